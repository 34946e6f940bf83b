package drain

import (
	"context"
	"sync"
	"time"

	"golang.org/x/time/rate"
)

// governor enforces one route's limits: a token bucket for the rate and a
// counting semaphore for the concurrency. The ramp moves both while
// deliveries run. It also notes which limit made a delivery wait, since
// only a limit that is reached is worth raising.
type governor struct {
	lim *rate.Limiter

	mu       sync.Mutex
	cond     *sync.Cond
	max      int
	inflight int
	demand   Demand
}

func newGovernor(r float64, concurrency int) *governor {
	// Burst 1: the rate is a ceiling the store is promised, in every
	// second, not on average.
	g := &governor{lim: rate.NewLimiter(rate.Limit(r), 1), max: concurrency}
	g.cond = sync.NewCond(&g.mu)
	return g
}

// acquire waits for a free slot, then for a token.
func (g *governor) acquire(ctx context.Context) error {
	stop := context.AfterFunc(ctx, func() {
		g.mu.Lock()
		g.cond.Broadcast()
		g.mu.Unlock()
	})
	defer stop()
	g.mu.Lock()
	if g.inflight >= g.max {
		g.demand.Slots = true
	}
	for g.inflight >= g.max && ctx.Err() == nil {
		g.cond.Wait()
	}
	if err := ctx.Err(); err != nil {
		g.mu.Unlock()
		return err
	}
	g.inflight++
	g.mu.Unlock()
	r := g.lim.Reserve()
	if d := r.Delay(); d > 0 {
		g.mu.Lock()
		g.demand.Rate = true
		g.mu.Unlock()
		t := time.NewTimer(d)
		defer t.Stop()
		select {
		case <-ctx.Done():
			r.Cancel()
			g.release()
			return ctx.Err()
		case <-t.C:
		}
	}
	return nil
}

func (g *governor) release() {
	g.mu.Lock()
	g.inflight--
	g.cond.Signal()
	g.mu.Unlock()
}

// takeDemand returns, and clears, which limits were reached since the
// last call.
func (g *governor) takeDemand() Demand {
	g.mu.Lock()
	defer g.mu.Unlock()
	d := g.demand
	g.demand = Demand{}
	return d
}

// set changes the limits.
func (g *governor) set(r float64, concurrency int) {
	g.lim.SetLimit(rate.Limit(r))
	g.mu.Lock()
	g.max = concurrency
	g.cond.Broadcast()
	g.mu.Unlock()
}

func (g *governor) limits() (float64, int) {
	g.mu.Lock()
	defer g.mu.Unlock()
	return float64(g.lim.Limit()), g.max
}
