package drain

import (
	"context"
	"io"
	"time"

	"github.com/mxq-dev/mxq/queue"
	"github.com/mxq-dev/mxq/queue/delivery"
	"github.com/mxq-dev/mxq/queue/envelope"
)

// Reporter builds the delivery status notification for recipients that
// failed for good. It returns nil when none is due: the null sender, a
// report about a report, or no way to send it.
type Reporter interface {
	Report(env *envelope.Envelope, failed []delivery.Result, original io.Reader, now time.Time) *queue.Output
}

// finish writes a delivery's outcome to the queue. unreachable means the
// remaining recipients were not refused by anyone: they are retried when the
// circuit closes, without counting an attempt.
//
// ctx is not cancelled by a stopping drain (the outcome must be written);
// stopping is closed when the drain stops, which shortens the retries.
func (rd *routeDrain) finish(ctx context.Context, stopping <-chan struct{}, p picked, results []delivery.Result, unreachable bool, latency time.Duration) {
	rec := p.rec
	o := &rd.d.o
	now := o.Clock.Now()
	env := rec.Env
	var retry, dead []int
	delivered := 0
	for i, r := range results {
		switch {
		case r.Success():
			delivered++
		case r.Permanent():
			dead = append(dead, i)
		default:
			retry = append(retry, i)
		}
	}
	expired := o.MaxLifetime > 0 && now.Sub(env.Arrived) > o.MaxLifetime
	var outs []queue.Output
	if len(retry) > 0 {
		switch {
		case unreachable && delivered == 0 && len(dead) == 0:
			// Nothing changed for this record: keep it as it is, and
			// try it again as soon as the circuit lets us.
			rd.mu.Lock()
			delete(rd.inflight, rec.Seq)
			rd.pick.rewind(p.at)
			rd.counts.Unreachable++
			rd.mu.Unlock()
			rd.metric("unreachable", latency)
			return
		case expired:
			for _, i := range retry {
				results[i].Text = "delivery time expired, last error: " + results[i].String()
				results[i].Code, results[i].Enhanced = 550, "5.4.7"
			}
			dead = append(dead, retry...)
			retry = nil
		default:
			n := env.Clone()
			n.Gen++
			n.To, n.Errors = pick(env.To, retry), errorsOf(results, retry)
			if unreachable {
				// Recipients the backend never answered for: no attempt
				// is counted against them.
				n.NextAttempt = now
			} else {
				n.Attempts++
				n.NextAttempt = now.Add(rd.backoff(n.Attempts))
			}
			outs = append(outs, queue.Output{Env: n})
		}
	}
	if len(dead) > 0 {
		n := env.Clone()
		n.Gen++
		n.To, n.Errors = pick(env.To, dead), errorsOf(results, dead)
		outs = append(outs, queue.Output{Env: n, Dead: true})
		rd.log.Warn("permanent failure, dead-lettered", "id", env.ID, "rcpts", n.To, "errors", n.Errors)
		if rp := o.Reporter; rp != nil {
			failed := make([]delivery.Result, len(dead))
			for j, i := range dead {
				failed[j] = results[i]
			}
			if dsn := rp.Report(env, failed, rd.d.src.Body(ctx, rec), now); dsn != nil {
				outs = append(outs, *dsn)
			}
		}
	}
	var err error
	onFail := func(err error) {
		rd.log.Warn("recording delivery outcome failed, retrying", "id", env.ID, "err", err)
	}
	if len(outs) == 0 {
		err = retryStore(ctx, o.Clock, stopping, onFail, func() error { return rd.d.src.Complete(ctx, rec) })
	} else {
		err = retryStore(ctx, o.Clock, stopping, onFail, func() error { return rd.d.src.Rewrite(ctx, rec, outs) })
	}
	if err != nil {
		rd.log.Error("recording delivery outcome failed; the message may be delivered again", "id", env.ID, "err", err)
	}
	if delivered > 0 {
		rd.log.Debug("delivered", "id", env.ID, "rcpts", delivered, "latency", latency.Round(time.Millisecond))
	}
	rd.mu.Lock()
	if err == nil {
		rd.finishedLocked(rec.Seq, o.Clock.Now())
	} else {
		// Not recorded: the record is still queued as it was, and will be
		// delivered again (at least once). Give the queue a moment.
		delete(rd.inflight, rec.Seq)
		rd.later[rec.Seq] = laterPick{p.at, o.Clock.Now().Add(o.RetryMin)}
	}
	result := "delivered"
	switch {
	case len(dead) > 0:
		rd.counts.Bounces++
		result = "bounced"
	case len(retry) > 0 && unreachable:
		rd.counts.Unreachable++
		result = "unreachable"
	case len(retry) > 0:
		rd.counts.Deferrals++
		result = "deferred"
	default:
		rd.counts.Delivered++
	}
	rd.mu.Unlock()
	rd.metric(result, latency)
}

func (rd *routeDrain) metric(result string, latency time.Duration) {
	if m := rd.d.o.Metrics; m != nil {
		m.Delivery(rd.r.Name, result, latency)
	}
}

// backoff is the wait before attempt n+1 after n failed attempts: doubling
// from RetryMin up to RetryMax, then multiplied by a random factor in
// [0.75, 1.25) so that messages that failed together do not all come back
// at the same second (after a long outage that would be a stampede).
func (rd *routeDrain) backoff(attempts int) time.Duration {
	return backoff(rd.d.o.RetryMin, rd.d.o.RetryMax, attempts, rd.d.o.Rand.Float64())
}

// backoff is the schedule itself, with the random draw u in [0, 1) passed
// in so that tests can pin it.
func backoff(min, max time.Duration, attempts int, u float64) time.Duration {
	d := min
	for i := 1; i < attempts && d < max; i++ {
		d *= 2
	}
	if d > max {
		d = max
	}
	return time.Duration(float64(d) * (0.75 + 0.5*u))
}

// retryStore retries a queue write for up to a minute: the delivery has
// happened, and forgetting that would deliver the message again. Once
// stopping is closed it tries for at most storeRetryStopping more: a
// process asked to stop must stop well within an orchestrator's grace
// period, and the worst a forgotten outcome does is one duplicate delivery.
// onFail hears the first failure.
func retryStore(ctx context.Context, clock Clock, stopping <-chan struct{}, onFail func(error), f func() error) error {
	var err error
	wait := 100 * time.Millisecond
	deadline := clock.Now().Add(time.Minute)
	stop := func() {
		if d := clock.Now().Add(storeRetryStopping); d.Before(deadline) {
			deadline = d
		}
		stopping = nil
	}
	for attempt := 0; clock.Now().Before(deadline); attempt++ {
		if err = f(); err == nil {
			return nil
		}
		if attempt == 0 && onFail != nil {
			onFail(err)
		}
		// A stop already asked for shortens this wait, not only the next.
		select {
		case <-stopping:
			stop()
		default:
		}
		select {
		case <-ctx.Done():
			return err
		case <-stopping:
			stop()
		case <-clock.After(wait):
		}
		if wait < 5*time.Second {
			wait *= 2
		}
	}
	return err
}

// storeRetryStopping bounds retryStore once the drain is stopping.
const storeRetryStopping = 3 * time.Second

func pick(all []string, idx []int) []string {
	out := make([]string, len(idx))
	for j, i := range idx {
		out[j] = all[i]
	}
	return out
}

func errorsOf(results []delivery.Result, idx []int) []string {
	out := make([]string, len(idx))
	for j, i := range idx {
		out[j] = results[i].String()
	}
	return out
}
