package main

import (
	"bufio"
	"bytes"
	"fmt"
	"hash/fnv"
	"net"
	"slices"
	"strings"
	"sync"
	"time"
)

// sink is the mailbox store of the benchmark: an LMTP server that accepts
// every recipient at once and keeps, per delivery, only its time and a
// 64-bit hash of mxq's queue ID (from the Received header mxq puts first).
// At five million deliveries that is 40 MB of times and a set of hashes,
// where internal/testbackend (a Delivery of ~130 bytes each, copied on
// every read) would take a gigabyte beside the node being measured.
//
// It speaks just enough LMTP (RFC 2033) for mxq's delivery client, by
// hand: go-smtp's server reads the message byte by byte and flushes every
// reply, which made it the drain's second-largest CPU cost on two cores;
// this one reads lines from a large buffer, keeps only the header, and
// writes replies only when the client has nothing more pipelined
// (BenchmarkSink: over 20 000 msg/s with its client beside it).
//
// It can go down (listener and connections closed, like a crashed store)
// and come back on the same address.
type sink struct {
	addr string

	mu    sync.Mutex
	ln    net.Listener
	conns map[net.Conn]struct{}
	times []int64             // UnixNano of each delivery since the last reset
	ids   map[uint64]struct{} // every queue ID ever delivered
	total int                 // deliveries, duplicates included
	dups  int
	noID  int // messages without mxq's Received header (should be 0)
}

func newSink(addr string) *sink {
	return &sink{addr: addr, ids: make(map[uint64]struct{}), conns: make(map[net.Conn]struct{})}
}

// up starts listening; a no-op when up.
func (s *sink) up() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ln != nil {
		return nil
	}
	var ln net.Listener
	var err error
	for i := 0; i < 100; i++ { // the port may linger briefly after down
		if ln, err = net.Listen("tcp", s.addr); err == nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil {
		return fmt.Errorf("sink: %w", err)
	}
	s.ln = ln
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s.mu.Lock()
			if s.ln != ln { // went down meanwhile
				s.mu.Unlock()
				c.Close()
				return
			}
			s.conns[c] = struct{}{}
			s.mu.Unlock()
			go s.serve(c)
		}
	}()
	return nil
}

// down closes the listener and every connection.
func (s *sink) down() {
	s.mu.Lock()
	ln := s.ln
	s.ln = nil
	conns := s.conns
	s.conns = make(map[net.Conn]struct{})
	s.mu.Unlock()
	if ln != nil {
		ln.Close()
	}
	for c := range conns {
		c.Close()
	}
}

// serve is one LMTP connection.
func (s *sink) serve(c net.Conn) {
	defer func() {
		c.Close()
		s.mu.Lock()
		delete(s.conns, c)
		s.mu.Unlock()
	}()
	r := bufio.NewReaderSize(c, 64<<10)
	w := bufio.NewWriterSize(c, 4<<10)
	// Replies wait while more commands are already buffered (pipelining).
	send := func(lines string) bool {
		w.WriteString(lines)
		if r.Buffered() == 0 {
			return w.Flush() == nil
		}
		return true
	}
	send("220 store.scale.test LMTP ready\r\n")
	rcpts := 0
	hdr := make([]byte, 0, 8<<10)
	for {
		c.SetReadDeadline(time.Now().Add(5 * time.Minute))
		line, err := r.ReadSlice('\n')
		if err != nil {
			return
		}
		verb := ""
		if len(line) >= 4 {
			verb = strings.ToUpper(string(line[:4]))
		}
		ok := true
		switch verb {
		case "LHLO", "EHLO", "HELO":
			ok = send("250-store.scale.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250 SMTPUTF8\r\n")
		case "MAIL":
			rcpts = 0
			ok = send("250 2.1.0 Ok\r\n")
		case "RCPT":
			rcpts++
			ok = send("250 2.1.5 Ok\r\n")
		case "DATA":
			if rcpts == 0 {
				ok = send("503 5.5.1 No valid recipients\r\n")
				break
			}
			w.WriteString("354 End data with <CR><LF>.<CR><LF>\r\n")
			if w.Flush() != nil {
				return
			}
			// Keep the header (for the queue ID), skip the body.
			hdr = hdr[:0]
			inHeader := true
			for {
				l, err := r.ReadSlice('\n')
				if err == bufio.ErrBufferFull { // a line longer than the buffer
					inHeader = inHeader && len(hdr) < cap(hdr)
					continue
				}
				if err != nil {
					return
				}
				if len(l) <= 3 && l[0] == '.' && (string(l) == ".\r\n" || string(l) == ".\n") {
					break
				}
				if inHeader {
					if len(l) <= 2 && (string(l) == "\r\n" || string(l) == "\n") || len(hdr)+len(l) > cap(hdr) {
						inHeader = false
					} else {
						hdr = append(hdr, l...)
					}
				}
			}
			s.record(hdr, rcpts)
			ok = send(strings.Repeat("250 2.0.0 Ok\r\n", rcpts))
			rcpts = 0
		case "RSET":
			rcpts = 0
			ok = send("250 2.0.0 Ok\r\n")
		case "NOOP":
			ok = send("250 2.0.0 Ok\r\n")
		case "QUIT":
			w.WriteString("221 2.0.0 Bye\r\n")
			w.Flush()
			return
		default:
			ok = send("500 5.5.2 Command not recognized\r\n")
		}
		if !ok {
			return
		}
	}
}

// resetTimes starts a new series of delivery times (the ID set stays).
func (s *sink) resetTimes() {
	s.mu.Lock()
	s.times = nil
	s.mu.Unlock()
}

// snapshot returns the delivery times since the last reset, sorted.
func (s *sink) snapshot() []int64 {
	s.mu.Lock()
	t := slices.Clone(s.times)
	s.mu.Unlock()
	slices.Sort(t)
	return t
}

// snapshotAt returns the time of the k-th delivery of the series, in
// arrival order (0 if there is none).
func (s *sink) snapshotAt(k int) int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	if k < 0 || k >= len(s.times) {
		return 0
	}
	return s.times[k]
}

// tail returns the delivery times of the series from the from-th on that
// are not before t, sorted, and the index to continue from.
func (s *sink) tail(from int, t int64) ([]int64, int) {
	s.mu.Lock()
	from = min(from, len(s.times))
	var out []int64
	for _, x := range s.times[from:] {
		if x >= t {
			out = append(out, x)
		}
	}
	next := len(s.times)
	s.mu.Unlock()
	slices.Sort(out)
	return out, next
}

// counts returns the deliveries in the current series, the distinct queue
// IDs ever delivered, and the duplicates ever delivered.
func (s *sink) counts() (series, distinct, dups int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.times), len(s.ids), s.dups
}

func (s *sink) record(data []byte, rcpts int) {
	now := time.Now().UnixNano()
	id := queueID(data)
	h := fnv.New64a()
	h.Write(id)
	key := h.Sum64()
	s.mu.Lock()
	defer s.mu.Unlock()
	for i := 0; i < rcpts; i++ {
		s.times = append(s.times, now)
	}
	s.total += rcpts
	if len(id) == 0 {
		s.noID++
		return
	}
	if _, dup := s.ids[key]; dup {
		s.dups++
		return
	}
	s.ids[key] = struct{}{}
}

// queueID is the ID in the first Received header mxq wrote
// ("... (mxq) with ESMTP id <ID>;").
func queueID(msg []byte) []byte {
	end := bytes.Index(msg, []byte("\r\n\r\n"))
	if end < 0 {
		end = len(msg)
	}
	hdr := msg[:end]
	i := bytes.Index(hdr, []byte(" (mxq) with "))
	if i < 0 {
		return nil
	}
	rest := hdr[i:]
	j := bytes.Index(rest, []byte(" id "))
	if j < 0 {
		return nil
	}
	rest = rest[j+4:]
	if k := bytes.IndexAny(rest, "; \r\n"); k >= 0 {
		rest = rest[:k]
	}
	return rest
}
