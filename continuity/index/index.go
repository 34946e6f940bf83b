// Package index lists, per recipient, the mail mxq holds, without scanning
// the stream: it is what lets one user's held mail be listed in
// microseconds under a backlog of millions.
//
// The index is in memory, built by one headers-only walk of the queued
// records at start and then kept current by following the stream:
//
//   - new records: a walk from the last sequence seen, whenever the stream's
//     last sequence moved (Store.Notify wakes us on local writes; a poll
//     every PollInterval catches the writes of other cluster nodes);
//   - records that left (delivered, deleted, rewritten): the stream's state
//     tells for free whether anything was deleted since the last look —
//     LastSeq − Msgs counts every deletion ever made — and only then do we
//     ask which: every sequence below FirstSeq, plus the interior deleted
//     sequences the stream lists. Nothing is read per indexed record, so
//     during an outage (nothing delivered) the check costs one stream-info
//     call per poll, however large the backlog.
//
// Each round walks the new records before applying deletions, and a
// rewrite (a retry of the remaining recipients) stores its new record
// before deleting the old one, so the new record is always seen first: the
// message keeps its entry, and its IMAP UID, across rewrites.
//
// UIDs are per mailbox (one per user), given in arrival order at start-up
// and in discovery order afterwards, never reused while the index lives.
// UIDVALIDITY is the start time in seconds: after a restart every mailbox
// gets a new UIDVALIDITY (greater than the last) and clients re-sync. An
// empty mailbox is kept (about 130 bytes) so that its UID counter survives.
//
// Only queued records are indexed: dead letters leave the view, as they
// leave the queue's delivery path.
package index

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/mxq-dev/mxq/internal/mailaddr"
	"github.com/mxq-dev/mxq/queue"
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
// It is cached on the entry because a client asks for it again and again
// (every ENVELOPE fetch, every web listing).
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
	Mailboxes int    `json:"mailboxes"`
	Messages  int    `json:"messages"`
	Records   int    `json:"records"`
	Bytes     int64  `json:"bytes"`
	LastSeq   uint64 `json:"last_seq"`
	// LastSync is when the index last caught up with the stream.
	LastSync time.Time `json:"last_sync"`
}

// Options configures an Index.
type Options struct {
	// PollInterval is how often the stream is checked for changes made
	// elsewhere (default 1 s).
	PollInterval time.Duration
	Now          func() time.Time
	Logger       *slog.Logger
}

// entry is a message in one mailbox.
type entry struct {
	uid     uint32
	id      string
	seqs    []uint64 // the records holding it for this mailbox, oldest first
	size    int64
	arrived int64 // Unix nanoseconds: 8 bytes instead of time.Time's 24
	from    string
	sum     *Summary
	mb      *mailbox
}

// mailbox is one user's held mail.
type mailbox struct {
	nextUID uint32
	entries []*entry // by UID
	// changed is closed at the next change; nil while nobody watches.
	changed chan struct{}
}

type idKey struct {
	mb *mailbox
	id string
}

// Index is the per-recipient index of held mail.
type Index struct {
	store *queue.Store
	o     Options
	log   *slog.Logger
	uidv  uint32
	ready chan struct{}

	syncMu  sync.Mutex // one sync at a time
	next    uint64     // first sequence not yet walked
	deleted uint64     // LastSeq − Msgs at the last look: deletions so far
	stream  jetstream.Stream

	mu        sync.RWMutex
	mailboxes map[string]*mailbox
	byID      map[idKey]*entry
	bySeq     map[uint64][]*entry
	order     []uint64 // indexed sequences, ascending (may hold removed ones)
	messages  int
	bytes     int64
	lastSeq   uint64
	lastSync  time.Time
}

// New returns an index of store's queued mail; Run builds and follows it.
func New(store *queue.Store, o Options) *Index {
	if o.PollInterval <= 0 {
		o.PollInterval = time.Second
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	return &Index{
		store: store, o: o, log: o.Logger,
		uidv:      uint32(o.Now().Unix()),
		ready:     make(chan struct{}),
		mailboxes: map[string]*mailbox{},
		byID:      map[idKey]*entry{},
		bySeq:     map[uint64][]*entry{},
	}
}

// UIDValidity is the UIDVALIDITY of every mailbox for the life of the index.
func (x *Index) UIDValidity() uint32 { return x.uidv }

// Ready is closed once the initial walk is done.
func (x *Index) Ready() <-chan struct{} { return x.ready }

// IsReady reports whether the initial walk is done.
func (x *Index) IsReady() bool {
	select {
	case <-x.ready:
		return true
	default:
		return false
	}
}

// Run builds the index, then follows the stream until ctx ends.
func (x *Index) Run(ctx context.Context) error {
	notify := x.store.Notify()
	for {
		err := x.Build(ctx)
		if err == nil {
			break
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		x.log.Warn("building the continuity index, will retry", "err", err)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(x.o.PollInterval):
		}
	}
	t := time.NewTicker(x.o.PollInterval)
	defer t.Stop()
	// Local writes wake us at once, but a burst of them costs at most
	// one sync per minGap: each sync that finds new records walks them
	// with a short-lived consumer, which the server keeps for a while.
	const minGap = 250 * time.Millisecond
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-notify:
		case <-t.C:
		}
		if err := x.Sync(ctx); err != nil && ctx.Err() == nil {
			x.log.Warn("continuity index: following the stream", "err", err)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(minGap):
		}
	}
}

// state is the stream's state as the index reads it.
type state struct {
	first, last, msgs uint64
	deleted           []uint64 // interior deletions, when asked for
}

func (x *Index) streamState(ctx context.Context, details bool) (state, error) {
	if x.stream == nil {
		st, err := x.store.JetStream().Stream(ctx, x.store.StreamName())
		if err != nil {
			return state{}, fmt.Errorf("stream %s: %w", x.store.StreamName(), err)
		}
		x.stream = st
	}
	var opts []jetstream.StreamInfoOpt
	if details {
		opts = append(opts, jetstream.WithDeletedDetails(true))
	}
	si, err := x.stream.Info(ctx, opts...)
	if err != nil {
		return state{}, fmt.Errorf("stream info: %w", err)
	}
	return state{first: si.State.FirstSeq, last: si.State.LastSeq, msgs: si.State.Msgs, deleted: si.State.Deleted}, nil
}

// Build walks every queued record's envelope and gives UIDs in arrival
// order. It replaces what the index held.
func (x *Index) Build(ctx context.Context) error {
	x.syncMu.Lock()
	defer x.syncMu.Unlock()
	// The deletion count is read before the walk: whatever is deleted
	// during it is caught by the next Sync.
	st, err := x.streamState(ctx, false)
	if err != nil {
		return err
	}
	type found struct {
		rec  queue.Record
		keys []string
	}
	var all []found
	next, err := x.store.Walk(ctx, queue.Queued, 1, func(r queue.Record) error {
		if keys := recipientKeys(r); len(keys) > 0 {
			r.Data = nil
			all = append(all, found{r, keys})
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("walking the queue: %w", err)
	}
	// Arrival order: retried records sit later in the stream than their
	// arrival says.
	sort.SliceStable(all, func(i, j int) bool {
		a, b := all[i].rec.Env, all[j].rec.Env
		if !a.Arrived.Equal(b.Arrived) {
			return a.Arrived.Before(b.Arrived)
		}
		return a.ID < b.ID
	})
	x.mu.Lock()
	x.mailboxes = map[string]*mailbox{}
	x.byID = map[idKey]*entry{}
	x.bySeq = map[uint64][]*entry{}
	x.order = x.order[:0]
	x.messages, x.bytes = 0, 0
	for _, f := range all {
		x.addLocked(f.rec, f.keys)
	}
	// add appended out of sequence order; order must be ascending.
	slices.Sort(x.order)
	x.next = next
	x.deleted = st.last - st.msgs
	x.lastSeq = max(st.last, next-1)
	x.lastSync = x.o.Now()
	messages, mailboxes := x.messages, len(x.mailboxes)
	x.mu.Unlock()
	select {
	case <-x.ready:
	default:
		close(x.ready)
	}
	x.log.Info("continuity index built", "messages", messages, "mailboxes", mailboxes, "uid_validity", x.uidv)
	return nil
}

// Sync catches up with the stream: records written and removed since the
// last look.
func (x *Index) Sync(ctx context.Context) error {
	x.syncMu.Lock()
	defer x.syncMu.Unlock()
	st, err := x.streamState(ctx, false)
	if err != nil {
		return err
	}
	deleted := st.last - st.msgs
	if deleted != x.deleted {
		// Something was deleted: ask which (interior ones; everything
		// below FirstSeq is gone too).
		if st, err = x.streamState(ctx, true); err != nil {
			return err
		}
		deleted = st.last - st.msgs
	}
	// New records first, so that a rewrite's new record is indexed before
	// its old one is removed (see the package comment).
	if st.last >= x.next {
		var batch []queue.Record
		flush := func() {
			x.mu.Lock()
			for _, r := range batch {
				x.addLocked(r, recipientKeys(r))
			}
			x.mu.Unlock()
			batch = batch[:0]
		}
		next, err := x.store.Walk(ctx, queue.Queued, x.next, func(r queue.Record) error {
			batch = append(batch, r)
			if len(batch) == 256 {
				flush()
			}
			return nil
		})
		flush()
		if err != nil {
			return fmt.Errorf("walking new records: %w", err)
		}
		x.next = max(next, st.last+1)
	}
	x.mu.Lock()
	defer x.mu.Unlock()
	if deleted != x.deleted {
		x.removeBelowLocked(st.first)
		for _, seq := range st.deleted {
			x.removeSeqLocked(seq)
		}
		x.deleted = deleted
	}
	x.lastSeq = max(x.lastSeq, st.last)
	x.lastSync = x.o.Now()
	return nil
}

// recipientKeys returns the mailbox keys of a record's recipients, once
// each.
func recipientKeys(r queue.Record) []string {
	if r.Env == nil {
		return nil // undecodable: reported by the queue's tools, not shown
	}
	keys := make([]string, 0, len(r.Env.To))
	for _, to := range r.Env.To {
		a, err := mailaddr.Parse(to)
		if err != nil {
			continue
		}
		k := a.Key()
		if !slices.Contains(keys, k) {
			keys = append(keys, k)
		}
	}
	return keys
}

// addLocked indexes a record for its recipients' mailboxes.
func (x *Index) addLocked(r queue.Record, keys []string) {
	if len(keys) == 0 || r.Env == nil {
		return
	}
	if _, ok := x.bySeq[r.Seq]; ok {
		return // already indexed (a walk that overlapped)
	}
	env := r.Env
	// Copies, so that the index does not pin the decoded header block the
	// strings may point into.
	id, from := strings.Clone(env.ID), strings.Clone(env.From)
	refs := make([]*entry, 0, len(keys))
	for _, k := range keys {
		mb := x.mailboxes[k]
		if mb == nil {
			mb = &mailbox{nextUID: 1}
			x.mailboxes[k] = mb
		}
		e := x.byID[idKey{mb, env.ID}]
		if e == nil {
			e = &entry{uid: mb.nextUID, id: id, size: env.Size, arrived: env.Arrived.UnixNano(), from: from, mb: mb}
			mb.nextUID++
			mb.entries = append(mb.entries, e) // the new UID is the largest
			x.byID[idKey{mb, env.ID}] = e
			x.messages++
			x.bytes += env.Size
		}
		e.seqs = append(e.seqs, r.Seq)
		refs = append(refs, e)
		mb.notifyLocked()
	}
	x.bySeq[r.Seq] = refs
	x.order = append(x.order, r.Seq)
}

// removeBelowLocked removes every indexed record below seq.
func (x *Index) removeBelowLocked(seq uint64) {
	i := 0
	for ; i < len(x.order) && x.order[i] < seq; i++ {
		x.removeSeqLocked(x.order[i])
	}
	if i > 0 {
		x.order = slices.Delete(x.order, 0, i)
	}
}

// removeSeqLocked forgets a record that left the stream; a message whose
// last record it was leaves its mailbox.
func (x *Index) removeSeqLocked(seq uint64) {
	refs, ok := x.bySeq[seq]
	if !ok {
		return
	}
	delete(x.bySeq, seq)
	for _, e := range refs {
		if i := slices.Index(e.seqs, seq); i >= 0 {
			e.seqs = slices.Delete(e.seqs, i, i+1)
		}
		if len(e.seqs) > 0 {
			continue
		}
		mb := e.mb
		i, found := slices.BinarySearchFunc(mb.entries, e.uid, func(a *entry, uid uint32) int { return int64cmp(int64(a.uid), int64(uid)) })
		if found {
			mb.entries = slices.Delete(mb.entries, i, i+1)
		}
		delete(x.byID, idKey{mb, e.id})
		x.messages--
		x.bytes -= e.size
		mb.notifyLocked()
	}
	// The order slice keeps the sequence until the head passes it; keep
	// it from growing without bound when deletions are all interior.
	if len(x.order) > 1024 && len(x.order) > 2*len(x.bySeq) {
		x.order = slices.DeleteFunc(x.order, func(s uint64) bool { _, ok := x.bySeq[s]; return !ok })
	}
}

func int64cmp(a, b int64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

func (mb *mailbox) notifyLocked() {
	if mb.changed != nil {
		close(mb.changed)
		mb.changed = nil
	}
}

func (e *entry) message() Message {
	m := Message{UID: e.uid, ID: e.id, Size: e.size, Arrived: time.Unix(0, e.arrived), From: e.from, Summary: e.sum}
	if len(e.seqs) > 0 {
		m.Seq = e.seqs[len(e.seqs)-1]
	}
	return m
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

// List returns the messages held for a mailbox key, by UID, and the UID
// the next message will get.
func (x *Index) List(user string) (msgs []Message, uidNext uint32) {
	x.mu.RLock()
	defer x.mu.RUnlock()
	mb := x.mailboxes[user]
	if mb == nil {
		return nil, 1
	}
	msgs = make([]Message, len(mb.entries))
	for i, e := range mb.entries {
		msgs[i] = e.message()
	}
	return msgs, mb.nextUID
}

// UIDs returns the UIDs of a mailbox, ascending, without copying the rest.
func (x *Index) UIDs(user string) (uids []uint32, uidNext uint32) {
	x.mu.RLock()
	defer x.mu.RUnlock()
	mb := x.mailboxes[user]
	if mb == nil {
		return nil, 1
	}
	uids = make([]uint32, len(mb.entries))
	for i, e := range mb.entries {
		uids[i] = e.uid
	}
	return uids, mb.nextUID
}

// Get returns one message of a mailbox by UID. A UID of another mailbox
// is simply not found: a user can name only what is in their own.
func (x *Index) Get(user string, uid uint32) (Message, bool) {
	x.mu.RLock()
	defer x.mu.RUnlock()
	mb := x.mailboxes[user]
	if mb == nil {
		return Message{}, false
	}
	i, found := slices.BinarySearchFunc(mb.entries, uid, func(a *entry, uid uint32) int { return int64cmp(int64(a.uid), int64(uid)) })
	if !found {
		return Message{}, false
	}
	return mb.entries[i].message(), true
}

// Records returns the sequences of the records holding a message for a
// mailbox, newest first.
func (x *Index) Records(user string, uid uint32) []uint64 {
	x.mu.RLock()
	defer x.mu.RUnlock()
	mb := x.mailboxes[user]
	if mb == nil {
		return nil
	}
	i, found := slices.BinarySearchFunc(mb.entries, uid, func(a *entry, uid uint32) int { return int64cmp(int64(a.uid), int64(uid)) })
	if !found {
		return nil
	}
	seqs := slices.Clone(mb.entries[i].seqs)
	slices.Reverse(seqs)
	return seqs
}

// SetSummary caches a message's parsed header.
func (x *Index) SetSummary(user string, uid uint32, s *Summary) {
	x.mu.Lock()
	defer x.mu.Unlock()
	mb := x.mailboxes[user]
	if mb == nil {
		return
	}
	if i, found := slices.BinarySearchFunc(mb.entries, uid, func(a *entry, uid uint32) int { return int64cmp(int64(a.uid), int64(uid)) }); found {
		mb.entries[i].sum = s
	}
}

// Watch returns a channel closed at the next change of a mailbox (a
// message added or removed). IMAP IDLE waits on it.
func (x *Index) Watch(user string) <-chan struct{} {
	x.mu.Lock()
	defer x.mu.Unlock()
	mb := x.mailboxes[user]
	if mb == nil {
		mb = &mailbox{nextUID: 1}
		x.mailboxes[user] = mb
	}
	if mb.changed == nil {
		mb.changed = make(chan struct{})
	}
	return mb.changed
}

// Stats describes the index now.
func (x *Index) Stats() Stats {
	x.mu.RLock()
	defer x.mu.RUnlock()
	n := 0
	for _, mb := range x.mailboxes {
		if len(mb.entries) > 0 {
			n++
		}
	}
	return Stats{Ready: x.IsReady(), UIDValidity: x.uidv, Mailboxes: n, Messages: x.messages,
		Records: len(x.bySeq), Bytes: x.bytes, LastSeq: x.lastSeq, LastSync: x.lastSync}
}

// ErrNotReady is returned while the initial walk runs.
var ErrNotReady = errors.New("the index of held mail is still being built")
