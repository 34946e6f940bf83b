package main

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestScaleSmall is the benchmark at 90 000 messages (steps 10 000,
// 50 000 and 90 000, continuity on), as CI runs it. It asserts only what
// the same run measured at its other steps, never an absolute time, with
// bounds lenient enough for a shared machine: accept and drain rates at
// 90 k at least 0.8 of those at 10 k, RSS at 90 k at most 50 MiB above
// that at 50 k (the two steps with fills alike), each query at most five
// times its 10 k latency (or 100 ms, whichever is more), and duplicates
// within what mxq bounds. It also fails if mxq crashed, lost a message, or
// the run stopped early.
func TestScaleSmall(t *testing.T) {
	if testing.Short() {
		t.Skip("the scale benchmark's small run takes about three minutes")
	}
	if _, err := exec.LookPath("go"); err != nil {
		if os.Getenv("MXQ_E2E") == "require" {
			t.Fatalf("go is required to build mxq (MXQ_E2E=require): %v", err)
		}
		t.Skipf("go is not installed: %v", err)
	}
	repo, err := repoRoot()
	if err != nil {
		t.Fatal(err)
	}
	var progress strings.Builder
	o := Options{
		N:          90_000,
		Steps:      []int{10_000, 50_000, 90_000},
		Continuity: []bool{true},
		// As the command's defaults.
		RestartEveryStep: true,
		HeldDue:          true,
		Repo:             repo,
		Work:             t.TempDir(),
		Log:              &syncWriter{w: &progress},
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	start := time.Now()
	rep, err := Run(ctx, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("the run took %v; progress:\n%s", time.Since(start).Round(time.Second), progress.String())
	t.Logf("report:\n%s", rep.Markdown())

	if len(rep.Settings) != 1 {
		t.Fatalf("%d settings run, want 1", len(rep.Settings))
	}
	r := rep.Settings[0]
	if r.Err != "" {
		t.Errorf("the run stopped early: %s", r.Err)
	}
	for _, c := range r.Crashes {
		t.Errorf("mxq crashed during %s: %s", c.Phase, c.What)
	}
	if lost := r.Lost(); r.Err == "" && lost > 0 {
		t.Errorf("%d accepted messages neither delivered nor queued", lost)
	}
	if bound := (1 + len(r.Crashes)) * max(2*sinkConcurrency, 32); r.Dups > bound {
		t.Errorf("%d duplicate deliveries, want at most %d (what a kill -9 during the drain may deliver again)", r.Dups, bound)
	}
	if len(r.Steps) != 3 {
		t.Fatalf("%d steps measured, want 3", len(r.Steps))
	}
	small, mid, big := r.Steps[0], r.Steps[1], r.Steps[2]
	x := r.Ratios()
	if x.Accept < 0.8 {
		t.Errorf("accept rate at 90 k is %.2f × the rate at 10 k (%.0f vs %.0f msg/s); want ≥ 0.8", x.Accept, big.Load.rate(), small.Load.rate())
	}
	// The drain at 90 k runs beside the held fifth of the queue, which the
	// 10 k reference does not have: 0.79-0.80 at 1 M on a quiet machine,
	// and 0.79 once in CI at 90 k (its restart and held + due rates 1.1x).
	// 0.7 still catches any cost that grows with the backlog (a rescan
	// design measured far below 0.5).
	if x.Drain < 0.7 {
		t.Errorf("drain rate at 90 k is %.2f × the rate at 10 k; want ≥ 0.7", x.Drain)
	}
	// RSS is compared between the two steps whose fills were alike (40 k
	// messages each): what JetStream caches of the blocks written in the
	// last 10 s depends on how long the fill ran, not on the backlog.
	if big.RSS > mid.RSS+50 {
		t.Errorf("RSS at 90 k is %.0f MiB, at 50 k %.0f MiB; want at most 50 MiB more", big.RSS, mid.RSS)
	}
	for _, name := range queryNames {
		a, b := small.Queries[name], big.Queries[name]
		if a.Err == "off" {
			continue
		}
		if !a.ok() || !b.ok() {
			t.Errorf("%s: no latency at 10 k (%s) or at 90 k (%s)", name, a.Err, b.Err)
			continue
		}
		if a.Note != "" || b.Note != "" {
			t.Errorf("%s: wrong answer: %s %s", name, a.Note, b.Note)
		}
		if limit := max(5*a.MS, 100); b.MS > limit {
			t.Errorf("%s takes %.1f ms at 90 k against %.1f ms at 10 k; want at most %.0f ms", name, b.MS, a.MS, limit)
		}
	}
}

type syncWriter struct {
	mu sync.Mutex
	w  *strings.Builder
}

func (s *syncWriter) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.w.Write(p)
}

// BenchmarkSink is the store's own speed: 16 LMTP connections, each
// sending 2 KiB messages one after the other (as the drain does). The
// drain is far below it; it must stay so (at least 20 000 msg/s here).
//
//	go test -run - -bench Sink ./bench/scale
func BenchmarkSink(b *testing.B) {
	s := newSink(freePort())
	if err := s.up(); err != nil {
		b.Fatal(err)
	}
	defer s.down()
	g := newMailGen(100, 100, 2048)
	msg := g.message(nil, 1, "a@example.org", "b@example.test", "bench")
	// mxq's Received header first, so that the queue ID is parsed.
	msg = append([]byte("Received: from x (x [127.0.0.1])\r\n\tby mx (mxq) with ESMTP id 00D20GXKE3R002B7DMY9;\r\n\tFri, 5 Dec 2026 10:00:00 +0000\r\n"), msg...)
	const conns = 16
	per := b.N/conns + 1
	b.SetBytes(int64(len(msg)))
	b.ResetTimer()
	start := time.Now()
	var wg sync.WaitGroup
	errs := make(chan error, conns)
	for c := 0; c < conns; c++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := lmtpSend(s.addr, msg, per); err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		b.Fatal(err)
	}
	b.ReportMetric(float64(per*conns)/time.Since(start).Seconds(), "msg/s")
}

// lmtpSend sends n messages over one LMTP connection.
func lmtpSend(addr string, msg []byte, n int) error {
	c, err := net.Dial("tcp", addr)
	if err != nil {
		return err
	}
	defer c.Close()
	r := bufio.NewReader(c)
	w := bufio.NewWriter(c)
	cmd := func(line string, want int) error {
		if line != "" {
			fmt.Fprintf(w, "%s\r\n", line)
			if err := w.Flush(); err != nil {
				return err
			}
		}
		_, err := reply(r, want)
		return err
	}
	if err := cmd("", 220); err != nil {
		return err
	}
	if err := cmd("LHLO bench", 250); err != nil {
		return err
	}
	// MAIL, RCPT and DATA pipelined (RFC 2920), so that the client costs
	// less of the CPU the sink is measured on.
	for i := 0; i < n; i++ {
		w.WriteString("MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n")
		if err := w.Flush(); err != nil {
			return err
		}
		for _, want := range []int{250, 250, 354} {
			if err := cmd("", want); err != nil {
				return err
			}
		}
		w.Write(msg)
		if err := w.Flush(); err != nil {
			return err
		}
		if err := cmd("", 250); err != nil { // one reply per recipient
			return err
		}
	}
	return cmd("QUIT", 221)
}
