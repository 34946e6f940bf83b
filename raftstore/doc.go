// Package raftstore keeps mxq's cluster-wide control state in a small
// replicated state machine on hashicorp/raft.
//
// # Why raft, and what is in it
//
// Mail itself lives in JetStream. What does not fit there is the control
// state that every node must agree on and that must survive the loss of any
// one node: whether the drain is paused (globally or per backend), operator
// rate and concurrency ceilings, holds on individual messages, and the
// adaptive ramp of each backend (rate, phase, latency baseline). The drain
// runs on the raft leader; it persists its ramp with "set_ramp" commands, so
// a new leader resumes exactly where the old one stopped instead of slamming
// a recovering mailbox store with a fresh full-rate drain.
//
// The state is tiny and changes rarely (operator commands, a ramp update
// every few seconds), so the FSM is a plain in-memory struct rebuilt from the
// latest snapshot plus the log on start. Readers never lock: every applied
// command builds a new *State (copy-on-write, sharing unchanged maps) and
// swaps an atomic pointer; [Store.Subscribe] wakes waiters after each apply
// and on leadership changes.
//
// # Commands and forwarding
//
// Only the leader may append to the raft log. [Store.Apply] on the leader
// calls raft.Apply and waits until the command is applied locally. On a
// follower it encodes the command once and hands it to Options.Forward,
// which the caller wires to some request/reply channel (NATS, HTTP); the
// leader's side of that channel calls [Store.ApplyEncoded]. raftstore does
// not open a second network service of its own. During an election Apply
// waits for a leader (until its context ends) and retries; commands are
// idempotent (a repeated reset_ramp merely restarts the ramp once more), so
// a retry after an ambiguous failure is safe. Bulk holds are split into
// entries of at most [MaxEntryBytes] each.
//
// State() is local and may lag the leader on a follower by a commit round
// trip; right after a restart it holds the latest snapshot until the node
// learns the commit index and replays the log.
//
// # Bootstrap rules
//
// The cluster's membership is static and given to every node (Options.Peers,
// the same list everywhere, this node included; empty means a single node).
//
//   - A node without raft state on disk (raft.HasExistingState false)
//     bootstraps with the full peer list: a configuration entry at index 1,
//     term 1. Every node does this on its first start; because all of them
//     write the identical entry, their logs agree at index 1 and whoever wins
//     the first election simply replicates from index 2 on.
//   - A node with state never bootstraps again; it restarts from its log and
//     snapshot and rejoins. Peers is then ignored: the configuration lives in
//     the log.
//   - A node that comes back with an empty directory while the cluster has
//     moved on also bootstraps with the identical configuration. That is
//     safe: its entry 1 equals everyone else's (same index, term and
//     content), so the leader's consistency check passes at index 1 and it
//     sends the rest of the log, or a snapshot if the log was compacted.
//     The fresh node cannot disrupt the cluster while it catches up: with
//     pre-vote, and with servers rejecting votes while they hear from a
//     leader, its premature election attempts are refused.
//   - The limit of a static bootstrap: if a majority of the nodes lose their
//     directories at the same time, they re-form an empty cluster instead of
//     refusing to start. Only control state is lost (pauses, holds, ramps);
//     mail is in JetStream.
//
// A new leader reports itself as leader ([Store.IsLeader]) only after a
// raft barrier, i.e. once its FSM has applied every entry committed before
// its term: the drain must never act on a state older than the cluster's.
package raftstore
