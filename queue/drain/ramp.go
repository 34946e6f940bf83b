package drain

import (
	"math"
	"slices"
	"time"
)

// RampConfig tunes how a route's allowed rate and concurrency follow the
// backend. The defaults (DefaultRamp) are explained field by field.
type RampConfig struct {
	// StartRate and StartConcurrency are where a route starts after an
	// outage, and at start-up with a backlog: low, because a store that
	// just came back is cold (caches, indexes) and may fall over again.
	StartRate        float64
	StartConcurrency int
	// MaxRate and MaxConcurrency are the operator's ceilings: the ramp
	// never goes above them.
	MaxRate        float64
	MaxConcurrency int
	// Tick is the control interval: signals are judged, and limits
	// changed, once per tick.
	Tick time.Duration
	// SlowStart multiplies the limits each healthy, busy tick until the
	// first sign of trouble (TCP's slow start): from 5 msg/s to 500 msg/s
	// in under two seconds with the defaults.
	SlowStart float64
	// Additive is the growth per healthy, busy tick after the first sign
	// of trouble, as a share of the current rate (congestion avoidance).
	Additive float64
	// Backoff multiplies the limits after an overload reply (421, 451,
	// 452 4.3.x) or a connection refused for being busy.
	Backoff float64
	// LatencyBackoff multiplies them when the store only got slower: a
	// gentler step, since slowness is the early warning, before refusals.
	LatencyBackoff float64
	// SaturationShare defines "slower": in a tick of at least MinSample
	// deliveries, the drain had more to send than it could, every slot its
	// rate needs at the store's unloaded latency was busy, and fewer than
	// SaturationShare of the allowed rate got through. The store then takes
	// longer per message than unloaded: it is queueing. A store whose
	// latency grows with load but which keeps up (a disk-bound Dovecot) is
	// not held back by that; one that stops keeping up is.
	SaturationShare float64
	MinSample       int
	// SlowTicks is how many ticks in a row must look slow (saturated, or
	// over LatencyTarget) before the limits shrink. One tick is a quarter
	// of a second: a GC pause or a moment without CPU on mxq's own host
	// can halve one tick's throughput without the store being any slower,
	// and shrinking from that throughput cut the rate by a third for
	// seconds. Overload replies are the store's own word and act at once.
	SlowTicks int
	// LatencyTarget is an absolute bound: a tick's median delivery time
	// above it means the store is struggling, whatever its throughput.
	LatencyTarget time.Duration
	// OpenShare is the share of overload replies among a tick's results
	// (with at least OpenMin results) that opens the circuit: the store is
	// refusing most work, so stop and probe instead of hammering it.
	OpenShare float64
	OpenMin   int
}

// DefaultRamp returns the defaults for the given ceilings.
func DefaultRamp(maxRate float64, maxConcurrency int) RampConfig {
	return RampConfig{
		StartRate:        math.Min(5, maxRate),
		StartConcurrency: 1,
		MaxRate:          maxRate,
		MaxConcurrency:   maxConcurrency,
		Tick:             250 * time.Millisecond,
		SlowStart:        2,
		Additive:         0.05,
		Backoff:          0.7,
		LatencyBackoff:   0.9,
		SaturationShare:  0.8,
		MinSample:        10,
		SlowTicks:        2,
		LatencyTarget:    time.Second,
		OpenShare:        0.5,
		OpenMin:          10,
	}
}

// Phase of the ramp.
const (
	PhaseSlowStart = "slow-start"
	PhaseSteady    = "steady"
)

// RampState is the ramp's whole state: what the cluster's control plane
// persists, so that a new leader continues where the old one stopped
// instead of jumping to the ceiling.
type RampState struct {
	Rate        float64       `json:"rate"`
	Concurrency int           `json:"concurrency"`
	Phase       string        `json:"phase"`
	SSThresh    float64       `json:"ssthresh"` // rate at which slow start ends
	Latency     time.Duration `json:"latency"`  // moving average
	Baseline    time.Duration `json:"baseline"` // lowest recent latency
	Updated     time.Time     `json:"updated"`
}

// Outcome is what the ramp learns from one delivery.
type Outcome struct {
	// Latency is the store's own time: waiting for its replies and for
	// it to take the message.
	Latency time.Duration
	// Own is the rest of the delivery's time: mxq's (a new connection,
	// reading the message from the queue, scheduling).
	Own time.Duration
	// Overload: the store answered 421, 451 or 452 4.3.x for a recipient,
	// or refused the connection as busy.
	Overload bool
	// Results is how many recipient results the delivery produced.
	Results int
}

// ramp is AIMD on a route's rate and concurrency, driven by latency and
// overload replies. It is a plain value: time comes in as arguments, so its
// behaviour is tested without sleeping.
type ramp struct {
	cfg RampConfig
	st  RampState

	// Accumulated during the current tick.
	n, over, results int
	lats             []time.Duration // bounded sample
	// baseline window: the median latency of each of the last ticks; the
	// baseline is the lowest of them, the store's latency when nothing
	// queues in it.
	medians [40]time.Duration
	mi      int
	// holdUntil suppresses growth right after a decrease, while the
	// deliveries already in flight at the old limits complete.
	holdUntil time.Time
	// lastThroughput is the deliveries per second of the last tick.
	lastThroughput float64
	// slowRun counts the slow ticks in a row (see SlowTicks).
	slowRun int
	// slots samples each delivery's whole time (the store's and mxq's):
	// how long it holds a slot; slotMedians and slotBase are its window
	// and its lowest median, the slot time when nothing queues.
	slots       []time.Duration
	slotMedians [40]time.Duration
	slotBase    time.Duration
	// bottleneck is what the last judged tick found limiting the drain.
	bottleneck string
}

func newRamp(cfg RampConfig, now time.Time) *ramp {
	r := &ramp{cfg: cfg}
	r.reset(now)
	return r
}

// reset starts over at the start values, in slow start: after an outage.
func (r *ramp) reset(now time.Time) {
	r.st = RampState{
		Rate: r.cfg.StartRate, Concurrency: r.cfg.StartConcurrency,
		Phase: PhaseSlowStart, SSThresh: r.cfg.MaxRate, Updated: now,
	}
	r.medians = [40]time.Duration{}
	r.slotMedians = [40]time.Duration{}
	r.slotBase = 0
	r.slowRun = 0
	r.clearTick()
}

// restore continues from a persisted state, within today's ceilings.
func (r *ramp) restore(st RampState) {
	r.st = st
	r.clamp()
}

func (r *ramp) clearTick() {
	r.n, r.over, r.results = 0, 0, 0
	r.lats = r.lats[:0]
	r.slots = r.slots[:0]
}

// observe records one delivery.
func (r *ramp) observe(o Outcome) {
	r.n++
	r.results += max(o.Results, 1)
	if o.Overload {
		r.over++
	}
	if len(r.lats) < 1024 {
		r.lats = append(r.lats, o.Latency)
		r.slots = append(r.slots, o.Latency+o.Own)
	}
	// The average follows each delivery, so a tick sees fresh values.
	const alpha = 0.2
	if r.st.Latency == 0 {
		r.st.Latency = o.Latency
	} else {
		r.st.Latency = time.Duration(alpha*float64(o.Latency) + (1-alpha)*float64(r.st.Latency))
	}
}

// Verdict of a tick.
type verdict int

const (
	verdictHold verdict = iota
	verdictGrow
	verdictShrink
	verdictOpen
)

// Demand says which limits held deliveries back during a tick: only a
// limit that was reached is worth raising. Idle says the drain ran out of
// records due during the tick: what it delivered was all there was.
type Demand struct {
	Rate, Slots, Idle bool
}

// Bottlenecks a tick can find (RouteState.Bottleneck).
const (
	BottleneckStore = "store"
	BottleneckMxq   = "mxq"
)

// tick judges the interval that just ended: d is which limits were reached,
// throughput the deliveries per second completed. It returns what it did.
func (r *ramp) tick(now time.Time, d Demand, throughput float64) verdict {
	defer r.clearTick()
	r.lastThroughput = throughput
	// Medians, not means: a few deliveries held up by this process's own
	// scheduling (GC, a busy CPU) must not read as a slow store.
	var median time.Duration
	if len(r.lats) > 0 {
		slices.Sort(r.lats)
		median = r.lats[len(r.lats)/2]
		r.medians[r.mi%len(r.medians)] = median
		r.mi++
	}
	r.st.Baseline = 0
	for _, m := range r.medians {
		if m > 0 && (r.st.Baseline == 0 || m < r.st.Baseline) {
			r.st.Baseline = m
		}
	}
	if len(r.slots) > 0 {
		slices.Sort(r.slots)
		r.slotMedians[(r.mi-1)%len(r.slotMedians)] = r.slots[len(r.slots)/2]
	}
	r.slotBase = 0
	for _, m := range r.slotMedians {
		if m > 0 && (r.slotBase == 0 || m < r.slotBase) {
			r.slotBase = m
		}
	}
	if r.results >= r.cfg.OpenMin && float64(r.over) >= r.cfg.OpenShare*float64(r.results) {
		return verdictOpen
	}
	// Saturated: the drain wanted more than it got through, with as many
	// deliveries in flight as the rate needs at the store's unloaded
	// latency, and the store itself answers slower than unloaded: it
	// takes longer per message, and more concurrency would only queue more
	// work in it. The store's own time is what is judged (its replies,
	// taking the message), never mxq's: when this process is short of CPU
	// or slow to read the queue, its deliveries take longer, the store
	// does not, and cutting the rate would only slow the drain further.
	short := r.n >= r.cfg.MinSample && throughput < r.cfg.SaturationShare*r.st.Rate
	// Slower by half, and by a millisecond at least: at a fraction of a
	// millisecond, jitter on a busy host doubles a latency without the
	// store queueing anything.
	storeSlower := r.st.Baseline > 0 && median > max(r.st.Baseline*3/2, r.st.Baseline+time.Millisecond)
	saturated := short && d.Slots && r.st.Concurrency >= r.needed() && storeSlower
	slow := median > r.cfg.LatencyTarget || saturated
	switch {
	case slow || r.over > 0:
		r.bottleneck = BottleneckStore
	case short && !d.Rate && !d.Idle:
		// Neither the allowance nor the backlog held it back, and the
		// store is as fast as unloaded: mxq is what limits the drain.
		r.bottleneck = BottleneckMxq
	default:
		r.bottleneck = ""
	}
	if slow {
		r.slowRun++
	} else {
		r.slowRun = 0
	}
	if slow && r.over == 0 && r.slowRun < max(r.cfg.SlowTicks, 1) {
		// Not yet a trend: neither grow nor shrink.
		return verdictHold
	}
	switch {
	case r.over > 0 || slow:
		if now.Before(r.holdUntil) {
			// Signals from deliveries sent before the last decrease.
			return verdictHold
		}
		r.shrink(now, r.over > 0, throughput)
		return verdictShrink
	case (d.Rate || d.Slots) && !now.Before(r.holdUntil):
		if r.st.Phase == PhaseSlowStart && r.st.Rate < r.st.SSThresh {
			if d.Rate {
				r.st.Rate *= r.cfg.SlowStart
			}
			if d.Slots && r.st.Concurrency < r.needed() {
				r.st.Concurrency = min(r.needed(), int(math.Ceil(float64(r.st.Concurrency)*r.cfg.SlowStart)))
			}
		} else {
			r.st.Phase = PhaseSteady
			if d.Rate {
				r.st.Rate += math.Max(r.st.Rate*r.cfg.Additive, r.cfg.StartRate/5)
			}
			if d.Slots && r.st.Concurrency < r.needed() {
				r.st.Concurrency++
			}
		}
		r.clamp()
		r.st.Updated = now
		return verdictGrow
	}
	return verdictHold
}

// shrink backs off, by Backoff after an overload reply and by
// LatencyBackoff when the store only got slower, from throughput when it is
// below the allowance (an allowance that was never used is no measure of
// anything).
func (r *ramp) shrink(now time.Time, overload bool, throughput float64) {
	f := r.cfg.LatencyBackoff
	if overload {
		f = r.cfg.Backoff
	}
	base := r.st.Rate
	if throughput > 0 && throughput < base {
		base = throughput
	}
	r.st.Rate = base * f
	conc := int(math.Floor(float64(r.st.Concurrency) * f))
	if !overload {
		// The store got slower, it did not refuse connections: keep the
		// connections the lower rate needs by Little's law. Flooring 3 × 0.9
		// to 2 left the drain short of slots whenever its own latency
		// wobbled, which read as saturation again.
		conc = min(r.st.Concurrency, max(conc, r.neededAt(r.st.Rate)))
	}
	r.st.Concurrency = conc
	r.slowRun = 0
	r.st.SSThresh = r.st.Rate
	r.st.Phase = PhaseSteady
	// Deliveries already under way at the old limits will report too;
	// they are not a reason to back off again.
	r.holdUntil = now.Add(2 * r.cfg.Tick)
	r.clamp()
	r.st.Updated = now
}

// overloaded reacts to an overload reply at once, without waiting for the
// end of the tick: the store said no, and every delivery sent at the old
// rate until then would meet the same answer. It reports whether it
// changed the limits.
func (r *ramp) overloaded(now time.Time) bool {
	if now.Before(r.holdUntil) {
		return false
	}
	r.shrink(now, true, r.lastThroughput)
	return true
}

// needed is the concurrency the allowed rate takes at the store's
// unloaded latency (Little's law), with room for twice that latency. More
// connections than that cannot raise throughput: they only queue more work
// inside a store that is already slowing down, so slot waits beyond it do
// not grow the concurrency.
func (r *ramp) needed() int { return r.neededAt(r.st.Rate) }

// neededAt is needed for an allowed rate of rate. A slot is held for the
// whole delivery, mxq's part included, so the unloaded slot time counts.
func (r *ramp) neededAt(rate float64) int {
	lat := max(r.slotBase, r.st.Baseline)
	if lat <= 0 {
		lat = r.st.Latency
	}
	if lat <= 0 {
		return r.st.Concurrency + 1 // nothing measured yet
	}
	return int(math.Ceil(rate*lat.Seconds()*2)) + 1
}

func (r *ramp) clamp() {
	r.st.Rate = math.Max(r.cfg.StartRate, math.Min(r.st.Rate, r.cfg.MaxRate))
	r.st.Concurrency = max(r.cfg.StartConcurrency, min(r.st.Concurrency, r.cfg.MaxConcurrency))
	if r.st.Phase == "" {
		r.st.Phase = PhaseSlowStart
	}
}
