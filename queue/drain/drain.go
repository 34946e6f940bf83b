// Package drain delivers queued mail to the mailbox stores, and protects
// them while doing so.
//
// One route drain runs per backend. It takes the route's records in the
// order they are due (oldest or newest first) from the node's catalog of the
// queue (queue/catalog), which keeps held records apart and retries under
// their next attempt time, so neither is looked at again until it is due:
// nothing per pass grows with how much mail is held or waiting (pick.go).
// It reads the records it will deliver from the queue and hands them to the
// backend's Deliverer, never faster than the route's governor allows (a
// token bucket for the rate, a semaphore for the concurrency). A delivery's
// outcome is written back to the queue before anything else: delivered
// recipients are removed, temporary failures are rewritten with their next
// attempt time, permanent failures become dead letters.
//
// The limits follow the store (ramp.go): they start low, grow while the
// store stays fast and polite, and shrink when it slows down or refuses
// work, like TCP's congestion control; the operator's ceilings are never
// exceeded. When the store cannot be reached at all, the circuit opens
// (breaker.go): nothing is delivered and no retry is counted against any
// message; a probe checks the store every ProbeInterval, and the first
// success closes the circuit and restarts the ramp from the bottom.
package drain

import (
	"context"
	"io"
	"log/slog"
	"math/rand/v2"
	"sync"
	"time"

	"github.com/mxq-dev/mxq/queue"
	"github.com/mxq-dev/mxq/queue/catalog"
	"github.com/mxq-dev/mxq/queue/delivery"
	"github.com/mxq-dev/mxq/queue/envelope"
)

// Source is the queue as the drain uses it (queue.Store).
type Source interface {
	QueueSubject(route string) string
	ReadFrom(ctx context.Context, subject string, seq uint64, max, maxBytes int) ([]queue.Record, uint64, error)
	Body(ctx context.Context, r queue.Record) io.Reader
	Complete(ctx context.Context, r queue.Record) error
	Rewrite(ctx context.Context, r queue.Record, outs []queue.Output) error
}

// Index is the catalog of the queue as the drain uses it
// (catalog.Catalog): which records of a route are due, in order.
type Index interface {
	Ready() <-chan struct{}
	DueIn(route string, lo, hi catalog.Pos, max int, reverse bool) ([]catalog.Due, error)
	NextDue(route string, t time.Time) (time.Time, bool, error)
	Added(route string) (catalog.Pos, bool)
	Wake(route string) <-chan struct{}
	Forget(seqs ...uint64)
}

// Deliverer hands one record to a backend (delivery.Client).
type Deliverer interface {
	DeliverTimed(ctx context.Context, env *envelope.Envelope, body io.Reader) ([]delivery.Result, delivery.Timing, error)
	Probe(ctx context.Context) error
}

// Control is the operator's say over the drain. Its methods are called
// often and must be cheap.
type Control interface {
	Paused(route string) bool
	Held(id string) bool
}

// Clock is the time source; tests inject a fake one.
type Clock interface {
	Now() time.Time
	After(d time.Duration) <-chan time.Time
}

type realClock struct{}

func (realClock) Now() time.Time                         { return time.Now() }
func (realClock) After(d time.Duration) <-chan time.Time { return time.After(d) }

// RealClock is the wall clock.
var RealClock Clock = realClock{}

// Route is one backend and its limits.
type Route struct {
	Name      string
	Deliverer Deliverer
	// Ramp holds the ceilings (MaxRate, MaxConcurrency) and how the
	// limits move below them; see DefaultRamp.
	Ramp RampConfig
	// DSN marks the route that carries delivery status notifications to
	// the outbound smarthost.
	DSN bool
}

// Options configures a Drainer.
type Options struct {
	Routes        []Route
	NewestFirst   bool
	RetryMin      time.Duration
	RetryMax      time.Duration
	MaxLifetime   time.Duration
	ProbeInterval time.Duration
	// PollInterval is how often an idle route looks at the catalog
	// without being woken (new records wake it at once).
	PollInterval time.Duration
	// Window is how many records one look at the catalog, and one read of
	// the stream, covers.
	Window  int
	Control Control
	// Reporter, if set, is told the outcome of every failed recipient, to
	// build and queue a delivery status notification (dsn.go).
	Reporter Reporter
	// OnRamp, if set, is called when a route's ramp state changes, for
	// the control plane to persist it.
	OnRamp func(route string, st RampState)
	// Metrics, if set, is told about each delivery as it finishes.
	Metrics Metrics
	Clock   Clock
	Rand    *rand.Rand
	Logger  *slog.Logger
}

// Metrics receives the drain's events; the admin API's Prometheus
// collector implements it. Calls are cheap and must not block.
type Metrics interface {
	// Delivery counts one finished delivery attempt: result is
	// "delivered", "deferred", "bounced" or "unreachable"; latency is how
	// long the backend took.
	Delivery(route, result string, latency time.Duration)
	// Probe counts one probe of an unreachable backend.
	Probe(route string, ok bool)
}

// Drainer runs one route drain per backend.
type Drainer struct {
	src    Source
	idx    Index
	o      Options
	log    *slog.Logger
	routes []*routeDrain
}

// New returns a Drainer; Run starts it.
func New(src Source, idx Index, o Options) *Drainer {
	if o.Clock == nil {
		o.Clock = RealClock
	}
	if o.Rand == nil {
		o.Rand = rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 0x6d7871))
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.Window <= 0 {
		o.Window = 64
	}
	if o.PollInterval <= 0 {
		o.PollInterval = 500 * time.Millisecond
	}
	if o.ProbeInterval <= 0 {
		o.ProbeInterval = 10 * time.Second
	}
	d := &Drainer{src: src, idx: idx, o: o, log: o.Logger}
	for _, r := range o.Routes {
		d.routes = append(d.routes, newRouteDrain(d, r))
	}
	return d
}

// Run drains until ctx ends, then waits for deliveries in flight (their
// outcome is written to the queue before Run returns).
func (d *Drainer) Run(ctx context.Context) {
	var wg sync.WaitGroup
	for _, rd := range d.routes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rd.run(ctx)
		}()
	}
	wg.Wait()
}

// Kick wakes every route at once: after a resume. (Released and requeued
// records are new due keys in the catalog, which wakes the routes itself;
// records waiting for a retry keep waiting: a kick is not a "retry now",
// or a million over-quota recipients would all be retried at once.)
func (d *Drainer) Kick() {
	for _, rd := range d.routes {
		select {
		case rd.kick <- struct{}{}:
		default:
		}
	}
}

// RouteState is what an operator (and the control plane) sees of a route.
type RouteState struct {
	Route    string
	Circuit  string // closed or open
	Ramp     RampState
	MaxRate  float64
	MaxConc  int
	InFlight int
	// Counters since start.
	Delivered   uint64 // deliveries that got a 2xx for every recipient they carried
	Deferrals   uint64 // deliveries with recipients to try again
	Bounces     uint64 // deliveries with recipients dead-lettered
	Unreachable uint64 // deliveries that did not reach the backend
	Overloads   uint64 // deliveries that met an overload reply
	LastError   string
	// Bottleneck says what limits the drain below its allowed rate: ""
	// (nothing: the allowance, or no backlog), "store" (the store is
	// slower than unloaded) or "mxq" (this process: it cannot read the
	// queue or hand out records as fast as the store takes them).
	Bottleneck string
}

// Restore sets a route's ramp state, as persisted by the control plane,
// so that a new leader continues where the old one stopped.
func (d *Drainer) Restore(route string, st RampState) {
	for _, rd := range d.routes {
		if rd.r.Name == route {
			rd.restore(st)
		}
	}
}

// Reset restarts a route's ramp from its start values.
func (d *Drainer) Reset(route string) {
	for _, rd := range d.routes {
		if rd.r.Name == route {
			rd.resetRamp()
		}
	}
}

// SetCeilings changes a route's ceilings at run time.
func (d *Drainer) SetCeilings(route string, rate float64, concurrency int) {
	for _, rd := range d.routes {
		if rd.r.Name == route {
			rd.setCeilings(rate, concurrency)
		}
	}
}

// State returns a snapshot per route.
func (d *Drainer) State() []RouteState {
	out := make([]RouteState, 0, len(d.routes))
	for _, rd := range d.routes {
		out = append(out, rd.state())
	}
	return out
}
