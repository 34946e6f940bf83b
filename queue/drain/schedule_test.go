package drain

import (
	"testing"
	"time"
)

func TestBackoffSchedule(t *testing.T) {
	min, max := 5*time.Minute, time.Hour
	cases := []struct {
		attempts int
		u        float64
		want     time.Duration
	}{
		{1, 0.5, 5 * time.Minute},
		{2, 0.5, 10 * time.Minute},
		{3, 0.5, 20 * time.Minute},
		{4, 0.5, 40 * time.Minute},
		{5, 0.5, time.Hour}, // capped
		{50, 0.5, time.Hour},
		{1, 0, 5 * time.Minute * 3 / 4},  // jitter floor
		{5, 0.999999, time.Hour * 5 / 4}, // jitter ceiling (just under)
	}
	for _, tc := range cases {
		got := backoff(min, max, tc.attempts, tc.u)
		if d := got - tc.want; d < -10*time.Millisecond || d > 10*time.Millisecond {
			t.Errorf("attempts %d u %v: %v, want %v", tc.attempts, tc.u, got, tc.want)
		}
	}
}

func TestBreaker(t *testing.T) {
	b := breaker{threshold: 3}
	if b.failure(true) || b.failure(true) {
		t.Fatal("opened before the threshold")
	}
	b.success()
	if b.failure(true) || b.failure(true) || b.isOpen() {
		t.Fatal("a success did not reset the count")
	}
	if !b.failure(true) || !b.isOpen() {
		t.Fatal("did not open at the threshold")
	}
	if b.failure(true) {
		t.Fatal("reported opening twice")
	}
	b.close()
	// Busy (421) counts half: the store is up, slowing down comes first.
	for i := 0; i < 5; i++ {
		if b.failure(false) {
			t.Fatalf("opened after %d busy replies", i+1)
		}
	}
	if !b.failure(false) {
		t.Fatal("six busy replies in a row did not open the circuit")
	}
	b.close()
	if !b.trip() || b.trip() {
		t.Fatal("trip should open once")
	}
}
