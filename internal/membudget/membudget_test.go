package membudget

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"
)

// fakeClock fires After channels only when the test advances it.
type fakeClock struct {
	mu     sync.Mutex
	now    time.Time
	timers []fakeTimer
}

type fakeTimer struct {
	at time.Time
	ch chan time.Time
}

func newFakeClock() *fakeClock { return &fakeClock{now: time.Unix(1_800_000_000, 0)} }

func (c *fakeClock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.now }

func (c *fakeClock) After(d time.Duration) <-chan time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	ch := make(chan time.Time, 1)
	c.timers = append(c.timers, fakeTimer{c.now.Add(d), ch})
	return ch
}

func (c *fakeClock) advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
	keep := c.timers[:0]
	for _, t := range c.timers {
		if !t.at.After(c.now) {
			t.ch <- c.now
		} else {
			keep = append(keep, t)
		}
	}
	c.timers = keep
}

func (c *fakeClock) pending() int { c.mu.Lock(); defer c.mu.Unlock(); return len(c.timers) }

// waitUntil polls cond for a while: the goroutine under test runs on its own.
func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// reserveAsync starts a Reserve and returns its outcome channel, once the
// reservation is waiting on the clock.
func reserveAsync(t *testing.T, b *Budget, c *fakeClock, ctx context.Context, n int64) <-chan error {
	t.Helper()
	timers := c.pending()
	done := make(chan error, 1)
	go func() { done <- b.Reserve(ctx, n) }()
	waitUntil(t, "the reservation to wait", func() bool { return c.pending() > timers })
	return done
}

func TestReserveRelease(t *testing.T) {
	type step struct {
		op    string // reserve, try, release
		n     int64
		ok    bool
		inUse int64
	}
	cases := []struct {
		name  string
		steps []step
	}{
		{"fits exactly", []step{{"reserve", 60, true, 60}, {"reserve", 40, true, 100}, {"try", 1, false, 100}, {"release", 100, true, 0}}},
		{"try within", []step{{"try", 30, true, 30}, {"try", 70, true, 100}, {"release", 30, true, 70}, {"try", 30, true, 100}}},
		{"larger than the budget", []step{{"reserve", 101, false, 0}, {"try", 101, false, 0}}},
		{"zero is free", []step{{"reserve", 100, true, 100}, {"reserve", 0, true, 100}, {"try", 0, true, 100}, {"release", 0, true, 100}}},
		{"no wait refuses at once", []step{{"reserve", 90, true, 90}, {"reserve", 20, false, 90}, {"release", 90, true, 0}, {"reserve", 20, true, 20}}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			b := New(Options{Size: 100})
			for i, s := range tc.steps {
				ok := true
				switch s.op {
				case "reserve":
					err := b.Reserve(context.Background(), s.n)
					if err != nil && !errors.Is(err, ErrExhausted) {
						t.Fatalf("step %d: %v", i, err)
					}
					ok = err == nil
				case "try":
					ok = b.TryReserve(s.n)
				case "release":
					b.Release(s.n)
				}
				if ok != s.ok || b.InUse() != s.inUse {
					t.Fatalf("step %d %s %d: ok %v in use %d, want %v %d", i, s.op, s.n, ok, b.InUse(), s.ok, s.inUse)
				}
			}
		})
	}
}

func TestWaitThenRefuse(t *testing.T) {
	c := newFakeClock()
	b := New(Options{Size: 100, Wait: 3 * time.Second, Clock: c})
	if err := b.Reserve(context.Background(), 80); err != nil {
		t.Fatal(err)
	}
	done := reserveAsync(t, b, c, context.Background(), 40)
	c.advance(2999 * time.Millisecond)
	select {
	case err := <-done:
		t.Fatalf("returned before the wait was over: %v", err)
	case <-time.After(20 * time.Millisecond):
	}
	c.advance(time.Millisecond)
	err := <-done
	if !errors.Is(err, ErrExhausted) {
		t.Fatalf("after the wait: %v, want ErrExhausted", err)
	}
	if b.InUse() != 80 || b.Waits() != 1 || b.Refusals() != 1 || b.Waiting() != 0 {
		t.Errorf("in use %d, waits %d, refusals %d, waiting %d; want 80 1 1 0", b.InUse(), b.Waits(), b.Refusals(), b.Waiting())
	}
	// While someone waits, a growth is refused even if it would fit.
	done = reserveAsync(t, b, c, context.Background(), 40)
	if b.TryReserve(10) {
		t.Error("TryReserve jumped ahead of a waiting Reserve")
	}
	b.Release(80)
	if err := <-done; err != nil {
		t.Fatalf("after a release: %v", err)
	}
	if b.InUse() != 40 || b.Refusals() != 1 || b.Waits() != 2 {
		t.Errorf("in use %d refusals %d waits %d, want 40 1 2", b.InUse(), b.Refusals(), b.Waits())
	}
}

func TestWaitersInOrder(t *testing.T) {
	c := newFakeClock()
	b := New(Options{Size: 100, Wait: time.Minute, Clock: c})
	b.Reserve(context.Background(), 100)
	big := reserveAsync(t, b, c, context.Background(), 70)
	small := reserveAsync(t, b, c, context.Background(), 20)
	b.Release(20) // enough for small, not for big: small must not pass big
	select {
	case <-small:
		t.Fatal("a later, smaller request was served before an earlier one")
	case <-time.After(20 * time.Millisecond):
	}
	b.Release(80)
	if err := <-big; err != nil {
		t.Fatal(err)
	}
	if err := <-small; err != nil {
		t.Fatal(err)
	}
	if b.InUse() != 90 {
		t.Errorf("in use %d, want 90", b.InUse())
	}
	// A waiter at the front that gives up lets the ones behind it in.
	b.Release(90)
	b.Reserve(context.Background(), 50)
	front := reserveAsync(t, b, c, context.Background(), 60)
	c.advance(time.Second)
	behind := reserveAsync(t, b, c, context.Background(), 30)
	c.advance(59 * time.Second) // the front one's wait is over, not yet the other's
	if err := <-front; !errors.Is(err, ErrExhausted) {
		t.Errorf("front: %v, want ErrExhausted", err)
	}
	if err := <-behind; err != nil {
		t.Errorf("behind, once the front gave up: %v", err)
	}
	if b.InUse() != 80 {
		t.Errorf("in use %d, want 80", b.InUse())
	}
}

func TestContextEndsWait(t *testing.T) {
	c := newFakeClock()
	b := New(Options{Size: 10, Wait: time.Minute, Clock: c})
	b.Reserve(context.Background(), 10)
	ctx, cancel := context.WithCancel(context.Background())
	done := reserveAsync(t, b, c, ctx, 5)
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("%v, want context.Canceled", err)
	}
	if b.Refusals() != 0 || b.Waiting() != 0 || b.InUse() != 10 {
		t.Errorf("refusals %d waiting %d in use %d, want 0 0 10", b.Refusals(), b.Waiting(), b.InUse())
	}
}

func TestLogRateLimited(t *testing.T) {
	c := newFakeClock()
	var out bytes.Buffer
	b := New(Options{Size: 10, Clock: c, Logger: slog.New(slog.NewTextHandler(&out, nil))})
	b.Reserve(context.Background(), 10)
	for i := 0; i < 5; i++ {
		b.Reserve(context.Background(), 1) // no wait: refused at once
		c.advance(time.Second)
	}
	if n := strings.Count(out.String(), "memory budget used up"); n != 1 {
		t.Fatalf("%d lines in 5 s, want 1:\n%s", n, out.String())
	}
	if !strings.Contains(out.String(), "budget=10 in_use=10") || !strings.Contains(out.String(), "refusals=1 ") {
		t.Errorf("first line without the figures: %s", out.String())
	}
	c.advance(5 * time.Second)
	b.Reserve(context.Background(), 1)
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	if len(lines) != 2 || !strings.Contains(lines[1], "refusals=5 ") || !strings.Contains(lines[1], "refusals_total=6") {
		t.Errorf("second line should count the 5 refusals since the first:\n%s", out.String())
	}
}

func TestReleaseTooMuchPanics(t *testing.T) {
	b := New(Options{Size: 10})
	b.Reserve(context.Background(), 5)
	defer func() {
		if recover() == nil {
			t.Error("releasing more than reserved did not panic")
		}
	}()
	b.Release(6)
}
