package e2e

import (
	"context"
	"fmt"
	"net"
	"strconv"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/mxq-dev/mxq/internal/testbackend"
)

// With nats.url, mxq uses an existing NATS server instead of its embedded
// one: here a real nats-server with JetStream and a password, in this test
// process, on a loopback port.
func TestExternalNATS(t *testing.T) {
	addr := freePort(t)
	host, p, _ := net.SplitHostPort(addr)
	port, _ := strconv.Atoi(p)
	ns, err := server.NewServer(&server.Options{
		Host: host, Port: port, JetStream: true, StoreDir: t.TempDir(), SyncAlways: true,
		Username: "mxq", Password: "s3cret-pass", NoSigs: true, MaxPayload: 8 << 20,
	})
	if err != nil {
		t.Fatal(err)
	}
	ns.Start()
	defer func() { ns.Shutdown(); ns.WaitForShutdown() }()
	if !ns.ReadyForConnections(10 * time.Second) {
		t.Fatal("nats-server not ready")
	}
	be, err := testbackend.Start("127.0.0.1:0", testbackend.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer be.Close()
	url := fmt.Sprintf("nats://mxq:s3cret-pass@%s", addr)
	m := startMxq(t, fmt.Sprintf(`
data_dir: {{dir}}/data
smtp: {listen: "{{smtp}}"}
admin: {listen: ""}
nats: {url: "%s"}
backends: {store: {address: "%s", start_rate: 200}}
`, url, be.Addr()))

	c, err := dial(m.smtp)
	if err != nil {
		t.Fatal(err)
	}
	id, err := sendOne(context.Background(), c, "a@example.org", []string{"b@example.test"}, []byte("Subject: via external NATS\r\n\r\nhi\r\n"))
	c.Quit()
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "delivered", func() bool { return delivered(be, id) == 1 })

	// The queue really lives in that server.
	nc, err := nats.Connect(url)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, _ := jetstream.New(nc)
	st, err := js.Stream(context.Background(), "MXQ")
	if err != nil {
		t.Fatalf("stream MXQ in the external server: %v", err)
	}
	if info := st.CachedInfo(); info.State.LastSeq == 0 {
		t.Fatalf("the external stream saw no message: %+v", info.State)
	}
	// The wrong password is refused at start-up, with a clear error.
	bad := startMxqFails(t, fmt.Sprintf(`
data_dir: {{dir}}/data
smtp: {listen: "{{smtp}}"}
admin: {listen: ""}
nats: {url: "nats://mxq:wrong@%s"}
`, addr))
	if !containsAny(bad, "Authorization Violation", "authorization") {
		t.Fatalf("wrong password: %s", bad)
	}
}
