package drain

import (
	"math"
	"testing"
	"time"
)

var t0 = time.Date(2026, 11, 22, 12, 0, 0, 0, time.UTC)

func TestRampSlowStartThenBackoff(t *testing.T) {
	cfg := DefaultRamp(1000, 16)
	r := newRamp(cfg, t0)
	now := t0
	step := func(d Demand, lat time.Duration, overload bool, tp float64) verdict {
		r.observe(Outcome{Latency: lat, Overload: overload, Results: 1})
		now = now.Add(cfg.Tick)
		return r.tick(now, d, tp)
	}
	// Slow start doubles the rate each busy, healthy tick.
	want := cfg.StartRate
	for i := 0; i < 5; i++ {
		if v := step(Demand{Rate: true}, 2*time.Millisecond, false, want); v != verdictGrow {
			t.Fatalf("tick %d: verdict %d, want grow", i, v)
		}
		want *= 2
		if r.st.Rate != want {
			t.Fatalf("tick %d: rate %v, want %v", i, r.st.Rate, want)
		}
	}
	if r.st.Concurrency != cfg.StartConcurrency {
		t.Fatalf("concurrency grew to %d although slots were never the limit", r.st.Concurrency)
	}
	// An overload reply: back off from what got through, leave slow start.
	if v := step(Demand{Rate: true}, 2*time.Millisecond, true, 100); v != verdictShrink {
		t.Fatalf("verdict %d after an overload reply, want shrink", v)
	}
	if got := r.st.Rate; math.Abs(got-100*cfg.Backoff) > 1e-9 {
		t.Fatalf("rate after backoff %v, want %v", got, 100*cfg.Backoff)
	}
	if r.st.Phase != PhaseSteady {
		t.Fatalf("phase %s", r.st.Phase)
	}
	// The next signals come from deliveries sent at the old rate: held.
	if v := step(Demand{Rate: true}, 2*time.Millisecond, true, 100); v != verdictHold {
		t.Fatalf("verdict %d right after a decrease, want hold", v)
	}
	step(Demand{Rate: true}, 2*time.Millisecond, false, 70)
	// Then additive growth.
	before := r.st.Rate
	if v := step(Demand{Rate: true}, 2*time.Millisecond, false, 70); v != verdictGrow {
		t.Fatalf("verdict %d, want grow", v)
	}
	if got := r.st.Rate; math.Abs(got-before*(1+cfg.Additive)) > 1e-9 {
		t.Fatalf("additive step to %v from %v", got, before)
	}
}

func TestRampNeedsDemandToGrow(t *testing.T) {
	r := newRamp(DefaultRamp(1000, 16), t0)
	for i := 1; i <= 10; i++ {
		r.observe(Outcome{Latency: time.Millisecond, Results: 1})
		if v := r.tick(t0.Add(time.Duration(i)*time.Second), Demand{}, 1); v != verdictHold {
			t.Fatalf("grew without demand (verdict %d)", v)
		}
	}
	if r.st.Rate != 5 {
		t.Fatalf("rate %v", r.st.Rate)
	}
}

func TestRampSlowSignals(t *testing.T) {
	cfg := DefaultRamp(1000, 16)
	lat := func(d time.Duration, n int) []time.Duration {
		out := make([]time.Duration, n)
		for i := range out {
			out[i] = d
		}
		return out
	}
	// Each case is two ticks alike: a slow signal is acted on only when
	// it lasts (SlowTicks = 2), so a hiccup of one tick costs nothing.
	cases := []struct {
		name        string
		lats        []time.Duration
		demand      Demand
		conc        int
		throughput  float64 // against an allowance of 100/s
		first, then verdict
	}{
		{"keeping up", lat(2*time.Millisecond, 20), Demand{Rate: true}, 1, 100, verdictGrow, verdictGrow},
		{"slower but keeping up (a disk-bound store)", lat(20*time.Millisecond, 20), Demand{Slots: true, Rate: true}, 4, 95, verdictGrow, verdictGrow},
		{"saturated: every needed slot busy, 60% through", lat(30*time.Millisecond, 20), Demand{Slots: true}, 4, 60, verdictHold, verdictShrink},
		{"short of slots, not saturated: grow them", lat(30*time.Millisecond, 20), Demand{Slots: true}, 1, 60, verdictGrow, verdictGrow},
		{"too few deliveries to judge", lat(30*time.Millisecond, 3), Demand{Slots: true}, 4, 60, verdictGrow, verdictGrow},
		{"over the absolute target", lat(2*time.Second, 20), Demand{Rate: true}, 1, 100, verdictHold, verdictShrink},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := newRamp(cfg, t0)
			// An unloaded baseline of 1 ms, then the ticks under test, at 100/s.
			for i := 0; i < 20; i++ {
				r.observe(Outcome{Latency: time.Millisecond, Results: 1})
			}
			now := t0.Add(cfg.Tick)
			r.tick(now, Demand{}, 100)
			for i, want := range []verdict{tc.first, tc.then} {
				r.st.Rate, r.st.Phase, r.st.Concurrency = 100, PhaseSteady, tc.conc
				for _, l := range tc.lats {
					r.observe(Outcome{Latency: l, Results: 1})
				}
				now = now.Add(cfg.Tick)
				if v := r.tick(now, tc.demand, tc.throughput); v != want {
					t.Fatalf("tick %d: verdict %d, want %d (needed %d connections)", i+1, v, want, r.needed())
				}
			}
		})
	}
}

// A slow tick between healthy ones is a hiccup (GC, a busy CPU on mxq's
// host): the limits stay. Two in a row are a trend.
func TestRampIgnoresOneSlowTick(t *testing.T) {
	cfg := DefaultRamp(1000, 16)
	r := newRamp(cfg, t0)
	now := t0
	tick := func(l time.Duration, d Demand, tp float64) verdict {
		for i := 0; i < 20; i++ {
			r.observe(Outcome{Latency: l, Results: 1})
		}
		now = now.Add(cfg.Tick)
		return r.tick(now, d, tp)
	}
	tick(time.Millisecond, Demand{}, 100)
	r.st.Rate, r.st.Phase, r.st.Concurrency = 100, PhaseSteady, 4
	for i, step := range []struct {
		slow bool
		want verdict
	}{{true, verdictHold}, {false, verdictGrow}, {true, verdictHold}, {false, verdictGrow}, {true, verdictHold}, {true, verdictShrink}} {
		var v verdict
		if step.slow {
			v = tick(30*time.Millisecond, Demand{Slots: true}, 0.5*r.st.Rate)
		} else {
			v = tick(time.Millisecond, Demand{Rate: true}, r.st.Rate)
		}
		if v != step.want {
			t.Fatalf("tick %d (slow %v): verdict %d, want %d", i+1, step.slow, v, step.want)
		}
	}
}

// Backing off for slowness keeps the connections the new rate needs by
// Little's law; backing off for an overload reply cuts them too.
func TestRampShrinkKeepsNeededConnections(t *testing.T) {
	cfg := DefaultRamp(1000, 16)
	for _, tc := range []struct {
		name     string
		overload bool
		want     int
	}{
		// 3 connections at 500/s and a 1.25 ms baseline: the lower rate
		// (0.9 × 500) still needs ⌈450 × 2.5 ms⌉ + 1 = 3.
		{"slower", false, 3},
		{"overload reply", true, 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newRamp(cfg, t0)
			r.st.Rate, r.st.Phase, r.st.Concurrency, r.st.Baseline = 500, PhaseSteady, 3, 1250*time.Microsecond
			r.shrink(t0, tc.overload, 500)
			if r.st.Concurrency != tc.want {
				t.Fatalf("concurrency %d after backing off from 3, want %d", r.st.Concurrency, tc.want)
			}
		})
	}
}

func TestRampOpensOnOverloadShare(t *testing.T) {
	cfg := DefaultRamp(1000, 16)
	r := newRamp(cfg, t0)
	for i := 0; i < 20; i++ {
		r.observe(Outcome{Latency: time.Millisecond, Overload: i%2 == 0, Results: 1})
	}
	if v := r.tick(t0.Add(time.Second), Demand{Rate: true}, 80); v != verdictOpen {
		t.Fatalf("verdict %d with half the results overloaded, want open", v)
	}
	// A few overload replies among many only slow down.
	r = newRamp(cfg, t0)
	for i := 0; i < 20; i++ {
		r.observe(Outcome{Latency: time.Millisecond, Overload: i == 0, Results: 1})
	}
	if v := r.tick(t0.Add(time.Second), Demand{Rate: true}, 80); v != verdictShrink {
		t.Fatalf("verdict %d with one overload reply in 20, want shrink", v)
	}
}

func TestRampRespectsCeilingsAndFloors(t *testing.T) {
	cfg := DefaultRamp(50, 3)
	r := newRamp(cfg, t0)
	now := t0
	for i := 0; i < 100; i++ {
		// 100 ms per delivery: 50 msg/s need 5 or more connections.
		r.observe(Outcome{Latency: 100 * time.Millisecond, Results: 1})
		now = now.Add(cfg.Tick)
		r.tick(now, Demand{Rate: true, Slots: true}, r.st.Rate)
		if r.st.Rate > 50 || r.st.Concurrency > 3 {
			t.Fatalf("tick %d: %v msg/s, %d connections: over the ceilings", i, r.st.Rate, r.st.Concurrency)
		}
	}
	if r.st.Rate != 50 || r.st.Concurrency != 3 {
		t.Fatalf("did not reach the ceilings: %v, %d", r.st.Rate, r.st.Concurrency)
	}
	for i := 0; i < 100; i++ {
		r.observe(Outcome{Latency: time.Millisecond, Overload: true, Results: 1})
		now = now.Add(cfg.Tick)
		r.tick(now, Demand{Rate: true}, 1)
		if r.st.Rate < cfg.StartRate || r.st.Concurrency < 1 {
			t.Fatalf("tick %d: fell below the floor: %v, %d", i, r.st.Rate, r.st.Concurrency)
		}
	}
}

// store is a toy mailbox store for the ramp: it completes at most capacity
// deliveries per second; offered load beyond that queues (latency grows
// with the excess) and, past twice its capacity, is refused.
type store struct{ capacity float64 }

func (s store) serve(offered float64) (throughput float64, latency time.Duration, overloadShare float64) {
	base := 2 * time.Millisecond
	if offered <= s.capacity {
		return offered, base, 0
	}
	excess := offered/s.capacity - 1
	latency = base + time.Duration(excess*float64(20*time.Millisecond))
	if offered > 2*s.capacity {
		overloadShare = 1 - 2*s.capacity/offered
	}
	return s.capacity, latency, overloadShare
}

// simulate runs the ramp against the toy store and returns the delivered
// total, the overload replies, and the highest rate allowed.
func simulate(cfg RampConfig, capacity func(time.Duration) float64, d time.Duration) (delivered, overloads, maxRate float64) {
	r := newRamp(cfg, t0)
	for el := time.Duration(0); el < d; el += cfg.Tick {
		s := store{capacity(el)}
		tp, lat, share := s.serve(r.st.Rate)
		n := tp * cfg.Tick.Seconds()
		delivered += n
		overloads += share * r.st.Rate * cfg.Tick.Seconds()
		for i := 0; i < int(math.Max(1, n)); i++ {
			r.observe(Outcome{Latency: lat, Overload: float64(i) < share*n, Results: 1})
		}
		r.tick(t0.Add(el+cfg.Tick), Demand{Rate: true}, tp)
		maxRate = math.Max(maxRate, r.st.Rate)
	}
	return
}

func TestRampFollowsCapacity(t *testing.T) {
	cfg := DefaultRamp(2000, 16)
	cases := []struct {
		name     string
		capacity func(time.Duration) float64
		optimal  float64 // deliveries an oracle would make
	}{
		{"steady 500/s", func(time.Duration) float64 { return 500 }, 500 * 60},
		{"halves at 30s", func(el time.Duration) float64 {
			if el < 30*time.Second {
				return 500
			}
			return 250
		}, 500*30 + 250*30},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			delivered, overloads, maxRate := simulate(cfg, tc.capacity, time.Minute)
			t.Logf("delivered %.0f of an optimal %.0f (%.2f), %.0f overload replies, peak allowance %.0f/s",
				delivered, tc.optimal, delivered/tc.optimal, overloads, maxRate)
			if delivered < 0.85*tc.optimal {
				t.Errorf("delivered only %.2f of the optimum", delivered/tc.optimal)
			}
			if overloads > 0.01*delivered {
				t.Errorf("overload replies %.0f are more than 1%% of %.0f deliveries", overloads, delivered)
			}
			if maxRate > cfg.MaxRate {
				t.Errorf("allowance %v over the ceiling", maxRate)
			}
		})
	}
}

// mxq's own slowness is not the store's: when deliveries take longer
// because of this process (its CPU, reading the queue) while the store
// answers as fast as unloaded, the rate is kept and the bottleneck named;
// when the store's own time grows, it is the store.
func TestRampTellsItsOwnSlownessFromTheStores(t *testing.T) {
	cfg := DefaultRamp(1000, 16)
	cases := []struct {
		name      string
		store     time.Duration // the store's own time per delivery
		own       time.Duration // mxq's
		demand    Demand
		wantV     verdict
		wantNeck  string
		wantShrnk bool
	}{
		{"mxq slow, store as unloaded, slots busy", time.Millisecond, 40 * time.Millisecond, Demand{Slots: true}, verdictGrow, BottleneckMxq, false},
		{"mxq slow reading the queue, no limit reached", time.Millisecond, 0, Demand{}, verdictHold, BottleneckMxq, false},
		{"store slower than unloaded, slots busy", 30 * time.Millisecond, 0, Demand{Slots: true}, verdictShrink, BottleneckStore, true},
		{"nothing left to send", time.Millisecond, 0, Demand{Idle: true}, verdictHold, "", false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := newRamp(cfg, t0)
			for i := 0; i < 20; i++ {
				r.observe(Outcome{Latency: time.Millisecond, Results: 1})
			}
			now := t0.Add(cfg.Tick)
			r.tick(now, Demand{}, 100)
			var v verdict
			for i := 0; i < 2; i++ {
				r.st.Rate, r.st.Phase, r.st.Concurrency = 100, PhaseSteady, 4
				for j := 0; j < 20; j++ {
					r.observe(Outcome{Latency: tc.store, Own: tc.own, Results: 1})
				}
				now = now.Add(cfg.Tick)
				v = r.tick(now, tc.demand, 50) // half the allowance got through
			}
			if v != tc.wantV || r.bottleneck != tc.wantNeck {
				t.Fatalf("verdict %d bottleneck %q, want %d %q", v, r.bottleneck, tc.wantV, tc.wantNeck)
			}
			if shrunk := r.st.Rate < 100; shrunk != tc.wantShrnk {
				t.Fatalf("rate %v after the ticks: shrunk %v, want %v", r.st.Rate, shrunk, tc.wantShrnk)
			}
		})
	}
}
