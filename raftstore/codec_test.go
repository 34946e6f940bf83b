package raftstore

import (
	"errors"
	"fmt"
	"reflect"
	"strings"
	"testing"
	"time"
)

func TestCodecRoundTrip(t *testing.T) {
	for _, c := range []Command{
		{Op: OpPause, By: "cli:alice", At: t0},
		{Op: OpSetRate, Route: "store", MaxRate: 12.75, MaxConcurrency: 3, At: t0.UTC()},
		{Op: OpSetRamp, Route: "store", Ramp: &Ramp{Rate: 1, Concurrency: 2, Phase: "p", SSThresh: 3, Latency: 4, Baseline: 5, Updated: t0.UTC()}},
		{Op: OpHold, IDs: []string{"A", "ü", strings.Repeat("x", MaxIDLen)}, Reason: "r", By: "b", At: t0.UTC()},
	} {
		b, err := encodeCommand(&c)
		if err != nil {
			t.Fatal(err)
		}
		got, err := decodeCommand(b)
		if err != nil {
			t.Fatalf("decode %s: %v", c.Op, err)
		}
		// JSON keeps the instant and the offset, not the *Location.
		if !got.At.Equal(c.At) {
			t.Errorf("%s: At %v, want %v", c.Op, got.At, c.At)
		}
		got.At, c.At = time.Time{}, time.Time{}
		if !reflect.DeepEqual(got, c) {
			t.Errorf("round trip\n got %+v\nwant %+v", got, c)
		}
	}
}

// TestCodecBulkHold checks the size of a bulk hold's encoding and that
// split keeps every entry under MaxEntryBytes without losing an ID.
func TestCodecBulkHold(t *testing.T) {
	ids := make([]string, 120_000)
	for i := range ids {
		ids[i] = fmt.Sprintf("00D20GXKE3R%09d", i) // 20 bytes, like a queue ID
	}
	c := Command{Op: OpHold, IDs: ids[:10_000], Reason: "bulk", By: "ops", At: t0}
	b, err := encodeCommand(&c)
	if err != nil {
		t.Fatal(err)
	}
	if perID := float64(len(b)) / 10_000; perID > 21.1 {
		t.Errorf("%.1f bytes per 20-byte ID", perID)
	}

	c.IDs = ids
	if _, err := encodeCommand(&c); !errors.Is(err, ErrTooLarge) {
		t.Errorf("encoding %d IDs in one entry: %v, want ErrTooLarge", len(ids), err)
	}
	parts := split(c)
	if len(parts) != 3 {
		t.Errorf("%d IDs (~%d KiB) split into %d parts, want 3", len(ids), len(ids)*21/1024, len(parts))
	}
	var all []string
	for i, p := range parts {
		b, err := encodeCommand(&p)
		if err != nil {
			t.Fatalf("part %d: %v", i, err)
		}
		if len(b) > MaxEntryBytes {
			t.Errorf("part %d is %d bytes", i, len(b))
		}
		if p.Reason != "bulk" || p.By != "ops" || !p.At.Equal(t0) {
			t.Errorf("part %d lost its header: %+v", i, p)
		}
		all = append(all, p.IDs...)
	}
	if !reflect.DeepEqual(all, ids) {
		t.Errorf("split lost or reordered IDs")
	}
	if got := split(Command{Op: OpPause}); len(got) != 1 {
		t.Errorf("split(pause) = %d parts", len(got))
	}
}
