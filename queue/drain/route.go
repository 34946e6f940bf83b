package drain

import (
	"container/heap"
	"context"
	"errors"
	"log/slog"
	"os"
	"sync"
	"time"

	"github.com/mxq-dev/mxq/queue"
	"github.com/mxq-dev/mxq/queue/delivery"
)

// routeDrain drains one route.
type routeDrain struct {
	d       *Drainer
	r       Route
	log     *slog.Logger
	scan    *scanner
	gov     *governor
	breaker breaker
	kick    chan struct{}
	notify  <-chan struct{}

	mu       sync.Mutex
	ramp     *ramp
	done     int // deliveries finished in the current tick
	window   []queue.Record
	deferred deferHeap
	isDefer  map[uint64]bool
	inflight map[uint64]bool
	counts   RouteState // the counters only
	lastErr  string
	wg       sync.WaitGroup
}

func newRouteDrain(d *Drainer, r Route) *routeDrain {
	rp := newRamp(r.Ramp, d.o.Clock.Now())
	return &routeDrain{
		d:   d,
		r:   r,
		log: d.log.With("route", r.Name),
		scan: &scanner{
			src: d.src, subject: d.src.QueueSubject(r.Name), newest: d.o.NewestFirst,
			window: d.o.Window, bytes: 16 << 20,
		},
		ramp:     rp,
		gov:      newGovernor(rp.st.Rate, rp.st.Concurrency),
		breaker:  breaker{threshold: 3},
		kick:     make(chan struct{}, 1),
		notify:   d.src.Notify(),
		isDefer:  map[uint64]bool{},
		inflight: map[uint64]bool{},
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
	st.Deferred = len(rd.deferred)
	st.LastError = rd.lastErr
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
	rescanAt := o.Clock.Now().Add(o.RescanInterval)
	for ctx.Err() == nil {
		if o.Control != nil && o.Control.Paused(rd.r.Name) {
			rd.sleep(ctx, o.PollInterval)
			continue
		}
		if rd.breaker.isOpen() {
			rd.probe(ctx)
			continue
		}
		if now := o.Clock.Now(); now.After(rescanAt) {
			rd.scan.rescan()
			rescanAt = now.Add(o.RescanInterval)
		}
		rec, ok, err := rd.next(ctx)
		if err != nil {
			rd.log.Warn("reading the queue", "err", err)
			rd.sleep(ctx, o.PollInterval)
			continue
		}
		if !ok {
			rd.idle(ctx)
			continue
		}
		if err := rd.gov.acquire(ctx); err != nil {
			rd.putBack(rec)
			return
		}
		if rd.breaker.isOpen() {
			// Opened while we waited for a slot: this one waits too.
			rd.gov.release()
			rd.putBack(rec)
			continue
		}
		rd.mu.Lock()
		rd.inflight[rec.Seq] = true
		rd.mu.Unlock()
		rd.wg.Add(1)
		go func() {
			defer rd.wg.Done()
			rd.deliver(ctx, rec)
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

// putBack returns a record taken for delivery that was not delivered.
func (rd *routeDrain) putBack(rec queue.Record) {
	rd.mu.Lock()
	rd.deferLocked(rec.Seq, rd.d.o.Clock.Now())
	rd.mu.Unlock()
}

func (rd *routeDrain) deferLocked(seq uint64, due time.Time) {
	if rd.isDefer[seq] {
		return
	}
	rd.isDefer[seq] = true
	heap.Push(&rd.deferred, deferred{seq, due})
}

// next returns the next record to deliver, or ok=false when nothing is
// deliverable now.
func (rd *routeDrain) next(ctx context.Context) (queue.Record, bool, error) {
	o := &rd.d.o
	now := o.Clock.Now()
	// Due retries first: they have waited longest.
	rd.mu.Lock()
	for len(rd.deferred) > 0 && !rd.deferred[0].due.After(now) {
		it := heap.Pop(&rd.deferred).(deferred)
		delete(rd.isDefer, it.seq)
		rd.mu.Unlock()
		rec, err := rd.d.src.Get(ctx, it.seq)
		rd.mu.Lock()
		if err != nil {
			continue // delivered, deleted or rewritten meanwhile
		}
		if r, ok := rd.usable(rec, now); ok {
			rd.mu.Unlock()
			return r, true, nil
		}
	}
	rd.mu.Unlock()
	for {
		rd.mu.Lock()
		for len(rd.window) > 0 {
			rec := rd.window[0]
			rd.window = rd.window[1:]
			if r, ok := rd.usable(rec, now); ok {
				rd.mu.Unlock()
				return r, true, nil
			}
		}
		rd.mu.Unlock()
		if rd.scan.empty() {
			last, err := rd.d.src.LastSeq(ctx)
			if err != nil {
				return queue.Record{}, false, err
			}
			rd.scan.extend(last)
			if rd.scan.empty() {
				return queue.Record{}, false, nil
			}
		}
		recs, err := rd.scan.next(ctx)
		if err != nil {
			return queue.Record{}, false, err
		}
		if len(recs) == 0 {
			return queue.Record{}, false, nil
		}
		rd.mu.Lock()
		rd.window = recs
		rd.mu.Unlock()
	}
}

// usable decides about a record read from the stream. Called with mu held.
func (rd *routeDrain) usable(rec queue.Record, now time.Time) (queue.Record, bool) {
	if rd.inflight[rec.Seq] || rd.isDefer[rec.Seq] {
		return rec, false
	}
	if rec.Err != nil {
		// Never guess at a damaged record: leave it for the operator.
		rd.log.Error("damaged record left in queue", "seq", rec.Seq, "err", rec.Err)
		return rec, false
	}
	if c := rd.d.o.Control; c != nil && c.Held(rec.Env.ID) {
		return rec, false
	}
	if rec.Env.NextAttempt.After(now) {
		rd.deferLocked(rec.Seq, rec.Env.NextAttempt)
		return rec, false
	}
	return rec, true
}

// idle waits for new mail, a due retry, a kick or the poll interval.
func (rd *routeDrain) idle(ctx context.Context) {
	o := &rd.d.o
	wait := o.PollInterval
	rd.mu.Lock()
	if len(rd.deferred) > 0 {
		if until := rd.deferred[0].due.Sub(o.Clock.Now()); until < wait {
			wait = until
		}
	}
	rd.mu.Unlock()
	if wait <= 0 {
		return
	}
	select {
	case <-ctx.Done():
	case <-rd.notify:
	case <-rd.kick:
		rd.kicked()
	case <-o.Clock.After(wait):
	}
}

// kicked starts over: everything is looked at again, deferred records now.
func (rd *routeDrain) kicked() {
	rd.scan.rescan()
	rd.mu.Lock()
	for i := range rd.deferred {
		rd.deferred[i].due = time.Time{}
	}
	heap.Init(&rd.deferred)
	rd.mu.Unlock()
}

func (rd *routeDrain) sleep(ctx context.Context, d time.Duration) {
	select {
	case <-ctx.Done():
	case <-rd.kick:
		rd.kicked()
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
func (rd *routeDrain) deliver(ctx context.Context, rec queue.Record) {
	start := rd.d.o.Clock.Now()
	// A delivery that has started is finished even if the drain is
	// stopping: cutting it off would only make a duplicate more likely.
	dctx := context.WithoutCancel(ctx)
	results, err := rd.r.Deliverer.Deliver(dctx, rec.Env, rd.d.src.Body(dctx, rec))
	latency := rd.d.o.Clock.Now().Sub(start)
	rd.gov.release()
	if err != nil && !errors.Is(err, delivery.ErrUnreachable) {
		// Reading the body failed: a queue problem, not the backend's.
		// Keep the record as it is and look again later.
		rd.log.Error("reading message for delivery", "id", rec.Env.ID, "err", err)
		rd.mu.Lock()
		delete(rd.inflight, rec.Seq)
		rd.deferLocked(rec.Seq, rd.d.o.Clock.Now().Add(rd.d.o.RetryMin))
		rd.mu.Unlock()
		return
	}
	out := Outcome{Latency: latency, Results: len(results)}
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
	rd.finish(dctx, ctx.Done(), rec, results, err != nil, latency)
}
