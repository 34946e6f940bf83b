package continuity

import (
	"context"
	"crypto/tls"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-imap/v2/imapclient"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/crypto/bcrypt"

	"github.com/mxq-dev/mxq/continuity/auth"
	"github.com/mxq-dev/mxq/continuity/internal/teststore"
	"github.com/mxq-dev/mxq/internal/testpki"
)

func options(t *testing.T) (Options, *testpki.CA) {
	t.Helper()
	h, _ := bcrypt.GenerateFromPassword([]byte("alice-pw"), 4)
	pw := filepath.Join(t.TempDir(), "passwd")
	os.WriteFile(pw, []byte("alice@example.test:{BLF-CRYPT}"+string(h)+"\n"), 0o600)
	pf, err := auth.OpenPasswdFile(pw, "", nil)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := testpki.NewCA("continuity test")
	leaf, _ := ca.Issue("127.0.0.1")
	st := teststore.New(t, 0)
	return Options{
		Store: st, Catalog: teststore.Catalog(t, st),
		IMAPListen: "127.0.0.1:0", WebListen: "127.0.0.1:0",
		TLS:  &tls.Config{Certificates: []tls.Certificate{leaf.Cert}},
		Auth: pf, Limits: auth.Limits{PerUser: 5, PerIP: 20, Window: time.Minute},
		Registerer: prometheus.NewRegistry(),
	}, ca
}

func TestServiceStatusAndMetrics(t *testing.T) {
	o, ca := options(t)
	reg := o.Registerer.(*prometheus.Registry)
	teststore.Enqueue(t, o.Store, teststore.Message("hi", "x"), "alice@example.test")
	ctx, cancel := context.WithCancel(context.Background())
	s, err := Start(ctx, o)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { cancel(); <-s.Done() }()
	<-s.Index().Ready()

	c, err := imapclient.DialTLS(s.Addrs().IMAP, &imapclient.Options{TLSConfig: &tls.Config{RootCAs: ca.Pool}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Login("alice@example.test", "wrong").Wait(); err == nil {
		t.Fatal("wrong password accepted")
	}
	if err := c.Login("alice@example.test", "alice-pw").Wait(); err != nil {
		t.Fatal(err)
	}
	st := s.Status()
	if !st.Enabled || st.Index.Messages != 1 || st.Sessions.IMAP != 1 || st.UsersSeen != 1 ||
		st.Logins["ok"] != 1 || st.Logins["failed"] != 1 || st.Listen.Web == "" {
		t.Fatalf("status %+v", st)
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	names := map[string]bool{}
	for _, mf := range mfs {
		names[mf.GetName()] = true
	}
	for _, n := range []string{"mxq_continuity_logins_total", "mxq_continuity_sessions", "mxq_continuity_indexed_messages", "mxq_continuity_users_seen"} {
		if !names[n] {
			t.Errorf("metric %s missing (have %v)", n, names)
		}
	}
}

// TestServicePortTaken: a listener that cannot open is an error, and
// nothing is left listening or registered.
func TestServicePortTaken(t *testing.T) {
	o, _ := options(t)
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	o.WebListen = taken.Addr().String()
	if _, err := Start(context.Background(), o); err == nil || !strings.Contains(err.Error(), "continuity web") {
		t.Fatalf("Start: %v", err)
	}
	// The metrics were unregistered: a second start can register them.
	o.WebListen = "127.0.0.1:0"
	ctx, cancel := context.WithCancel(context.Background())
	s, err := Start(ctx, o)
	if err != nil {
		t.Fatal(err)
	}
	cancel()
	<-s.Done()
}
