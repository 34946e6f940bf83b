package raftstore

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"runtime"
	"slices"
	"testing"
	"time"

	"github.com/hashicorp/raft"
)

// holdBase is a state with n holds, made as the admin API makes them:
// commands of 1 000 IDs.
func holdBase(n int, scattered bool) *State {
	st := &State{}
	for start := 0; start < n; start += 1000 {
		ids := make([]string, min(1000, n-start))
		for i := range ids {
			ids[i] = testID(uint64(start+i), scattered)
		}
		st = st.apply(&Command{Op: OpHold, IDs: ids, By: "admin:alice", Reason: "suspected spam run", At: t0}, uint64(start/1000+1))
	}
	return st
}

// BenchmarkHoldApply applies a hold of 1 000 new IDs on top of 10 000 and
// of 1 000 000 existing holds, side by side, and reports the time per ID
// of each: equal numbers mean the cost does not grow with the holds
// (before the tree it did, linearly: every command copied the map). The
// IDs are scattered over the existing ones (the worst case: each lands in
// another leaf) or ascending past them (queue IDs grow with time). Every
// iteration applies to the same base, which is what immutability allows.
func BenchmarkHoldApply(b *testing.B) {
	for _, scattered := range []bool{true, false} {
		name := "ascending"
		if scattered {
			name = "scattered"
		}
		b.Run(name, func(b *testing.B) {
			bases := []*State{holdBase(10_000, scattered), holdBase(1_000_000, scattered)}
			var took [2]time.Duration
			next := uint64(2_000_000)
			b.ResetTimer()
			for b.Loop() {
				for k, base := range bases {
					ids := make([]string, 1000)
					for i := range ids {
						ids[i] = testID(next, scattered)
						next++
					}
					c := &Command{Op: OpHold, IDs: ids, By: "admin:alice", Reason: "suspected spam run", At: t0}
					start := time.Now()
					st := base.apply(c, base.Index+1)
					took[k] += time.Since(start)
					if st.HoldCount() != base.HoldCount()+1000 {
						b.Fatalf("%d held after adding 1000 to %d", st.HoldCount(), base.HoldCount())
					}
				}
			}
			b.ReportMetric(float64(took[0].Nanoseconds())/float64(b.N)/1000, "ns/id@10k")
			b.ReportMetric(float64(took[1].Nanoseconds())/float64(b.N)/1000, "ns/id@1M")
			b.ReportMetric(0, "ns/op") // both sizes together say nothing
		})
	}
}

func heapAfterGC() (heap, total uint64) {
	runtime.GC()
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapAlloc, m.TotalAlloc
}

// BenchmarkHolds1M holds a million scattered IDs in 1 000 raft entries
// through the FSM, as a node does, then snapshots and restores them. It
// reports the heap per hold after each (after GC), the time of each step,
// the snapshot's size, and what persisting and restoring allocate in all
// (they stream: none of it is live at once).
func BenchmarkHolds1M(b *testing.B) {
	const n = 1_000_000
	entries := make([][]byte, n/1000)
	for e := range entries {
		ids := make([]string, 1000)
		for i := range ids {
			ids[i] = testID(uint64(e*1000+i), true)
		}
		var err error
		// A command per call, as the admin API sends them: At differs.
		entries[e], err = encodeCommand(&Command{Op: OpHold, IDs: ids, By: "admin:alice", Reason: "suspected spam run",
			At: t0.Add(time.Duration(e) * time.Millisecond)})
		if err != nil {
			b.Fatal(err)
		}
	}
	for b.Loop() {
		before, _ := heapAfterGC()
		f := newFSM(slog.New(slog.DiscardHandler), nil, nil)
		start := time.Now()
		for e, data := range entries {
			if resp := f.Apply(&raft.Log{Index: uint64(e + 1), Data: data}); resp != nil {
				b.Fatal(resp)
			}
		}
		b.ReportMetric(time.Since(start).Seconds(), "s-apply")
		after, total := heapAfterGC()
		b.ReportMetric(float64(after-before)/n, "B/hold")
		if f.current().HoldCount() != n {
			b.Fatalf("%d held", f.current().HoldCount())
		}

		start = time.Now()
		snap, err := f.Snapshot()
		if err != nil {
			b.Fatal(err)
		}
		b.ReportMetric(float64(time.Since(start).Nanoseconds()), "ns-Snapshot()")
		var sink memSink
		sink.Grow(120 << 20) // the sink's own buffer is not the snapshot's cost
		_, total = heapAfterGC()
		start = time.Now()
		if err := snap.Persist(&sink); err != nil {
			b.Fatal(err)
		}
		b.ReportMetric(time.Since(start).Seconds(), "s-persist")
		_, total2 := heapAfterGC()
		b.ReportMetric(float64(total2-total)/(1<<20), "MiB-alloc-persist")
		b.ReportMetric(float64(sink.Len())/1e6, "MB-snapshot")

		data := sink.Bytes()
		f, snap = nil, nil
		before, total = heapAfterGC()
		g := newFSM(slog.New(slog.DiscardHandler), nil, nil)
		start = time.Now()
		if err := g.Restore(io.NopCloser(bytes.NewReader(data))); err != nil {
			b.Fatal(err)
		}
		b.ReportMetric(time.Since(start).Seconds(), "s-restore")
		after, total2 = heapAfterGC()
		b.ReportMetric(float64(after-before)/n, "B/hold-restored")
		b.ReportMetric(float64(total2-total)/(1<<20), "MiB-alloc-restore")
		if g.current().HoldCount() != n {
			b.Fatalf("%d restored", g.current().HoldCount())
		}
		runtime.KeepAlive(data)
	}
	b.ReportMetric(0, "ns/op")
}

// BenchmarkStoreHold1M holds a million IDs through a single-node Store
// (raft, bolt with its fsyncs, the FSM) as the admin API does, one Apply
// of 1 000 IDs after the other, and releases them again: what an
// operator's bulk hold by filter costs end to end, less the walk of the
// queue.
func BenchmarkStoreHold1M(b *testing.B) {
	ids := make([]string, 1_000_000)
	for i := range ids {
		ids[i] = testID(uint64(i), true)
	}
	for b.Loop() {
		s, err := Open(b.Context(), testOptions("n1", b.TempDir(), freeAddrs(b, 1)[0]))
		if err != nil {
			b.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(b.Context(), 5*time.Minute)
		if err := s.WaitLeader(ctx); err != nil {
			b.Fatal(err)
		}
		for _, op := range []string{OpHold, OpRelease} {
			start := time.Now()
			for part := range slices.Chunk(ids, 1000) {
				if err := s.Apply(ctx, Command{Op: op, IDs: part, By: "bench"}); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(time.Since(start).Seconds(), "s-"+op)
			if op == OpHold && s.State().HoldCount() != len(ids) {
				b.Fatalf("%d held", s.State().HoldCount())
			}
		}
		if n := s.State().HoldCount(); n != 0 {
			b.Fatalf("%d held after the release", n)
		}
		cancel()
		s.Close()
	}
	b.ReportMetric(0, "ns/op")
}
