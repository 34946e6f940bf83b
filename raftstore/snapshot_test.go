package raftstore

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"reflect"
	"strings"
	"testing"
	"time"
)

// oldSnapshot is a snapshot written by the code before holds became a tree
// (commit 8e47b62: its state.go applied these commands and
// json.NewEncoder(w).Encode wrote the snapshot file), as found on the
// disks of clusters running it:
//
//	pause by ops; pause a; set_rate b 0.3/7; reset_ramp b; set_ramp b
//	hold 00D20GXKE3R002B7DMY9 00D20GXKE3R002B7DMYA ü-id by cli:bob, reason `why "quoted" <b>`
//	hold 00D20GXKE3R002B7DMYA X a<b&c by api:eve, an hour later
//	release X never-held
const oldSnapshot = `{"version":1,"state":{"index":8,"paused":true,"routes":{"a":{"paused":true},"b":{"max_rate":0.3,"max_concurrency":7,"reset_seq":1,"ramp":{"rate":0.3333333333333333,"concurrency":2,"phase":"avoid","ssthresh":1e-9,"latency":1234567,"baseline":1000000000,"updated":"2026-11-03T09:04:05.123456789Z","circuit":"open","last_error":"421 \u003cbusy\u003e \u0026 \u2028"}}},"holds":{"00D20GXKE3R002B7DMY9":{"by":"cli:bob","at":"2026-11-03T09:04:05.123456789Z","reason":"why \"quoted\" \u003cb\u003e"},"00D20GXKE3R002B7DMYA":{"by":"api:eve","at":"2026-11-03T10:04:05.123456789Z"},"a\u003cb\u0026c":{"by":"api:eve","at":"2026-11-03T10:04:05.123456789Z"},"ü-id":{"by":"cli:bob","at":"2026-11-03T09:04:05.123456789Z","reason":"why \"quoted\" \u003cb\u003e"}}}}
`

// oldSnapshotState is what oldSnapshot holds.
func oldSnapshotState() plainState {
	bob := Hold{By: "cli:bob", At: t0.UTC(), Reason: `why "quoted" <b>`}
	eve := Hold{By: "api:eve", At: t0.Add(time.Hour).UTC()}
	return plainState{Index: 8, Paused: true,
		Routes: map[string]RouteControl{"a": {Paused: true}, "b": {MaxRate: 0.3, MaxConcurrency: 7, ResetSeq: 1,
			Ramp: &Ramp{Rate: 1.0 / 3, Concurrency: 2, Phase: "avoid", SSThresh: 1e-9, Latency: 1234567, Baseline: time.Second,
				Updated: t0.UTC(), Circuit: "open", LastError: "421 <busy> & \u2028"}}},
		Holds: map[string]Hold{"00D20GXKE3R002B7DMY9": bob, "00D20GXKE3R002B7DMYA": eve, "a<b&c": eve, "ü-id": bob},
	}
}

// persist writes f's snapshot as raft would.
func persist(t testing.TB, f *fsm) []byte {
	t.Helper()
	snap, err := f.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	var sink memSink
	if err := snap.Persist(&sink); err != nil {
		t.Fatal(err)
	}
	snap.Release()
	return sink.Bytes()
}

func restored(t testing.TB, data []byte) *fsm {
	t.Helper()
	f := newFSM(slog.New(slog.DiscardHandler), nil, nil)
	if err := f.Restore(io.NopCloser(bytes.NewReader(data))); err != nil {
		t.Fatalf("restore: %v", err)
	}
	return f
}

// TestOldSnapshot restores a snapshot of the old code, and writes it back
// byte for byte: old and new nodes read each other's snapshots (a rolling
// upgrade, a rollback).
func TestOldSnapshot(t *testing.T) {
	f := restored(t, []byte(oldSnapshot))
	if got, want := plain(f.current()), oldSnapshotState(); !reflect.DeepEqual(got, want) {
		t.Errorf("restored\n got %+v\nwant %+v", got, want)
	}
	st := f.current()
	if st.holds.get("00D20GXKE3R002B7DMY9") != st.holds.get("ü-id") {
		t.Error("equal holds restored unshared")
	}
	checkTree(t, &st.holds)
	if got := persist(t, f); string(got) != oldSnapshot {
		t.Errorf("written back\n got %s\nwant %s", got, oldSnapshot)
	}
	// Applying on top works as on any state.
	if err := applyCmd(t, f, 9, Command{Op: OpRelease, IDs: []string{"ü-id"}}); err != nil || f.current().Held("ü-id") ||
		f.current().HoldCount() != 3 {
		t.Errorf("release after restore: %v, %+v", err, plain(f.current()))
	}
}

// TestSnapshotBytes: states without holds, or with, are written as the
// old code wrote them.
func TestSnapshotBytes(t *testing.T) {
	for _, tt := range []struct {
		name string
		cmds []Command
	}{
		{"empty", nil},
		{"paused", []Command{{Op: OpPause}}},
		{"routes", []Command{{Op: OpSetRate, Route: "b<&>", MaxRate: 2}, {Op: OpSetRamp, Route: "b<&>", Ramp: &Ramp{Rate: 1, Updated: t0}}}},
		{"all released", []Command{{Op: OpHold, IDs: []string{"A"}}, {Op: OpRelease, IDs: []string{"A"}}}},
		{"holds", []Command{{Op: OpHold, IDs: []string{"B", "A"}, By: "x", At: t0}, {Op: OpHold, IDs: []string{"C\\", "\u2028"}, Reason: "\u00e9\t"}}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			f := stateAfter(t, tt.cmds...)
			if got, want := persist(t, f), oldEncoding(t, plain(f.current())); !bytes.Equal(got, want) {
				t.Errorf("wrote\n%s\nthe old code\n%s", got, want)
			}
		})
	}
}

// TestReadSnapshot covers what json.Decoder accepted (or refused) when
// snapshots were decoded into the old State in one go.
func TestReadSnapshot(t *testing.T) {
	hold := Hold{By: "b", At: t0.UTC()}
	tests := []struct {
		name, doc string
		want      *plainState // nil: an error
	}{
		{"empty state", `{"version":1,"state":{"index":0,"paused":false}}`, &plainState{}},
		{"null state", `{"version":1,"state":null}`, &plainState{}},
		{"no state", `{"version":1}`, &plainState{}},
		{"null holds and routes", `{"version":1,"state":{"index":3,"routes":null,"holds":null}}`, &plainState{Index: 3}},
		{"empty routes are none", `{"version":1,"state":{"index":3,"routes":{}}}`, &plainState{Index: 3}},
		{"version last, keys in other case, unknown keys",
			`{"state":{"Holds":{"A":{"by":"b","at":"2026-11-03T09:04:05.123456789Z","x":[1,{}]}},"INDEX":4,"extra":{"a":[1]}},"more":null,"Version":1}`,
			&plainState{Index: 4, Holds: map[string]Hold{"A": hold}}},
		{"unsorted and repeated IDs: the last wins",
			`{"version":1,"state":{"holds":{"B":{"by":"x"},"A":{"by":"b","at":"2026-11-03T09:04:05.123456789Z"},"B":{"by":"b","at":"2026-11-03T09:04:05.123456789Z"}}}}`,
			&plainState{Holds: map[string]Hold{"A": hold, "B": hold}}},
		{"null hold", `{"version":1,"state":{"holds":{"A":null}}}`, &plainState{Holds: map[string]Hold{"A": {}}}},
		{"unknown version", `{"version":2,"state":{}}`, nil},
		{"no version", `{"state":{}}`, nil},
		{"empty", ``, nil},
		{"not an object", `[1]`, nil},
		{"truncated", oldSnapshot[:len(oldSnapshot)/2], nil},
		{"holds not an object", `{"version":1,"state":{"holds":["A"]}}`, nil},
		{"hold not an object", `{"version":1,"state":{"holds":{"A":1}}}`, nil},
		{"bad time", `{"version":1,"state":{"holds":{"A":{"at":"yesterday"}}}}`, nil},
		{"index not a number", `{"version":1,"state":{"index":"1"}}`, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			st, err := readSnapshot(strings.NewReader(tt.doc))
			switch {
			case tt.want == nil && err == nil:
				t.Errorf("read %+v, want an error", plain(st))
			case tt.want != nil && err != nil:
				t.Errorf("error %v", err)
			case tt.want != nil:
				if got := plain(st); !reflect.DeepEqual(got, *tt.want) {
					t.Errorf("read\n got %+v\nwant %+v", got, *tt.want)
				}
				checkTree(t, &st.holds)
			}
		})
	}
}

// oldEncoding is the snapshot the old code wrote for p: its State had the
// holds in a map, and json.Encoder wrote the file.
func oldEncoding(t testing.TB, p plainState) []byte {
	t.Helper()
	type oldState struct {
		Index  uint64                  `json:"index"`
		Paused bool                    `json:"paused"`
		Routes map[string]RouteControl `json:"routes,omitempty"`
		Holds  map[string]Hold         `json:"holds,omitempty"`
	}
	type oldFile struct {
		Version int       `json:"version"`
		State   *oldState `json:"state"`
	}
	var b bytes.Buffer
	if err := json.NewEncoder(&b).Encode(oldFile{1, &oldState{p.Index, p.Paused, p.Routes, p.Holds}}); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// TestSnapshotRoundTrip100k: 100 000 holds from many commands, some
// released, round trip to the same holds, the same bytes as the old code
// wrote, and one Hold per command again.
func TestSnapshotRoundTrip100k(t *testing.T) {
	f := newFSM(slog.New(slog.DiscardHandler), nil, nil)
	index := uint64(0)
	apply := func(c Command) {
		t.Helper()
		index++
		if err := applyCmd(t, f, index, c); err != nil {
			t.Fatal(err)
		}
	}
	apply(Command{Op: OpPause, Route: "store"})
	const cmds, per = 110, 1000
	for c := range cmds {
		ids := make([]string, per)
		for i := range ids {
			ids[i] = testID(uint64(c*per+i), true)
		}
		if c == 7 {
			ids[0], ids[1] = "<odd & \"quoted\">", "ü\u2028"
		}
		apply(Command{Op: OpHold, IDs: ids, By: fmt.Sprint("cli:op", c%3), Reason: fmt.Sprintf("batch %d <%d>", c, c%5),
			At: t0.Add(time.Duration(c) * time.Second)})
	}
	var rel []string
	for i := range 10 * per {
		rel = append(rel, testID(uint64(i*11), true))
	}
	for start := 0; start < len(rel); start += per {
		apply(Command{Op: OpRelease, IDs: rel[start : start+per]})
	}
	want := f.current()
	if n := want.HoldCount(); n != 100_000 {
		t.Fatalf("%d held, want 100000", n)
	}

	data := persist(t, f)
	if old := oldEncoding(t, plain(want)); !bytes.Equal(data, old) {
		i := 0
		for i < len(data) && i < len(old) && data[i] == old[i] {
			i++
		}
		t.Errorf("snapshot differs from the old code's at byte %d of %d/%d: %.80q vs %.80q", i, len(data), len(old), data[i:], old[i:])
	}
	g := restored(t, data)
	got := g.current()
	if !reflect.DeepEqual(plain(got), plain(want)) {
		t.Error("restored state differs")
	}
	checkTree(t, &got.holds)
	shared := map[*Hold]bool{}
	got.holds.each(func(_ string, h *Hold) bool { shared[h] = true; return true })
	if len(shared) != cmds {
		t.Errorf("%d distinct holds after restore, want one per command (%d)", len(shared), cmds)
	}
	if again := persist(t, g); !bytes.Equal(again, data) {
		t.Error("a restored state writes another snapshot")
	}
}
