package raftstore

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"time"
)

// MaxEntryBytes bounds one encoded command, i.e. one raft log entry. Raft
// sends entries whole in AppendEntries and keeps the recent ones in memory
// (log cache, trailing logs), so a multi-megabyte entry would stall
// heartbeats behind it. Apply splits hold/release commands with many IDs
// into several entries below this size.
const MaxEntryBytes = 1 << 20

// ErrTooLarge is returned for an encoded command over MaxEntryBytes.
var ErrTooLarge = errors.New("raftstore: command too large for one raft entry")

// codecV1 is the first byte of every encoded command. A replica refuses
// versions it does not know (deterministically: every replica of the same
// version refuses the same entries).
const codecV1 = 1

// wireHeader is the JSON part of an encoded command: every field but IDs.
type wireHeader struct {
	Op             string    `json:"op"`
	Route          string    `json:"route,omitempty"`
	MaxRate        float64   `json:"max_rate,omitempty"`
	MaxConcurrency int       `json:"max_concurrency,omitempty"`
	Ramp           *Ramp     `json:"ramp,omitempty"`
	Reason         string    `json:"reason,omitempty"`
	By             string    `json:"by,omitempty"`
	At             time.Time `json:"at"`
}

// encodeCommand encodes c as one raft entry:
//
//	byte     version (1)
//	uvarint  length of the header, then the header (JSON of the scalar fields)
//	uvarint  number of IDs, then each ID as uvarint length + bytes
//
// The scalar fields stay readable JSON (easy to evolve and to debug in a
// log dump); the IDs, which are the bulk of a hold of thousands of
// messages, cost their length plus one byte each instead of JSON's quotes,
// commas and escape checks.
func encodeCommand(c *Command) ([]byte, error) {
	h, err := json.Marshal(wireHeader{
		Op: c.Op, Route: c.Route, MaxRate: c.MaxRate, MaxConcurrency: c.MaxConcurrency,
		Ramp: c.Ramp, Reason: c.Reason, By: c.By, At: c.At,
	})
	if err != nil {
		return nil, fmt.Errorf("raftstore: encode %s: %w", c.Op, err)
	}
	size := 1 + 2*binary.MaxVarintLen64 + len(h)
	for _, id := range c.IDs {
		size += binary.MaxVarintLen64 + len(id)
	}
	b := make([]byte, 0, size)
	b = append(b, codecV1)
	b = binary.AppendUvarint(b, uint64(len(h)))
	b = append(b, h...)
	b = binary.AppendUvarint(b, uint64(len(c.IDs)))
	for _, id := range c.IDs {
		b = binary.AppendUvarint(b, uint64(len(id)))
		b = append(b, id...)
	}
	if len(b) > MaxEntryBytes {
		return nil, fmt.Errorf("%w: %s is %d bytes, the limit is %d", ErrTooLarge, c.Op, len(b), MaxEntryBytes)
	}
	return b, nil
}

// decodeCommand is the inverse of encodeCommand. It does not validate the
// command's fields; see Command.validate.
func decodeCommand(b []byte) (Command, error) {
	var c Command
	if len(b) == 0 {
		return c, fmt.Errorf("%w: empty entry", ErrInvalidCommand)
	}
	if b[0] != codecV1 {
		return c, fmt.Errorf("%w: unknown encoding version %d", ErrInvalidCommand, b[0])
	}
	r := b[1:]
	next := func(what string) ([]byte, error) {
		n, k := binary.Uvarint(r)
		if k <= 0 || n > uint64(len(r)-k) {
			return nil, fmt.Errorf("%w: truncated %s", ErrInvalidCommand, what)
		}
		v := r[k : k+int(n)]
		r = r[k+int(n):]
		return v, nil
	}
	hb, err := next("header")
	if err != nil {
		return c, err
	}
	var h wireHeader
	dec := json.NewDecoder(bytes.NewReader(hb))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&h); err != nil {
		return c, fmt.Errorf("%w: header: %w", ErrInvalidCommand, err)
	}
	if dec.More() {
		return c, fmt.Errorf("%w: trailing data in header", ErrInvalidCommand)
	}
	c = Command{Op: h.Op, Route: h.Route, MaxRate: h.MaxRate, MaxConcurrency: h.MaxConcurrency,
		Ramp: h.Ramp, Reason: h.Reason, By: h.By, At: h.At}
	count, k := binary.Uvarint(r)
	// Every ID takes at least one byte, so a count above the bytes left is
	// garbage; checking it first avoids a huge allocation.
	if k <= 0 || count > uint64(len(r)-k) {
		return c, fmt.Errorf("%w: bad ID count", ErrInvalidCommand)
	}
	r = r[k:]
	if count > 0 {
		c.IDs = make([]string, 0, count)
		for range count {
			id, err := next("ID")
			if err != nil {
				return c, err
			}
			c.IDs = append(c.IDs, string(id))
		}
	}
	if len(r) != 0 {
		return c, fmt.Errorf("%w: %d trailing bytes", ErrInvalidCommand, len(r))
	}
	return c, nil
}

// split cuts a hold or release with many IDs into commands that each encode
// under MaxEntryBytes. Every part is applied atomically on its own; the
// whole is not, which is fine because holding or releasing an ID twice is
// the same as once. Other commands are returned as they are.
func split(c Command) []Command {
	if c.Op != OpHold && c.Op != OpRelease {
		return []Command{c}
	}
	head := c
	head.IDs = nil
	hb, err := encodeCommand(&head)
	if err != nil {
		return []Command{c} // encodeCommand reports it again
	}
	budget := MaxEntryBytes - len(hb) - binary.MaxVarintLen64
	var parts []Command
	start, size := 0, 0
	for i, id := range c.IDs {
		n := uvarintLen(uint64(len(id))) + len(id)
		if size+n > budget && i > start {
			p := head
			p.IDs = c.IDs[start:i]
			parts = append(parts, p)
			start, size = i, 0
		}
		size += n
	}
	p := head
	p.IDs = c.IDs[start:]
	return append(parts, p)
}

func uvarintLen(v uint64) int {
	n := 1
	for v >= 0x80 {
		v >>= 7
		n++
	}
	return n
}
