package main

import (
	"fmt"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"runtime/debug"
	"testing"
)

func TestTuneGC(t *testing.T) {
	dir := t.TempDir()
	n := 0
	file := func(content string) string {
		n++
		p := filepath.Join(dir, fmt.Sprintf("memory.max.%d", n))
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	cases := []struct {
		name        string
		env         map[string]string
		memoryMax   string
		wantPercent int
		wantLimit   int64
	}{
		{"defaults, no cgroup", nil, filepath.Join(dir, "missing"), gcPercent, math.MaxInt64},
		{"cgroup without a limit", nil, file("max\n"), gcPercent, math.MaxInt64},
		{"cgroup limit of 2 GiB", nil, file("2147483648\n"), gcPercent, 2147483648 / 10 * 8},
		{"operator's GOGC is kept", map[string]string{"GOGC": "100"}, file("max"), 100, math.MaxInt64},
		{"operator's GOMEMLIMIT is kept", map[string]string{"GOMEMLIMIT": "1GiB"}, file("2147483648"), gcPercent, math.MaxInt64},
		{"garbage in memory.max", nil, file("lots"), gcPercent, math.MaxInt64},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			// The runtime's settings are process-wide: set them to what the
			// case's environment would give at start, and restore after.
			oldPercent := debug.SetGCPercent(100)
			oldLimit := debug.SetMemoryLimit(math.MaxInt64)
			defer func() { debug.SetGCPercent(oldPercent); debug.SetMemoryLimit(oldLimit) }()
			tuneGC(slog.New(slog.DiscardHandler), func(k string) string { return tc.env[k] }, tc.memoryMax)
			if got := debug.SetGCPercent(100); got != tc.wantPercent {
				t.Errorf("GC percent %d, want %d", got, tc.wantPercent)
			}
			if got := debug.SetMemoryLimit(-1); got != tc.wantLimit {
				t.Errorf("memory limit %d, want %d", got, tc.wantLimit)
			}
		})
	}
}
