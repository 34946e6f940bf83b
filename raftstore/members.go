package raftstore

import (
	"fmt"
	"time"

	"github.com/hashicorp/raft"
)

// Reconcile makes the cluster's membership match peers, the configured
// list, when this node is the leader (elsewhere it does nothing). Peers are
// configured once, at the first bootstrap; after that the membership lives
// in the raft log, and scaling a deployment (three nodes to five, or back)
// changes it only through here: missing peers are added as voters, and
// voters that are no longer configured are removed once they have been
// absent from the list for longer than grace, so that a rolling restart,
// during which nodes disagree about the list for a while, does not make
// the membership flap. The leader never removes itself: another leader
// will, once the list it was given no longer names it.
func (s *Store) Reconcile(peers []Peer, grace time.Duration) error {
	if !s.IsLeader() || len(peers) == 0 {
		return nil
	}
	f := s.raft.GetConfiguration()
	if err := f.Error(); err != nil {
		return fmt.Errorf("raftstore: membership: %w", err)
	}
	want := map[raft.ServerID]raft.ServerAddress{}
	for _, p := range peers {
		want[raft.ServerID(p.ID)] = raft.ServerAddress(p.Addr)
	}
	have := map[raft.ServerID]raft.Server{}
	for _, srv := range f.Configuration().Servers {
		have[srv.ID] = srv
	}
	now := time.Now()
	s.membersMu.Lock()
	defer s.membersMu.Unlock()
	if s.absentSince == nil {
		s.absentSince = map[raft.ServerID]time.Time{}
	}
	for id, addr := range want {
		if srv, ok := have[id]; ok && srv.Address == addr && srv.Suffrage == raft.Voter {
			continue
		}
		s.log.Info("raftstore: adding voter", "id", id, "addr", addr)
		if err := s.raft.AddVoter(id, addr, 0, 10*time.Second).Error(); err != nil {
			return fmt.Errorf("raftstore: adding %s: %w", id, err)
		}
	}
	for id := range have {
		if _, ok := want[id]; ok || id == s.self {
			delete(s.absentSince, id)
			continue
		}
		since, seen := s.absentSince[id]
		if !seen {
			s.absentSince[id] = now
			continue
		}
		if now.Sub(since) < grace {
			continue
		}
		s.log.Info("raftstore: removing server no longer configured", "id", id)
		if err := s.raft.RemoveServer(id, 0, 10*time.Second).Error(); err != nil {
			return fmt.Errorf("raftstore: removing %s: %w", id, err)
		}
		delete(s.absentSince, id)
	}
	return nil
}
