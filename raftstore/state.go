package raftstore

import (
	"errors"
	"fmt"
	"maps"
	"math"
	"time"
	"unicode/utf8"
)

// State is the replicated control state. A *State returned by the Store is
// immutable: it is shared with other readers and with the FSM, so callers
// must not modify it or its maps.
//
// The holds are not a map but a persistent tree shared between successive
// states (see the package doc); read them with Held, HoldOf, RangeHolds and
// HoldCount. The JSON of a State has no holds: snapshots write them
// separately (snapshot.go).
type State struct {
	Index  uint64                  `json:"index"` // raft index of the last applied command
	Paused bool                    `json:"paused"`
	Routes map[string]RouteControl `json:"routes,omitempty"`
	holds  holdSet
}

// RouteControl is the operator's and the drain's control of one backend.
// The zero value means "no override"; such entries are removed from State.
type RouteControl struct {
	Paused         bool    `json:"paused,omitempty"`
	MaxRate        float64 `json:"max_rate,omitempty"`        // 0: use the configured ceiling
	MaxConcurrency int     `json:"max_concurrency,omitempty"` // 0: use the configured ceiling
	ResetSeq       uint64  `json:"reset_seq,omitempty"`       // bumped by reset_ramp
	Ramp           *Ramp   `json:"ramp,omitempty"`            // nil: none persisted yet
}

// Ramp is the drain's adaptive ramp of one backend as last persisted.
type Ramp struct {
	Rate        float64       `json:"rate"`
	Concurrency int           `json:"concurrency"`
	Phase       string        `json:"phase"`
	SSThresh    float64       `json:"ssthresh"`
	Latency     time.Duration `json:"latency"`
	Baseline    time.Duration `json:"baseline"`
	Updated     time.Time     `json:"updated"`
	// Circuit and LastError are the backend's health as the drain last
	// saw it, so that every node's status shows it.
	Circuit   string `json:"circuit,omitempty"`
	LastError string `json:"last_error,omitempty"`
}

// Hold keeps one queued message from being delivered.
type Hold struct {
	By     string    `json:"by,omitempty"`
	At     time.Time `json:"at"`
	Reason string    `json:"reason,omitempty"`
}

// Held reports whether the message with queue ID id is held.
func (st *State) Held(id string) bool {
	return st != nil && st.holds.get(id) != nil
}

// HoldOf returns the hold of the message with queue ID id.
func (st *State) HoldOf(id string) (Hold, bool) {
	if st == nil {
		return Hold{}, false
	}
	if h := st.holds.get(id); h != nil {
		return *h, true
	}
	return Hold{}, false
}

// HoldCount returns the number of held messages.
func (st *State) HoldCount() int {
	if st == nil {
		return 0
	}
	return st.holds.count
}

// RangeHolds calls fn for every held message in ascending order of ID
// until fn returns false. It copies nothing: it walks st's own immutable
// tree, so it sees exactly st's holds however many commands apply
// meanwhile, and it may take its time.
func (st *State) RangeHolds(fn func(id string, h Hold) bool) {
	if st == nil {
		return
	}
	st.holds.each(func(id string, h *Hold) bool { return fn(id, *h) })
}

// RoutePaused reports whether the drain of route must stand still: paused
// cluster-wide or for that route.
func (st *State) RoutePaused(route string) bool {
	if st == nil {
		return false
	}
	return st.Paused || st.Routes[route].Paused
}

// Route returns the control of route (the zero value when there is none).
func (st *State) Route(route string) RouteControl {
	if st == nil {
		return RouteControl{}
	}
	return st.Routes[route]
}

// Command ops.
const (
	OpPause     = "pause"
	OpResume    = "resume"
	OpSetRate   = "set_rate"
	OpResetRamp = "reset_ramp"
	OpSetRamp   = "set_ramp"
	OpHold      = "hold"
	OpRelease   = "release"
)

// Command is one change to the control state.
type Command struct {
	Op             string    // one of the Op* constants
	Route          string    // "" = all (pause/resume); required by set_rate, reset_ramp, set_ramp
	MaxRate        float64   // set_rate; 0 clears the override
	MaxConcurrency int       // set_rate; 0 clears the override
	Ramp           *Ramp     // set_ramp
	IDs            []string  // hold/release
	Reason         string    // hold
	By             string    // audit: who asked
	At             time.Time // set by the proposer, so replicas agree; Apply fills in now if zero
}

// ErrInvalidCommand is wrapped by every error about a malformed command.
var ErrInvalidCommand = errors.New("raftstore: invalid command")

// Limits on the fields of a command. They keep any single ID small enough
// that a bulk hold can always be split into entries under MaxEntryBytes.
const (
	MaxIDLen     = 256
	MaxRouteLen  = 256
	MaxByLen     = 256
	MaxReasonLen = 1024
	MaxPhaseLen  = 64
)

func invalid(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrInvalidCommand, fmt.Sprintf(format, args...))
}

func checkString(field, s string, max int) error {
	if len(s) > max {
		return invalid("%s longer than %d bytes", field, max)
	}
	// Snapshots are JSON, which would replace invalid UTF-8; a replica
	// restored from a snapshot would then differ from one that applied the
	// log. So only valid UTF-8 gets into the state.
	if !utf8.ValidString(s) {
		return invalid("%s is not valid UTF-8", field)
	}
	return nil
}

func finiteNonNeg(field string, f float64) error {
	if math.IsNaN(f) || math.IsInf(f, 0) || f < 0 {
		return invalid("%s must be a finite number >= 0, not %v", field, f)
	}
	return nil
}

// validate checks c on its own, independently of any state, so that the
// proposer can reject a bad command before it reaches the log and every
// replica rejects the same commands.
func (c *Command) validate() error {
	for _, f := range []struct {
		name, v string
		max     int
	}{{"route", c.Route, MaxRouteLen}, {"by", c.By, MaxByLen}, {"reason", c.Reason, MaxReasonLen}} {
		if err := checkString(f.name, f.v, f.max); err != nil {
			return err
		}
	}
	needRoute := func() error {
		if c.Route == "" {
			return invalid("%s needs a route", c.Op)
		}
		return nil
	}
	noIDs := func() error {
		if len(c.IDs) > 0 {
			return invalid("%s takes no IDs", c.Op)
		}
		return nil
	}
	noRates := func() error {
		if c.MaxRate != 0 || c.MaxConcurrency != 0 {
			return invalid("%s takes no rate or concurrency", c.Op)
		}
		return nil
	}
	noRamp := func() error {
		if c.Ramp != nil {
			return invalid("%s takes no ramp", c.Op)
		}
		return nil
	}
	switch c.Op {
	case OpPause, OpResume:
		return errors.Join(noIDs(), noRates(), noRamp())
	case OpSetRate:
		if err := errors.Join(needRoute(), noIDs(), noRamp(), finiteNonNeg("max_rate", c.MaxRate)); err != nil {
			return err
		}
		if c.MaxConcurrency < 0 {
			return invalid("max_concurrency must be >= 0, not %d", c.MaxConcurrency)
		}
		return nil
	case OpResetRamp:
		return errors.Join(needRoute(), noIDs(), noRates(), noRamp())
	case OpSetRamp:
		if err := errors.Join(needRoute(), noIDs(), noRates()); err != nil {
			return err
		}
		r := c.Ramp
		if r == nil {
			return invalid("set_ramp needs a ramp")
		}
		if err := errors.Join(finiteNonNeg("ramp.rate", r.Rate), finiteNonNeg("ramp.ssthresh", r.SSThresh),
			checkString("ramp.phase", r.Phase, MaxPhaseLen), checkString("ramp.circuit", r.Circuit, MaxPhaseLen),
			checkString("ramp.last_error", r.LastError, MaxReasonLen)); err != nil {
			return err
		}
		if r.Concurrency < 0 || r.Latency < 0 || r.Baseline < 0 {
			return invalid("ramp concurrency, latency and baseline must be >= 0")
		}
		return nil
	case OpHold, OpRelease:
		if c.Route != "" {
			return invalid("%s takes no route", c.Op)
		}
		if err := errors.Join(noRates(), noRamp()); err != nil {
			return err
		}
		if len(c.IDs) == 0 {
			return invalid("%s needs at least one ID", c.Op)
		}
		for _, id := range c.IDs {
			if id == "" {
				return invalid("empty ID")
			}
			if err := checkString("ID", id, MaxIDLen); err != nil {
				return err
			}
		}
		return nil
	case "":
		return invalid("no op")
	default:
		return invalid("unknown op %q", c.Op)
	}
}

// apply returns the state after c, sharing everything c does not change
// with st (which stays untouched). c must have been validated. It is
// deterministic: everything it uses comes from c and index.
func (st *State) apply(c *Command, index uint64) *State {
	n := *st
	n.Index = index
	at := c.At.UTC() // one representation on every replica and after a snapshot
	route := func(f func(rc *RouteControl)) {
		n.Routes = maps.Clone(st.Routes)
		if n.Routes == nil {
			n.Routes = make(map[string]RouteControl)
		}
		rc := n.Routes[c.Route]
		f(&rc)
		if rc == (RouteControl{}) {
			delete(n.Routes, c.Route)
		} else {
			n.Routes[c.Route] = rc
		}
	}
	switch c.Op {
	case OpPause, OpResume:
		paused := c.Op == OpPause
		if c.Route == "" {
			n.Paused = paused
		} else {
			route(func(rc *RouteControl) { rc.Paused = paused })
		}
	case OpSetRate:
		route(func(rc *RouteControl) { rc.MaxRate, rc.MaxConcurrency = c.MaxRate, c.MaxConcurrency })
	case OpResetRamp:
		route(func(rc *RouteControl) { rc.ResetSeq++ })
	case OpSetRamp:
		r := *c.Ramp
		r.Updated = r.Updated.UTC()
		route(func(rc *RouteControl) { rc.Ramp = &r })
	case OpHold:
		// One Hold for the whole command, shared by all its IDs: the
		// audit fields cost once per command, not once per message.
		n.holds = st.holds.withHeld(c.IDs, &Hold{By: c.By, At: at, Reason: c.Reason})
	case OpRelease:
		n.holds = st.holds.withReleased(c.IDs)
	}
	// Empty maps are nil, so that a state and its snapshot round trip are
	// identical (the snapshot omits empty maps).
	if len(n.Routes) == 0 {
		n.Routes = nil
	}
	return &n
}
