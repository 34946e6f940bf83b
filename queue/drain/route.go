package drain

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/mxq-dev/mxq/queue"
	"github.com/mxq-dev/mxq/queue/catalog"
	"github.com/mxq-dev/mxq/queue/delivery"
)

// routeDrain drains one route.
type routeDrain struct {
	d       *Drainer
	r       Route
	log     *slog.Logger
	gov     *governor
	breaker breaker
	kick    chan struct{}
	wake    <-chan struct{}
	// outcomes bounds the deliveries made but not yet recorded in the
	// queue (deleting a record costs the stream an fsync; a store faster
	// than that would otherwise pile up finished deliveries in memory, and
	// a crash would deliver all of them again). It is what bounds the
	// duplicates after a crash.
	outcomes chan struct{}

	mu       sync.Mutex
	ramp     *ramp
	pick     *picker
	done     int // deliveries finished in the current tick
	window   []picked
	inflight map[uint64]bool
	// recent holds records finished in the last recentTTL: the catalog
	// hears of a deletion a moment after it, through a tombstone, and a
	// look at the route meanwhile must not take the record for queued.
	recent    map[uint64]time.Time
	recentCut time.Time
	// later holds records to look at again at a given time: a read of
	// the queue that failed.
	later      map[uint64]laterPick
	counts     RouteState // the counters only
	lastErr    string
	bottleneck string
	idled      atomic.Bool // went idle (nothing due) during the tick
	wg         sync.WaitGroup
}

// picked is a record read for delivery, with its place in the due order.
type picked struct {
	at  catalog.Pos
	rec queue.Record
}

type laterPick struct {
	at   catalog.Pos
	when time.Time
}

// recentTTL is how long a finished record is remembered (see recent).
const recentTTL = 30 * time.Second

func newRouteDrain(d *Drainer, r Route) *routeDrain {
	rp := newRamp(r.Ramp, d.o.Clock.Now())
	return &routeDrain{
		d:        d,
		r:        r,
		log:      d.log.With("route", r.Name),
		ramp:     rp,
		pick:     newPicker(d.o.NewestFirst),
		gov:      newGovernor(rp.st.Rate, rp.st.Concurrency),
		breaker:  breaker{threshold: 3},
		kick:     make(chan struct{}, 1),
		outcomes: make(chan struct{}, max(2*r.Ramp.MaxConcurrency, 32)),
		wake:     d.idx.Wake(r.Name),
		inflight: map[uint64]bool{},
		recent:   map[uint64]time.Time{},
		later:    map[uint64]laterPick{},
	}
}

func (rd *routeDrain) state() RouteState {
	rd.mu.Lock()
	defer rd.mu.Unlock()
	st := rd.counts
	st.Route = rd.r.Name
	st.Circuit = rd.breaker.String()
	st.Ramp = rd.ramp.st
	st.MaxRate, st.MaxConc = rd.ramp.cfg.MaxRate, rd.ramp.cfg.MaxConcurrency
	st.InFlight = len(rd.inflight)
	st.LastError = rd.lastErr
	st.Bottleneck = rd.bottleneck
	return st
}

// apply pushes the ramp's limits to the governor and reports the state.
// Called with mu held.
func (rd *routeDrain) applyLocked() {
	rd.gov.set(rd.ramp.st.Rate, rd.ramp.st.Concurrency)
	if f := rd.d.o.OnRamp; f != nil {
		st := rd.ramp.st
		go f(rd.r.Name, st)
	}
}

func (rd *routeDrain) restore(st RampState) {
	rd.mu.Lock()
	rd.ramp.restore(st)
	rd.gov.set(rd.ramp.st.Rate, rd.ramp.st.Concurrency)
	rd.mu.Unlock()
}

func (rd *routeDrain) resetRamp() {
	rd.mu.Lock()
	rd.ramp.reset(rd.d.o.Clock.Now())
	rd.applyLocked()
	rd.mu.Unlock()
}

func (rd *routeDrain) setCeilings(rate float64, concurrency int) {
	rd.mu.Lock()
	rd.ramp.cfg.MaxRate, rd.ramp.cfg.MaxConcurrency = rate, concurrency
	rd.ramp.cfg.StartRate = min(rd.ramp.cfg.StartRate, rate)
	rd.ramp.cfg.StartConcurrency = min(rd.ramp.cfg.StartConcurrency, concurrency)
	rd.ramp.clamp()
	rd.applyLocked()
	rd.mu.Unlock()
}

func (rd *routeDrain) run(ctx context.Context) {
	ctl, stop := context.WithCancel(ctx)
	go rd.control(ctl)
	defer func() {
		rd.wg.Wait()
		stop()
	}()
	o := &rd.d.o
	select {
	case <-ctx.Done():
		return
	case <-rd.d.idx.Ready():
	}
	for ctx.Err() == nil {
		if o.Control != nil && o.Control.Paused(rd.r.Name) {
			rd.sleep(ctx, o.PollInterval)
			continue
		}
		if rd.breaker.isOpen() {
			rd.probe(ctx)
			continue
		}
		p, ok, err := rd.next(ctx)
		if err != nil {
			rd.log.Warn("reading the queue", "err", err)
			rd.sleep(ctx, o.PollInterval)
			continue
		}
		if !ok {
			rd.idle(ctx)
			continue
		}
		// A delivery holds an outcome token until its outcome is in the
		// queue; the store's slot is free as soon as the store answered.
		select {
		case rd.outcomes <- struct{}{}:
		case <-ctx.Done():
			rd.putBack(p.at)
			return
		}
		if err := rd.gov.acquire(ctx); err != nil {
			<-rd.outcomes
			rd.putBack(p.at)
			return
		}
		if rd.breaker.isOpen() {
			// Opened while we waited for a slot: this one waits too.
			rd.gov.release()
			<-rd.outcomes
			rd.putBack(p.at)
			continue
		}
		if c := o.Control; c != nil && c.Held(p.rec.Env.ID) {
			// Held while it waited for a slot.
			rd.gov.release()
			<-rd.outcomes
			continue
		}
		rd.mu.Lock()
		rd.inflight[p.rec.Seq] = true
		rd.mu.Unlock()
		rd.wg.Add(1)
		go func() {
			defer rd.wg.Done()
			defer func() { <-rd.outcomes }()
			rd.deliver(ctx, p)
		}()
	}
}

// control runs the ramp: every tick it judges the tick's deliveries and
// moves the limits.
func (rd *routeDrain) control(ctx context.Context) {
	tick := rd.ramp.cfg.Tick
	if tick <= 0 {
		tick = 250 * time.Millisecond
	}
	o := &rd.d.o
	for {
		select {
		case <-ctx.Done():
			return
		case <-o.Clock.After(tick):
		}
		now := o.Clock.Now()
		demand := rd.gov.takeDemand()
		demand.Idle = rd.idled.Swap(false)
		rd.mu.Lock()
		if rd.breaker.isOpen() {
			rd.done = 0
			rd.ramp.clearTick()
			rd.mu.Unlock()
			continue
		}
		tp := float64(rd.done) / tick.Seconds()
		rd.done = 0
		before := rd.ramp.st
		v := rd.ramp.tick(now, demand, tp)
		if v == verdictOpen {
			rd.lastErr = "most deliveries met overload replies"
			rd.mu.Unlock()
			if rd.breaker.trip() {
				rd.log.Warn("backend refuses most work, circuit opened; probing every "+o.ProbeInterval.String(), "throughput", tp)
			}
			continue
		}
		if b := rd.ramp.bottleneck; b != rd.bottleneck {
			switch b {
			case BottleneckMxq:
				rd.log.Warn("the drain is limited by mxq itself (CPU or reading the queue), not by the store; rate kept",
					"rate", round(rd.ramp.st.Rate), "throughput", round(tp), "store_latency", rd.ramp.st.Latency.Round(10*time.Microsecond))
			case BottleneckStore:
				rd.log.Info("the drain is limited by the store", "throughput", round(tp))
			default:
				if rd.bottleneck == BottleneckMxq {
					rd.log.Info("mxq no longer limits the drain", "throughput", round(tp))
				}
			}
			rd.bottleneck = b
		}
		if v == verdictShrink {
			rd.log.Info("backend struggling, slowing down", "rate", round(rd.ramp.st.Rate), "concurrency", rd.ramp.st.Concurrency,
				"latency", rd.ramp.st.Latency.Round(10*time.Microsecond), "baseline", rd.ramp.st.Baseline.Round(10*time.Microsecond), "throughput", round(tp))
		}
		if rd.ramp.st.Rate != before.Rate || rd.ramp.st.Concurrency != before.Concurrency {
			rd.applyLocked()
		}
		rd.mu.Unlock()
	}
}

func round(f float64) float64 { return float64(int(f*10)) / 10 }

// putBack returns a record taken for delivery that was not delivered: the
// picker looks there again.
func (rd *routeDrain) putBack(at catalog.Pos) {
	rd.mu.Lock()
	rd.pick.rewind(at)
	rd.mu.Unlock()
}

// lookLater has the picker look at a record again after wait.
func (rd *routeDrain) lookLater(seq uint64, at catalog.Pos, wait time.Duration) {
	rd.mu.Lock()
	rd.later[seq] = laterPick{at, rd.d.o.Clock.Now().Add(wait)}
	rd.mu.Unlock()
}

// finished remembers a record that left the queue. Called with mu held.
func (rd *routeDrain) finishedLocked(seq uint64, now time.Time) {
	delete(rd.inflight, seq)
	rd.recent[seq] = now.Add(recentTTL)
	if now.After(rd.recentCut) {
		// Amortized: the map holds what finished in the last recentTTL.
		for s, until := range rd.recent {
			if now.After(until) {
				delete(rd.recent, s)
			}
		}
		rd.recentCut = now.Add(recentTTL / 4)
	}
}

// next returns the next record to deliver, or ok=false when nothing is
// deliverable now.
func (rd *routeDrain) next(ctx context.Context) (picked, bool, error) {
	for {
		rd.mu.Lock()
		for len(rd.window) > 0 {
			p := rd.window[0]
			rd.window = rd.window[1:]
			if rd.usableLocked(p) {
				rd.mu.Unlock()
				return p, true, nil
			}
		}
		rd.mu.Unlock()
		dues, err := rd.look()
		if err != nil || len(dues) == 0 {
			return picked{}, false, err
		}
		w, err := rd.read(ctx, dues)
		if err != nil {
			return picked{}, false, err
		}
		rd.mu.Lock()
		rd.window = w
		rd.mu.Unlock()
	}
}

// look asks the catalog for the next records due, as the picker says.
func (rd *routeDrain) look() ([]catalog.Due, error) {
	o := &rd.d.o
	idx := rd.d.idx
	now := o.Clock.Now()
	rd.mu.Lock()
	defer rd.mu.Unlock()
	if at, ok := idx.Added(rd.r.Name); ok {
		rd.pick.rewind(at)
	}
	for seq, l := range rd.later {
		if !now.Before(l.when) {
			rd.pick.rewind(l.at)
			delete(rd.later, seq)
		}
	}
	rd.pick.advance(now)
	for !rd.pick.empty() {
		sp := rd.pick.span()
		rd.mu.Unlock()
		dues, err := idx.DueIn(rd.r.Name, sp.lo, sp.hi, o.Window, rd.pick.newest)
		rd.mu.Lock()
		if err != nil {
			return nil, err
		}
		var last catalog.Pos
		if len(dues) > 0 {
			last = dues[len(dues)-1].Pos
		}
		rd.pick.looked(last, len(dues) < o.Window)
		out := dues[:0]
		for _, d := range dues {
			if rd.inflight[d.Seq] || rd.recent[d.Seq].After(now) {
				continue
			}
			if _, ok := rd.later[d.Seq]; ok {
				continue
			}
			if c := o.Control; c != nil && c.Held(d.ID) {
				continue // the catalog moves it out of the due keys
			}
			out = append(out, d)
		}
		if len(out) > 0 {
			return out, nil
		}
	}
	return nil, nil
}

// read fetches the records of dues with their messages, in dues' order. A
// record the queue no longer holds is dropped (and the catalog told).
func (rd *routeDrain) read(ctx context.Context, dues []catalog.Due) ([]picked, error) {
	want := make(map[uint64]catalog.Due, len(dues))
	seqs := make([]uint64, 0, len(dues))
	for _, d := range dues {
		want[d.Seq] = d
		seqs = append(seqs, d.Seq)
	}
	slices.Sort(seqs)
	got := make(map[uint64]queue.Record, len(dues))
	subject := rd.d.src.QueueSubject(rd.r.Name)
	var gone []uint64
	for i := 0; i < len(seqs); {
		// One read covers the wanted records from seqs[i] on: due records
		// of a backlog are mostly consecutive on the route's subject, with
		// held ones or retries not due between them. Asking for as many
		// records as the wanted ones span (up to four times as many as
		// are wanted) reads past those in one request.
		n := len(seqs) - i
		n = int(min(seqs[len(seqs)-1]-seqs[i]+1, uint64(4*n)))
		recs, pending, err := rd.d.src.ReadFrom(ctx, subject, seqs[i], n, 16<<20)
		if err != nil {
			// What was not read is looked at again after RetryMin;
			// what was is delivered.
			for _, seq := range seqs[i:] {
				rd.lookLater(seq, want[seq].Pos, rd.d.o.RetryMin)
			}
			if len(got) == 0 {
				return nil, err
			}
			break
		}
		for _, r := range recs {
			if _, ok := want[r.Seq]; ok {
				got[r.Seq] = r
			}
		}
		// What the read covered: up to its last record, or, when the
		// subject holds nothing after it (no record at all, or none
		// pending), everything. A read cut short by its byte bound says
		// nothing about the records after it.
		covered := ^uint64(0)
		if len(recs) > 0 && pending > 0 {
			covered = recs[len(recs)-1].Seq
		}
		for ; i < len(seqs) && seqs[i] <= covered; i++ {
			if _, ok := got[seqs[i]]; !ok {
				gone = append(gone, seqs[i])
			}
		}
	}
	if len(gone) > 0 {
		rd.d.idx.Forget(gone...)
	}
	out := make([]picked, 0, len(got))
	for _, d := range dues {
		if r, ok := got[d.Seq]; ok {
			out = append(out, picked{d.Pos, r})
		}
	}
	return out, nil
}

// usableLocked decides about a record read from the queue. Called with mu
// held.
func (rd *routeDrain) usableLocked(p picked) bool {
	rec := p.rec
	if rd.inflight[rec.Seq] || rd.recent[rec.Seq].After(rd.d.o.Clock.Now()) {
		return false
	}
	if rec.Err != nil {
		// Never guess at a damaged record: leave it for the operator.
		rd.log.Error("damaged record left in queue", "seq", rec.Seq, "err", rec.Err)
		return false
	}
	if c := rd.d.o.Control; c != nil && c.Held(rec.Env.ID) {
		return false
	}
	return true
}

// idle waits for new mail, the next record's due time, a kick or the poll
// interval.
func (rd *routeDrain) idle(ctx context.Context) {
	rd.idled.Store(true)
	o := &rd.d.o
	now := o.Clock.Now()
	wait := o.PollInterval
	if at, ok, err := rd.d.idx.NextDue(rd.r.Name, now); err == nil && ok {
		wait = min(wait, at.Sub(now))
	}
	rd.mu.Lock()
	for _, l := range rd.later {
		wait = min(wait, l.when.Sub(now))
	}
	rd.mu.Unlock()
	if wait <= 0 {
		return
	}
	select {
	case <-ctx.Done():
	case <-rd.wake:
	case <-rd.kick:
	case <-o.Clock.After(wait):
	}
}

func (rd *routeDrain) sleep(ctx context.Context, d time.Duration) {
	select {
	case <-ctx.Done():
	case <-rd.kick:
	case <-rd.d.o.Clock.After(d):
	}
}

// probe waits one probe interval (with jitter, so nodes and routes do not
// probe in step) and checks whether the backend answers again. On success
// the circuit closes and the ramp starts over from the bottom: a store that
// just came back gets the gentle start, whatever the rate was before.
func (rd *routeDrain) probe(ctx context.Context) {
	o := &rd.d.o
	wait := time.Duration(float64(o.ProbeInterval) * (0.8 + 0.4*o.Rand.Float64()))
	rd.sleep(ctx, wait)
	if ctx.Err() != nil || !rd.breaker.isOpen() {
		return
	}
	pctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	err := rd.r.Deliverer.Probe(pctx)
	cancel()
	if m := o.Metrics; m != nil {
		m.Probe(rd.r.Name, err == nil)
	}
	if err != nil {
		// Every probe at Debug: an outage of days would fill the log.
		rd.log.Debug("probe failed, circuit stays open", "err", err)
		rd.setErr(err.Error())
		return
	}
	rd.mu.Lock()
	rd.ramp.reset(o.Clock.Now())
	rd.applyLocked()
	rd.mu.Unlock()
	rd.breaker.close()
	rd.log.Info("probe succeeded, circuit closed, ramping up", "rate", rd.r.Ramp.StartRate, "concurrency", rd.r.Ramp.StartConcurrency)
}

func (rd *routeDrain) setErr(s string) {
	rd.mu.Lock()
	rd.lastErr = s
	rd.mu.Unlock()
}

// deliver runs one delivery and records its outcome.
func (rd *routeDrain) deliver(ctx context.Context, p picked) {
	rec := p.rec
	start := rd.d.o.Clock.Now()
	// A delivery that has started is finished even if the drain is
	// stopping: cutting it off would only make a duplicate more likely.
	dctx := context.WithoutCancel(ctx)
	results, timing, err := rd.r.Deliverer.DeliverTimed(dctx, rec.Env, rd.d.src.Body(dctx, rec))
	latency := rd.d.o.Clock.Now().Sub(start)
	rd.gov.release()
	if errors.Is(err, delivery.ErrSource) {
		rd.unreadable(dctx, ctx.Done(), p, results, err)
		return
	}
	// The store's own time is what tells how it is doing; the rest
	// (opening a connection, reading the message from the queue, this
	// process's scheduling) is mxq's.
	out := Outcome{Latency: timing.Store, Own: latency - timing.Store, Results: len(results)}
	overload := errors.Is(err, delivery.ErrBusy) || errors.Is(err, os.ErrDeadlineExceeded)
	for _, r := range results {
		overload = overload || r.Overload()
	}
	out.Overload = overload
	if err != nil {
		if rd.breaker.failure(!errors.Is(err, delivery.ErrBusy)) {
			rd.log.Warn("backend unreachable, circuit opened; probing every "+rd.d.o.ProbeInterval.String(), "id", rec.Env.ID, "err", err)
		}
		rd.setErr(err.Error())
	} else {
		rd.breaker.success()
	}
	rd.mu.Lock()
	rd.ramp.observe(out)
	rd.done++
	if overload {
		rd.counts.Overloads++
		if rd.ramp.overloaded(rd.d.o.Clock.Now()) {
			rd.applyLocked()
		}
	}
	rd.mu.Unlock()
	rd.finish(dctx, ctx.Done(), p, results, err != nil, latency)
}

// unreadable handles a delivery cut off because the message could not be
// read from the queue. The store got nothing (the transaction was cut
// before its end). A message whose body is gone for good (a chunk missing)
// can never be delivered: its recipients are dead-lettered at once, with
// the reason, and the sender is told, instead of opening the circuit and
// retrying forever. Any other read error is the queue's passing trouble:
// the record is looked at again after RetryMin, without counting an
// attempt, until its lifetime ends.
func (rd *routeDrain) unreadable(ctx context.Context, stopping <-chan struct{}, p picked, results []delivery.Result, err error) {
	o := &rd.d.o
	rec := p.rec
	now := o.Clock.Now()
	expired := o.MaxLifetime > 0 && now.Sub(rec.Env.Arrived) > o.MaxLifetime
	if !errors.Is(err, queue.ErrDamaged) && !expired {
		rd.log.Warn("reading a message for delivery failed, will retry", "id", rec.Env.ID, "err", err)
		rd.setErr(err.Error())
		rd.mu.Lock()
		delete(rd.inflight, rec.Seq)
		rd.mu.Unlock()
		rd.lookLater(rec.Seq, p.at, o.RetryMin)
		return
	}
	rd.log.Error("message lost in the queue, dead-lettered", "id", rec.Env.ID, "err", err)
	for i := range results {
		results[i].Code, results[i].Enhanced = 554, "5.3.0"
		results[i].Text = "message damaged in the relay's queue, not delivered: " + err.Error()
		if expired && !errors.Is(err, queue.ErrDamaged) {
			results[i].Code, results[i].Enhanced = 550, "5.4.7"
			results[i].Text = "delivery time expired, last error: " + err.Error()
		}
	}
	rd.finish(ctx, stopping, p, results, false, 0)
}
