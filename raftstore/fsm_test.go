package raftstore

import (
	"bytes"
	"errors"
	"io"
	"log/slog"
	"math"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/raft"
)

var t0 = time.Date(2026, 11, 3, 10, 4, 5, 123456789, time.FixedZone("CET", 3600))

// applyCmd feeds c to f as raft would: encoded, in a log entry.
func applyCmd(t *testing.T, f *fsm, index uint64, c Command) error {
	t.Helper()
	b, err := encodeCommand(&c)
	if err != nil {
		t.Fatalf("encode %+v: %v", c, err)
	}
	resp := f.Apply(&raft.Log{Index: index, Type: raft.LogCommand, Data: b})
	if resp == nil {
		return nil
	}
	return resp.(error)
}

// stateAfter applies cmds to a fresh FSM, failing on any error.
func stateAfter(t *testing.T, cmds ...Command) *fsm {
	t.Helper()
	f := newFSM(slog.New(slog.DiscardHandler), nil, nil)
	for i, c := range cmds {
		if err := applyCmd(t, f, uint64(i+1), c); err != nil {
			t.Fatalf("command %d (%s): %v", i, c.Op, err)
		}
	}
	return f
}

func TestFSMApply(t *testing.T) {
	ramp := &Ramp{Rate: 12.5, Concurrency: 3, Phase: "slow_start", SSThresh: 40, Latency: 30 * time.Millisecond,
		Baseline: 20 * time.Millisecond, Updated: t0}
	rampUTC := *ramp
	rampUTC.Updated = t0.UTC()
	tests := []struct {
		name string
		cmds []Command
		want plainState
	}{
		{"empty", nil, plainState{}},
		{"pause all", []Command{{Op: OpPause, By: "alice"}}, plainState{Index: 1, Paused: true}},
		{"pause then resume all", []Command{{Op: OpPause}, {Op: OpResume}}, plainState{Index: 2}},
		{"pause route", []Command{{Op: OpPause, Route: "store"}},
			plainState{Index: 1, Routes: map[string]RouteControl{"store": {Paused: true}}}},
		{"resume route removes the empty entry", []Command{{Op: OpPause, Route: "store"}, {Op: OpResume, Route: "store"}},
			plainState{Index: 2}},
		{"global resume leaves route pauses", []Command{{Op: OpPause, Route: "a"}, {Op: OpPause}, {Op: OpResume}},
			plainState{Index: 3, Routes: map[string]RouteControl{"a": {Paused: true}}}},
		{"set_rate", []Command{{Op: OpSetRate, Route: "store", MaxRate: 50, MaxConcurrency: 4}},
			plainState{Index: 1, Routes: map[string]RouteControl{"store": {MaxRate: 50, MaxConcurrency: 4}}}},
		{"set_rate 0 clears", []Command{{Op: OpSetRate, Route: "store", MaxRate: 50, MaxConcurrency: 4}, {Op: OpSetRate, Route: "store"}},
			plainState{Index: 2}},
		{"set_rate keeps pause", []Command{{Op: OpPause, Route: "s"}, {Op: OpSetRate, Route: "s", MaxRate: 1}},
			plainState{Index: 2, Routes: map[string]RouteControl{"s": {Paused: true, MaxRate: 1}}}},
		{"reset_ramp bumps", []Command{{Op: OpResetRamp, Route: "s"}, {Op: OpResetRamp, Route: "s"}},
			plainState{Index: 2, Routes: map[string]RouteControl{"s": {ResetSeq: 2}}}},
		{"set_ramp", []Command{{Op: OpSetRamp, Route: "s", Ramp: ramp}},
			plainState{Index: 1, Routes: map[string]RouteControl{"s": {Ramp: &rampUTC}}}},
		{"hold", []Command{{Op: OpHold, IDs: []string{"A", "B"}, By: "bob", Reason: "spam?", At: t0}},
			plainState{Index: 1, Holds: map[string]Hold{"A": {By: "bob", At: t0.UTC(), Reason: "spam?"}, "B": {By: "bob", At: t0.UTC(), Reason: "spam?"}}}},
		{"hold again overwrites", []Command{{Op: OpHold, IDs: []string{"A"}, By: "bob", At: t0}, {Op: OpHold, IDs: []string{"A"}, By: "eve", At: t0.Add(time.Hour)}},
			plainState{Index: 2, Holds: map[string]Hold{"A": {By: "eve", At: t0.Add(time.Hour).UTC()}}}},
		{"release some, unknown IDs ignored", []Command{{Op: OpHold, IDs: []string{"A", "B"}, At: t0}, {Op: OpRelease, IDs: []string{"B", "Z"}}},
			plainState{Index: 2, Holds: map[string]Hold{"A": {At: t0.UTC()}}}},
		{"release all", []Command{{Op: OpHold, IDs: []string{"A"}, At: t0}, {Op: OpRelease, IDs: []string{"A"}}},
			plainState{Index: 2}},
		{"release with nothing held", []Command{{Op: OpRelease, IDs: []string{"A", "B"}}},
			plainState{Index: 1}},
		{"an ID twice in one hold", []Command{{Op: OpHold, IDs: []string{"A", "B", "A"}, By: "bob", At: t0}},
			plainState{Index: 1, Holds: map[string]Hold{"A": {By: "bob", At: t0.UTC()}, "B": {By: "bob", At: t0.UTC()}}}},
		{"a later hold wins for the IDs it repeats", []Command{
			{Op: OpHold, IDs: []string{"A", "B"}, By: "bob", Reason: "r1", At: t0},
			{Op: OpHold, IDs: []string{"B", "C"}, By: "eve", Reason: "r2", At: t0.Add(time.Minute)}},
			plainState{Index: 2, Holds: map[string]Hold{"A": {By: "bob", At: t0.UTC(), Reason: "r1"},
				"B": {By: "eve", At: t0.Add(time.Minute).UTC(), Reason: "r2"}, "C": {By: "eve", At: t0.Add(time.Minute).UTC(), Reason: "r2"}}}},
		{"release then hold again", []Command{
			{Op: OpHold, IDs: []string{"A"}, By: "bob", At: t0}, {Op: OpRelease, IDs: []string{"A"}},
			{Op: OpHold, IDs: []string{"A"}, By: "eve", At: t0.Add(time.Hour)}},
			plainState{Index: 3, Holds: map[string]Hold{"A": {By: "eve", At: t0.Add(time.Hour).UTC()}}}},
		{"hold and release mixed with other commands", []Command{
			{Op: OpHold, IDs: []string{"A", "B"}, At: t0}, {Op: OpPause, Route: "s"}, {Op: OpRelease, IDs: []string{"A", "Z"}}},
			plainState{Index: 3, Routes: map[string]RouteControl{"s": {Paused: true}}, Holds: map[string]Hold{"B": {At: t0.UTC()}}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := stateAfter(t, tt.cmds...).current()
			if !reflect.DeepEqual(plain(got), tt.want) {
				t.Errorf("state\n got %+v\nwant %+v", plain(got), tt.want)
			}
			checkTree(t, &got.holds)
		})
	}
}

// TestFSMApplyCopyOnWrite checks that a State handed out earlier never
// changes: readers hold it without locks.
func TestFSMApplyCopyOnWrite(t *testing.T) {
	f := stateAfter(t, Command{Op: OpHold, IDs: []string{"A"}}, Command{Op: OpPause, Route: "s"})
	before := f.current()
	if err := applyCmd(t, f, 3, Command{Op: OpRelease, IDs: []string{"A"}}); err != nil {
		t.Fatal(err)
	}
	if err := applyCmd(t, f, 4, Command{Op: OpResume, Route: "s"}); err != nil {
		t.Fatal(err)
	}
	if !before.Held("A") || !before.RoutePaused("s") || before.Index != 2 {
		t.Errorf("an earlier state changed: %+v", before)
	}
	if after := f.current(); after.Held("A") || after.RoutePaused("s") {
		t.Errorf("new state: %+v", after)
	}
}

func TestFSMRejects(t *testing.T) {
	nan := math.NaN()
	tests := []struct {
		name string
		c    Command
	}{
		{"no op", Command{}},
		{"unknown op", Command{Op: "drop_all"}},
		{"pause with IDs", Command{Op: OpPause, IDs: []string{"A"}}},
		{"pause with rate", Command{Op: OpPause, MaxRate: 3}},
		{"set_rate without route", Command{Op: OpSetRate, MaxRate: 3}},
		{"set_rate negative", Command{Op: OpSetRate, Route: "s", MaxRate: -1}},
		{"set_rate NaN", Command{Op: OpSetRate, Route: "s", MaxRate: nan}},
		{"set_rate +Inf", Command{Op: OpSetRate, Route: "s", MaxRate: math.Inf(1)}},
		{"set_rate negative concurrency", Command{Op: OpSetRate, Route: "s", MaxConcurrency: -2}},
		{"reset_ramp without route", Command{Op: OpResetRamp}},
		{"set_ramp without ramp", Command{Op: OpSetRamp, Route: "s"}},
		{"set_ramp without route", Command{Op: OpSetRamp, Ramp: &Ramp{}}},
		{"set_ramp negative rate", Command{Op: OpSetRamp, Route: "s", Ramp: &Ramp{Rate: -1}}},
		{"set_ramp negative latency", Command{Op: OpSetRamp, Route: "s", Ramp: &Ramp{Latency: -1}}},
		{"hold without IDs", Command{Op: OpHold}},
		{"hold with empty ID", Command{Op: OpHold, IDs: []string{"A", ""}}},
		{"hold with route", Command{Op: OpHold, Route: "s", IDs: []string{"A"}}},
		{"hold with a long ID", Command{Op: OpHold, IDs: []string{strings.Repeat("x", MaxIDLen+1)}}},
		{"hold with bad UTF-8", Command{Op: OpHold, IDs: []string{"A\xff"}}},
		{"release without IDs", Command{Op: OpRelease}},
		{"long reason", Command{Op: OpHold, IDs: []string{"A"}, Reason: strings.Repeat("r", MaxReasonLen+1)}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := stateAfter(t, Command{Op: OpHold, IDs: []string{"K"}}, Command{Op: OpSetRate, Route: "s", MaxRate: 9})
			before := f.current()
			// NaN and ±Inf do not even encode (JSON); the rest must reach
			// the FSM and be refused there.
			if b, err := encodeCommand(&tt.c); err == nil {
				resp := f.Apply(&raft.Log{Index: 99, Data: b})
				if err, _ := resp.(error); !errors.Is(err, ErrInvalidCommand) {
					t.Errorf("Apply(%+v) = %v, want ErrInvalidCommand", tt.c, resp)
				}
			}
			if f.current() != before {
				t.Errorf("a rejected command changed the state")
			}
			if verr := tt.c.validate(); !errors.Is(verr, ErrInvalidCommand) {
				t.Errorf("validate = %v, want ErrInvalidCommand (the proposer must reject it too)", verr)
			}
		})
	}
}

func TestFSMRejectsGarbage(t *testing.T) {
	good, _ := encodeCommand(&Command{Op: OpHold, IDs: []string{"A", "B"}})
	for name, b := range map[string][]byte{
		"empty":           {},
		"unknown version": append([]byte{9}, good[1:]...),
		"truncated":       good[:len(good)-1],
		"trailing":        append(append([]byte{}, good...), 0),
		"huge count":      {1, 2, '{', '}', 0xff, 0xff, 0xff, 0xff, 0x0f},
		"unknown field":   withHeader(`{"op":"pause","zz":1}`),
		"bad header JSON": withHeader(`{"op":`),
	} {
		t.Run(name, func(t *testing.T) {
			f := newFSM(slog.New(slog.DiscardHandler), nil, nil)
			resp := f.Apply(&raft.Log{Index: 1, Data: b})
			if err, _ := resp.(error); !errors.Is(err, ErrInvalidCommand) {
				t.Errorf("Apply = %v, want ErrInvalidCommand", resp)
			}
			if f.current().Index != 0 {
				t.Errorf("state changed")
			}
		})
	}
}

// withHeader builds an entry with header h and no IDs.
func withHeader(h string) []byte {
	return append([]byte{codecV1, byte(len(h))}, h+"\x00"...)
}

// memSink is a raft.SnapshotSink in memory.
type memSink struct {
	bytes.Buffer
	cancelled bool
}

func (s *memSink) ID() string    { return "mem" }
func (s *memSink) Cancel() error { s.cancelled = true; return nil }
func (s *memSink) Close() error  { return nil }

func TestFSMSnapshotRestore(t *testing.T) {
	f := stateAfter(t,
		Command{Op: OpPause, By: "ops"},
		Command{Op: OpPause, Route: "a"},
		Command{Op: OpSetRate, Route: "b", MaxRate: 0.1 + 0.2, MaxConcurrency: 7},
		Command{Op: OpResetRamp, Route: "b"},
		Command{Op: OpSetRamp, Route: "b", Ramp: &Ramp{Rate: 1.0 / 3, Concurrency: 2, Phase: "avoid", SSThresh: 1e-9,
			Latency: 1234567 * time.Nanosecond, Baseline: time.Second, Updated: t0}},
		Command{Op: OpHold, IDs: []string{"00D20GXKE3R002B7DMY9", "ü-id"}, By: "bob", Reason: "why \"quoted\"", At: t0},
		Command{Op: OpHold, IDs: []string{"X"}},
		Command{Op: OpRelease, IDs: []string{"X"}},
	)
	want := f.current()
	snap, err := f.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	var sink memSink
	if err := snap.Persist(&sink); err != nil {
		t.Fatal(err)
	}
	snap.Release()

	var changes int
	g := newFSM(slog.New(slog.DiscardHandler), func() { changes++ }, nil)
	if err := g.Restore(io.NopCloser(bytes.NewReader(sink.Bytes()))); err != nil {
		t.Fatal(err)
	}
	if got := g.current(); !reflect.DeepEqual(plain(got), plain(want)) {
		t.Errorf("restored\n got %+v\nwant %+v", plain(got), plain(want))
	}
	if changes != 1 {
		t.Errorf("restore notified %d times, want 1", changes)
	}
	// Restore replaces, it does not merge.
	h := stateAfter(t, Command{Op: OpHold, IDs: []string{"other"}})
	if err := h.Restore(io.NopCloser(bytes.NewReader(sink.Bytes()))); err != nil {
		t.Fatal(err)
	}
	if got := h.current(); !reflect.DeepEqual(plain(got), plain(want)) {
		t.Errorf("restore over a state\n got %+v\nwant %+v", plain(got), plain(want))
	}
	if err := g.Restore(io.NopCloser(strings.NewReader(`{"version":2,"state":{}}`))); err == nil {
		t.Errorf("restore of an unknown version succeeded")
	}
}

func TestStateQueries(t *testing.T) {
	var nilState *State
	if nilState.Held("A") || nilState.RoutePaused("s") {
		t.Error("a nil state holds or pauses")
	}
	st := stateAfter(t, Command{Op: OpHold, IDs: []string{"A"}}, Command{Op: OpPause, Route: "a"}).current()
	global := stateAfter(t, Command{Op: OpPause}).current()
	for _, tt := range []struct {
		st    *State
		route string
		want  bool
	}{{st, "a", true}, {st, "b", false}, {global, "a", true}, {global, "", true}, {&State{}, "a", false}} {
		if got := tt.st.RoutePaused(tt.route); got != tt.want {
			t.Errorf("RoutePaused(%q) on %+v = %v", tt.route, tt.st, got)
		}
	}
	if !st.Held("A") || st.Held("B") {
		t.Errorf("Held: %+v", plain(st).Holds)
	}
}

// TestFSMHoldEvents: every applied hold and release, in order, with the
// command's IDs and index, once the state shows it; nothing for other or
// rejected commands; HoldsRestored after a restore.
func TestFSMHoldEvents(t *testing.T) {
	var events []HoldEvent
	var f *fsm
	f = newFSM(slog.New(slog.DiscardHandler), nil, func(ev HoldEvent) {
		st := f.current()
		if st.Index != ev.Index {
			t.Errorf("%s event for index %d while the state is at %d", ev.Op, ev.Index, st.Index)
		}
		for _, id := range ev.IDs {
			if st.Held(id) != (ev.Op == OpHold) {
				t.Errorf("%s event for %s before the state shows it", ev.Op, id)
			}
		}
		events = append(events, ev)
	})
	for i, c := range []Command{
		{Op: OpHold, IDs: []string{"A", "B"}},
		{Op: OpPause},
		{Op: OpRelease, IDs: []string{"B", "Z"}},
		{Op: OpHold, IDs: []string{""}}, // rejected
		{Op: OpHold, IDs: []string{"B", "A"}},
	} {
		applyCmd(t, f, uint64(i+1), c)
	}
	want := []HoldEvent{
		{Op: OpHold, IDs: []string{"A", "B"}, Index: 1},
		{Op: OpRelease, IDs: []string{"B", "Z"}, Index: 3},
		{Op: OpHold, IDs: []string{"B", "A"}, Index: 5},
	}
	if !reflect.DeepEqual(events, want) {
		t.Errorf("events\n got %+v\nwant %+v", events, want)
	}

	snap := persist(t, f)
	applyCmd(t, f, 6, Command{Op: OpRelease, IDs: []string{"A", "B"}})
	events = nil
	if err := f.Restore(io.NopCloser(bytes.NewReader(snap))); err != nil {
		t.Fatal(err)
	}
	if want := []HoldEvent{{Op: HoldsRestored, Index: 5}}; !reflect.DeepEqual(events, want) {
		t.Errorf("events of a restore\n got %+v\nwant %+v", events, want)
	}
	if !f.current().Held("A") {
		t.Error("the restore did not bring the holds back")
	}
}
