package raftstore

import (
	"bufio"
	"fmt"
	"io"
	"log/slog"
	"sync/atomic"

	"github.com/hashicorp/raft"
)

// HoldsRestored is the Op of a HoldEvent sent after a snapshot replaced the
// whole state.
const HoldsRestored = "holds_restored"

// HoldEvent tells Options.OnHolds about a change of the holds.
type HoldEvent struct {
	// Op is OpHold or OpRelease for an applied command, HoldsRestored
	// after a snapshot restore: the holds may then differ in any way, and
	// the subscriber reconciles against State().RangeHolds.
	Op string
	// IDs are the command's IDs as the log has them: a hold may list IDs
	// held already, a release IDs that were not held. nil for
	// HoldsRestored. The slice is the callee's: the FSM keeps no
	// reference to it.
	IDs []string
	// Index is the raft index of the command, or of the snapshot. The
	// subscriber may handle an event after later commands applied: having
	// reconciled against a State, it skips the events up to that State's
	// Index, which the State already reflects.
	Index uint64
}

// fsm is the raft state machine: the current *State behind an atomic
// pointer. raft calls Apply and Restore from one goroutine; Snapshot only
// takes the pointer, so persisting runs concurrently with later applies
// without copying anything.
type fsm struct {
	state    atomic.Pointer[State]
	onChange func()          // after every change of state; must not block
	onHolds  func(HoldEvent) // after every change of holds; must not block
	log      *slog.Logger
}

func newFSM(log *slog.Logger, onChange func(), onHolds func(HoldEvent)) *fsm {
	f := &fsm{onChange: onChange, onHolds: onHolds, log: log}
	f.state.Store(&State{})
	return f
}

func (f *fsm) current() *State { return f.state.Load() }

// Apply applies one committed command. A command that does not decode or
// validate changes nothing and returns the error, which raft hands back to
// the proposer through ApplyFuture.Response. Apply must be deterministic:
// it never reads the clock or any other input but the entry.
func (f *fsm) Apply(l *raft.Log) any {
	c, err := decodeCommand(l.Data)
	if err == nil {
		err = c.validate()
	}
	if err != nil {
		f.log.Warn("raftstore: rejected command", "index", l.Index, "error", err)
		return err
	}
	f.state.Store(f.current().apply(&c, l.Index))
	f.log.Debug("raftstore: applied", "index", l.Index, "op", c.Op, "route", c.Route, "ids", len(c.IDs), "by", c.By)
	if f.onHolds != nil && (c.Op == OpHold || c.Op == OpRelease) {
		// c.IDs was decoded for this call and the state keeps only the
		// strings, so the subscriber may have the slice itself.
		f.onHolds(HoldEvent{Op: c.Op, IDs: c.IDs, Index: l.Index})
	}
	if f.onChange != nil {
		f.onChange()
	}
	return nil
}

func (f *fsm) Snapshot() (raft.FSMSnapshot, error) {
	return fsmSnapshot{f.current()}, nil
}

// Restore replaces the state with a snapshot's (on start, and when the
// leader sends a snapshot to a follower that is too far behind).
func (f *fsm) Restore(rc io.ReadCloser) error {
	defer rc.Close()
	st, err := readSnapshot(rc)
	if err != nil {
		return fmt.Errorf("raftstore: restore snapshot: %w", err)
	}
	f.state.Store(st)
	f.log.Debug("raftstore: restored snapshot", "index", st.Index, "holds", st.HoldCount())
	if f.onHolds != nil {
		f.onHolds(HoldEvent{Op: HoldsRestored, Index: st.Index})
	}
	if f.onChange != nil {
		f.onChange()
	}
	return nil
}

// fsmSnapshot is a published *State: immutable, so Persist writes exactly
// the state as of the snapshot's index while later commands apply.
type fsmSnapshot struct{ st *State }

func (s fsmSnapshot) Persist(sink raft.SnapshotSink) error {
	w := bufio.NewWriterSize(sink, 64<<10)
	err := writeSnapshot(w, s.st)
	if err == nil {
		err = w.Flush()
	}
	if err != nil {
		sink.Cancel()
		return fmt.Errorf("raftstore: persist snapshot: %w", err)
	}
	if err := sink.Close(); err != nil {
		return fmt.Errorf("raftstore: persist snapshot: %w", err)
	}
	return nil
}

func (fsmSnapshot) Release() {}
