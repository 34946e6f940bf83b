package main

import (
	"context"
	"log/slog"
	"sync"
	"time"

	"github.com/mxq-dev/mxq/admin"
	"github.com/mxq-dev/mxq/config"
	"github.com/mxq-dev/mxq/queue/catalog"
	"github.com/mxq-dev/mxq/queue/drain"
	"github.com/mxq-dev/mxq/raftstore"
)

// controlPlane adapts the raft store to what the drain and the admin API
// ask of the control state, and carries state changes to the drain
// (ceilings, ramp resets, releases) and the drain's ramp back to the store,
// so that a new leader starts from it.
type controlPlane struct {
	rs  *raftstore.Store
	cfg *config.Config
	log *slog.Logger
}

func newControlPlane(rs *raftstore.Store, cfg *config.Config, log *slog.Logger) *controlPlane {
	return &controlPlane{rs: rs, cfg: cfg, log: log}
}

// Paused implements drain.Control and admin.Control: the drain of route is
// paused, cluster-wide or for that route ("" asks the global flag).
func (c *controlPlane) Paused(route string) bool { return c.rs.State().RoutePaused(route) }

// Held implements drain.Control and admin.Control.
func (c *controlPlane) Held(id string) bool { return c.rs.State().Held(id) }

// Overrides implements admin.Control.
func (c *controlPlane) Overrides(route string) (float64, int) {
	rc := c.rs.State().Route(route)
	return rc.MaxRate, rc.MaxConcurrency
}

// Apply implements admin.Control.
func (c *controlPlane) Apply(ctx context.Context, cmd admin.Command) error {
	return c.rs.Apply(ctx, raftstore.Command{
		Op: cmd.Op, Route: cmd.Route, MaxRate: cmd.MaxRate, MaxConcurrency: cmd.MaxConcurrency,
		IDs: cmd.IDs, Reason: cmd.Reason, By: cmd.By, At: time.Now().UTC(),
	})
}

// Role implements admin.Control.
func (c *controlPlane) Role() string {
	switch {
	case len(c.rs.Members()) <= 1:
		return "single"
	case c.rs.IsLeader():
		return "leader"
	}
	return "follower"
}

// Members implements admin.Control.
func (c *controlPlane) Members() []admin.Member {
	var out []admin.Member
	for _, m := range c.rs.Members() {
		out = append(out, admin.Member{ID: m.ID, Addr: m.Addr, Leader: m.Leader, Voter: m.Voter})
	}
	return out
}

// routeNames are the routes the drain runs: the backends, and the DSN
// route when there is a smarthost.
func (c *controlPlane) routeNames() []string {
	names := c.cfg.BackendNames()
	if c.cfg.Drain.DSNSmarthost != "" {
		names = append(names, drain.DSNRoute)
	}
	return names
}

// persist writes the drain's ramp and circuit state to the control plane,
// at most every interval and only when it changed enough to matter (or is
// getting old), and only while this node drains: a new leader starts from
// what it finds there.
func (c *controlPlane) persist(ctx context.Context, r *drainRunner, every time.Duration) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		d := r.current()
		if d == nil || !c.rs.IsLeader() {
			continue
		}
		st := c.rs.State()
		for _, rs := range d.State() {
			now := rampFromDrain(rs)
			if old := st.Route(rs.Route).Ramp; old != nil && !rampChanged(*old, now) {
				continue
			}
			cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			err := c.rs.Apply(cctx, raftstore.Command{Op: raftstore.OpSetRamp, Route: rs.Route, Ramp: &now, By: "drain", At: time.Now().UTC()})
			cancel()
			if err != nil {
				c.log.Debug("persisting ramp state", "route", rs.Route, "err", err)
			}
		}
	}
}

// rampChanged says whether a ramp state is worth a raft entry.
func rampChanged(old, now raftstore.Ramp) bool {
	switch {
	case old.Circuit != now.Circuit, old.Phase != now.Phase, old.Concurrency != now.Concurrency:
		return true
	case old.Rate == 0:
		return now.Rate != 0
	case now.Rate/old.Rate > 1.05 || now.Rate/old.Rate < 0.95:
		return true
	}
	return now.Updated.Sub(old.Updated) > 30*time.Second
}

// follow applies control state to the drain as it changes: ceilings
// (operator overrides or the configuration), ramp resets, and a kick after
// a resume. (Releases reach the drain through the catalog.)
func (c *controlPlane) follow(ctx context.Context, d *drain.Drainer) {
	ch, unsubscribe := c.rs.Subscribe()
	defer unsubscribe()
	type seen struct {
		rate     float64
		conc     int
		resetSeq uint64
	}
	last := map[string]seen{}
	lastPaused := map[string]bool{}
	first := true
	for {
		st := c.rs.State()
		kick := false
		for _, name := range c.cfg.BackendNames() {
			rc := st.Route(name)
			b := c.cfg.Backends[name]
			now := seen{rate: b.Rate, conc: b.Concurrency, resetSeq: rc.ResetSeq}
			if rc.MaxRate > 0 {
				now.rate = rc.MaxRate
			}
			if rc.MaxConcurrency > 0 {
				now.conc = rc.MaxConcurrency
			}
			was, ok := last[name]
			if !ok || was.rate != now.rate || was.conc != now.conc {
				d.SetCeilings(name, now.rate, now.conc)
			}
			if ok && was.resetSeq != now.resetSeq {
				d.Reset(name)
			}
			last[name] = now
			p := st.RoutePaused(name)
			if lastPaused[name] && !p {
				kick = true
			}
			lastPaused[name] = p
		}
		if kick && !first {
			d.Kick()
		}
		first = false
		select {
		case <-ctx.Done():
			return
		case <-ch:
		}
	}
}

// rangeHolds calls fn for every held queue ID, for the catalog's
// reconciliation at start.
func (c *controlPlane) rangeHolds(fn func(id string) bool) {
	c.rs.State().RangeHolds(func(id string, _ raftstore.Hold) bool { return fn(id) })
}

// holdEvents carries the control plane's holds and releases to the
// catalog, which the raft store starts before the catalog exists: events
// before that are dropped, and covered by the catalog's reconciliation of
// its held keys with the whole control state when it starts.
type holdEvents struct {
	mu  sync.Mutex
	cat *catalog.Catalog
}

func (h *holdEvents) set(c *catalog.Catalog) {
	h.mu.Lock()
	h.cat = c
	h.mu.Unlock()
}

// event is raftstore.Options.OnHolds: it runs on the FSM's goroutine and
// only queues.
func (h *holdEvents) event(ev raftstore.HoldEvent) {
	h.mu.Lock()
	c := h.cat
	h.mu.Unlock()
	if c == nil {
		return
	}
	switch ev.Op {
	case raftstore.OpHold:
		c.HoldEvent(catalog.OpHold, ev.IDs)
	case raftstore.OpRelease:
		c.HoldEvent(catalog.OpRelease, ev.IDs)
	case raftstore.HoldsRestored:
		c.HoldEvent(catalog.OpRestored, nil)
	}
}
