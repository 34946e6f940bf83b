package raftstore

import (
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"sync/atomic"

	"github.com/hashicorp/raft"
)

// fsm is the raft state machine: the current *State behind an atomic
// pointer. raft calls Apply and Restore from one goroutine; Snapshot only
// takes the pointer, so persisting runs concurrently with later applies
// without copying anything.
type fsm struct {
	state    atomic.Pointer[State]
	onChange func() // after every change of state; must not block
	log      *slog.Logger
}

func newFSM(log *slog.Logger, onChange func()) *fsm {
	f := &fsm{onChange: onChange, log: log}
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
	if f.onChange != nil {
		f.onChange()
	}
	return nil
}

// snapshotFile is the JSON document of a snapshot.
type snapshotFile struct {
	Version int    `json:"version"`
	State   *State `json:"state"`
}

const snapshotVersion = 1

func (f *fsm) Snapshot() (raft.FSMSnapshot, error) {
	return fsmSnapshot{f.current()}, nil
}

// Restore replaces the state with a snapshot's (on start, and when the
// leader sends a snapshot to a follower that is too far behind).
func (f *fsm) Restore(rc io.ReadCloser) error {
	defer rc.Close()
	var sf snapshotFile
	if err := json.NewDecoder(rc).Decode(&sf); err != nil {
		return fmt.Errorf("raftstore: restore snapshot: %w", err)
	}
	if sf.Version != snapshotVersion {
		return fmt.Errorf("raftstore: restore snapshot: unknown version %d", sf.Version)
	}
	if sf.State == nil {
		sf.State = &State{}
	}
	f.state.Store(sf.State)
	f.log.Debug("raftstore: restored snapshot", "index", sf.State.Index, "holds", len(sf.State.Holds))
	if f.onChange != nil {
		f.onChange()
	}
	return nil
}

type fsmSnapshot struct{ st *State }

func (s fsmSnapshot) Persist(sink raft.SnapshotSink) error {
	if err := json.NewEncoder(sink).Encode(snapshotFile{Version: snapshotVersion, State: s.st}); err != nil {
		sink.Cancel()
		return fmt.Errorf("raftstore: persist snapshot: %w", err)
	}
	if err := sink.Close(); err != nil {
		return fmt.Errorf("raftstore: persist snapshot: %w", err)
	}
	return nil
}

func (fsmSnapshot) Release() {}
