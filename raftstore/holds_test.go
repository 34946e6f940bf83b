package raftstore

import (
	"fmt"
	"log/slog"
	"math/rand/v2"
	"reflect"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// plainState is a State with its holds in a map. States are compared by
// content through it: two equal states may hold their IDs in trees of
// different shapes (one restored from a snapshot, one grown by applies).
type plainState struct {
	Index  uint64
	Paused bool
	Routes map[string]RouteControl
	Holds  map[string]Hold
}

func plain(st *State) plainState {
	p := plainState{Index: st.Index, Paused: st.Paused, Routes: st.Routes}
	if st.HoldCount() > 0 {
		p.Holds = make(map[string]Hold, st.HoldCount())
		st.RangeHolds(func(id string, h Hold) bool {
			p.Holds[id] = h
			return true
		})
	}
	return p
}

// testID returns the n-th of a series of 20-character IDs in the queue's
// alphabet: ascending with n, or scattered (random-looking but
// reproducible, and distinct for distinct n).
func testID(n uint64, scattered bool) string {
	const alphabet = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
	if scattered {
		n *= 0x9E3779B97F4A7C15 // odd, so a bijection on uint64
	}
	var b [20]byte
	for i := len(b) - 1; i >= 0; i-- {
		b[i] = alphabet[n&31]
		n >>= 5
	}
	return string(b[:])
}

type treeStats struct{ leaves, depth int }

// checkTree fails t unless s is a well-formed tree: IDs strictly
// ascending, every key separating its kids, nodes within their size,
// leaves all at one depth, count right, and no node newer than s.
func checkTree(t testing.TB, s *holdSet) treeStats {
	t.Helper()
	var st treeStats
	if s.root == nil {
		if s.count != 0 {
			t.Errorf("empty tree counts %d", s.count)
		}
		return st
	}
	count, prev, seen := 0, "", false
	st.depth = -1
	var walk func(n *holdNode, depth int, lo, hi string, hasHi bool)
	walk = func(n *holdNode, depth int, lo, hi string, hasHi bool) {
		if n.gen > s.gen {
			t.Errorf("node of generation %d in a set of generation %d", n.gen, s.gen)
		}
		if n.leaf() {
			st.leaves++
			if st.depth == -1 {
				st.depth = depth
			} else if depth != st.depth {
				t.Errorf("leaves at depths %d and %d", st.depth, depth)
			}
			if len(n.ents) == 0 || len(n.ents) > maxLeaf {
				t.Errorf("leaf of %d entries", len(n.ents))
			}
			for _, e := range n.ents {
				if seen && e.id <= prev {
					t.Errorf("ID %q after %q", e.id, prev)
				}
				if e.id < lo || hasHi && e.id >= hi {
					t.Errorf("ID %q outside its node's range [%q, %q)", e.id, lo, hi)
				}
				if e.h == nil {
					t.Errorf("ID %q without a hold", e.id)
				}
				prev, seen = e.id, true
				count++
			}
			return
		}
		if len(n.keys) != len(n.kids) || len(n.kids) == 0 || len(n.kids) > maxInner || n == s.root && len(n.kids) < 2 {
			t.Errorf("inner node with %d keys, %d kids", len(n.keys), len(n.kids))
			return
		}
		if n.keys[0] < lo {
			t.Errorf("first key %q below the parent's %q", n.keys[0], lo)
		}
		for i, k := range n.kids {
			khi, kHasHi := hi, hasHi
			if i+1 < len(n.keys) {
				khi, kHasHi = n.keys[i+1], true
				if n.keys[i+1] <= n.keys[i] {
					t.Errorf("keys %q, %q out of order", n.keys[i], n.keys[i+1])
				}
			}
			walk(k, depth+1, n.keys[i], khi, kHasHi)
		}
	}
	walk(s.root, 0, "", "", false)
	if count != s.count {
		t.Errorf("tree has %d IDs, counts %d", count, s.count)
	}
	return st
}

// TestHoldSet grows and shrinks sets in commands the way the admin API
// sends them, and checks each against a map: content, order, the Hold
// shared per command, the tree's shape, and that every earlier version
// stays as it was.
func TestHoldSet(t *testing.T) {
	type order int
	const (
		ascending order = iota
		descending
		scattered
	)
	tests := []struct {
		name    string
		n       int // IDs held
		order   order
		perCmd  int              // IDs per hold and per release command
		release func(i int) bool // which of the held IDs to release afterwards
		// maxLeaves bounds the leaves when all is done, as a function of
		// the IDs left; it fails if full leaves are not kept full or
		// emptied ones are not joined.
		maxLeaves func(held int) int
	}{
		{"one", 1, ascending, 1, func(int) bool { return false }, func(int) int { return 1 }},
		{"one leaf, all released", maxLeaf, scattered, 7, func(int) bool { return true }, func(int) int { return 0 }},
		{"ascending leaves full leaves", 20_000, ascending, 1000, func(int) bool { return false },
			func(held int) int { return held/maxLeaf + 2 }},
		{"descending", 20_000, descending, 1000, func(i int) bool { return i%3 == 0 }, nil},
		{"scattered, every other released", 20_000, scattered, 1000, func(i int) bool { return i%2 == 0 }, nil},
		{"scattered, mass release gives leaves back", 50_000, scattered, 1000, func(i int) bool { return i%100 != 0 },
			func(held int) int { return 2*held/minLeaf + 2 }},
		{"ascending, all released", 30_000, ascending, 500, func(int) bool { return true }, func(int) int { return 0 }},
		{"single-ID commands", 3_000, scattered, 1, func(i int) bool { return i%5 == 0 }, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ids := make([]string, tt.n)
			for i := range ids {
				switch tt.order {
				case ascending:
					ids[i] = testID(uint64(i), false)
				case descending:
					ids[i] = testID(uint64(tt.n-i), false)
				case scattered:
					ids[i] = testID(uint64(i), true)
				}
			}
			type version struct {
				set   holdSet
				model map[string]*Hold
			}
			var versions []version
			model := map[string]*Hold{}
			var set holdSet
			keep := func() {
				m := make(map[string]*Hold, len(model))
				for k, v := range model {
					m[k] = v
				}
				versions = append(versions, version{set, m})
			}
			for start := 0; start < len(ids); start += tt.perCmd {
				part := ids[start:min(start+tt.perCmd, len(ids))]
				h := &Hold{By: fmt.Sprint("cmd", start), At: t0.Add(time.Duration(start))}
				set = set.withHeld(part, h)
				for _, id := range part {
					model[id] = h
				}
				if len(versions) < 4 && start%(3*tt.perCmd) == 0 {
					keep()
				}
			}
			checkTree(t, &set)
			matchModel(t, &set, model)

			var rel []string
			for i, id := range ids {
				if tt.release(i) {
					rel = append(rel, id, "never-held-"+id)
				}
			}
			for start := 0; start < len(rel); start += tt.perCmd {
				part := rel[start:min(start+tt.perCmd, len(rel))]
				set = set.withReleased(part)
				for _, id := range part {
					delete(model, id)
				}
				if len(versions) < 8 && start%(3*tt.perCmd) == 0 {
					keep()
				}
			}
			stats := checkTree(t, &set)
			matchModel(t, &set, model)
			if tt.maxLeaves != nil {
				if max := tt.maxLeaves(len(model)); stats.leaves > max {
					t.Errorf("%d leaves for %d IDs, want at most %d", stats.leaves, len(model), max)
				}
			}
			for i, v := range versions {
				checkTree(t, &v.set)
				if !matchModel(t, &v.set, v.model) {
					t.Errorf("version %d changed after later commands", i)
				}
			}
		})
	}
}

// matchModel fails t unless s holds exactly the IDs of model, in
// ascending order, each with model's *Hold (not a copy: holds of one
// command share it).
func matchModel(t *testing.T, s *holdSet, model map[string]*Hold) bool {
	t.Helper()
	ok := true
	fail := func(format string, args ...any) {
		t.Helper()
		if ok {
			t.Errorf(format, args...)
		}
		ok = false
	}
	if s.count != len(model) {
		fail("%d held, want %d", s.count, len(model))
	}
	n, prev := 0, ""
	s.each(func(id string, h *Hold) bool {
		if n > 0 && id <= prev {
			fail("%q after %q", id, prev)
		}
		if model[id] != h {
			fail("%q held by %p, want %p", id, h, model[id])
		}
		prev = id
		n++
		return true
	})
	if n != len(model) {
		fail("walked %d, want %d", n, len(model))
	}
	for id, h := range model {
		if got := s.get(id); got != h {
			fail("get(%q) = %p, want %p", id, got, h)
			break
		}
	}
	if s.get("not held") != nil {
		fail("an ID never held is held")
	}
	return ok
}

func TestStateHoldReads(t *testing.T) {
	st := stateAfter(t,
		Command{Op: OpHold, IDs: []string{"C", "A", "B"}, By: "bob", Reason: "r", At: t0},
		Command{Op: OpHold, IDs: []string{"D"}, By: "eve", At: t0},
	).current()
	if h, ok := st.HoldOf("B"); !ok || h != (Hold{By: "bob", At: t0.UTC(), Reason: "r"}) {
		t.Errorf("HoldOf(B) = %+v, %v", h, ok)
	}
	if _, ok := st.HoldOf("Z"); ok {
		t.Error("HoldOf an ID not held")
	}
	if n := st.HoldCount(); n != 4 {
		t.Errorf("HoldCount = %d", n)
	}
	var got []string
	st.RangeHolds(func(id string, h Hold) bool {
		got = append(got, id+":"+h.By)
		return id < "B" // stop after B
	})
	if want := []string{"A:bob", "B:bob"}; !reflect.DeepEqual(got, want) {
		t.Errorf("RangeHolds = %v, want %v", got, want)
	}
	// One command's IDs share one Hold: its fields are stored once.
	if a, c := st.holds.get("A"), st.holds.get("C"); a != c || a == st.holds.get("D") {
		t.Errorf("holds of one command not shared, or shared across commands")
	}
	var nilState *State
	nilState.RangeHolds(func(string, Hold) bool { t.Error("a nil state has holds"); return true })
	if _, ok := nilState.HoldOf("A"); ok || nilState.HoldCount() != 0 {
		t.Error("a nil state has holds")
	}
}

// TestHoldSetRandomOps mixes holds and releases of overlapping IDs from a
// small universe, so that IDs are held twice, released when not held, and
// nodes split and join over and over.
func TestHoldSetRandomOps(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	model := map[string]*Hold{}
	var set holdSet
	for op := range 3000 {
		ids := make([]string, 1+rng.IntN(300))
		for i := range ids {
			ids[i] = testID(uint64(rng.IntN(5000)), true)
		}
		if rng.IntN(2) == 0 {
			h := &Hold{By: fmt.Sprint(op)}
			set = set.withHeld(ids, h)
			for _, id := range ids {
				model[id] = h
			}
		} else {
			set = set.withReleased(ids)
			for _, id := range ids {
				delete(model, id)
			}
		}
		if op%100 == 0 {
			checkTree(t, &set)
			if !matchModel(t, &set, model) {
				t.Fatalf("after op %d", op)
			}
		}
	}
	checkTree(t, &set)
	matchModel(t, &set, model)
}

// TestHoldReadersDuringApplies reads states (Held, HoldCount, RangeHolds)
// while the FSM applies, and persists a snapshot while later commands
// apply, as raft does. Run with -race. Command i holds group i when i is
// odd and releases the even-numbered half of group i-1 when i is even, so
// a state's holds follow from its index alone: a reader seeing anything
// else saw a half-applied command or a later one.
func TestHoldReadersDuringApplies(t *testing.T) {
	const cmds, group = 400, 200
	id := func(g, k int) string { return fmt.Sprintf("%04d-%03d", g, k) }
	held := func(index uint64, g, k int) bool {
		switch {
		case g%2 == 0 || uint64(g) > index:
			return false
		case uint64(g) == index:
			return true // held by the last command, not yet halved
		}
		return k%2 == 1
	}
	count := func(index uint64) int {
		n := int(index+1) / 2 * group / 2 // odd groups up to index, each half held
		if index%2 == 1 {
			n += group / 2 // the last one whole
		}
		return n
	}
	wantAt := func(index uint64) plainState {
		p := plainState{Index: index, Holds: map[string]Hold{}}
		for g := 1; uint64(g) <= index; g++ {
			for k := range group {
				if held(index, g, k) {
					p.Holds[id(g, k)] = Hold{By: fmt.Sprint(g), At: t0.UTC()}
				}
			}
		}
		return p
	}

	f := newFSM(slog.New(slog.DiscardHandler), nil, nil)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var reads atomic.Int64
	for r := range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(r), 7))
			for {
				select {
				case <-stop:
					return
				default:
				}
				st := f.current()
				if n, want := st.HoldCount(), count(st.Index); n != want {
					t.Errorf("state %d counts %d holds, want %d", st.Index, n, want)
					return
				}
				walked := 0
				st.RangeHolds(func(string, Hold) bool { walked++; return true })
				if want := count(st.Index); walked != want {
					t.Errorf("state %d: walked %d holds, want %d", st.Index, walked, want)
					return
				}
				for range 50 {
					g, k := 1+rng.IntN(int(st.Index)+2), rng.IntN(group)
					if got, want := st.Held(id(g, k)), held(st.Index, g, k); got != want {
						t.Errorf("state %d: Held(%s) = %v, want %v", st.Index, id(g, k), got, want)
						return
					}
				}
				reads.Add(1)
			}
		}()
	}
	waitFor(t, 5*time.Second, "a first read", func() bool { return reads.Load() > 0 })

	const snapAt = cmds / 2
	persisted := make(chan []byte, 1)
	for i := uint64(1); i <= cmds; i++ {
		c := Command{Op: OpHold, By: fmt.Sprint(i), At: t0}
		for k := range group {
			if i%2 == 1 {
				c.IDs = append(c.IDs, id(int(i), k))
			} else if k%2 == 0 {
				c.Op = OpRelease
				c.By, c.IDs = "", append(c.IDs, id(int(i-1), k))
			}
		}
		if err := applyCmd(t, f, i, c); err != nil {
			t.Fatal(err)
		}
		if i == snapAt {
			snap, err := f.Snapshot()
			if err != nil {
				t.Fatal(err)
			}
			go func() {
				var sink memSink
				if err := snap.Persist(&sink); err != nil {
					t.Error(err)
				}
				persisted <- sink.Bytes()
			}()
		}
	}
	close(stop)
	wg.Wait()
	t.Logf("%d reads during %d applies", reads.Load(), cmds)
	if got := plain(f.current()); !reflect.DeepEqual(got, wantAt(cmds)) {
		t.Errorf("final state: %d holds, want %d", len(got.Holds), count(cmds))
	}
	// The snapshot is the state at its index, not some later one.
	g := restored(t, <-persisted)
	if got := plain(g.current()); !reflect.DeepEqual(got, wantAt(snapAt)) {
		t.Errorf("snapshot at %d restored to index %d with %d holds, want %d", snapAt, got.Index, len(got.Holds), count(snapAt))
	}
}
