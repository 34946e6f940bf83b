package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/mxq-dev/mxq/internal/clustercred"
	"github.com/mxq-dev/mxq/internal/testbackend"
	"github.com/mxq-dev/mxq/internal/testpki"
)

// loopbackCluster is three mxq processes on one machine, each on its own
// loopback address (127.0.0.1, .2, .3 all reach this host on Linux).
type loopbackCluster struct {
	nodes    []*mxqProc
	admins   []string
	be       *testbackend.Server
	natsPort int
}

// startLoopbackCluster starts the three nodes; creds gives each node's
// cluster credentials as YAML lines under cluster:.
func startLoopbackCluster(t *testing.T, creds func(i int, ip string) string) *loopbackCluster {
	t.Helper()
	if testing.Short() {
		t.Skip("cluster test")
	}
	// Loopback aliases must be bindable; they are on Linux.
	if ln, err := net.Listen("tcp", "127.0.0.3:0"); err != nil {
		t.Skipf("no 127.0.0.3: %v", err)
	} else {
		ln.Close()
	}
	be, err := testbackend.Start("127.0.0.1:0", testbackend.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(be.Close)
	c := &loopbackCluster{be: be}
	raftPort, natsPort := freePortNum(t), freePortNum(t)
	c.natsPort = natsPort
	for i := 1; i <= 3; i++ {
		ip := fmt.Sprintf("127.0.0.%d", i)
		admin := net.JoinHostPort(ip, fmt.Sprint(freePortNum(t)))
		c.admins = append(c.admins, "http://"+admin)
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
%s
`, i, smtpAddr, admin, cliToken, be.Addr(), ip, ip, raftPort, natsPort, creds(i, ip))
		c.nodes = append(c.nodes, startMxqAsync(t, cfg, smtpAddr))
	}
	for _, n := range c.nodes {
		n.waitSMTP(3 * time.Minute)
	}
	return c
}

// check sends a message through each node and waits for the leader to
// deliver them; then pauses the drain through node 1 and waits until
// every node's status says so: commands forwarded to the leader.
func (c *loopbackCluster) check(t *testing.T) {
	t.Helper()
	var ids []string
	for _, n := range c.nodes {
		cl, err := dial(n.smtp)
		if err != nil {
			t.Fatal(err)
		}
		id, err := sendOne(context.Background(), cl, "a@example.org", []string{"b@example.test"}, []byte("Subject: cluster\r\n\r\nhi\r\n"))
		cl.Quit()
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, id)
	}
	// A cluster that has just formed first elects its leaders and creates
	// the stream (retried every 10 s while the routes come up): with other
	// packages' tests on the same two cores that took over 20 s once in CI.
	waitUntil(t, "three messages delivered by the leader", 90*time.Second, func() bool {
		for _, id := range ids {
			if delivered(c.be, id) < 1 {
				return false
			}
		}
		return true
	})
	// No fault was injected: each once, not more.
	for _, id := range ids {
		if n := delivered(c.be, id); n != 1 {
			t.Errorf("%s delivered %d times, want 1", id, n)
		}
	}
	for i, admin := range c.admins {
		n := &cliNode{t: t, admin: admin}
		if i == 0 {
			n.ok("pause")
		}
		eventually(t, "pause replicated", func() bool {
			out, _, _ := n.mxq(cliToken, "status")
			return containsAny(out, "PAUSED")
		})
	}
}

func (c *loopbackCluster) stop(t *testing.T) {
	for _, n := range c.nodes {
		if err := n.stop(); err != nil {
			t.Errorf("stop: %v", err)
		}
	}
}

// queued is the number of messages in the queue, from node i's status.
func (c *loopbackCluster) queued(t *testing.T, i int) uint64 {
	t.Helper()
	req, _ := http.NewRequest("GET", c.admins[i]+"/api/v1/status", nil)
	req.Header.Set("Authorization", "Bearer "+cliToken)
	resp, err := (&http.Client{Timeout: 5 * time.Second}).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var st clusterStatus
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
		t.Fatal(err)
	}
	return st.Queue.Messages
}

// The cluster's wiring with the routes and raft over mutual TLS from a
// private PKI: forming, replicated accept, commands forwarded from a
// follower to the leader, delivery by the leader.
func TestClusterTLSProcesses(t *testing.T) {
	ca, err := testpki.NewCA("mxq e2e cluster")
	if err != nil {
		t.Fatal(err)
	}
	c := startLoopbackCluster(t, func(i int, ip string) string {
		leaf, err := ca.Issue(ip)
		if err != nil {
			t.Fatal(err)
		}
		cert, key, caFile, err := leaf.Write(t.TempDir(), ca)
		if err != nil {
			t.Fatal(err)
		}
		return fmt.Sprintf("  tls: {ca_file: %q, cert_file: %q, key_file: %q}", caFile, cert, key)
	})
	c.check(t)
	c.stop(t)
}

// The same cluster secured by cluster.secret, and a stranger: a stock
// nats-server with JetStream routed to the nodes' route ports, once without
// TLS and once with TLS derived from another secret. It never becomes a
// route peer, its JetStream never sees the queue's stream, and what it
// publishes on the queue's subjects never reaches the queue. A stranger
// given the secret does join and its messages are stored: the checks can
// fail.
func TestClusterSecretProcesses(t *testing.T) {
	secret := "e2e-cluster-secret-0123456789abcdef"
	var secretFile string
	c := startLoopbackCluster(t, func(i int, ip string) string {
		if i == 3 {
			// The file form, with an earlier secret still accepted.
			secretFile = filepath.Join(t.TempDir(), "secret")
			if err := os.WriteFile(secretFile, []byte(secret+"\n"+strings.Repeat("o", 40)+"\n"), 0o600); err != nil {
				t.Fatal(err)
			}
			return "  secret_file: " + secretFile
		}
		return "  secret: " + secret
	})
	c.check(t)
	// The drain is paused: a message sent now stays queued.
	cl, err := dial(c.nodes[1].smtp)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := sendOne(context.Background(), cl, "a@example.org", []string{"b@example.test"}, []byte("Subject: held\r\n\r\nhi\r\n")); err != nil {
		t.Fatal(err)
	}
	cl.Quit()
	eventually(t, "one message queued", func() bool { return c.queued(t, 0) == 1 })

	other, err := clustercred.FromSecrets([][]byte{[]byte("a-stranger-has-another-secret-0123456789")}, "127.0.0.9", time.Now())
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range []struct {
		name string
		tls  *clustercred.Source
	}{
		{"without TLS", nil},
		{"with another secret", clustercred.Static(other)},
	} {
		t.Run(s.name, func(t *testing.T) {
			srv := startStranger(t, []string{"127.0.0.1", "127.0.0.2", "127.0.0.3"}, c.natsPort, s.tls, true)
			nc, err := nats.Connect("", nats.InProcessServer(srv))
			if err != nil {
				t.Fatal(err)
			}
			defer nc.Close()
			// Publish on the queue's subjects while the route is tried.
			deadline := time.Now().Add(8 * time.Second)
			for time.Now().Before(deadline) {
				if err := nc.Publish("mxq.q.store", []byte("from a stranger")); err != nil {
					t.Fatal(err)
				}
				nc.Flush()
				time.Sleep(250 * time.Millisecond)
			}
			if n := srv.NumRoutes(); n != 0 {
				t.Fatalf("the stranger has %d routes", n)
			}
			if rz, err := srv.Routez(nil); err != nil || rz.NumRoutes != 0 {
				t.Fatalf("routez: %+v, %v", rz, err)
			}
			js, err := jetstream.New(nc)
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			if _, err := js.Stream(ctx, "MXQ"); err == nil {
				t.Fatal("the stranger's JetStream sees the stream MXQ")
			} else if !errors.Is(err, jetstream.ErrStreamNotFound) {
				t.Logf("stream MXQ on the stranger: %v", err)
			}
			if n := c.queued(t, 0); n != 1 {
				t.Fatalf("queue has %d messages, want the 1 held", n)
			}
		})
	}

	// Rotation without restart: node 3's file gets a new secret first,
	// the old one below it. Within its poll, a server that has only the
	// new secret routes to node 3.
	newSecret := "e2e-rotated-secret-abcdef0123456789"
	if err := os.WriteFile(secretFile, []byte(newSecret+"\n"+secret+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	rotated, err := clustercred.FromSecrets([][]byte{[]byte(newSecret)}, "127.0.0.9", time.Now())
	if err != nil {
		t.Fatal(err)
	}
	func() {
		srv := startStranger(t, []string{"127.0.0.3"}, c.natsPort, clustercred.Static(rotated), false)
		defer srv.Shutdown()
		deadline := time.Now().Add(time.Minute)
		for srv.NumRoutes() == 0 {
			if time.Now().After(deadline) {
				t.Fatal("a server with the new secret did not route to node 3 after its file was rotated")
			}
			time.Sleep(200 * time.Millisecond)
		}
	}()

	// The control: a stranger with the secret joins, and what it
	// publishes on the queue's subjects is stored, as from any stranger
	// before credentials. (Without JetStream of its own: a fourth
	// JetStream peer would stay in the cluster's meta group. Routed to
	// every node: a message crosses one route only, so it must reach the
	// stream's leader directly, whichever node that is.)
	mine, err := clustercred.FromSecrets([][]byte{[]byte(secret)}, "127.0.0.9", time.Now())
	if err != nil {
		t.Fatal(err)
	}
	srv := startStranger(t, []string{"127.0.0.1", "127.0.0.2", "127.0.0.3"}, c.natsPort, clustercred.Static(mine), false)
	eventually(t, "a server with the secret routed to the cluster", func() bool { return srv.NumRoutes() > 0 })
	nc, err := nats.Connect("", nats.InProcessServer(srv))
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if t.Failed() {
			rz, _ := srv.Routez(nil)
			for _, r := range rz.Routes {
				t.Logf("the control's route: %s %s:%d subs %d", r.RemoteName, r.IP, r.Port, r.NumSubs)
			}
		}
	}()
	eventually(t, "a message through the server with the secret stored in the queue", func() bool {
		nc.Publish("mxq.q.store", []byte("through a peer with the secret"))
		nc.Flush()
		time.Sleep(200 * time.Millisecond)
		return c.queued(t, 0) > 1
	})
	nc.Close()
	srv.Shutdown()
	srv.WaitForShutdown()
	c.stop(t)
}

// startStranger starts a nats-server in this process, in mxq's NATS
// cluster name, with routes to natsPort on hosts.
func startStranger(t *testing.T, hosts []string, natsPort int, creds *clustercred.Source, js bool) *server.Server {
	t.Helper()
	var routes []*url.URL
	for _, h := range hosts {
		u, _ := url.Parse(fmt.Sprintf("nats://%s:%d", h, natsPort))
		routes = append(routes, u)
	}
	opts := &server.Options{
		ServerName: fmt.Sprintf("stranger-%d", time.Now().UnixNano()),
		Host:       "127.0.0.1", Port: server.RANDOM_PORT,
		JetStream: js, StoreDir: t.TempDir(),
		NoSigs: true, NoLog: true,
		Cluster: server.ClusterOpts{Name: "mxq", Host: "127.0.0.9", Port: server.RANDOM_PORT},
		Routes:  routes,
	}
	if creds != nil {
		opts.Cluster.TLSConfig = creds.Config()
		opts.Cluster.TLSTimeout = 5
	}
	srv, err := server.NewServer(opts)
	if err != nil {
		t.Fatal(err)
	}
	srv.Start()
	if !srv.ReadyForConnections(30 * time.Second) {
		t.Fatal("stranger not ready")
	}
	t.Cleanup(func() {
		srv.Shutdown()
		srv.WaitForShutdown()
	})
	return srv
}

// A cluster without credentials is refused: exit code 2 and a message
// naming cluster.secret; with cluster.insecure: true the node starts and
// warns, naming its open ports.
func TestClusterNeedsCredentials(t *testing.T) {
	raftPort, natsPort := freePortNum(t), freePortNum(t)
	base := fmt.Sprintf(`
node_name: n1
data_dir: {{dir}}/data
smtp: {listen: "{{smtp}}"}
admin: {listen: ""}
queue: {replicas: 3}
cluster:
  peers: [127.0.0.1, 127.0.0.2, 127.0.0.3]
  advertise: 127.0.0.1
  bind: 127.0.0.1
  raft_port: %d
  nats_port: %d
`, raftPort, natsPort)
	dir := t.TempDir()
	cfg := filepath.Join(dir, "mxq.yaml")
	if err := os.WriteFile(cfg, []byte(strings.NewReplacer("{{smtp}}", freePort(t), "{{dir}}", dir).Replace(base)), 0o644); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, mxqBin, "serve", "--config", cfg).CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 2 {
		t.Fatalf("exit: %v, want code 2; output:\n%s", err, out)
	}
	for _, want := range []string{"cluster.secret", "cluster.tls", "cluster.insecure"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("the error does not name %s:\n%s", want, out)
		}
	}

	// Insecure: it starts (it waits for its peers, which never come) and
	// says which ports are open.
	smtpAddr := freePort(t)
	p := startMxqAsync(t, strings.ReplaceAll(base, "{{smtp}}", smtpAddr)+"  insecure: true\n", smtpAddr)
	var log string
	deadline := time.Now().Add(time.Minute)
	for time.Now().Before(deadline) {
		b, _ := os.ReadFile(p.logPath)
		if log = string(b); strings.Contains(log, "cluster.insecure") {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	for _, want := range []string{"level=WARN", "cluster.insecure", fmt.Sprintf("127.0.0.1:%d", natsPort), fmt.Sprintf("127.0.0.1:%d", raftPort)} {
		if !strings.Contains(log, want) {
			t.Fatalf("no %q in the log:\n%s", want, tail(log, 20))
		}
	}
	// Started: its route port takes connections. (Raft opens after the
	// queue's stream, which needs a quorum this lone node never gets.)
	addr := fmt.Sprintf("127.0.0.1:%d", natsPort)
	eventually(t, "the insecure node listens on "+addr, func() bool {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
		}
		return err == nil
	})
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
		if dir := os.Getenv("MXQ_E2E_LOGS"); dir != "" && t.Failed() {
			// The whole log, for a failure the tail does not explain.
			if b, err := os.ReadFile(p.logPath); err == nil {
				name := strings.NewReplacer(":", "_", "/", "_").Replace(t.Name() + "-" + smtpAddr)
				_ = os.WriteFile(filepath.Join(dir, name+".log"), b, 0o644)
			}
		}
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
