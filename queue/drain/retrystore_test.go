package drain

import (
	"context"
	"errors"
	"testing"
	"time"
)

// stepClock is virtual time that passes only while someone waits on it.
type stepClock struct{ now time.Time }

func (c *stepClock) Now() time.Time { return c.now }
func (c *stepClock) After(d time.Duration) <-chan time.Time {
	c.now = c.now.Add(d)
	ch := make(chan time.Time, 1)
	ch <- c.now
	return ch
}

func TestRetryStore(t *testing.T) {
	errDown := errors.New("store down")
	stopped := make(chan struct{})
	close(stopped)
	cases := []struct {
		name      string
		failFirst int // f fails this many times, then succeeds
		stopping  <-chan struct{}
		wantErr   bool
		// Virtual time spent, at most.
		maxSpent time.Duration
		minCalls int
	}{
		{name: "succeeds at once", failFirst: 0, wantErr: false, maxSpent: 0, minCalls: 1},
		{name: "succeeds after failures", failFirst: 4, wantErr: false, maxSpent: 2 * time.Second, minCalls: 5},
		{name: "gives up after a minute", failFirst: 1 << 30, wantErr: true, maxSpent: time.Minute + 5*time.Second, minCalls: 10},
		// A stopping drain must not hold the process for a minute.
		{name: "stopping: gives up soon", failFirst: 1 << 30, stopping: stopped, wantErr: true, maxSpent: storeRetryStopping + 5*time.Second, minCalls: 2},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			clock := &stepClock{now: time.Unix(1e9, 0)}
			start := clock.now
			calls, fails := 0, 0
			err := retryStore(context.Background(), clock, tc.stopping, func(error) { fails++ }, func() error {
				calls++
				if calls <= tc.failFirst {
					return errDown
				}
				return nil
			})
			if (err != nil) != tc.wantErr || (err != nil && !errors.Is(err, errDown)) {
				t.Fatalf("err %v, want error %v", err, tc.wantErr)
			}
			if spent := clock.now.Sub(start); spent > tc.maxSpent {
				t.Fatalf("spent %v, want at most %v", spent, tc.maxSpent)
			}
			if calls < tc.minCalls {
				t.Fatalf("%d tries, want at least %d", calls, tc.minCalls)
			}
			if wantFails := min(tc.failFirst, 1); fails != wantFails {
				t.Fatalf("onFail heard %d failures, want %d (the first only)", fails, wantFails)
			}
		})
	}
}
