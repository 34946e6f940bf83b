package queue

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/synadia-io/orbit.go/jetstreamext"
)

// Tombstones tell every node which records were deleted.
//
// Each node keeps an index of the queue on its own disk (the catalog), built
// by reading the stream in sequence order. A new record is in the stream for
// every reader to see; a deleted one leaves nothing behind, and JetStream
// offers no feed of deletions (its list of deleted sequences grows with
// every delivery and costs more to read each time). So whoever deletes a
// record says so in the stream itself: a tombstone record on p.x lists the
// sequences deleted since the last one, in the header Mxq-Deleted.
//
// Tombstones are gathered for TombstoneInterval and written off the
// deleting caller's path: a delivery does not wait for one. They matter
// only to an index that has not read them yet, so those older than
// TombstoneTTL are purged (PurgeTombstones, hourly); an index that was not
// kept up for that long is rebuilt. (Not JetStream's per-message TTL: with
// it, a server restarted after a crash rescans the whole stream for TTLs
// before it serves.) A tombstone lost in a crash leaves an index entry for a record
// that is gone; every reader of the index checks the record itself before it
// acts on it, and drops such an entry when it finds it.

// HdrDeleted lists the sequences a tombstone reports deleted, in decimal,
// separated by spaces.
const HdrDeleted = "Mxq-Deleted"

// TombstoneSubject is the subject of tombstones.
func (s *Store) TombstoneSubject() string { return s.prefix + ".x" }

// AllSubjects is the filter that matches every record mxq writes.
func (s *Store) AllSubjects() string { return s.prefix + ".>" }

// IsTombstone reports whether a subject is the tombstones'.
func (s *Store) IsTombstone(subject string) bool { return subject == s.prefix+".x" }

// IsQueued reports whether a subject holds queued records.
func (s *Store) IsQueued(subject string) bool { return strings.HasPrefix(subject, s.prefix+".q.") }

// IsDead reports whether a subject holds dead letters.
func (s *Store) IsDead(subject string) bool { return strings.HasPrefix(subject, s.prefix+".dlq.") }

// ParseTombstone returns the sequences a tombstone's header lists.
func ParseTombstone(h nats.Header) ([]uint64, error) {
	var out []uint64
	for _, v := range h.Values(HdrDeleted) {
		for _, f := range strings.Fields(v) {
			n, err := strconv.ParseUint(f, 10, 64)
			if err != nil {
				return out, fmt.Errorf("tombstone: %q is not a sequence", f)
			}
			out = append(out, n)
		}
	}
	return out, nil
}

// Defaults for tombstones.
const (
	DefaultTombstoneTTL      = 48 * time.Hour
	DefaultTombstoneInterval = 100 * time.Millisecond
	// tombstoneMax bounds one tombstone (about 10 KiB of header).
	tombstoneMax = 1000
)

// tombstones gathers deleted sequences and writes them.
type tombstones struct {
	s        *Store
	ttl      time.Duration
	interval time.Duration

	flushMu sync.Mutex // one flush at a time
	mu      sync.Mutex
	pending []uint64
	kick    chan struct{}
	stop    chan struct{}
	done    chan struct{}
}

func newTombstones(s *Store, ttl, interval time.Duration) *tombstones {
	if ttl <= 0 {
		ttl = DefaultTombstoneTTL
	}
	if interval <= 0 {
		interval = DefaultTombstoneInterval
	}
	t := &tombstones{s: s, ttl: ttl, interval: interval, kick: make(chan struct{}, 1), stop: make(chan struct{}), done: make(chan struct{})}
	go t.run()
	return t
}

// add records deleted sequences; it never blocks on the store.
func (t *tombstones) add(seqs ...uint64) {
	t.mu.Lock()
	t.pending = append(t.pending, seqs...)
	full := len(t.pending) >= tombstoneMax
	t.mu.Unlock()
	if full {
		select {
		case t.kick <- struct{}{}:
		default:
		}
	}
}

func (t *tombstones) run() {
	defer close(t.done)
	tick := time.NewTicker(t.interval)
	defer tick.Stop()
	for {
		select {
		case <-t.stop:
			t.flush(context.Background())
			return
		case <-tick.C:
		case <-t.kick:
		}
		t.flush(context.Background())
	}
}

// flush writes what is pending, a tombstone per tombstoneMax sequences. A
// tombstone that cannot be written is kept and tried again at the next
// interval: it is not mail, and nothing waits for it.
func (t *tombstones) flush(ctx context.Context) {
	t.flushMu.Lock()
	defer t.flushMu.Unlock()
	for {
		t.mu.Lock()
		n := min(len(t.pending), tombstoneMax)
		if n == 0 {
			t.mu.Unlock()
			return
		}
		seqs := append([]uint64(nil), t.pending[:n]...)
		t.mu.Unlock()
		if err := t.write(ctx, seqs); err != nil {
			t.s.log.Debug("writing a tombstone, will retry", "seqs", len(seqs), "err", err)
			return
		}
		t.mu.Lock()
		t.pending = append(t.pending[:0], t.pending[n:]...)
		t.mu.Unlock()
	}
}

func (t *tombstones) write(ctx context.Context, seqs []uint64) error {
	var b strings.Builder
	for i, q := range seqs {
		if i > 0 {
			b.WriteByte(' ')
		}
		b.WriteString(strconv.FormatUint(q, 10))
	}
	m := &nats.Msg{Subject: t.s.TombstoneSubject(), Header: nats.Header{}}
	m.Header.Set(HdrDeleted, b.String())
	ctx, cancel := context.WithTimeout(ctx, t.s.o.Timeout)
	defer cancel()
	_, err := t.s.js.PublishMsg(ctx, m)
	return err
}

// FlushTombstones writes the tombstones of every deletion so far now,
// instead of at the next interval: for tools and tests that want the
// catalog to see a deletion at once.
func (s *Store) FlushTombstones(ctx context.Context) error {
	s.tombs.flush(ctx)
	s.tombs.mu.Lock()
	left := len(s.tombs.pending)
	s.tombs.mu.Unlock()
	if left > 0 {
		return fmt.Errorf("queue: %d tombstones not written", left)
	}
	return nil
}

// PurgeTombstones removes the tombstones older than the TTL. Any node may
// call it at any time: it is idempotent.
func (s *Store) PurgeTombstones(ctx context.Context, now time.Time) error {
	ctx, cancel := context.WithTimeout(ctx, s.o.Timeout)
	defer cancel()
	it, err := jetstreamext.GetBatch(ctx, s.js, s.o.Stream, 1,
		jetstreamext.GetBatchStartTime(now.Add(-s.tombs.ttl)), jetstreamext.GetBatchSubject(s.TombstoneSubject()))
	if err != nil {
		return fmt.Errorf("tombstones: %w", err)
	}
	keepFrom := uint64(0)
	for m, err := range it {
		if errors.Is(err, jetstreamext.ErrNoMessages) {
			// None younger: all may go.
			last, err := s.LastSeq(ctx)
			if err != nil {
				return err
			}
			keepFrom = last + 1
			break
		}
		if err != nil {
			return fmt.Errorf("tombstones: %w", err)
		}
		keepFrom = m.Sequence
		break
	}
	if keepFrom <= 1 {
		return nil
	}
	if err := s.stream.Purge(ctx, jetstream.WithPurgeSubject(s.TombstoneSubject()), jetstream.WithPurgeSequence(keepFrom)); err != nil {
		return fmt.Errorf("tombstones: %w", err)
	}
	return nil
}

// close writes what is pending and stops.
func (t *tombstones) close() {
	select {
	case <-t.stop:
	default:
		close(t.stop)
	}
	<-t.done
}
