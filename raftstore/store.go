package raftstore

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/raft"
	raftboltdb "github.com/hashicorp/raft-boltdb/v2"
	"go.etcd.io/bbolt"
)

// Peer is one member of the cluster.
type Peer struct {
	ID   string
	Addr string // host:port of the peer's raft transport
}

// Member is one server in the current raft configuration.
type Member struct {
	ID     string
	Addr   string
	Voter  bool
	Leader bool
}

// Options configure a Store. Zero timing values take defaults suited to a
// LAN or a Kubernetes cluster network.
type Options struct {
	NodeID    string
	Dir       string // raft.db (bolt: log and stable store), snapshots/
	Bind      string // host:port to listen on for raft
	Advertise string // host:port others use to reach this node; default: this node's Peers entry, else Bind
	// Peers is the whole cluster, this node included, identical on every
	// node; empty = a single node. Used only for the first bootstrap.
	Peers []Peer
	// Forward applies an encoded command on the leader: followers call it
	// and the caller wires it to NATS request/reply or HTTP, ending in the
	// leader's ApplyEncoded. It should return an error that satisfies
	// errors.Is(err, ErrNotLeader) when the other side answered
	// ErrNotLeader, so that Apply retries with the next leader. nil: Apply
	// on a follower returns ErrNotLeader.
	Forward func(ctx context.Context, leaderID string, cmd []byte) error
	// TLS, if set, runs the raft transport over mutual TLS: Certificates
	// (this node's), RootCAs and ClientCAs (the cluster's CA). Peers are
	// checked against their host names.
	TLS    *tls.Config
	Logger *slog.Logger // nil: discard
	// OnHolds, if set, is told of every applied hold and release command,
	// in log order, once State reflects it, and of every snapshot restore
	// (Op HoldsRestored: reconcile against the whole set). It runs on
	// raft's FSM goroutine, which applies nothing else meanwhile: it must
	// not block (queue the event and return). It runs on every node, from
	// the start: a node with a snapshot restores it inside Open (an event
	// before Open returns), then replays the log after it.
	OnHolds func(HoldEvent)

	HeartbeatTimeout   time.Duration // default 1s
	ElectionTimeout    time.Duration // default 1s
	LeaderLeaseTimeout time.Duration // default 500ms (at most HeartbeatTimeout)
	CommitTimeout      time.Duration // default 50ms
	SnapshotThreshold  uint64        // log entries between snapshots; default 1024
	SnapshotInterval   time.Duration // how often to check the threshold; default 30s
	TrailingLogs       uint64        // entries kept after a snapshot for slow followers; default 1024
	ApplyTimeout       time.Duration // Apply's limit when its context has no deadline; default 10s
}

// ErrNotLeader is returned by Apply on a follower without Forward, and by
// ApplyEncoded on a node that is not the leader.
var ErrNotLeader = errors.New("raftstore: not the raft leader")

// ErrNoLeader is wrapped in Apply's error when its context ended while the
// cluster had no leader (an election, or no quorum).
var ErrNoLeader = errors.New("raftstore: no raft leader")

// ErrClosed is returned by calls on a closed Store.
var ErrClosed = errors.New("raftstore: closed")

// Store is one node of the replicated control state.
type Store struct {
	o     Options
	log   *slog.Logger
	self  raft.ServerID
	raft  *raft.Raft
	fsm   *fsm
	bolt  *raftboltdb.BoltStore
	trans *raft.NetworkTransport

	membersMu   sync.Mutex
	absentSince map[raft.ServerID]time.Time // servers configured away, for Reconcile
	snaps       *raft.FileSnapshotStore
	subs        broadcaster
	obs         *raft.Observer
	obsCh       chan raft.Observation
	done        chan struct{}
	wg          sync.WaitGroup
	closed      sync.Once
	err         error

	// readyTerm is the term in which this node, as leader, has applied
	// everything committed before (see IsLeader); 0: not ready.
	readyTerm atomic.Uint64
	// bootstrapped records whether Open wrote the initial configuration.
	bootstrapped bool
}

func (o Options) withDefaults() Options {
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	def(&o.HeartbeatTimeout, time.Second)
	def(&o.ElectionTimeout, time.Second)
	def(&o.LeaderLeaseTimeout, 500*time.Millisecond)
	def(&o.CommitTimeout, 50*time.Millisecond)
	def(&o.SnapshotInterval, 30*time.Second)
	def(&o.ApplyTimeout, 10*time.Second)
	// raft refuses a lease longer than the heartbeat timeout and an
	// election timeout shorter than it; shortening only the heartbeat (as
	// tests do) should not need all three set.
	o.LeaderLeaseTimeout = min(o.LeaderLeaseTimeout, o.HeartbeatTimeout)
	o.ElectionTimeout = max(o.ElectionTimeout, o.HeartbeatTimeout)
	if o.SnapshotThreshold == 0 {
		// The state is small and snapshots are cheap; a short log keeps
		// start-up replay and a lagging follower's catch-up short.
		o.SnapshotThreshold = 1024
	}
	if o.TrailingLogs == 0 {
		o.TrailingLogs = 1024
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	return o
}

// peers checks Options.Peers and returns the cluster and this node's entry.
func (o *Options) peers() ([]Peer, *Peer, error) {
	var self *Peer
	ids, addrs := map[string]bool{}, map[string]bool{}
	for i, p := range o.Peers {
		if p.ID == "" || p.Addr == "" {
			return nil, nil, fmt.Errorf("raftstore: peer %d: ID and Addr are required", i)
		}
		if ids[p.ID] || addrs[p.Addr] {
			return nil, nil, fmt.Errorf("raftstore: peer %s at %s listed twice", p.ID, p.Addr)
		}
		ids[p.ID], addrs[p.Addr] = true, true
		if p.ID == o.NodeID {
			self = &o.Peers[i]
		}
	}
	if len(o.Peers) > 0 && self == nil {
		return nil, nil, fmt.Errorf("raftstore: node %s is not in its own peer list", o.NodeID)
	}
	return o.Peers, self, nil
}

// advertiseAddr resolves the address this node gives the others. raft's TCP
// transport needs an IP, so a name (a Kubernetes pod's DNS name) is
// resolved once here. nil: use the listener's address (Bind with port 0,
// single node only).
func advertiseAddr(ctx context.Context, adv string) (*net.TCPAddr, error) {
	host, port, err := net.SplitHostPort(adv)
	if err != nil {
		return nil, fmt.Errorf("raftstore: advertise address %q: %w", adv, err)
	}
	p, err := net.DefaultResolver.LookupPort(ctx, "tcp", port)
	if err != nil {
		return nil, fmt.Errorf("raftstore: advertise address %q: %w", adv, err)
	}
	if p == 0 {
		return nil, nil
	}
	ips, err := net.DefaultResolver.LookupNetIP(ctx, "ip", host)
	if err != nil {
		return nil, fmt.Errorf("raftstore: advertise address %q: %w", adv, err)
	}
	if len(ips) == 0 || ips[0].IsUnspecified() {
		return nil, fmt.Errorf("raftstore: advertise address %q is not reachable by others; set Advertise", adv)
	}
	return &net.TCPAddr{IP: ips[0].Unmap().AsSlice(), Port: p}, nil
}

// Open starts the node: opens (or creates) its log, stable and snapshot
// stores in o.Dir, bootstraps if it has no state (see the package doc),
// and joins raft. It does not wait for a leader; see WaitLeader.
func Open(ctx context.Context, o Options) (_ *Store, err error) {
	o = o.withDefaults()
	if o.NodeID == "" || o.Dir == "" || o.Bind == "" {
		return nil, errors.New("raftstore: NodeID, Dir and Bind are required")
	}
	peers, self, err := o.peers()
	if err != nil {
		return nil, err
	}
	adv := o.Advertise
	if adv == "" && self != nil {
		adv = self.Addr
	}
	if adv == "" {
		adv = o.Bind
	}
	advAddr, err := advertiseAddr(ctx, adv)
	if err != nil {
		return nil, err
	}
	if advAddr == nil && len(peers) > 1 {
		return nil, fmt.Errorf("raftstore: a cluster needs fixed ports, not %q", adv)
	}

	s := &Store{o: o, log: o.Logger, self: raft.ServerID(o.NodeID), done: make(chan struct{})}
	var cleanup []func() error
	defer func() {
		if err != nil {
			for i := len(cleanup) - 1; i >= 0; i-- {
				cleanup[i]()
			}
		}
	}()

	if err := os.MkdirAll(o.Dir, 0o750); err != nil {
		return nil, fmt.Errorf("raftstore: %w", err)
	}
	dbPath := filepath.Join(o.Dir, "raft.db")
	// The timeout turns a second process on the same directory into an
	// error instead of a hang on bolt's file lock.
	s.bolt, err = raftboltdb.New(raftboltdb.Options{Path: dbPath, BoltOptions: &bbolt.Options{Timeout: 2 * time.Second}})
	if err != nil {
		return nil, fmt.Errorf("raftstore: open %s: %w", dbPath, err)
	}
	cleanup = append(cleanup, s.bolt.Close)
	hl := newHCLog(s.log, "raft")
	s.snaps, err = raft.NewFileSnapshotStoreWithLogger(o.Dir, 2, hl.Named("snapshot"))
	if err != nil {
		return nil, fmt.Errorf("raftstore: snapshot store: %w", err)
	}
	var advNet net.Addr
	if advAddr != nil {
		advNet = advAddr
	}
	if o.TLS != nil {
		var layer *tlsLayer
		if layer, err = newTLSLayer(o.Bind, advNet, o.TLS); err == nil {
			s.trans = raft.NewNetworkTransportWithLogger(layer, 3, 10*time.Second, hl.Named("transport"))
		}
	} else {
		s.trans, err = raft.NewTCPTransportWithLogger(o.Bind, advNet, 3, 10*time.Second, hl.Named("transport"))
	}
	if err != nil {
		return nil, fmt.Errorf("raftstore: listen on %s: %w", o.Bind, err)
	}
	cleanup = append(cleanup, s.trans.Close)
	if len(peers) == 0 {
		peers = []Peer{{ID: o.NodeID, Addr: string(s.trans.LocalAddr())}}
	}

	conf := raft.DefaultConfig()
	conf.LocalID = s.self
	conf.Logger = hl
	conf.HeartbeatTimeout = o.HeartbeatTimeout
	conf.ElectionTimeout = o.ElectionTimeout
	conf.LeaderLeaseTimeout = o.LeaderLeaseTimeout
	conf.CommitTimeout = o.CommitTimeout
	conf.SnapshotThreshold = o.SnapshotThreshold
	conf.SnapshotInterval = o.SnapshotInterval
	conf.TrailingLogs = o.TrailingLogs
	if err := raft.ValidateConfig(conf); err != nil {
		return nil, fmt.Errorf("raftstore: %w", err)
	}

	// The log cache keeps the newest entries in memory for replication.
	logs, err := raft.NewLogCache(256, s.bolt)
	if err != nil {
		return nil, fmt.Errorf("raftstore: %w", err)
	}
	has, err := raft.HasExistingState(logs, s.bolt, s.snaps)
	if err != nil {
		return nil, fmt.Errorf("raftstore: read state in %s: %w", o.Dir, err)
	}
	if !has {
		// First start (or a wiped directory): write the identical initial
		// configuration every node writes; see the package doc for why this
		// is safe even when the cluster has moved on.
		var cfg raft.Configuration
		for _, p := range peers {
			cfg.Servers = append(cfg.Servers, raft.Server{Suffrage: raft.Voter, ID: raft.ServerID(p.ID), Address: raft.ServerAddress(p.Addr)})
		}
		if err := raft.BootstrapCluster(conf, logs, s.bolt, s.snaps, s.trans, cfg); err != nil {
			return nil, fmt.Errorf("raftstore: bootstrap: %w", err)
		}
		s.bootstrapped = true
		s.log.Info("raftstore: bootstrapped", "node", o.NodeID, "peers", len(peers))
	}

	s.fsm = newFSM(s.log, s.subs.notify, o.OnHolds)
	s.raft, err = raft.NewRaft(conf, s.fsm, logs, s.bolt, s.snaps, s.trans)
	if err != nil {
		return nil, fmt.Errorf("raftstore: start raft: %w", err)
	}
	s.obsCh = make(chan raft.Observation, 16)
	s.obs = raft.NewObserver(s.obsCh, false, func(o *raft.Observation) bool {
		switch o.Data.(type) {
		case raft.LeaderObservation, raft.RaftState:
			return true
		}
		return false
	})
	s.raft.RegisterObserver(s.obs)
	s.wg.Add(1)
	go s.watch()
	s.log.Info("raftstore: started", "node", o.NodeID, "addr", s.trans.LocalAddr(), "existing_state", has)
	return s, nil
}

// watch turns raft's leadership signals into readiness and notifications.
func (s *Store) watch() {
	defer s.wg.Done()
	leaderCh := s.raft.LeaderCh()
	for {
		select {
		case <-s.done:
			return
		case <-s.obsCh:
			s.subs.notify()
		case isLeader := <-leaderCh:
			s.readyTerm.Store(0)
			if isLeader {
				s.becomeReady()
			}
			s.subs.notify()
		}
	}
}

// becomeReady waits, as a new leader, until the FSM has applied every entry
// committed before this term: raft reports leadership before its FSM has
// caught up, and a drain acting on the older state could, say, run while
// the cluster is paused.
func (s *Store) becomeReady() {
	for s.raft.State() == raft.Leader {
		term := s.raft.CurrentTerm()
		err := s.raft.Barrier(0).Error()
		if err == nil {
			if s.raft.CurrentTerm() == term && s.raft.State() == raft.Leader {
				s.readyTerm.Store(term)
				s.log.Info("raftstore: leader", "node", s.o.NodeID, "term", term, "index", s.fsm.current().Index)
			}
			return
		}
		if errors.Is(err, raft.ErrRaftShutdown) {
			return
		}
		s.log.Debug("raftstore: leader barrier", "error", err)
		select {
		case <-s.done:
			return
		case <-time.After(s.o.CommitTimeout):
		}
	}
}

// Close shuts the node down cleanly. A leader first hands leadership to an
// up-to-date follower (bounded by ElectionTimeout), so the cluster does not
// sit without a leader until the followers' heartbeat timeout.
func (s *Store) Close() error {
	s.closed.Do(func() { s.err = s.shutdown(true) })
	return s.err
}

func (s *Store) shutdown(handOver bool) error {
	if handOver && s.raft.State() == raft.Leader && len(s.Members()) > 1 {
		if err := s.raft.LeadershipTransfer().Error(); err != nil {
			s.log.Debug("raftstore: leadership transfer on close", "error", err)
		}
	}
	close(s.done)
	s.raft.DeregisterObserver(s.obs)
	var errs []error
	if err := s.raft.Shutdown().Error(); err != nil {
		errs = append(errs, fmt.Errorf("raftstore: shutdown: %w", err))
	}
	s.wg.Wait()
	if err := s.trans.Close(); err != nil {
		errs = append(errs, fmt.Errorf("raftstore: close transport: %w", err))
	}
	// hashicorp/raft's heartbeat fast path runs on the transport's
	// connection goroutines, which Shutdown does not wait for: one that
	// checked for shutdown just before it began still writes the term,
	// and raft panics if the log is closed under it ("failed to save
	// current term: database not open", seen once in CI). Closing the
	// transport stops new ones; let those under way finish first.
	time.Sleep(200 * time.Millisecond)
	if err := s.bolt.Close(); err != nil {
		errs = append(errs, fmt.Errorf("raftstore: close log: %w", err))
	}
	s.readyTerm.Store(0)
	s.subs.notify()
	return errors.Join(errs...)
}

// State returns the current control state. It never blocks; the result is
// shared and must not be modified.
func (s *Store) State() *State { return s.fsm.current() }

// Subscribe returns a channel signalled after every applied command or
// snapshot restore and on every leadership change. Signals coalesce (the
// channel holds at most one) and are never waited for, so a subscriber
// re-reads State when woken. The function unsubscribes.
func (s *Store) Subscribe() (<-chan struct{}, func()) { return s.subs.subscribe() }

// IsLeader reports whether this node is the leader and its state is
// current: true only once the FSM has applied everything committed before
// this leader's term.
func (s *Store) IsLeader() bool {
	t := s.readyTerm.Load()
	return t != 0 && s.raft.State() == raft.Leader && t == s.raft.CurrentTerm()
}

// Leader returns the leader as this node knows it ("" when unknown).
func (s *Store) Leader() (id, addr string) {
	a, i := s.raft.LeaderWithID()
	return string(i), string(a)
}

// WaitLeader waits until some node is known to be the leader (and, when
// that is this node, until it IsLeader).
func (s *Store) WaitLeader(ctx context.Context) error {
	ch, unsub := s.Subscribe()
	defer unsub()
	t := time.NewTicker(s.pollInterval())
	defer t.Stop()
	for {
		if id, _ := s.Leader(); id != "" && (raft.ServerID(id) != s.self || s.IsLeader()) {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("raftstore: wait for leader: %w: %w", ErrNoLeader, ctx.Err())
		case <-s.done:
			return fmt.Errorf("raftstore: wait for leader: %w", ErrClosed)
		case <-ch:
		case <-t.C:
		}
	}
}

// pollInterval backs up the notifications (raft drops observations for a
// slow observer) when waiting for a leader.
func (s *Store) pollInterval() time.Duration {
	return max(s.o.HeartbeatTimeout/4, 10*time.Millisecond)
}

// Members lists the servers of the current raft configuration.
func (s *Store) Members() []Member {
	f := s.raft.GetConfiguration()
	if f.Error() != nil {
		return nil
	}
	_, leader := s.raft.LeaderWithID()
	var ms []Member
	for _, srv := range f.Configuration().Servers {
		ms = append(ms, Member{ID: string(srv.ID), Addr: string(srv.Address), Voter: srv.Suffrage == raft.Voter, Leader: srv.ID == leader})
	}
	return ms
}

// Apply applies c to the cluster's state and returns once the leader has
// applied it. On a follower it forwards the command (Options.Forward). When
// there is no leader (an election) it waits for one and retries until ctx
// ends (Options.ApplyTimeout when ctx has no deadline). A hold or release
// with many IDs becomes several raft entries (see MaxEntryBytes).
//
// An error after the command reached the leader (leadership lost, ctx
// ended) does not prove it was not applied: it may still commit. Apply
// itself retries after lost leadership, and a caller may retry too: every
// command is idempotent, except that a repeated reset_ramp bumps ResetSeq
// once more, which only restarts the ramp again.
func (s *Store) Apply(ctx context.Context, c Command) error {
	if c.At.IsZero() {
		c.At = time.Now()
	}
	c.At = c.At.UTC()
	if err := c.validate(); err != nil {
		return err
	}
	ctx, cancel := s.applyContext(ctx)
	defer cancel()
	for _, part := range split(c) {
		b, err := encodeCommand(&part)
		if err != nil {
			return err
		}
		if err := s.applyBytes(ctx, b); err != nil {
			return fmt.Errorf("raftstore: %s: %w", c.Op, err)
		}
	}
	level := slog.LevelInfo
	if c.Op == OpSetRamp {
		level = slog.LevelDebug // the drain persists its ramp every few seconds
	}
	s.log.Log(ctx, level, "raftstore: command applied", "op", c.Op, "route", c.Route, "ids", len(c.IDs), "by", c.By)
	return nil
}

// ApplyEncoded is the leader's side of forwarding: it applies a command a
// follower encoded. On a node that is not the leader it returns an error
// wrapping ErrNotLeader (the follower then retries).
func (s *Store) ApplyEncoded(ctx context.Context, b []byte) error {
	if len(b) > MaxEntryBytes {
		return fmt.Errorf("%w: %d bytes", ErrTooLarge, len(b))
	}
	c, err := decodeCommand(b)
	if err == nil {
		err = c.validate()
	}
	if err != nil {
		return err
	}
	ctx, cancel := s.applyContext(ctx)
	defer cancel()
	if s.raft.State() != raft.Leader {
		return ErrNotLeader
	}
	_, err = s.applyLocal(ctx, b)
	return err
}

func (s *Store) applyContext(ctx context.Context) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok {
		return context.WithCancel(ctx)
	}
	return context.WithTimeout(ctx, s.o.ApplyTimeout)
}

// applyBytes applies one encoded entry on the leader, wherever it is,
// retrying through elections until ctx ends.
func (s *Store) applyBytes(ctx context.Context, b []byte) error {
	var changed <-chan struct{}
	var t *time.Timer
	for {
		retry, err := s.applyOnce(ctx, b)
		if err == nil || !retry {
			return err
		}
		if changed == nil {
			// Subscribe only when needed, then try once more at once: the
			// change we wait for may have happened before subscribing.
			ch, unsub := s.Subscribe()
			defer unsub()
			changed = ch
			t = time.NewTimer(s.pollInterval())
			defer t.Stop()
			continue
		}
		t.Reset(s.pollInterval())
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w: %w", ctx.Err(), err)
		case <-s.done:
			return ErrClosed
		case <-changed:
		case <-t.C:
		}
	}
}

// applyOnce makes one attempt; retry reports whether another attempt may
// succeed once leadership settles.
func (s *Store) applyOnce(ctx context.Context, b []byte) (retry bool, err error) {
	if s.raft.State() == raft.Leader {
		return s.applyLocal(ctx, b)
	}
	addr, id := s.raft.LeaderWithID()
	if id == "" || id == s.self {
		return true, ErrNoLeader
	}
	if s.o.Forward == nil {
		return false, fmt.Errorf("%w: the leader is %s at %s", ErrNotLeader, id, addr)
	}
	if err := s.o.Forward(ctx, string(id), b); err != nil {
		if ctx.Err() != nil {
			return false, fmt.Errorf("forward to %s: %w", id, err)
		}
		return errors.Is(err, ErrNotLeader), fmt.Errorf("forward to %s: %w", id, err)
	}
	return false, nil
}

// applyLocal appends b to the log on this (leader) node and waits until the
// FSM applied it or ctx ends.
func (s *Store) applyLocal(ctx context.Context, b []byte) (retry bool, err error) {
	timeout := time.Duration(0)
	if dl, ok := ctx.Deadline(); ok {
		timeout = max(time.Until(dl), time.Millisecond)
	}
	f := s.raft.Apply(b, timeout) // the timeout only bounds enqueueing
	done := make(chan struct{})
	go func() {
		f.Error() // resolves on apply, lost leadership or shutdown
		close(done)
	}()
	select {
	case <-done:
	case <-ctx.Done():
		return false, fmt.Errorf("waiting for the log: %w", ctx.Err())
	}
	if err := f.Error(); err != nil {
		switch {
		case errors.Is(err, raft.ErrNotLeader), errors.Is(err, raft.ErrLeadershipLost),
			errors.Is(err, raft.ErrLeadershipTransferInProgress):
			return true, fmt.Errorf("%w: %w", ErrNotLeader, err)
		case errors.Is(err, raft.ErrRaftShutdown):
			return false, fmt.Errorf("%w: %w", ErrClosed, err)
		}
		return false, fmt.Errorf("raft apply: %w", err)
	}
	if err, ok := f.Response().(error); ok && err != nil {
		return false, err
	}
	return false, nil
}

// broadcaster wakes subscribers without ever blocking the FSM.
type broadcaster struct {
	mu   sync.Mutex
	next int
	subs map[int]chan struct{}
}

func (b *broadcaster) subscribe() (<-chan struct{}, func()) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.subs == nil {
		b.subs = make(map[int]chan struct{})
	}
	id := b.next
	b.next++
	ch := make(chan struct{}, 1)
	b.subs[id] = ch
	return ch, func() {
		b.mu.Lock()
		delete(b.subs, id)
		b.mu.Unlock()
	}
}

func (b *broadcaster) notify() {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, ch := range b.subs {
		select {
		case ch <- struct{}{}:
		default: // a signal is pending already
		}
	}
}
