package raftstore

import (
	"context"
	"errors"
	"fmt"
	"io"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/raft"

	"github.com/mxq-dev/mxq/internal/clustercred"
	"github.com/mxq-dev/mxq/internal/testpki"
)

// cluster runs n nodes in this process over real TCP on loopback. Forward
// goes straight to the target node's ApplyEncoded, as the NATS request/reply
// wiring does; a node that is down answers like "no responders", i.e. as a
// node that is not the leader.
type cluster struct {
	t     *testing.T
	mu    sync.Mutex
	nodes map[string]*Store
	opts  map[string]Options
	ids   []string
}

func newCluster(t *testing.T, n int, tweak func(*Options)) *cluster {
	c := &cluster{t: t, nodes: map[string]*Store{}, opts: map[string]Options{}}
	addrs := freeAddrs(t, n)
	var peers []Peer
	for i := range n {
		id := fmt.Sprintf("n%d", i+1)
		c.ids = append(c.ids, id)
		peers = append(peers, Peer{ID: id, Addr: addrs[i]})
	}
	for i, id := range c.ids {
		o := testOptions(id, t.TempDir(), addrs[i])
		o.Peers = peers
		o.Forward = c.forward
		if tweak != nil {
			tweak(&o)
		}
		c.opts[id] = o
	}
	t.Cleanup(func() {
		c.mu.Lock()
		defer c.mu.Unlock()
		for _, s := range c.nodes {
			s.Close()
		}
	})
	return c
}

func (c *cluster) forward(ctx context.Context, leaderID string, cmd []byte) error {
	s := c.node(leaderID)
	if s == nil {
		return fmt.Errorf("%w: %s is down", ErrNotLeader, leaderID)
	}
	return s.ApplyEncoded(ctx, cmd)
}

func (c *cluster) node(id string) *Store {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.nodes[id]
}

func (c *cluster) running() []*Store {
	c.mu.Lock()
	defer c.mu.Unlock()
	var ss []*Store
	for _, id := range c.ids {
		if s := c.nodes[id]; s != nil {
			ss = append(ss, s)
		}
	}
	return ss
}

func (c *cluster) start(id string) *Store {
	c.t.Helper()
	s, err := Open(c.t.Context(), c.opts[id])
	if err != nil {
		c.t.Fatalf("open %s: %v", id, err)
	}
	c.mu.Lock()
	c.nodes[id] = s
	c.mu.Unlock()
	return s
}

// kill stops a node hard: no leadership hand-over, no leave; its peers only
// notice that it stopped answering.
func (c *cluster) kill(id string) {
	c.t.Helper()
	c.mu.Lock()
	s := c.nodes[id]
	delete(c.nodes, id)
	c.mu.Unlock()
	s.closed.Do(func() { s.err = s.shutdown(false) })
	if s.err != nil {
		c.t.Errorf("kill %s: %v", id, s.err)
	}
}

// leader waits until one running node is a ready leader and every running
// node knows it.
func (c *cluster) leader(d time.Duration) *Store {
	c.t.Helper()
	var leader *Store
	waitFor(c.t, d, "a leader known to all", func() bool {
		leader = nil
		ss := c.running()
		for _, s := range ss {
			if s.IsLeader() {
				leader = s
			}
		}
		if leader == nil {
			return false
		}
		for _, s := range ss {
			if id, _ := s.Leader(); id != leader.o.NodeID {
				return false
			}
		}
		return true
	})
	return leader
}

func (c *cluster) follower(leader *Store) *Store {
	for _, s := range c.running() {
		if s != leader {
			return s
		}
	}
	c.t.Fatal("no follower")
	return nil
}

// converged waits until every running node has the leader's state.
func (c *cluster) converged(leader *Store, d time.Duration) {
	c.t.Helper()
	want := leader.State()
	waitFor(c.t, d, fmt.Sprintf("all nodes at index %d", want.Index), func() bool {
		for _, s := range c.running() {
			if s.State().Index != want.Index {
				return false
			}
		}
		return true
	})
	for _, s := range c.running() {
		if got := s.State(); !reflect.DeepEqual(plain(got), plain(want)) {
			c.t.Errorf("%s state\n got %+v\nwant %+v", s.o.NodeID, plain(got), plain(want))
		}
	}
}

func TestClusterFailover(t *testing.T) {
	c := newCluster(t, 3, func(o *Options) {
		// Small enough that the node restarted below is behind the leader's
		// compacted log and must be sent a snapshot.
		o.SnapshotThreshold, o.TrailingLogs, o.SnapshotInterval = 16, 4, 50*time.Millisecond
	})
	start := time.Now()
	for _, id := range c.ids {
		if s := c.start(id); !s.bootstrapped {
			t.Errorf("%s did not bootstrap on first start", id)
		}
	}
	leader := c.leader(5 * time.Second)
	t.Logf("first leader %s after %v", leader.o.NodeID, time.Since(start))
	if ms := leader.Members(); len(ms) != 3 {
		t.Errorf("Members() = %+v", ms)
	}

	ctx := ctxTimeout(t, 15*time.Second)
	f := c.follower(leader)
	sub, unsub := f.Subscribe()
	defer unsub()
	// Through a follower: forwarded to the leader.
	for _, cmd := range []Command{
		{Op: OpPause, Route: "store", By: "f"},
		{Op: OpHold, IDs: []string{"A", "B", "C"}, By: "f", Reason: "why"},
		{Op: OpSetRamp, Route: "store", Ramp: &Ramp{Rate: 5, Concurrency: 2, Phase: "slow_start", Updated: time.Now()}},
	} {
		if err := f.Apply(ctx, cmd); err != nil {
			t.Fatalf("Apply %s via follower %s: %v", cmd.Op, f.o.NodeID, err)
		}
	}
	// The leader applied before Apply returned; followers follow.
	if st := leader.State(); !st.Held("B") || !st.RoutePaused("store") {
		t.Fatalf("leader state after forwarded applies: %+v", st)
	}
	c.converged(leader, 5*time.Second)
	if !signalled(sub, time.Second) {
		t.Error("follower not signalled after apply")
	}
	if err := f.Apply(ctx, Command{Op: OpHold}); !errors.Is(err, ErrInvalidCommand) {
		t.Errorf("bad command via follower: %v, want ErrInvalidCommand", err)
	}
	b, _ := encodeCommand(&Command{Op: OpPause})
	if err := f.ApplyEncoded(ctx, b); !errors.Is(err, ErrNotLeader) {
		t.Errorf("ApplyEncoded on a follower: %v, want ErrNotLeader", err)
	}

	// Kill the leader: a new one is elected and has everything.
	before := leader.State()
	old := leader.o.NodeID
	oldLast := leader.raft.LastIndex()
	killed := time.Now()
	c.kill(old)
	leader = c.leader(5 * time.Second)
	t.Logf("new leader %s %v after killing %s", leader.o.NodeID, time.Since(killed), old)
	if leader.o.NodeID == old {
		t.Fatal("the killed node is still the leader")
	}
	if got := leader.State(); !reflect.DeepEqual(plain(got), plain(before)) {
		t.Errorf("state after failover\n got %+v\nwant %+v", plain(got), plain(before))
	}

	// Two of three keep working, through either node, past the old
	// node's last log index and its snapshot threshold.
	f = c.follower(leader)
	for i := range 40 {
		s := leader
		if i%2 == 1 {
			s = f
		}
		cmd := Command{Op: OpHold, IDs: []string{fmt.Sprintf("H%02d", i)}, By: s.o.NodeID}
		if i%5 == 0 {
			cmd = Command{Op: OpResetRamp, Route: "store"}
		}
		if err := s.Apply(ctx, cmd); err != nil {
			t.Fatalf("Apply %d with 2 of 3 via %s: %v", i, s.o.NodeID, err)
		}
	}
	if err := f.Apply(ctx, Command{Op: OpRelease, IDs: []string{"A"}}); err != nil {
		t.Fatal(err)
	}
	c.converged(leader, 5*time.Second)
	waitFor(t, 5*time.Second, "the leader to compact its log past the killed node", func() bool {
		first, _ := leader.bolt.FirstIndex()
		return first > oldLast+1
	})

	// The old node comes back from its directory: no bootstrap, and it
	// catches up from the leader's snapshot.
	back := c.start(old)
	if back.bootstrapped {
		t.Errorf("%s bootstrapped again on restart", old)
	}
	c.converged(leader, 5*time.Second)
	if snaps, _ := back.snaps.List(); len(snaps) == 0 || snaps[0].Index <= oldLast {
		t.Errorf("restarted node has no snapshot past index %d: %+v", oldLast, snaps)
	}
	if !back.State().Held("H39") || back.State().Held("A") || back.State().Route("store").ResetSeq != 8 {
		t.Errorf("restarted node's state: %+v", back.State())
	}
	if id, _ := back.Leader(); id != leader.o.NodeID {
		t.Errorf("restarted node follows %q, want %s", id, leader.o.NodeID)
	}

	// With one of three, nothing can commit: Apply fails instead of
	// succeeding, on what was the leader as on a follower.
	last := c.running()[0]
	for _, s := range c.running()[1:] {
		c.kill(s.o.NodeID)
	}
	want := last.State()
	fctx, cancel := context.WithTimeout(t.Context(), time.Second)
	defer cancel()
	start = time.Now()
	err := last.Apply(fctx, Command{Op: OpResume, Route: "store"})
	if err == nil {
		t.Fatal("Apply succeeded with 1 of 3 nodes")
	}
	t.Logf("Apply with 1 of 3 failed after %v: %v", time.Since(start), err)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Apply with 1 of 3: %v, want a deadline error", err)
	}
	if got := last.State(); got != want || last.IsLeader() {
		t.Errorf("state changed or still leader with 1 of 3 (leader %v)", last.IsLeader())
	}
}

// TestClusterWipedNode restarts a node with an empty directory after the
// cluster moved on: it bootstraps with the same configuration and still
// joins, with the cluster's state.
func TestClusterWipedNode(t *testing.T) {
	c := newCluster(t, 3, nil)
	for _, id := range c.ids {
		c.start(id)
	}
	leader := c.leader(5 * time.Second)
	ctx := ctxTimeout(t, 10*time.Second)
	for i := range 5 {
		if err := leader.Apply(ctx, Command{Op: OpHold, IDs: []string{fmt.Sprint(i)}}); err != nil {
			t.Fatal(err)
		}
	}
	f := c.follower(leader)
	id := f.o.NodeID
	c.kill(id)
	if err := leader.Apply(ctx, Command{Op: OpPause}); err != nil {
		t.Fatal(err)
	}
	o := c.opts[id]
	o.Dir = t.TempDir()
	c.opts[id] = o
	if s := c.start(id); !s.bootstrapped {
		t.Error("a wiped node did not bootstrap")
	}
	c.converged(leader, 5*time.Second)
	if id, _ := c.node(o.NodeID).Leader(); id != leader.o.NodeID {
		t.Errorf("wiped node follows %q, want %s", id, leader.o.NodeID)
	}
	if l := c.leader(time.Second); l != leader {
		t.Errorf("the wiped node disturbed the leader: now %s", l.o.NodeID)
	}
	if err := c.node(o.NodeID).Apply(ctx, Command{Op: OpResume}); err != nil {
		t.Fatal(err)
	}
	c.converged(leader, 5*time.Second)

	// A clean Close of the leader hands leadership over first.
	c.mu.Lock()
	delete(c.nodes, leader.o.NodeID)
	c.mu.Unlock()
	start := time.Now()
	if err := leader.Close(); err != nil {
		t.Fatal(err)
	}
	t.Logf("leader Close took %v", time.Since(start))
	next := c.leader(5 * time.Second)
	t.Logf("next leader %s %v after Close began", next.o.NodeID, time.Since(start))
	if err := leader.Apply(ctx, Command{Op: OpPause}); !errors.Is(err, ErrClosed) {
		t.Errorf("Apply after Close: %v, want ErrClosed", err)
	}
	if err := next.Apply(ctx, Command{Op: OpPause}); err != nil {
		t.Fatal(err)
	}
}

// Over mutual TLS the cluster forms, and a node whose certificate comes
// from another CA cannot take part.
func TestClusterTLS(t *testing.T) {
	ca, err := testpki.NewCA("mxq cluster")
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := ca.Issue("127.0.0.1", "localhost")
	if err != nil {
		t.Fatal(err)
	}
	c := newCluster(t, 3, func(o *Options) { o.TLS = ca.MutualTLS(leaf) })
	for _, id := range c.ids {
		c.start(id)
	}
	l := c.leader(10 * time.Second)
	if err := l.Apply(ctxTimeout(t, 5*time.Second), Command{Op: OpPause, By: "test"}); err != nil {
		t.Fatal(err)
	}
	c.converged(l, 5*time.Second)

	// A stranger: right protocol, wrong CA. Its connection attempts fail
	// the handshake; the cluster is undisturbed.
	other, _ := testpki.NewCA("someone else")
	bad, _ := other.Issue("127.0.0.1")
	layer, err := newTLSLayer("127.0.0.1:0", nil, other.MutualTLS(bad))
	if err != nil {
		t.Fatal(err)
	}
	defer layer.Close()
	_, addr := l.Leader()
	conn, err := layer.Dial(raft.ServerAddress(addr), 2*time.Second)
	if err == nil {
		// TLS 1.3 may report the failure on first use.
		_, err = conn.Write([]byte{0})
		if err == nil {
			buf := make([]byte, 1)
			_, err = conn.Read(buf)
		}
		conn.Close()
	}
	if err == nil {
		t.Fatal("a node with a foreign certificate talked to the cluster")
	}
	if l2 := c.leader(5 * time.Second); l2 != l || !l2.State().Paused {
		t.Fatal("the cluster changed after the stranger's attempt")
	}
}

// Scaling: three nodes bootstrapped, two more started with the grown peer
// list; the leader's Reconcile adds them as voters, and a later Reconcile
// with the shorter list removes them again.
func TestReconcileMembership(t *testing.T) {
	c := newCluster(t, 5, nil)
	all := c.opts["n1"].Peers
	for _, id := range c.ids[:3] {
		o := c.opts[id]
		o.Peers = all[:3]
		c.opts[id] = o
	}
	for _, id := range c.ids[:3] {
		c.start(id)
	}
	l := c.leader(10 * time.Second)
	if err := l.Apply(ctxTimeout(t, 5*time.Second), Command{Op: OpPause, By: "t"}); err != nil {
		t.Fatal(err)
	}
	c.start("n4")
	c.start("n5")
	if err := l.Reconcile(all, time.Minute); err != nil {
		t.Fatal(err)
	}
	if n := len(l.Members()); n != 5 {
		t.Fatalf("%d members after adding two", n)
	}
	waitFor(t, 10*time.Second, "new members caught up", func() bool {
		return c.node("n4").State().Paused && c.node("n5").State().Paused
	})
	// Scale back down: absent for longer than the grace, then removed.
	if err := l.Reconcile(all[:3], 0); err != nil {
		t.Fatal(err)
	}
	if n := len(l.Members()); n != 5 {
		t.Fatalf("removed at first sight: %d members", n)
	}
	time.Sleep(10 * time.Millisecond)
	if err := l.Reconcile(all[:3], 0); err != nil {
		t.Fatal(err)
	}
	if n := len(l.Members()); n != 3 {
		t.Fatalf("%d members after removing two", n)
	}
	c.kill("n4")
	c.kill("n5")
	if err := l.Apply(ctxTimeout(t, 5*time.Second), Command{Op: OpResume, By: "t"}); err != nil {
		t.Fatalf("three remaining members cannot commit: %v", err)
	}
}

// holdEvents records each node's OnHolds events.
type holdEvents struct {
	mu     sync.Mutex
	events map[string][]HoldEvent
}

func (h *holdEvents) record(node string) func(HoldEvent) {
	return func(ev HoldEvent) {
		h.mu.Lock()
		defer h.mu.Unlock()
		h.events[node] = append(h.events[node], ev)
	}
}

func (h *holdEvents) of(node string) []HoldEvent {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]HoldEvent(nil), h.events[node]...)
}

// TestClusterHoldEvents: every node reports the same hold and release
// entries, in log order, with their IDs (a bulk hold as the entries it
// was split into); a node that catches up from the leader's snapshot
// reports HoldsRestored and then only what comes after it.
func TestClusterHoldEvents(t *testing.T) {
	rec := &holdEvents{events: map[string][]HoldEvent{}}
	c := newCluster(t, 3, func(o *Options) {
		o.OnHolds = rec.record(o.NodeID)
		o.SnapshotThreshold, o.TrailingLogs, o.SnapshotInterval = 16, 4, 50*time.Millisecond
	})
	for _, id := range c.ids {
		c.start(id)
	}
	leader := c.leader(5 * time.Second)
	f := c.follower(leader)
	// Generous: entries of a megabyte, an election or two on 2 busy cores
	// under -race, and a follower that then needs a snapshot.
	const slow = 30 * time.Second
	ctx := ctxTimeout(t, 2*slow)

	// Over MaxEntryBytes: two entries. Long IDs keep it to few holds, so
	// that a follower lagging under -race catches up quickly.
	bulk := make([]string, 5000)
	for i := range bulk {
		bulk[i] = testID(uint64(i), true) + strings.Repeat("-", MaxIDLen-30)
	}
	cmds := []struct {
		via *Store
		c   Command
	}{
		{leader, Command{Op: OpHold, IDs: []string{"A", "B", "C"}, By: "ops"}},
		{f, Command{Op: OpPause, Route: "store"}},
		{f, Command{Op: OpRelease, IDs: []string{"B", "never-held"}}},
		{leader, Command{Op: OpHold, IDs: bulk, By: "bulk"}},
		{f, Command{Op: OpHold, IDs: []string{"B"}, By: "again"}},
		{leader, Command{Op: OpRelease, IDs: bulk[:10]}},
	}
	var want []HoldEvent
	for _, cmd := range cmds {
		cmd.c.At = t0.UTC() // as Apply sets it, so that split cuts where Apply does
		if err := cmd.via.Apply(ctx, cmd.c); err != nil {
			t.Fatalf("Apply %s via %s: %v", cmd.c.Op, cmd.via.o.NodeID, err)
		}
		if cmd.c.Op == OpHold || cmd.c.Op == OpRelease {
			for _, part := range split(cmd.c) {
				want = append(want, HoldEvent{Op: part.Op, IDs: part.IDs})
			}
		}
	}
	if len(want) != 6 {
		t.Fatalf("expected the bulk hold in two entries, have %d events", len(want))
	}
	c.converged(leader, slow)
	waitFor(t, 5*time.Second, "every node's events", func() bool {
		for _, id := range c.ids {
			if len(rec.of(id)) < len(want) {
				return false
			}
		}
		return true
	})
	first := rec.of(c.ids[0])
	for _, id := range c.ids {
		got := rec.of(id)
		if !reflect.DeepEqual(got, first) {
			t.Errorf("%s's events differ from %s's", id, c.ids[0])
		}
		var ops []HoldEvent
		for i, ev := range got {
			if i > 0 && ev.Index <= got[i-1].Index {
				t.Errorf("%s: event %d at index %d after %d", id, i, ev.Index, got[i-1].Index)
			}
			op := HoldEvent{Op: ev.Op, IDs: ev.IDs}
			// Apply retries an entry when leadership changes under it (2
			// cores, -race), so an entry may come twice, one after the
			// other; each is an event of its own.
			if len(ops) > 0 && reflect.DeepEqual(ops[len(ops)-1], op) {
				continue
			}
			ops = append(ops, op)
		}
		if !reflect.DeepEqual(ops, want) {
			t.Errorf("%s: events %s, want the commands' %s", id, summary(got), summary(want))
		}
	}
	if st := leader.State(); st.HoldCount() != 3+len(bulk)-10 || !st.Held("B") {
		t.Errorf("leader holds %d", st.HoldCount())
	}

	// A follower misses enough for the leader to compact past it.
	leader = c.leader(5 * time.Second) // the same, unless an election came in between
	f = c.follower(leader)
	gone := f.o.NodeID
	lastSeen := f.raft.LastIndex()
	c.kill(gone)
	for i := range 40 {
		if err := leader.Apply(ctx, Command{Op: OpHold, IDs: []string{fmt.Sprint("late-", i)}}); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, 5*time.Second, "the leader to compact its log past the stopped node", func() bool {
		first, _ := leader.bolt.FirstIndex()
		return first > lastSeen+1
	})
	before := len(rec.of(gone))
	c.start(gone)
	c.converged(leader, slow)
	after := rec.of(gone)[before:]
	restoredAt := uint64(0)
	for i, ev := range after {
		if ev.Op == HoldsRestored && ev.Index > lastSeen {
			restoredAt = ev.Index
		}
		if i > 0 && ev.Index <= after[i-1].Index {
			t.Errorf("after restart: event at index %d after %d", ev.Index, after[i-1].Index)
		}
	}
	if restoredAt == 0 {
		t.Fatalf("no HoldsRestored past index %d after restart: %+v", lastSeen, after)
	}
	if st := c.node(gone).State(); !st.Held("late-39") || st.HoldCount() != leader.State().HoldCount() {
		t.Errorf("restarted node holds %d, the leader %d", st.HoldCount(), leader.State().HoldCount())
	}
}

// summary is a short form of events for messages: op, index, number of IDs.
func summary(evs []HoldEvent) string {
	var b strings.Builder
	for _, ev := range evs {
		fmt.Fprintf(&b, "[%s@%d %d IDs]", ev.Op, ev.Index, len(ev.IDs))
	}
	return b.String()
}

// With a cluster secret, raft answers only peers that have it: a raft RPC
// that would depose the leader (AppendEntries from a "leader" of a much
// later term) is refused from plain TCP and from a node with another
// secret, and the cluster's term and leader stay as they were. The same
// RPC from a holder of the secret gets through: the check above can fail.
func TestClusterSecretRefusesStrangers(t *testing.T) {
	creds := func(secret string) *clustercred.Source {
		m, err := clustercred.FromSecrets([][]byte{[]byte(secret)}, "127.0.0.1", time.Now())
		if err != nil {
			t.Fatal(err)
		}
		return clustercred.Static(m)
	}
	secret := strings.Repeat("s", 32)
	c := newCluster(t, 3, func(o *Options) {
		o.TLS = creds(secret).Config()
		// Elections of their own would change the term under a loaded
		// machine; the test is about the stranger's.
		o.HeartbeatTimeout, o.ElectionTimeout, o.LeaderLeaseTimeout = time.Second, time.Second, 500*time.Millisecond
	})
	for _, id := range c.ids {
		c.start(id)
	}
	l := c.leader(30 * time.Second)
	term := l.raft.CurrentTerm()
	_, addr := l.Leader()

	depose := func(trans *raft.NetworkTransport) error {
		req := &raft.AppendEntriesRequest{
			RPCHeader: raft.RPCHeader{ProtocolVersion: raft.ProtocolVersionMax, ID: []byte("stranger"), Addr: []byte(trans.LocalAddr())},
			Term:      term + 100,
		}
		var resp raft.AppendEntriesResponse
		return trans.AppendEntries(raft.ServerID(l.o.NodeID), raft.ServerAddress(addr), req, &resp)
	}
	tlsTransport := func(secret string) *raft.NetworkTransport {
		layer, err := newTLSLayer("127.0.0.1:0", nil, creds(secret).Config())
		if err != nil {
			t.Fatal(err)
		}
		trans := raft.NewNetworkTransport(layer, 1, 3*time.Second, io.Discard)
		t.Cleanup(func() { trans.Close() })
		return trans
	}
	plainTCP, err := raft.NewTCPTransport("127.0.0.1:0", nil, 1, 3*time.Second, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { plainTCP.Close() })

	for _, s := range []struct {
		name  string
		trans *raft.NetworkTransport
	}{
		{"plain TCP", plainTCP},
		{"another secret", tlsTransport(strings.Repeat("x", 32))},
	} {
		if err := depose(s.trans); err == nil {
			t.Errorf("%s: the leader answered a raft RPC", s.name)
		}
		// Let a (wrongly) accepted RPC take effect before looking.
		time.Sleep(500 * time.Millisecond)
		if got := l.raft.CurrentTerm(); got != term {
			t.Fatalf("%s: term %d -> %d", s.name, term, got)
		}
		if !l.IsLeader() {
			t.Fatalf("%s: the leader stepped down", s.name)
		}
	}

	if err := depose(tlsTransport(secret)); err != nil {
		t.Fatalf("with the secret: %v", err)
	}
	waitFor(t, 5*time.Second, "the term taken from the RPC with the secret", func() bool { return l.raft.CurrentTerm() >= term+100 })
}
