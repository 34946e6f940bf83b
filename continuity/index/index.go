// Package index lists, per recipient, the mail mxq holds, for the
// continuity views (IMAP and web).
//
// The lists themselves are the node's catalog of the queue
// (queue/catalog): on disk, following the stream, so that one user's held
// mail is listed by a prefix scan under a backlog of millions, and the
// memory it takes does not grow with the backlog. UIDs are per mailbox,
// given in the order the catalog first saw each message, never reused, and
// kept across restarts; UIDVALIDITY is the catalog's, so a client re-syncs
// only when the catalog was rebuilt. A message keeps its entry, and its
// UID, across rewrites (a retry of some recipients); dead letters leave the
// view as they leave the queue's delivery path.
//
// What this package adds is a bounded cache of the header summaries the
// views parse (subject, sender, date): a client asks for them again and
// again, and parsing means reading the message from the queue.
package index

import (
	"container/list"
	"context"
	"errors"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/mxq-dev/mxq/internal/mailaddr"
	"github.com/mxq-dev/mxq/queue"
	"github.com/mxq-dev/mxq/queue/catalog"
)

// Message is one held message as a mailbox lists it.
type Message struct {
	UID uint32
	// ID is the queue ID (the same for every recipient and across
	// rewrites).
	ID string
	// Seq is the newest record holding the message for this mailbox.
	Seq     uint64
	Size    int64
	Arrived time.Time
	// From is the envelope sender ("" for <>).
	From string
	// Summary is what the views parsed from the message's header, nil
	// until one of them needed it (see SetSummary).
	Summary *Summary
}

// Summary is the part of a message's header the views show and search.
type Summary struct {
	Subject string
	From    string // the From: header, decoded
	Date    time.Time
	// Header is the raw header section (with its blank line), kept when
	// small enough; nil means "read it again from the store".
	Header []byte
}

// Stats describes the index.
type Stats struct {
	Ready       bool   `json:"ready"`
	UIDValidity uint32 `json:"uid_validity"`
	// Mailboxes is the number of users with held mail; Messages counts a
	// message once per recipient mailbox.
	Mailboxes int   `json:"mailboxes"`
	Messages  int   `json:"messages"`
	Records   int   `json:"records"` // queued records (not dead letters)
	Bytes     int64 `json:"bytes"`
	// Position is the next stream sequence the catalog will read.
	Position uint64 `json:"position"`
	// Summaries is how many parsed headers the cache holds.
	Summaries int `json:"summaries"`
	// LastSync is when the catalog last applied a change.
	LastSync time.Time `json:"last_sync"`
}

// Options configures an Index.
type Options struct {
	// Summaries bounds the cache of parsed headers (default 10 000).
	Summaries int
	Logger    *slog.Logger
}

// Index is the per-recipient view of held mail.
type Index struct {
	cat   *catalog.Catalog
	store *queue.Store
	o     Options
	log   *slog.Logger

	mu    sync.Mutex
	cache map[sumKey]*list.Element
	lru   list.List // of *cached, most recent first
}

type sumKey struct {
	user string
	uid  uint32
}

type cached struct {
	key sumKey
	id  string // the message it was parsed from: a UID is never reused, but be sure
	sum *Summary
}

// New returns the view of cat, the catalog of store's queue.
func New(cat *catalog.Catalog, store *queue.Store, o Options) *Index {
	if o.Summaries <= 0 {
		o.Summaries = 10000
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	return &Index{cat: cat, store: store, o: o, log: o.Logger, cache: map[sumKey]*list.Element{}}
}

// UIDValidity is the UIDVALIDITY of every mailbox.
func (x *Index) UIDValidity() uint32 { return x.cat.UIDValidity() }

// Ready is closed once the catalog has caught up with the stream.
func (x *Index) Ready() <-chan struct{} { return x.cat.Ready() }

// IsReady reports whether Ready is closed.
func (x *Index) IsReady() bool { return x.cat.IsReady() }

// Sync returns once every change made to the queue before the call is in
// the lists: for tools and tests (the catalog follows by itself).
func (x *Index) Sync(ctx context.Context) error {
	if err := x.store.FlushTombstones(ctx); err != nil {
		return err
	}
	return x.cat.CatchUp(ctx)
}

// Key returns the mailbox key of an address (what List and the others
// take), or an error for something that is not a mailbox.
func Key(addr string) (string, error) {
	a, err := mailaddr.Parse(addr)
	if err != nil {
		return "", err
	}
	return a.Key(), nil
}

func (x *Index) message(user string, m catalog.Message) Message {
	out := Message{UID: m.UID, ID: m.ID, Size: m.Size, Arrived: m.Arrived, From: m.From}
	if len(m.Seqs) > 0 {
		out.Seq = m.Seqs[len(m.Seqs)-1]
	}
	out.Summary = x.summary(sumKey{user, m.UID}, m.ID)
	return out
}

// List returns the messages held for a mailbox key, by UID, and the UID
// the next message will get.
func (x *Index) List(user string) ([]Message, uint32) {
	msgs, _, err := x.cat.Mailbox(user, 0, 0)
	if err != nil {
		x.log.Warn("continuity: listing a mailbox", "user", user, "err", err)
		return nil, 1
	}
	_, next, err := x.cat.UIDs(user)
	if err != nil {
		next = 1
	}
	out := make([]Message, len(msgs))
	for i, m := range msgs {
		out[i] = x.message(user, m)
	}
	if n := len(out); n > 0 && next <= out[n-1].UID {
		next = out[n-1].UID + 1
	}
	return out, next
}

// UIDs returns the UIDs of a mailbox, ascending, and the UID the next
// message will get.
func (x *Index) UIDs(user string) ([]uint32, uint32) {
	uids, next, err := x.cat.UIDs(user)
	if err != nil {
		x.log.Warn("continuity: listing a mailbox", "user", user, "err", err)
		return nil, 1
	}
	return uids, next
}

// Get returns one message of a mailbox by UID. A UID of another mailbox
// is simply not found: a user can name only what is in their own.
func (x *Index) Get(user string, uid uint32) (Message, bool) {
	m, ok, err := x.cat.Message(user, uid)
	if err != nil {
		x.log.Warn("continuity: reading a mailbox", "user", user, "err", err)
		return Message{}, false
	}
	if !ok {
		return Message{}, false
	}
	return x.message(user, m), true
}

// Records returns the sequences of the records holding a message for a
// mailbox, newest first.
func (x *Index) Records(user string, uid uint32) []uint64 {
	m, ok, err := x.cat.Message(user, uid)
	if err != nil || !ok {
		return nil
	}
	seqs := slices.Clone(m.Seqs)
	slices.Reverse(seqs)
	return seqs
}

// Gone tells the index that a record it listed is no longer in the queue.
func (x *Index) Gone(seq uint64) { x.cat.Forget(seq) }

// SetSummary caches a message's parsed header.
func (x *Index) SetSummary(user string, uid uint32, s *Summary) {
	m, ok, err := x.cat.Message(user, uid)
	if err != nil || !ok {
		return
	}
	k := sumKey{user, uid}
	x.mu.Lock()
	defer x.mu.Unlock()
	if e, ok := x.cache[k]; ok {
		x.lru.Remove(e)
	}
	x.cache[k] = x.lru.PushFront(&cached{key: k, id: m.ID, sum: s})
	for x.lru.Len() > x.o.Summaries {
		old := x.lru.Back()
		x.lru.Remove(old)
		delete(x.cache, old.Value.(*cached).key)
	}
}

func (x *Index) summary(k sumKey, id string) *Summary {
	x.mu.Lock()
	defer x.mu.Unlock()
	e, ok := x.cache[k]
	if !ok {
		return nil
	}
	c := e.Value.(*cached)
	if c.id != id {
		x.lru.Remove(e)
		delete(x.cache, k)
		return nil
	}
	x.lru.MoveToFront(e)
	return c.sum
}

// Watch returns a channel closed at the next change of a mailbox (a
// message added or removed). IMAP IDLE waits on it.
func (x *Index) Watch(user string) <-chan struct{} { return x.cat.Watch(user) }

// Stats describes the index now.
func (x *Index) Stats() Stats {
	st := x.cat.Stats()
	x.mu.Lock()
	n := x.lru.Len()
	x.mu.Unlock()
	return Stats{Ready: st.Ready, UIDValidity: x.cat.UIDValidity(), Mailboxes: int(st.Mailboxes), Messages: int(st.Messages),
		Records: int(st.Records - st.Dead), Bytes: int64(st.Bytes), Position: st.Position, Summaries: n, LastSync: st.LastSync}
}

// ErrNotReady is returned while the catalog catches up at first start.
var ErrNotReady = errors.New("the index of held mail is still being built")
