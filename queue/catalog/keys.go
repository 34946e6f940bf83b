package catalog

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Key spaces. Every key starts with one byte naming its space; strings in
// keys end with a 0 byte (no mailbox, queue ID or route contains one: the
// relay refuses NUL in addresses), numbers are big-endian so that keys sort
// by them.
//
//	r seq                   → record: what the other keys of a record are
//	i id 0 seq              → (nothing): the records of a queue ID
//	d route 0 due seq       → id: a queued record, deliverable from due
//	h id 0 seq              → (nothing): a queued record whose ID is held
//	m mbox 0 uid            → mailbox entry: a message held for a mailbox
//	u mbox 0 id             → uid: the entry of a queue ID in a mailbox
//	n mbox                  → next UID and entry count of a mailbox
//	0 name                  → the catalog's own state (position, identity)
const (
	spMeta    byte = 0
	spRecord  byte = 'r'
	spID      byte = 'i'
	spDue     byte = 'd'
	spHeld    byte = 'h'
	spMailbox byte = 'm'
	spUID     byte = 'u'
	spCounter byte = 'n'
)

func u64(b []byte, v uint64) []byte { return binary.BigEndian.AppendUint64(b, v) }
func u32(b []byte, v uint32) []byte { return binary.BigEndian.AppendUint32(b, v) }

func keyRecord(seq uint64) []byte { return u64([]byte{spRecord}, seq) }

func keyID(id string, seq uint64) []byte {
	b := append([]byte{spID}, id...)
	return u64(append(b, 0), seq)
}

func prefixID(id string) []byte { return append(append([]byte{spID}, id...), 0) }

func keyDue(route string, due int64, seq uint64) []byte {
	b := append([]byte{spDue}, route...)
	return u64(u64(append(b, 0), uint64(due)), seq)
}

func prefixDue(route string) []byte { return append(append([]byte{spDue}, route...), 0) }

func keyHeld(id string, seq uint64) []byte {
	b := append([]byte{spHeld}, id...)
	return u64(append(b, 0), seq)
}

func prefixHeld(id string) []byte { return append(append([]byte{spHeld}, id...), 0) }

func keyMailbox(mbox string, uid uint32) []byte {
	b := append([]byte{spMailbox}, mbox...)
	return u32(append(b, 0), uid)
}

func prefixMailbox(mbox string) []byte { return append(append([]byte{spMailbox}, mbox...), 0) }

func keyUID(mbox, id string) []byte {
	b := append([]byte{spUID}, mbox...)
	return append(append(b, 0), id...)
}

func keyCounter(mbox string) []byte { return append([]byte{spCounter}, mbox...) }

func keyMeta(name string) []byte { return append([]byte{spMeta}, name...) }

// upper returns the smallest key greater than every key with prefix p.
func upper(p []byte) []byte {
	u := append([]byte(nil), p...)
	for i := len(u) - 1; i >= 0; i-- {
		if u[i] < 0xff {
			u[i]++
			return u[:i+1]
		}
	}
	return nil
}

// tailSeq is the sequence at the end of an i, d or h key.
func tailSeq(k []byte) uint64 { return binary.BigEndian.Uint64(k[len(k)-8:]) }

// dueOf is the due time in a d key.
func dueOf(k []byte) int64 { return int64(binary.BigEndian.Uint64(k[len(k)-16:])) }

var errCorrupt = errors.New("catalog: corrupt value")

// enc builds values: unsigned varints and length-prefixed strings.
type enc struct{ b []byte }

func (e *enc) uv(v uint64)  { e.b = binary.AppendUvarint(e.b, v) }
func (e *enc) iv(v int64)   { e.b = binary.AppendVarint(e.b, v) }
func (e *enc) str(s string) { e.uv(uint64(len(s))); e.b = append(e.b, s...) }

// dec reads them back; the first error sticks.
type dec struct {
	b   []byte
	err error
}

func (d *dec) uv() uint64 {
	if d.err != nil {
		return 0
	}
	v, n := binary.Uvarint(d.b)
	if n <= 0 {
		d.err = errCorrupt
		return 0
	}
	d.b = d.b[n:]
	return v
}

func (d *dec) iv() int64 {
	if d.err != nil {
		return 0
	}
	v, n := binary.Varint(d.b)
	if n <= 0 {
		d.err = errCorrupt
		return 0
	}
	d.b = d.b[n:]
	return v
}

func (d *dec) str() string {
	n := d.uv()
	if d.err != nil {
		return ""
	}
	if uint64(len(d.b)) < n {
		d.err = errCorrupt
		return ""
	}
	s := string(d.b[:n])
	d.b = d.b[n:]
	return s
}

// record is what the catalog keeps of a record, keyed by its sequence: all
// it needs to find and remove the record's other keys.
type record struct {
	dead  bool
	held  bool // queued, and its ID held: an h key, not a d key
	route string
	id    string
	due   int64 // the d key's due time (queued records)
	next  int64 // the envelope's next attempt (0: none)
	token string
	boxes []string // mailboxes it is listed in (queued records)
}

func (r *record) encode() []byte {
	var e enc
	var flags uint64
	if r.dead {
		flags |= 1
	}
	if r.held {
		flags |= 2
	}
	e.uv(flags)
	e.str(r.route)
	e.str(r.id)
	e.iv(r.due)
	e.iv(r.next)
	e.str(r.token)
	e.uv(uint64(len(r.boxes)))
	for _, b := range r.boxes {
		e.str(b)
	}
	return e.b
}

func decodeRecord(b []byte) (record, error) {
	d := dec{b: b}
	var r record
	flags := d.uv()
	r.dead, r.held = flags&1 != 0, flags&2 != 0
	r.route, r.id = d.str(), d.str()
	r.due, r.next = d.iv(), d.iv()
	r.token = d.str()
	n := d.uv()
	if d.err == nil && n > uint64(len(d.b)) {
		d.err = errCorrupt
	}
	for i := uint64(0); i < n && d.err == nil; i++ {
		r.boxes = append(r.boxes, d.str())
	}
	if d.err != nil {
		return r, fmt.Errorf("record: %w", d.err)
	}
	return r, nil
}

// entry is a message in a mailbox.
type entry struct {
	id      string
	size    int64
	arrived int64
	from    string
	seqs    []uint64 // the records that hold it for this mailbox, oldest first
}

func (m *entry) encode() []byte {
	var e enc
	e.str(m.id)
	e.iv(m.size)
	e.iv(m.arrived)
	e.str(m.from)
	e.uv(uint64(len(m.seqs)))
	for _, s := range m.seqs {
		e.uv(s)
	}
	return e.b
}

func decodeEntry(b []byte) (entry, error) {
	d := dec{b: b}
	var m entry
	m.id = d.str()
	m.size, m.arrived = d.iv(), d.iv()
	m.from = d.str()
	n := d.uv()
	if d.err == nil && n > uint64(len(d.b)) {
		d.err = errCorrupt
	}
	for i := uint64(0); i < n && d.err == nil; i++ {
		m.seqs = append(m.seqs, d.uv())
	}
	if d.err != nil {
		return m, fmt.Errorf("mailbox entry: %w", d.err)
	}
	return m, nil
}

// counter is a mailbox's next UID and how many entries it has.
type counter struct {
	next  uint32
	count uint32
}

func (c counter) encode() []byte { return u32(u32(nil, c.next), c.count) }

func decodeCounter(b []byte) (counter, error) {
	if len(b) != 8 {
		return counter{}, fmt.Errorf("mailbox counter: %w", errCorrupt)
	}
	return counter{binary.BigEndian.Uint32(b), binary.BigEndian.Uint32(b[4:])}, nil
}
