package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mxq-dev/mxq/internal/testbackend"
)

// The cluster fault tests run three mxq nodes as Docker containers of the
// image scripts/build-image.sh builds (no registry: FROM scratch and a
// static binary), on a private network, delivering to a capacity-limited
// LMTP store that this test runs on the network's gateway address.

const clusterToken = "cluster-e2e-token-0123456789"

// clusterSecret secures the containers' route and raft ports.
const clusterSecret = "cluster-e2e-secret-0123456789abcdef"

type dockerCluster struct {
	t       *testing.T
	id      string // unique suffix of names
	image   string
	network string
	gateway string
	nodes   []string // container names, index = node number
}

func docker(t testing.TB, args ...string) string {
	t.Helper()
	out, err := exec.Command("docker", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("docker %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return strings.TrimSpace(string(out))
}

func dockerQuiet(args ...string) error {
	return exec.Command("docker", args...).Run()
}

// newDockerCluster builds the image and creates the network.
func newDockerCluster(t *testing.T) *dockerCluster {
	t.Helper()
	need(t, "docker")
	if err := dockerQuiet("info"); err != nil {
		if os.Getenv("MXQ_E2E") == "require" {
			t.Fatalf("docker engine not reachable: %v", err)
		}
		t.Skipf("docker engine not reachable: %v", err)
	}
	c := &dockerCluster{t: t, id: fmt.Sprintf("%d", time.Now().UnixNano()%1e9)}
	c.image = "mxq:e2e-" + c.id
	cmd := exec.Command("../scripts/build-image.sh")
	cmd.Env = append(os.Environ(), "MXQ_IMAGE="+c.image)
	start := time.Now()
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("building the image: %v\n%s", err, out)
	}
	t.Logf("image %s built in %v", c.image, time.Since(start).Round(time.Second))
	c.network = "mxq-e2e-" + c.id
	docker(t, "network", "create", c.network)
	c.gateway = docker(t, "network", "inspect", "-f", "{{(index .IPAM.Config 0).Gateway}}", c.network)
	t.Cleanup(c.cleanup)
	return c
}

func (c *dockerCluster) cleanup() {
	for _, n := range c.nodes {
		if c.t.Failed() {
			out, err := exec.Command("docker", "logs", "--tail", "40", n).CombinedOutput()
			c.t.Logf("logs of %s (%v):\n%s", n, err, out)
		}
		dockerQuiet("rm", "-f", "-v", n)
	}
	dockerQuiet("network", "rm", c.network)
	dockerQuiet("rmi", c.image)
}

// start runs node i (mxq-i on the network).
func (c *dockerCluster) start(i int, backend string, extraEnv ...string) {
	c.t.Helper()
	name := fmt.Sprintf("mxq-%d-%s", i, c.id)
	host := fmt.Sprintf("mxq-%d", i)
	args := []string{"run", "-d", "--name", name, "--hostname", host, "--network", c.network, "--network-alias", host,
		"-e", "MXQ_NODE_NAME=" + host,
		"-e", "MXQ_CLUSTER_PEERS=mxq-0 mxq-1 mxq-2",
		// The cluster ports need credentials: TLS derived from a secret.
		"-e", "MXQ_CLUSTER_SECRET=" + clusterSecret,
		"-e", "MXQ_QUEUE_REPLICAS=3",
		"-e", "MXQ_BACKEND=lmtp://" + backend + "?rate=2000&concurrency=16",
		"-e", "MXQ_ADMIN_TOKEN=" + clusterToken,
		"-e", "MXQ_QUEUE_TIMEOUT=5s",
		"-e", "MXQ_DRAIN_RETRY_MIN=1s",
		"-e", "MXQ_DRAIN_RETRY_MAX=5s",
		"-e", "MXQ_DRAIN_PROBE_INTERVAL=500ms",
		"-e", "MXQ_SMTP_SHUTDOWN_GRACE=5s",
	}
	for _, e := range extraEnv {
		args = append(args, "-e", e)
	}
	args = append(args, c.image)
	docker(c.t, args...)
	for len(c.nodes) <= i {
		c.nodes = append(c.nodes, "")
	}
	c.nodes[i] = name
}

func (c *dockerCluster) ip(i int) string {
	return docker(c.t, "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", c.nodes[i])
}

// clusterStatus is the part of the admin status the test reads.
type clusterStatus struct {
	Node struct {
		Name     string `json:"name"`
		Role     string `json:"role"`
		Draining bool   `json:"draining"`
	} `json:"node"`
	Members []struct {
		ID     string `json:"id"`
		Leader bool   `json:"leader"`
	} `json:"members"`
	Queue struct {
		Messages uint64 `json:"messages"`
	} `json:"queue"`
	Backends []struct {
		Name    string  `json:"name"`
		Rate    float64 `json:"rate"`
		MaxRate float64 `json:"max_rate"`
		Circuit string  `json:"circuit"`
		Phase   string  `json:"phase"`
	} `json:"backends"`
}

func status(ip string) (*clusterStatus, error) {
	req, _ := http.NewRequest("GET", "http://"+net.JoinHostPort(ip, "8025")+"/api/v1/status", nil)
	req.Header.Set("Authorization", "Bearer "+clusterToken)
	cl := &http.Client{Timeout: 3 * time.Second}
	resp, err := cl.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		return nil, fmt.Errorf("status %d", resp.StatusCode)
	}
	var st clusterStatus
	return &st, json.NewDecoder(resp.Body).Decode(&st)
}

// leader returns the node number that runs the drain, asking the given
// nodes.
func (c *dockerCluster) leader(nodes ...int) (int, *clusterStatus) {
	for _, i := range nodes {
		st, err := status(c.ip(i))
		if err == nil && st.Node.Draining {
			return i, st
		}
	}
	return -1, nil
}

func waitUntil(t *testing.T, what string, d time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v: %s", d, what)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// TestClusterFaults is the cluster issue's proof: 5 000 messages over the
// three nodes while (a) the raft leader is SIGKILLed and later restarted,
// (b) a node is cut from the network for 20 s, (c) a node is stopped for
// good. Every message answered 250 must be delivered; the cluster keeps
// accepting with two nodes; with one it refuses with 451; after the leader
// is killed the new one starts from the replicated ramp state.
func TestClusterFaults(t *testing.T) {
	if testing.Short() {
		t.Skip("docker cluster test")
	}
	c := newDockerCluster(t)
	// The store takes 300 msg/s: the ramp settles there, far below the
	// 2000 msg/s ceiling, so "starts from the replicated state" is visible.
	be, err := testbackend.Start(net.JoinHostPort(c.gateway, "0"), testbackend.Options{Capacity: testbackend.Capacity{Rate: 300, Conns: 8}})
	if err != nil {
		t.Fatal(err)
	}
	defer be.Close()
	for i := 0; i < 3; i++ {
		c.start(i, be.Addr())
	}
	all := []int{0, 1, 2}
	waitUntil(t, "a leader that drains", 3*time.Minute, func() bool { l, _ := c.leader(all...); return l >= 0 })
	up := map[int]bool{0: true, 1: true, 2: true}
	var upMu sync.Mutex
	alive := func() []int {
		upMu.Lock()
		defer upMu.Unlock()
		var out []int
		for i, ok := range up {
			if ok {
				out = append(out, i)
			}
		}
		return out
	}
	setUp := func(i int, ok bool) {
		upMu.Lock()
		up[i] = ok
		upMu.Unlock()
	}
	ips := map[int]string{0: c.ip(0), 1: c.ip(1), 2: c.ip(2)}

	// The load: 8 sessions send 5 000 messages, each to a node that is up,
	// moving to another on any failure, as an MTA would with several MX.
	const total = 5000
	var (
		mu    sync.Mutex
		acked = map[string]bool{}
		sent  atomic.Int64
	)
	work := make(chan int, total)
	for i := 0; i < total; i++ {
		work <- i
	}
	close(work)
	// The last thousand messages wait for fault (c), so that they prove
	// the cluster accepts with two nodes of three.
	const holdBack = total - 1000
	gate := make(chan struct{})
	var wg sync.WaitGroup
	loadStart := time.Now()
	for s := 0; s < 8; s++ {
		wg.Add(1)
		go func(s int) {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(s), 7))
			for i := range work {
				if i >= holdBack {
					<-gate
				}
				msg := []byte(fmt.Sprintf("Subject: cluster %d\r\nMessage-ID: <%d.cluster@example.org>\r\n\r\nbody %d\r\n", i, i, i))
				for attempt := 0; ; attempt++ {
					nodes := alive()
					node := nodes[rng.IntN(len(nodes))]
					cl, err := dial(net.JoinHostPort(ips[node], "2525"))
					if err == nil {
						var id string
						id, err = sendOne(context.Background(), cl, "sender@example.org", []string{fmt.Sprintf("u%d@example.test", i%50)}, msg)
						cl.Close()
						if err == nil {
							mu.Lock()
							acked[id] = true
							mu.Unlock()
							sent.Add(1)
							break
						}
					}
					if attempt > 300 {
						t.Errorf("message %d never accepted: %v", i, err)
						return
					}
					time.Sleep(100 * time.Millisecond)
				}
			}
		}(s)
	}

	// (a) SIGKILL the raft leader once the ramp has settled; measure the
	// failover and check the new leader's starting rate.
	waitUntil(t, "1000 messages accepted", 2*time.Minute, func() bool { return sent.Load() >= 1000 })
	lastLog := time.Now()
	waitUntil(t, "ramp settled near the store's capacity", 2*time.Minute, func() bool {
		l, st := c.leader(alive()...)
		if time.Since(lastLog) > 5*time.Second && st != nil {
			lastLog = time.Now()
			t.Logf("leader mxq-%d: %+v; store accepted %d, stats %+v", l, st.Backends, be.Count(), be.Stats())
		}
		return st != nil && len(st.Backends) > 0 && st.Backends[0].Rate >= 100
	})
	time.Sleep(3 * time.Second) // let the ramp state be persisted (every 2 s)
	old, st := c.leader(alive()...)
	if old < 0 {
		t.Fatal("no leader before the kill")
	}
	rateBefore := st.Backends[0].Rate
	var persisted float64
	for _, i := range alive() {
		if i == old {
			continue
		}
		if fs, err := status(ips[i]); err == nil && len(fs.Backends) > 0 {
			persisted = fs.Backends[0].Rate // a follower shows the replicated ramp
		}
	}
	deliveredBefore := be.Count()
	killAt := time.Now()
	docker(t, "kill", "-s", "KILL", c.nodes[old])
	setUp(old, false)
	t.Logf("(a) killed the leader mxq-%d (allowed rate %.0f/s, replicated %.0f/s)", old, rateBefore, persisted)
	var newLeader int
	var newRate float64
	waitUntil(t, "a new leader drains", time.Minute, func() bool {
		l, st := c.leader(alive()...)
		if l < 0 || l == old {
			return false
		}
		newLeader, newRate = l, st.Backends[0].Rate
		return true
	})
	t.Logf("new leader mxq-%d starts at %.0f/s (replicated state %.0f/s, start rate 5/s, ceiling 2000/s)", newLeader, newRate, persisted)
	// The replicated rate must stand clear of the start rate (5/s) for
	// the check to mean anything: 20/s at least (under load in CI the ramp
	// was at 42/s when the leader was killed).
	if persisted < 20 || newRate < 0.5*persisted || newRate > 2*persisted {
		t.Errorf("after failover the rate is %.0f/s: it should start from the replicated %.0f/s, not from the bottom or the ceiling", newRate, persisted)
	}
	waitUntil(t, "deliveries resume", time.Minute, func() bool { return be.Count() > deliveredBefore+50 })
	t.Logf("failover: leader killed → deliveries resume in %v", time.Since(killAt).Round(100*time.Millisecond))

	// (b) partition a node for 20 s.
	time.Sleep(5 * time.Second)
	docker(t, "start", c.nodes[old])
	ips[old] = c.ip(old)
	waitUntil(t, "the killed node is back", 2*time.Minute, func() bool { _, err := status(ips[old]); return err == nil })
	setUp(old, true)
	t.Logf("(a) restarted mxq-%d", old)
	part := (old + 1) % 3
	docker(t, "network", "disconnect", c.network, c.nodes[part])
	setUp(part, false)
	t.Logf("(b) partitioned mxq-%d for 20 s", part)
	time.Sleep(20 * time.Second)
	docker(t, "network", "connect", "--alias", fmt.Sprintf("mxq-%d", part), c.network, c.nodes[part])
	ips[part] = c.ip(part)
	setUp(part, true)
	t.Logf("(b) reconnected mxq-%d", part)

	// (c) stop a node for good; the two others keep accepting.
	waitUntil(t, "the first 4000 messages accepted", 3*time.Minute, func() bool { return sent.Load() >= holdBack })
	gone := (old + 2) % 3
	docker(t, "kill", "-s", "KILL", c.nodes[gone])
	setUp(gone, false)
	before := sent.Load()
	t.Logf("(c) stopped mxq-%d for good with %d messages accepted", gone, before)
	close(gate)
	wg.Wait()
	if sent.Load() != total {
		t.Fatalf("%d of %d messages accepted", sent.Load(), total)
	}
	t.Logf("accepted %d messages in %v; %d after a node was lost for good", total, time.Since(loadStart).Round(time.Second), total-int(before))
	if total-int(before) < 1000 {
		t.Fatalf("only %d messages accepted after the loss of a node", total-int(before))
	}

	// Everything answered 250 is delivered.
	waitUntil(t, "all acknowledged messages delivered", 5*time.Minute, func() bool {
		seen := map[string]bool{}
		for _, d := range be.Deliveries() {
			seen[d.QueueID] = true
		}
		for id := range acked {
			if !seen[id] {
				return false
			}
		}
		return true
	})
	time.Sleep(2 * time.Second)
	count := map[string]int{}
	for _, d := range be.Deliveries() {
		count[d.QueueID]++
	}
	lost, dups := 0, 0
	for id := range acked {
		if count[id] == 0 {
			lost++
		}
	}
	for _, n := range count {
		if n > 1 {
			dups += n - 1
		}
	}
	t.Logf("RESULT lost=%d duplicates=%d (of %d acknowledged); store overload replies %d", lost, dups, len(acked), be.Stats().Overloads())
	if lost != 0 {
		t.Fatalf("%d acknowledged messages lost", lost)
	}

	// One node of three: no quorum, so no 250.
	remaining := alive()
	docker(t, "kill", "-s", "KILL", c.nodes[remaining[0]])
	last := remaining[1]
	cl, err := dial(net.JoinHostPort(ips[last], "2525"))
	if err != nil {
		t.Fatalf("the last node does not take connections: %v", err)
	}
	_, err = sendOne(context.Background(), cl, "sender@example.org", []string{"u@example.test"}, []byte("Subject: alone\r\n\r\nx\r\n"))
	cl.Close()
	if err == nil || !strings.Contains(err.Error(), "451") {
		t.Fatalf("a lone node accepted a message it cannot replicate (err %v)", err)
	}
	t.Logf("one node of three refuses: %v", err)
}
