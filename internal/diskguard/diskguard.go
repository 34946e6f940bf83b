// Package diskguard keeps the queue's disk from filling up, and brings the
// queue back by itself when it did fill up anyway.
//
// Prevention: before a message is accepted, the relay asks Check whether
// the data directory's file system has the message's size plus a reserve
// free (statfs, a few microseconds; a reading is reused for MaxAge, so a
// busy relay asks the kernel a few times a second, not twice per message:
// the reserve is far larger than what arrives in that time). Below the
// reserve mail is refused with 452 4.3.1, and the senders keep it. The
// reserve is room for what is already in flight (sessions streaming their
// messages in) and for the drain, whose deletes and retry rewrites also
// write to the stream: a queue that can no longer delete cannot drain, and
// would stay full.
//
// Cure: nats-server v2.15.2 does not recover from ENOSPC on its own. A
// write that fails with "no space left on device" leaves a sticky write
// error on the file store and the stream (every later publish of that
// stream gets no reply at all, so clients time out); in a cluster, raft's
// out-of-space handling shuts JetStream down. Neither clears when space
// returns. Watch notices either (the server's health check, JetStream
// disabled) and, once the disk has the reserve free again, restarts
// JetStream in-process, which reloads the streams from disk. Acknowledged
// messages are not affected: they were fsync'd before the failed write,
// and the restart reads them back (the e2e full-disk test checks every
// one is delivered).
package diskguard

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/nats-io/nats-server/v2/server"

	"github.com/mxq-dev/mxq/queue/envelope"
)

// Guard checks free space against a reserve.
type Guard struct {
	dir     string
	reserve uint64
	log     *slog.Logger
	// Statfs returns the bytes available to an unprivileged writer in
	// dir's file system and the file system's size; tests replace it.
	Statfs func(dir string) (free, size uint64, err error)
	// MaxAge is how long Check reuses a reading (New sets DefaultMaxAge;
	// 0 asks every time). Now is the clock it is measured with.
	MaxAge time.Duration
	Now    func() time.Time

	last   atomic.Pointer[reading]
	low    atomic.Bool // last Check found too little space
	broken atomic.Pointer[string]
}

// DefaultMaxAge is how long Check reuses a free-space reading (see the
// package comment).
const DefaultMaxAge = 100 * time.Millisecond

// New guards dir with reserve bytes, or a tenth of the file system if that
// is less (a small volume would otherwise refuse all mail); reserve 0
// checks only that the message itself fits.
func New(dir string, reserve uint64, log *slog.Logger) *Guard {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Guard{dir: dir, reserve: reserve, log: log, Statfs: statfs, MaxAge: DefaultMaxAge, Now: time.Now}
}

// reading is one statfs result and when it was taken.
type reading struct {
	at         time.Time
	free, size uint64
}

// space is the latest reading, taken again once it is MaxAge old. Failed
// readings are not kept: the next Check asks again.
func (g *Guard) space() (free, size uint64, err error) {
	if g.MaxAge <= 0 || g.Now == nil {
		return g.Statfs(g.dir)
	}
	now := g.Now()
	if r := g.last.Load(); r != nil && now.Sub(r.at) < g.MaxAge && !now.Before(r.at) {
		return r.free, r.size, nil
	}
	free, size, err = g.Statfs(g.dir)
	if err == nil {
		g.last.Store(&reading{at: now, free: free, size: size})
	}
	return free, size, err
}

func statfs(dir string) (free, size uint64, err error) {
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		return 0, 0, fmt.Errorf("statfs %s: %w", dir, err)
	}
	return st.Bavail * uint64(st.Bsize), st.Blocks * uint64(st.Bsize), nil
}

// Reserve is the reserve in force for a file system of size bytes.
func (g *Guard) Reserve(size uint64) uint64 {
	if size == 0 {
		return g.reserve // a file system that does not say
	}
	return min(g.reserve, size/10)
}

// Check returns nil if a message of need bytes (0 if unknown) may be
// accepted; an error wrapping envelope.ErrStorageFull if the disk is
// below the reserve, or envelope.ErrStorageUnavailable while Watch knows
// the store to be broken (so sessions are refused at once instead of
// waiting for a publish that will not be answered).
func (g *Guard) Check(need int64) error {
	free, size, err := g.space()
	if err != nil {
		// Not knowing is no reason to refuse mail; the store will say.
		g.log.Warn("cannot check free disk space", "err", err)
		return nil
	}
	reserve := g.Reserve(size)
	if free < reserve+uint64(max(need, 0)) {
		if !g.low.Swap(true) {
			g.log.Warn("disk space below the reserve: refusing mail with 452 4.3.1 until space returns",
				"dir", g.dir, "free_bytes", free, "reserve_bytes", reserve)
		}
		return fmt.Errorf("%w: %d bytes free in %s, reserve %d", envelope.ErrStorageFull, free, g.dir, reserve)
	}
	if g.low.Swap(false) {
		g.log.Info("disk space above the reserve again: accepting mail", "dir", g.dir, "free_bytes", free)
	}
	if why := g.broken.Load(); why != nil {
		return fmt.Errorf("%w: %s", envelope.ErrStorageUnavailable, *why)
	}
	return nil
}

// JetStream is what Watch needs of the server that holds the queue.
type JetStream interface {
	// Broken says why the store cannot take writes, or returns nil.
	Broken() error
	// Restart restarts JetStream; its streams are reloaded from disk.
	Restart() error
}

// WatchOptions configures Watch.
type WatchOptions struct {
	// Interval between checks (default 5s).
	Interval time.Duration
	// MaxBackoff bounds the wait between restarts that did not help
	// (default 5m).
	MaxBackoff time.Duration
	// Restarted, if set, runs after each successful restart: what was
	// set up on the running store (the batch staging link) is gone.
	Restarted func()
}

// Watch checks the store every interval until ctx ends, and restarts it
// when it is broken and the disk has room again. It returns when ctx ends
// and no restart is in progress, so the caller may then shut the server
// down.
func (g *Guard) Watch(ctx context.Context, js JetStream, o WatchOptions) {
	if o.Interval <= 0 {
		o.Interval = 5 * time.Second
	}
	if o.MaxBackoff <= 0 {
		o.MaxBackoff = 5 * time.Minute
	}
	backoff := o.Interval
	var next time.Time
	t := time.NewTicker(o.Interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		err := js.Broken()
		if err == nil {
			if g.broken.Swap(nil) != nil {
				g.log.Info("queue storage is healthy again")
			}
			backoff = o.Interval
			continue
		}
		why := err.Error()
		if g.broken.Swap(&why) == nil {
			g.log.Error("queue storage is broken: refusing mail with 451 4.3.0", "err", err)
		}
		free, size, serr := g.Statfs(g.dir)
		if serr != nil || free < g.Reserve(size) {
			continue // no point restarting into a full disk
		}
		if time.Now().Before(next) {
			continue
		}
		g.log.Warn("restarting JetStream to clear the storage error", "err", err, "free_bytes", free)
		if err := js.Restart(); err != nil {
			g.log.Error("JetStream restart failed", "err", err)
		} else if o.Restarted != nil {
			o.Restarted()
		}
		next = time.Now().Add(backoff)
		backoff = min(2*backoff, o.MaxBackoff)
	}
}

// natsJS adapts an embedded nats-server.
type natsJS struct {
	s         *server.Server
	cfg       server.JetStreamConfig
	clustered bool
}

// NATS adapts the embedded server s, whose JetStream is running now (its
// configuration is kept for restarts). It restarts JetStream only on a
// single node: in a cluster the other replicas carry the stream, and a
// node leaving and rejoining the meta group is the cluster's business.
func NATS(s *server.Server) (JetStream, error) {
	cfg := s.JetStreamConfig()
	if cfg == nil {
		return nil, errors.New("diskguard: JetStream is not enabled")
	}
	// Asked now: a server whose JetStream is down no longer says.
	return &natsJS{s: s, cfg: *cfg, clustered: s.JetStreamIsClustered()}, nil
}

func (n *natsJS) Broken() error {
	if !n.s.JetStreamEnabled() {
		return errors.New("JetStream is disabled (out of resources)")
	}
	h := n.s.Healthz(&server.HealthzOptions{Details: true})
	for _, e := range h.Errors {
		if strings.Contains(e.Error, "write error") {
			return errors.New(e.Error)
		}
	}
	if h.Error != "" && strings.Contains(h.Error, "write error") {
		return errors.New(h.Error)
	}
	return nil
}

func (n *natsJS) Restart() error {
	if n.clustered {
		return errors.New("not restarting JetStream of a clustered node; restart the node once the disk has room")
	}
	if err := n.s.ShutdownJetStream(); err != nil {
		return fmt.Errorf("shutting JetStream down: %w", err)
	}
	cfg := n.cfg
	// JetStreamConfig reports the store directory with "jetstream"
	// appended; EnableJetStream appends it again.
	cfg.StoreDir = strings.TrimSuffix(strings.TrimSuffix(cfg.StoreDir, "/"), "/"+server.JetStreamStoreDir)
	if err := n.s.EnableJetStream(&cfg); err != nil {
		return fmt.Errorf("enabling JetStream: %w", err)
	}
	return nil
}
