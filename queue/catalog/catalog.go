// Package catalog is this node's index of the queue, kept on its own disk,
// so that no question about the queue costs more with a larger backlog.
//
// The stream is the queue's only truth, and JetStream answers cheaply only
// by sequence and by subject. Everything else mxq is asked — which records
// a queue ID has (queue show), what is held for a mailbox (queue ls --to,
// the continuity views), which records are due for delivery now and which
// wait for a retry or are held (the drain) — would walk the stream. Kept in
// memory, such indexes cost heap per held message (measured: ~1.6 KiB per
// message at 1 M); kept as subjects in JetStream, they cost the server's
// per-subject state in memory instead. So they live in a Pebble database (an
// LSM tree: memory is its block cache and memtables, a few tens of MiB
// whatever the backlog) under the node's data directory, and keys.go lists
// them.
//
// The catalog is derived state. It follows the stream in sequence order,
// headers only, with one long-lived ordered consumer: a new record adds its
// keys, a tombstone (queue/tombstone.go) removes the keys of the records it
// lists, and the position reached is written in the same atomic batch as
// the keys it covers, so a crash (or a power cut, which can lose the
// database's last writes: it does not sync them) leaves it consistent with
// a prefix of the stream, and following resumes there. Held messages come
// from the control plane: a hold moves a record's due key (d) to a held key
// (h), a release moves it back, due at once (or at its next attempt, if that
// is later). Every node keeps its own catalog from the same stream and the
// same control state, so a new leader's drain finds everything where the
// old one left it.
//
// The catalog can lag the stream, and a tombstone lost in a crash leaves an
// entry for a record that is gone. So every reader checks the record itself
// before acting on it (the drain reads the record it delivers, the views
// the message they show) and tells the catalog when one was gone (Forget).
// When the catalog cannot trust itself — it is new, it was made for another
// stream (the stream was deleted and made again), or it was not kept up for
// longer than tombstones live — it is rebuilt by following the stream from
// its first record: the one walk of the whole queue, at first start, in the
// background.
package catalog

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/bloom"
	"github.com/cockroachdb/pebble/v2/sstable"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/mxq-dev/mxq/queue"
)

// Options configures a Catalog.
type Options struct {
	// Dir is the database's directory.
	Dir string
	// Held reports whether a queue ID is held; nil: nothing is.
	Held func(id string) bool
	// RangeHolds calls fn for every held ID until it returns false, to
	// reconcile the catalog with holds it may have missed while stopped.
	RangeHolds func(fn func(id string) bool)
	// TombstoneTTL is how long tombstones live in the stream: a catalog not
	// kept up for half of it is rebuilt. Zero: queue.DefaultTombstoneTTL.
	TombstoneTTL time.Duration
	// CacheSize is the database's block cache (default 8 MiB).
	CacheSize int64
	// StallAfter is how long the follower may bring nothing while the
	// stream holds records past the catalog's position before it is made
	// anew (default 15 s). An ordered consumer that stops delivering
	// without an error would otherwise stop the drain without a word.
	StallAfter time.Duration
	Now        func() time.Time
	Logger     *slog.Logger
}

// Catalog is the node's index of the queue.
type Catalog struct {
	o     Options
	store *queue.Store
	db    *pebble.DB
	log   *slog.Logger
	uidv  uint32
	ready chan struct{}

	// followFn feeds the apply loop (follow; a test makes it stall).
	followFn func(ctx context.Context, from uint64, msgs chan<- jetstream.Msg) error
	// stalls counts the followers made anew because they stalled.
	stalls atomic.Uint64

	// Written by the apply loop only.
	pos     uint64 // next sequence to apply
	fresh   uint64 // above every sequence added since Run started
	stats   Stats
	purgeAt time.Time // when to purge old tombstones next

	mu      sync.Mutex
	applied uint64 // pos as committed, for CatchUp
	// statsCommitted is stats as committed.
	statsCommitted Stats
	lastSync       time.Time
	progress       chan struct{}
	wake           map[string]chan struct{}
	added          map[string]Pos // lowest due key added per route since Added
	watch          map[string]chan struct{}
	events         []event
	eventsCh       chan struct{}
	closed         bool
}

// Stats describes the catalog.
type Stats struct {
	Ready bool `json:"ready"`
	// Records counts queued records and dead letters, Dead the latter.
	Records uint64 `json:"records"`
	Dead    uint64 `json:"dead"`
	// Mailboxes is how many mailboxes hold mail; Messages counts a
	// message once per mailbox it is held for, Bytes their sizes.
	Mailboxes uint64 `json:"mailboxes"`
	Messages  uint64 `json:"messages"`
	Bytes     uint64 `json:"bytes"`
	// Position is the next stream sequence the catalog will read.
	Position uint64 `json:"position"`
	// LastSync is when the catalog last applied a change.
	LastSync time.Time `json:"last_sync"`
}

// Open opens (or creates, or rebuilds) the catalog of store's stream. Run
// brings it up to date and keeps it there.
func Open(ctx context.Context, store *queue.Store, o Options) (*Catalog, error) {
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.TombstoneTTL <= 0 {
		o.TombstoneTTL = queue.DefaultTombstoneTTL
	}
	if o.CacheSize <= 0 {
		o.CacheSize = 8 << 20
	}
	c := &Catalog{
		o: o, store: store, log: o.Logger,
		ready: make(chan struct{}), progress: make(chan struct{}),
		wake: map[string]chan struct{}{}, added: map[string]Pos{}, watch: map[string]chan struct{}{},
		eventsCh: make(chan struct{}, 1),
	}
	st, err := store.State(ctx)
	if err != nil {
		return nil, fmt.Errorf("catalog: %w", err)
	}
	if err := c.open(); err != nil {
		// A database that cannot be opened (damaged by a disk error, say)
		// is derived state: start it over rather than keep mxq down.
		c.log.Error("catalog of the queue cannot be opened; building it again from the stream", "err", err)
		if err := os.RemoveAll(c.o.Dir); err != nil {
			return nil, fmt.Errorf("catalog: %w", err)
		}
		if err := c.open(); err != nil {
			return nil, err
		}
	}
	why, err := c.doubt(st)
	if err != nil {
		c.db.Close()
		return nil, err
	}
	if why != "" {
		c.log.Info("catalog of the queue: building it from the stream", "why", why, "records", st.LastSeq-st.FirstSeq+1)
		if err := c.reset(st); err != nil {
			return nil, err
		}
	}
	return c, nil
}

func (c *Catalog) open() error {
	if err := os.MkdirAll(c.o.Dir, 0o750); err != nil {
		return fmt.Errorf("catalog: %w", err)
	}
	cache := pebble.NewCache(c.o.CacheSize)
	defer cache.Unref()
	opts := &pebble.Options{
		Cache:        cache,
		MemTableSize: 16 << 20,
		// Compaction is the catalog's main cost while a backlog grows: a
		// large base level and L0 left to grow a little keep the number of
		// times each key is rewritten low, and keys are small enough that
		// compressing them costs more CPU than the disk it saves.
		LBaseMaxBytes:         256 << 20,
		L0CompactionThreshold: 8,
		L0StopWritesThreshold: 24,
		// No write-ahead log: the catalog is derived from the stream, and
		// each batch carries the position it reached. A crash loses what
		// was not yet flushed from the memtable, and leaves the position
		// of the last flush, from which following the stream again makes
		// the same keys. (Holds and forgets, which do not come from the
		// stream, are reconciled at every start and found again.)
		DisableWAL: true,
		Logger:     pebbleLogger{c.log},
	}
	// Bloom filters on every level: following the stream asks for keys
	// that are mostly absent (is this message new in this mailbox?), and
	// without a filter every such miss reads a block of each level, a cost
	// that grows with the catalog.
	for i := range opts.Levels {
		opts.Levels[i].FilterPolicy = bloom.FilterPolicy(10)
		opts.Levels[i].Compression = func() *sstable.CompressionProfile { return sstable.NoCompression }
	}
	db, err := pebble.Open(c.o.Dir, opts)
	if err != nil {
		return fmt.Errorf("catalog: opening %s: %w", c.o.Dir, err)
	}
	c.db = db
	return nil
}

// doubt says why the catalog on disk cannot be used for st's stream, or ""
// when it can. It loads the catalog's state when it can.
func (c *Catalog) doubt(st queue.StreamState) (string, error) {
	pos, ok, err := c.metaU64("pos")
	if err != nil || !ok {
		return "new", err
	}
	created, _, err := c.metaU64("created")
	if err != nil {
		return "", err
	}
	if int64(created) != st.Created.UnixNano() {
		return "made for another stream", nil
	}
	if pos > st.LastSeq+1 {
		return fmt.Sprintf("ahead of the stream (%d > %d)", pos, st.LastSeq+1), nil
	}
	synced, _, err := c.metaU64("synced")
	if err != nil {
		return "", err
	}
	if age := c.o.Now().Sub(time.Unix(0, int64(synced))); age > c.o.TombstoneTTL/2 && pos <= st.LastSeq {
		return fmt.Sprintf("not kept up for %s, tombstones live %s", age.Round(time.Minute), c.o.TombstoneTTL), nil
	}
	uidv, _, err := c.metaU64("uidv")
	if err != nil {
		return "", err
	}
	v, ok, err := c.get(keyMeta("stats"))
	if err != nil {
		return "", err
	}
	if ok {
		d := dec{b: v}
		c.stats = Stats{Records: d.uv(), Mailboxes: d.uv(), Messages: d.uv(), Bytes: d.uv(), Dead: d.uv()}
		if d.err != nil {
			return "its counters are damaged", nil
		}
	}
	c.pos, c.applied, c.uidv = pos, pos, uint32(uidv)
	c.statsCommitted = c.stats
	return "", nil
}

// reset empties the catalog and starts it over for st's stream.
func (c *Catalog) reset(st queue.StreamState) error {
	c.db.Close()
	if err := os.RemoveAll(c.o.Dir); err != nil {
		return fmt.Errorf("catalog: %w", err)
	}
	if err := c.open(); err != nil {
		return err
	}
	// UIDVALIDITY: the time the catalog was made, so that a rebuilt one
	// (which numbers messages anew) has a greater one.
	c.uidv = uint32(c.o.Now().Unix())
	c.pos, c.applied, c.stats = 1, 1, Stats{}
	b := c.db.NewBatch()
	b.Set(keyMeta("created"), u64(nil, uint64(st.Created.UnixNano())), nil)
	b.Set(keyMeta("uidv"), u64(nil, uint64(c.uidv)), nil)
	c.setMeta(b)
	if err := b.Commit(pebble.NoSync); err != nil {
		return fmt.Errorf("catalog: %w", err)
	}
	if err := c.db.Flush(); err != nil {
		return fmt.Errorf("catalog: %w", err)
	}
	return nil
}

func (c *Catalog) metaU64(name string) (uint64, bool, error) {
	v, ok, err := c.get(keyMeta(name))
	if err != nil || !ok {
		return 0, ok, err
	}
	if len(v) != 8 {
		return 0, false, fmt.Errorf("catalog: meta %s: %w", name, errCorrupt)
	}
	return binary.BigEndian.Uint64(v), true, nil
}

// get reads a committed key.
func (c *Catalog) get(k []byte) ([]byte, bool, error) {
	v, closer, err := c.db.Get(k)
	if errors.Is(err, pebble.ErrNotFound) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, fmt.Errorf("catalog: %w", err)
	}
	out := append([]byte(nil), v...)
	closer.Close()
	return out, true, nil
}

// setMeta writes the position, counters and time of the batch's state.
func (c *Catalog) setMeta(b *pebble.Batch) {
	b.Set(keyMeta("pos"), u64(nil, c.pos), nil)
	b.Set(keyMeta("synced"), u64(nil, uint64(c.o.Now().UnixNano())), nil)
	var e enc
	e.uv(c.stats.Records)
	e.uv(c.stats.Mailboxes)
	e.uv(c.stats.Messages)
	e.uv(c.stats.Bytes)
	e.uv(c.stats.Dead)
	b.Set(keyMeta("stats"), e.b, nil)
}

// Close closes the database; call it after Run returned.
func (c *Catalog) Close() error {
	// Without a write-ahead log, what is in the memtable is lost unless
	// flushed: a clean stop keeps it, so the next start need not follow
	// the stream again from the last flush.
	ferr := c.db.Flush()
	if err := c.db.Close(); err != nil {
		return err
	}
	return ferr
}

// Ready is closed once the catalog has caught up with the stream once.
func (c *Catalog) Ready() <-chan struct{} { return c.ready }

// IsReady reports whether Ready is closed.
func (c *Catalog) IsReady() bool {
	select {
	case <-c.ready:
		return true
	default:
		return false
	}
}

// UIDValidity is the IMAP UIDVALIDITY of every mailbox of this catalog: the
// time it was made. It survives restarts; a rebuilt catalog has a new one.
func (c *Catalog) UIDValidity() uint32 { return c.uidv }

// Stats describes the catalog.
func (c *Catalog) Stats() Stats {
	c.mu.Lock()
	defer c.mu.Unlock()
	st := c.statsCommitted
	st.Ready = c.IsReady()
	st.Position = c.applied
	st.LastSync = c.lastSync
	return st
}

// pebbleLogger sends Pebble's chatter to the debug level.
type pebbleLogger struct{ l *slog.Logger }

func (p pebbleLogger) Infof(format string, args ...any) {
	p.l.Debug(fmt.Sprintf("pebble: "+format, args...))
}
func (p pebbleLogger) Errorf(format string, args ...any) {
	p.l.Warn(fmt.Sprintf("pebble: "+format, args...))
}

// Fatalf is Pebble's word that it cannot go on safely; the process stops
// (the catalog is rebuilt from the stream at the next start if need be).
func (p pebbleLogger) Fatalf(format string, args ...any) {
	p.l.Error(fmt.Sprintf("pebble: "+format, args...))
	os.Exit(1)
}

// consumerConfig is the follower's view of the stream: every record from
// from on, headers only.
func (c *Catalog) consumerConfig(from uint64) jetstream.OrderedConsumerConfig {
	return jetstream.OrderedConsumerConfig{
		FilterSubjects:    []string{c.store.AllSubjects()},
		DeliverPolicy:     jetstream.DeliverByStartSequencePolicy,
		OptStartSeq:       from,
		HeadersOnly:       true,
		InactiveThreshold: time.Minute,
	}
}
