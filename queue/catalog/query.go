package catalog

import (
	"fmt"
	"time"

	"github.com/cockroachdb/pebble/v2"
)

// Pos is a place in a route's due order: records sort by the time they are
// due (the time they were stored, or their next attempt), then sequence.
type Pos struct {
	Due int64 // Unix nanoseconds
	Seq uint64
}

func (p Pos) less(q Pos) bool { return p.Due < q.Due || p.Due == q.Due && p.Seq < q.Seq }

// Less reports whether p sorts before q.
func (p Pos) Less(q Pos) bool { return p.less(q) }

// Due is a queued record that is not held.
type Due struct {
	Pos
	ID string
}

// DueIn returns up to max records of route due in (lo, hi], in due order,
// or in reverse order (the latest first).
func (c *Catalog) DueIn(route string, lo, hi Pos, max int, reverse bool) ([]Due, error) {
	pre := prefixDue(route)
	return c.scanDue(pre, append(keyDue(route, lo.Due, lo.Seq), 0), append(keyDue(route, hi.Due, hi.Seq), 0), max, reverse)
}

// DueAfter returns up to max records of route due after pos and no later
// than until, in due order.
func (c *Catalog) DueAfter(route string, after Pos, until time.Time, max int) ([]Due, error) {
	return c.DueIn(route, after, Pos{until.UnixNano(), ^uint64(0)}, max, false)
}

func (c *Catalog) scanDue(pre, lo, hi []byte, max int, reverse bool) ([]Due, error) {
	it, err := c.db.NewIter(&pebble.IterOptions{LowerBound: lo, UpperBound: hi})
	if err != nil {
		return nil, fmt.Errorf("catalog: %w", err)
	}
	var out []Due
	first, next := it.First, it.Next
	if reverse {
		first, next = it.Last, it.Prev
	}
	for ok := first(); ok && len(out) < max; ok = next() {
		k := it.Key()
		if len(k) != len(pre)+16 {
			continue
		}
		out = append(out, Due{Pos{dueOf(k), tailSeq(k)}, string(it.Value())})
	}
	if err := it.Close(); err != nil {
		return nil, fmt.Errorf("catalog: %w", err)
	}
	return out, nil
}

// NextDue returns the earliest time after t at which a record of route is
// due, and false when none is.
func (c *Catalog) NextDue(route string, t time.Time) (time.Time, bool, error) {
	pre := prefixDue(route)
	it, err := c.db.NewIter(&pebble.IterOptions{LowerBound: keyDue(route, t.UnixNano()+1, 0), UpperBound: upper(pre)})
	if err != nil {
		return time.Time{}, false, fmt.Errorf("catalog: %w", err)
	}
	defer it.Close()
	if !it.First() {
		return time.Time{}, false, nil
	}
	return time.Unix(0, dueOf(it.Key())), true, nil
}

// Wake returns a channel that receives (without blocking the catalog) when
// records of route become due or are added.
func (c *Catalog) Wake(route string) <-chan struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	ch := c.wake[route]
	if ch == nil {
		ch = make(chan struct{}, 1)
		c.wake[route] = ch
	}
	return ch
}

// Added returns, and forgets, the lowest place at which records of route
// were added or released since the last call: a reader that walks a route
// in due order goes back there, for records that sort before where it is
// (stored a moment before it looked, indexed a moment after).
func (c *Catalog) Added(route string) (Pos, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	p, ok := c.added[route]
	delete(c.added, route)
	return p, ok
}

// Seqs returns the sequences of the records of a queue ID (queued and
// dead), ascending.
func (c *Catalog) Seqs(id string) ([]uint64, error) {
	pre := prefixID(id)
	it, err := c.db.NewIter(&pebble.IterOptions{LowerBound: pre, UpperBound: upper(pre)})
	if err != nil {
		return nil, fmt.Errorf("catalog: %w", err)
	}
	var out []uint64
	for ok := it.First(); ok; ok = it.Next() {
		out = append(out, tailSeq(it.Key()))
	}
	return out, it.Close()
}

// Message is a message held for a mailbox.
type Message struct {
	UID uint32
	// ID is the queue ID (the same for every recipient and across
	// rewrites).
	ID string
	// Seqs are the records holding it for this mailbox, oldest first.
	Seqs    []uint64
	Size    int64
	Arrived time.Time
	From    string // the envelope sender ("" for <>)
}

func (m *entry) message(uid uint32) Message {
	return Message{UID: uid, ID: m.id, Seqs: m.seqs, Size: m.size, Arrived: time.Unix(0, m.arrived), From: m.from}
}

// Mailbox returns up to max messages of a mailbox with UIDs from from on,
// by UID, and the UID to continue from (0 when there are no more).
func (c *Catalog) Mailbox(mbox string, from uint32, max int) ([]Message, uint32, error) {
	pre := prefixMailbox(mbox)
	it, err := c.db.NewIter(&pebble.IterOptions{LowerBound: keyMailbox(mbox, from), UpperBound: upper(pre)})
	if err != nil {
		return nil, 0, fmt.Errorf("catalog: %w", err)
	}
	defer it.Close()
	var out []Message
	for ok := it.First(); ok; ok = it.Next() {
		k := it.Key()
		if len(k) != len(pre)+4 {
			continue
		}
		uid := uint32FromBytes(k[len(k)-4:])
		if max > 0 && len(out) == max {
			return out, uid, nil
		}
		e, err := decodeEntry(it.Value())
		if err != nil {
			return out, 0, err
		}
		out = append(out, e.message(uid))
	}
	return out, 0, nil
}

// UIDs returns the UIDs of a mailbox, ascending, and the UID the next
// message will get.
func (c *Catalog) UIDs(mbox string) ([]uint32, uint32, error) {
	next, err := c.uidNext(mbox)
	if err != nil {
		return nil, 0, err
	}
	pre := prefixMailbox(mbox)
	it, err := c.db.NewIter(&pebble.IterOptions{LowerBound: pre, UpperBound: upper(pre)})
	if err != nil {
		return nil, 0, fmt.Errorf("catalog: %w", err)
	}
	var out []uint32
	for ok := it.First(); ok; ok = it.Next() {
		if k := it.Key(); len(k) == len(pre)+4 {
			out = append(out, uint32FromBytes(k[len(k)-4:]))
		}
	}
	return out, next, it.Close()
}

func (c *Catalog) uidNext(mbox string) (uint32, error) {
	v, ok, err := c.get(keyCounter(mbox))
	if err != nil || !ok {
		return 1, err
	}
	cnt, err := decodeCounter(v)
	if err != nil {
		return 1, err
	}
	return cnt.next, nil
}

// Message returns one message of a mailbox by UID. A UID of another
// mailbox is simply not found.
func (c *Catalog) Message(mbox string, uid uint32) (Message, bool, error) {
	v, ok, err := c.get(keyMailbox(mbox, uid))
	if err != nil || !ok {
		return Message{}, false, err
	}
	e, err := decodeEntry(v)
	if err != nil {
		return Message{}, false, err
	}
	return e.message(uid), true, nil
}

// Watch returns a channel closed at the next change of a mailbox (a
// message added or removed). IMAP IDLE waits on it.
func (c *Catalog) Watch(mbox string) <-chan struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	ch := c.watch[mbox]
	if ch == nil {
		ch = make(chan struct{})
		c.watch[mbox] = ch
	}
	return ch
}
