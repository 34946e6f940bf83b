package e2e

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/mxq-dev/mxq/internal/testbackend"
	"github.com/mxq-dev/mxq/internal/testpki"
)

// A three-node cluster as three processes on one machine, each on its own
// loopback address (127.0.0.1, .2, .3 all reach this host on Linux), with
// the NATS routes and raft over mutual TLS. Quicker than the Docker fault
// test, it checks the cluster's wiring: forming, replicated accept,
// commands forwarded from a follower to the leader, delivery by the leader.
func TestClusterTLSProcesses(t *testing.T) {
	if testing.Short() {
		t.Skip("cluster test")
	}
	// Loopback aliases must be bindable; they are on Linux.
	if ln, err := net.Listen("tcp", "127.0.0.3:0"); err != nil {
		t.Skipf("no 127.0.0.3: %v", err)
	} else {
		ln.Close()
	}
	ca, err := testpki.NewCA("mxq e2e cluster")
	if err != nil {
		t.Fatal(err)
	}
	be, err := testbackend.Start("127.0.0.1:0", testbackend.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer be.Close()
	raftPort, natsPort := freePortNum(t), freePortNum(t)
	var nodes []*mxqProc
	var admins []string
	for i := 1; i <= 3; i++ {
		ip := fmt.Sprintf("127.0.0.%d", i)
		leaf, err := ca.Issue(ip)
		if err != nil {
			t.Fatal(err)
		}
		dir := t.TempDir()
		cert, key, caFile, err := leaf.Write(dir, ca)
		if err != nil {
			t.Fatal(err)
		}
		admin := net.JoinHostPort(ip, fmt.Sprint(freePortNum(t)))
		admins = append(admins, "http://"+admin)
		smtpAddr := net.JoinHostPort(ip, fmt.Sprint(freePortNum(t)))
		cfg := fmt.Sprintf(`
node_name: n%d
data_dir: {{dir}}/data
smtp: {listen: "%s"}
admin: {listen: "%s", token: "%s"}
queue: {replicas: 3}
backends: {store: {address: "%s", start_rate: 100}}
cluster:
  peers: [127.0.0.1, 127.0.0.2, 127.0.0.3]
  advertise: %s
  bind: %s
  raft_port: %d
  nats_port: %d
  tls: {ca_file: "%s", cert_file: "%s", key_file: "%s"}
`, i, smtpAddr, admin, cliToken, be.Addr(), ip, ip, raftPort, natsPort, caFile, cert, key)
		nodes = append(nodes, startMxqAsync(t, cfg, smtpAddr))
	}
	for _, n := range nodes {
		n.waitSMTP(3 * time.Minute)
	}
	// A message through each node.
	var ids []string
	for _, n := range nodes {
		c, err := dial(n.smtp)
		if err != nil {
			t.Fatal(err)
		}
		id, err := sendOne(context.Background(), c, "a@example.org", []string{"b@example.test"}, []byte("Subject: tls cluster\r\n\r\nhi\r\n"))
		c.Quit()
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, id)
	}
	eventually(t, "three messages delivered by the leader", func() bool {
		for _, id := range ids {
			if delivered(be, id) != 1 {
				return false
			}
		}
		return true
	})
	// A command from any node reaches the leader: pause everywhere, seen
	// in every node's status.
	for i, admin := range admins {
		n := &cliNode{t: t, admin: admin}
		if i == 0 {
			n.ok("pause")
		}
		eventually(t, "pause replicated", func() bool {
			out, _, _ := n.mxq(cliToken, "status")
			return containsAny(out, "PAUSED")
		})
	}
	for _, n := range nodes {
		if err := n.stop(); err != nil {
			t.Errorf("stop: %v", err)
		}
	}
}

func freePortNum(t *testing.T) int {
	_, p, _ := net.SplitHostPort(freePort(t))
	var n int
	fmt.Sscan(p, &n)
	return n
}

// startMxqAsync writes config and starts mxq serve without waiting for
// its SMTP port (a cluster node waits for its peers).
func startMxqAsync(t *testing.T, config, smtpAddr string) *mxqProc {
	t.Helper()
	dir := t.TempDir()
	p := &mxqProc{t: t, dir: dir, smtp: smtpAddr, cfg: filepath.Join(dir, "mxq.yaml"), logPath: filepath.Join(dir, "mxq.log")}
	config = strings.ReplaceAll(config, "{{dir}}", dir)
	if err := os.WriteFile(p.cfg, []byte(config), 0o644); err != nil {
		t.Fatal(err)
	}
	p.launch()
	t.Cleanup(func() {
		p.stop()
		if t.Failed() {
			// Without raft's retries to a stopped peer and the per-message
			// lines, which would fill the tail.
			b, _ := os.ReadFile(p.logPath)
			var keep []string
			for _, l := range strings.Split(string(b), "\n") {
				if !containsAny(l, "failed to heartbeat", "failed to appendEntries", "msg=queued") {
					keep = append(keep, l)
				}
			}
			t.Logf("log of the node on %s:\n%s", smtpAddr, tail(strings.Join(keep, "\n"), 60))
		}
	})
	return p
}
