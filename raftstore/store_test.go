package raftstore

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"reflect"
	"testing"
	"time"
)

// testLogger shows raft's warnings with -v, and nothing otherwise.
func testLogger(id string) *slog.Logger {
	if !testing.Verbose() {
		return slog.New(slog.DiscardHandler)
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})).With("node", id)
}

// freeAddrs returns n loopback addresses with ports free right now.
func freeAddrs(t testing.TB, n int) []string {
	t.Helper()
	var addrs []string
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		addrs = append(addrs, l.Addr().String())
	}
	return addrs
}

// testOptions are short timings for loopback; 2 shared cores under -race
// still keep heartbeats well inside 100ms.
func testOptions(id, dir, bind string) Options {
	return Options{
		NodeID: id, Dir: dir, Bind: bind, Logger: testLogger(id),
		HeartbeatTimeout: 100 * time.Millisecond, ElectionTimeout: 100 * time.Millisecond,
		LeaderLeaseTimeout: 100 * time.Millisecond, CommitTimeout: 5 * time.Millisecond,
	}
}

// waitFor polls cond until it holds or d passes.
func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func ctxTimeout(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), d)
	t.Cleanup(cancel)
	return ctx
}

// signalled reports whether ch fires within d.
func signalled(ch <-chan struct{}, d time.Duration) bool {
	select {
	case <-ch:
		return true
	case <-time.After(d):
		return false
	}
}

func TestSingleNodeRestart(t *testing.T) {
	dir, bind := t.TempDir(), freeAddrs(t, 1)[0]
	o := testOptions("n1", dir, bind)

	start := time.Now()
	s, err := Open(t.Context(), o)
	if err != nil {
		t.Fatal(err)
	}
	if !s.bootstrapped {
		t.Error("first start did not bootstrap")
	}
	if err := s.WaitLeader(ctxTimeout(t, 5*time.Second)); err != nil {
		t.Fatal(err)
	}
	t.Logf("leader %v after Open", time.Since(start))
	if !s.IsLeader() {
		t.Fatal("a single node is not the leader")
	}
	if id, addr := s.Leader(); id != "n1" || addr != bind {
		t.Errorf("Leader() = %s, %s", id, addr)
	}
	if ms := s.Members(); !reflect.DeepEqual(ms, []Member{{ID: "n1", Addr: bind, Voter: true, Leader: true}}) {
		t.Errorf("Members() = %+v", ms)
	}

	sub, unsub := s.Subscribe()
	ctx := ctxTimeout(t, 5*time.Second)
	for _, c := range []Command{
		{Op: OpPause, Route: "store", By: "test"},
		{Op: OpHold, IDs: []string{"A", "B", "C"}, Reason: "check", By: "test"},
		{Op: OpRelease, IDs: []string{"B"}},
		{Op: OpSetRate, Route: "store", MaxRate: 25, MaxConcurrency: 2},
	} {
		if err := s.Apply(ctx, c); err != nil {
			t.Fatalf("Apply %s: %v", c.Op, err)
		}
	}
	if !signalled(sub, time.Second) {
		t.Error("no signal after Apply")
	}
	if signalled(sub, 20*time.Millisecond) {
		t.Error("signals did not coalesce")
	}
	unsub()
	if err := s.Apply(ctx, Command{Op: OpBad}); !errors.Is(err, ErrInvalidCommand) {
		t.Errorf("Apply(bad) = %v, want ErrInvalidCommand", err)
	}
	if signalled(sub, 20*time.Millisecond) {
		t.Error("signal after unsubscribe")
	}
	if err := s.ApplyEncoded(ctx, withHeader(`{"op":"pause","route":"x","ids":1}`)); !errors.Is(err, ErrInvalidCommand) {
		t.Errorf("ApplyEncoded(bad) = %v, want ErrInvalidCommand", err)
	}
	// A bad entry that gets into the log anyway (say from a newer version)
	// is refused by the FSM, and raft hands the error to the proposer.
	f := s.raft.Apply(withHeader(`{"op":"pause","route":"x","ids":1}`), time.Second)
	if err := f.Error(); err != nil {
		t.Fatal(err)
	}
	if err, _ := f.Response().(error); !errors.Is(err, ErrInvalidCommand) {
		t.Errorf("FSM response to a bad entry: %v", f.Response())
	}

	before := s.State()
	if !before.RoutePaused("store") || !before.Held("A") || before.Held("B") || before.Route("store").MaxRate != 25 {
		t.Fatalf("state after apply: %+v", before)
	}
	start = time.Now()
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	t.Logf("Close took %v", time.Since(start))
	if err := s.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}

	start = time.Now()
	s, err = Open(t.Context(), o)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if s.bootstrapped {
		t.Error("restart bootstrapped again")
	}
	if err := s.WaitLeader(ctxTimeout(t, 5*time.Second)); err != nil {
		t.Fatal(err)
	}
	t.Logf("leader %v after reopen", time.Since(start))
	// IsLeader implies the FSM replayed everything committed before.
	if !s.IsLeader() {
		t.Fatal("not leader after restart")
	}
	if after := s.State(); !reflect.DeepEqual(plain(after), plain(before)) {
		t.Errorf("state after restart\n got %+v\nwant %+v", plain(after), plain(before))
	}
	if err := s.Apply(ctx, Command{Op: OpResume, Route: "store"}); err != nil {
		t.Fatal(err)
	}
	if s.State().RoutePaused("store") {
		t.Error("resume after restart did not apply")
	}
	if n := len(s.Members()); n != 1 {
		t.Errorf("%d members after restart", n)
	}
}

// OpBad is not an op.
const OpBad = "frobnicate"

func TestOpenErrors(t *testing.T) {
	dir := t.TempDir()
	addrs := freeAddrs(t, 2)
	for _, tt := range []struct {
		name string
		o    Options
	}{
		{"no node ID", Options{Dir: dir, Bind: addrs[0]}},
		{"not in peers", Options{NodeID: "x", Dir: dir, Bind: addrs[0], Peers: []Peer{{"a", addrs[0]}, {"b", addrs[1]}}}},
		{"duplicate peer", Options{NodeID: "a", Dir: dir, Bind: addrs[0], Peers: []Peer{{"a", addrs[0]}, {"a", addrs[1]}}}},
		{"unspecified advertise", Options{NodeID: "a", Dir: dir, Bind: "0.0.0.0:0"}},
		{"cluster on port 0", Options{NodeID: "a", Dir: dir, Bind: "127.0.0.1:0", Peers: []Peer{{"a", "127.0.0.1:0"}, {"b", addrs[1]}}}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if s, err := Open(t.Context(), tt.o); err == nil {
				s.Close()
				t.Errorf("Open(%+v) succeeded", tt.o)
			}
		})
	}
}

// TestSnapshotRestart forces snapshots with a low threshold, then restarts
// the node: its state comes back from the snapshot (the log before it is
// gone) plus the few entries after it.
func TestSnapshotRestart(t *testing.T) {
	dir, bind := t.TempDir(), freeAddrs(t, 1)[0]
	o := testOptions("n1", dir, bind)
	o.SnapshotThreshold, o.TrailingLogs, o.SnapshotInterval = 8, 2, 20*time.Millisecond
	s, err := Open(t.Context(), o)
	if err != nil {
		t.Fatal(err)
	}
	ctx := ctxTimeout(t, 10*time.Second)
	if err := s.WaitLeader(ctx); err != nil {
		t.Fatal(err)
	}
	for i := range 30 {
		c := Command{Op: OpHold, IDs: []string{string(rune('a' + i%26)), string(rune('A' + i))}, Reason: "n"}
		if i%3 == 0 {
			c = Command{Op: OpResetRamp, Route: "r"}
		}
		if err := s.Apply(ctx, c); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, 5*time.Second, "a snapshot and a compacted log", func() bool {
		snaps, _ := s.snaps.List()
		first, _ := s.bolt.FirstIndex()
		return len(snaps) > 0 && first > 10
	})
	// One more after the snapshot, so the restart replays log on top.
	if err := s.Apply(ctx, Command{Op: OpPause}); err != nil {
		t.Fatal(err)
	}
	want := s.State()
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	s, err = Open(t.Context(), o)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if s.bootstrapped {
		t.Error("restart bootstrapped again")
	}
	if err := s.WaitLeader(ctx); err != nil {
		t.Fatal(err)
	}
	if got := s.State(); !reflect.DeepEqual(plain(got), plain(want)) {
		t.Errorf("state restored from snapshot\n got %+v\nwant %+v", plain(got), plain(want))
	}
	if got := s.State().Route("r").ResetSeq; got != 10 {
		t.Errorf("ResetSeq = %d, want 10", got)
	}
}

// TestBulkHold holds more IDs than fit in one raft entry: Apply splits them
// and every ID ends up held.
func TestBulkHold(t *testing.T) {
	s, err := Open(t.Context(), testOptions("n1", t.TempDir(), freeAddrs(t, 1)[0]))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ctx := ctxTimeout(t, 10*time.Second)
	if err := s.WaitLeader(ctx); err != nil {
		t.Fatal(err)
	}
	ids := make([]string, 100_000)
	for i := range ids {
		ids[i] = fmt.Sprintf("00D20GXKE3R%09d", i)
	}
	before := s.raft.LastIndex()
	start := time.Now()
	if err := s.Apply(ctx, Command{Op: OpHold, IDs: ids, By: "bulk"}); err != nil {
		t.Fatal(err)
	}
	t.Logf("held %d IDs in %d entries in %v", len(ids), s.raft.LastIndex()-before, time.Since(start))
	if n := s.State().HoldCount(); n != len(ids) {
		t.Errorf("%d held, want %d", n, len(ids))
	}
	if err := s.Apply(ctx, Command{Op: OpRelease, IDs: ids}); err != nil {
		t.Fatal(err)
	}
	if n := s.State().HoldCount(); n != 0 {
		t.Errorf("%d still held", n)
	}
}
