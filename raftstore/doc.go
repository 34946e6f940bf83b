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
// The state changes rarely (operator commands, a ramp update every few
// seconds) and, but for the holds, is tiny, so the FSM is a plain in-memory
// struct rebuilt from the latest snapshot plus the log on start. Readers
// never lock: every applied command builds a new *State (copy-on-write,
// sharing what it does not change) and swaps an atomic pointer;
// [Store.Subscribe] wakes waiters after each apply and on leadership
// changes.
//
// # Holds
//
// Holds can be many: an operator holding what a filter matches holds a
// million messages, which the admin API sends in commands of 1 000 IDs.
// They were a map, copied by every hold or release so that earlier states
// stayed intact: O(holds) per command, O(N²) to hold N. At a million that
// was 0.14 ms per ID, about a minute of one core on every node for the
// whole hold (57 s end to end on one node, 130 s to release it), and 191
// bytes of heap per hold (231 after a restore).
//
// Now they are a persistent B+-tree ordered by ID (holds.go). A command
// copies the nodes on the paths to its IDs, each once, edits the copies in
// place and shares every other node with the state before: its work is
// its IDs times the tree's height (4 levels at a million), not the holds.
// States stay immutable, so a reader keeps a consistent view without
// locks for as long as it likes ([State.RangeHolds] walks the tree it was
// given), and Snapshot takes the pointer while Persist walks that state's
// tree as later commands apply.
// Each ID points at the Hold of the command that held it: one Hold per
// command, however many IDs it names. Measured with a million holds
// (BenchmarkHoldApply, BenchmarkHolds1M, BenchmarkStoreHold1M; medians, 2
// cores shared with other work):
//
//   - apply, per ID of a 1 000-ID command: 180 ns on top of 10 000 holds
//     and 210 ns on top of a million for IDs past the held ones (queue IDs
//     grow with time, so a bulk hold's IDs are close together); 880 ns and
//     3.4 µs for IDs scattered among the held ones, the worst case: at a
//     million each ID copies a leaf of its own (at 10 000 a command's IDs
//     share the tree's 260 leaves), which the garbage collector pays for
//     too, and a bigger tree misses the caches more. The old map: 1.4 µs
//     and 139 µs. A million holds in 1 000 commands through one Store
//     (raft, bolt, fsyncs): 4 s, and 5 s to release them.
//   - heap: 53 bytes per hold, 54 after a restore: the ID (24), its entry
//     (24: the ID's string header and the Hold's pointer; a copied leaf is
//     sized to what it holds) and the nodes' share.
//   - snapshot: Snapshot() takes 0.4 µs on the FSM goroutine. Persist
//     writes the 112 MB in 0.2 s allocating 0.4 MiB (json.Encoder: 1.9 s,
//     416 MiB, the whole document in one buffer); Restore reads them in
//     1.7 s, a hold at a time (json.Decoder: 2.0 s, with the whole
//     document and the map in memory at once).
//
// A B+-tree over a hash trie because it keeps the IDs in order: the
// snapshot keeps its format (sorted, as encoding/json wrote the map), and
// a paged listing can start anywhere. A tree of our own over
// github.com/hashicorp/go-immutable-radix/v2 (v2.1.0) because the latter
// took 461 bytes per key at a million (383 for ascending keys) and 9.4 µs
// per scattered insert.
//
// The snapshot format is unchanged, byte for byte (snapshot.go), so nodes
// of either version read each other's snapshots during a rolling upgrade
// or a rollback.
//
// Options.OnHolds tells another package (the queue's index) of every
// applied hold and release, with its IDs, in log order on every node, and
// of every restore (HoldsRestored), after which it reconciles against the
// whole set.
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
