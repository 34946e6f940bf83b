// Package testbackend is a real LMTP (or SMTP) server for mxq's tests and
// benchmarks: it listens on TCP, speaks the protocol with go-smtp, records
// every message it accepts, and can be told to refuse recipients, to go
// down and come back on the same port.
//
// It can also play a mailbox store of limited capacity (Options.Capacity),
// so the drain's promise "never faster than the store can take" can be
// tested: at most Rate deliveries per second (one delivery is one message
// into one mailbox) and at most Conns connections at once.
//
// Within capacity the store answers after a small service time. Beyond it,
// it behaves like a real store whose disks are saturated: first it slows
// down, then it gives up. Every delivery takes a token from a token bucket
// (Rate per second, Burst deep); when none is free, it waits for one, so
// latency grows with the excess load, as I/O queues grow in a real store.
// That wait is the first, gentle signal a well-behaved client should heed.
// If the excess persists, the waiting work grows until a delivery would
// wait longer than MaxWait (equivalently: more than MaxWait×Rate deliveries
// are already waiting); that recipient is answered 451 4.3.0 after DATA,
// like a store whose mailbox lock or write timed out. A connection beyond
// Conns waits ConnWait in the listen backlog for a free slot, then is
// answered 421 4.7.0 at greeting and closed, like a server at its process
// limit. A client that keeps to Rate and Conns never waits beyond Burst's
// slack and so sees no overload reply; one that sends faster, with its
// connections kept busy, fills the wait queue and gets 451s for the excess
// while the accepted rate stays at Rate.
//
// Every accepted delivery is recorded (without its bytes unless KeepData),
// with counters of overload replies and a per-second series of accepted
// deliveries (Stats, PerSecond).
package testbackend

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	"github.com/emersion/go-smtp"
	"golang.org/x/time/rate"
)

// Delivery is one message accepted for one recipient.
type Delivery struct {
	From string
	Rcpt string
	// QueueID is mxq's queue ID, read from the topmost Received header.
	QueueID string
	Size    int
	Data    []byte // only with Options.KeepData
	At      time.Time
}

// Options configures a Server.
type Options struct {
	// SMTP makes it an SMTP server; the default is LMTP.
	SMTP bool
	// RcptReply, if set, may refuse a recipient at RCPT time.
	RcptReply func(rcpt string) *smtp.SMTPError
	// DataReply, if set, may refuse a recipient after DATA (LMTP) or the
	// whole message (SMTP, called with the first recipient).
	DataReply func(rcpt string, data []byte) *smtp.SMTPError
	// KeepData keeps each message's bytes in its Delivery.
	KeepData bool
	// Capacity limits what the store takes; the zero value is unlimited.
	// SetCapacity changes Rate and Conns while it runs.
	Capacity Capacity
}

// Server is a running test backend.
type Server struct {
	o    Options
	addr string

	start time.Time // of PerSecond's series

	mu         sync.Mutex
	ln         net.Listener
	srv        *smtp.Server
	down       chan struct{} // closed by Down, to abort waits
	deliveries []Delivery
	sessions   int

	// The capacity model; see capacity.go and listener.go.
	capa   Capacity
	lim    *rate.Limiter // nil: no rate limit
	active int           // connections open
	conns  map[*slotConn]struct{}
	freed  chan struct{} // closed and replaced when a slot may be free
	stats  Stats
	perSec []int
}

// Start listens on addr ("127.0.0.1:0" for any port).
func Start(addr string, o Options) (*Server, error) {
	s := &Server{
		o:     o,
		addr:  addr,
		start: time.Now(),
		capa:  o.Capacity,
		conns: make(map[*slotConn]struct{}),
		freed: make(chan struct{}),
	}
	s.setLimiter()
	if err := s.Up(); err != nil {
		return nil, err
	}
	return s, nil
}

// Addr is the address the server listens on (kept across Down and Up).
func (s *Server) Addr() string { return s.addr }

// Up starts listening (again) on the server's address.
func (s *Server) Up() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ln != nil {
		return nil
	}
	var ln net.Listener
	var err error
	for i := 0; i < 50; i++ { // the port may linger briefly after Down
		if ln, err = net.Listen("tcp", s.addr); err == nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil {
		return fmt.Errorf("testbackend: listen on %s: %w", s.addr, err)
	}
	s.addr = ln.Addr().String()
	s.down = make(chan struct{})
	srv := smtp.NewServer(backend{s})
	srv.LMTP = !s.o.SMTP
	srv.Domain = "backend.test"
	srv.EnableSMTPUTF8 = true
	srv.ReadTimeout = time.Minute
	srv.WriteTimeout = time.Minute
	srv.ErrorLog = discardLog{}
	s.ln, s.srv = ln, srv
	go srv.Serve(&slotListener{Listener: ln, s: s, down: s.down})
	return nil
}

// Down stops listening and drops every connection, like a crashed store.
func (s *Server) Down() {
	s.mu.Lock()
	srv, ln := s.srv, s.ln
	s.ln, s.srv = nil, nil
	var conns []*slotConn
	if srv != nil {
		close(s.down)
		for c := range s.conns {
			conns = append(conns, c)
		}
	}
	s.mu.Unlock()
	if srv != nil {
		// Close the listener and the connections ourselves too: Serve may
		// not have registered them with the server yet.
		ln.Close()
		srv.Close()
		for _, c := range conns {
			c.Close()
		}
	}
}

// Close is Down.
func (s *Server) Close() { s.Down() }

// Deliveries returns a copy of what was accepted so far.
func (s *Server) Deliveries() []Delivery {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Delivery(nil), s.deliveries...)
}

// Sessions is how many connections the server has taken.
func (s *Server) Sessions() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.sessions
}

// Count is how many recipient deliveries were accepted.
func (s *Server) Count() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.deliveries)
}

type backend struct{ s *Server }

func (b backend) NewSession(c *smtp.Conn) (smtp.Session, error) {
	b.s.mu.Lock()
	b.s.sessions++
	down := b.s.down
	b.s.mu.Unlock()
	return &session{s: b.s, down: down}, nil
}

type session struct {
	s     *Server
	down  <-chan struct{} // of the Up this session belongs to
	from  string
	rcpts []string
}

func (ss *session) Reset()        { ss.from, ss.rcpts = "", nil }
func (ss *session) Logout() error { return nil }

func (ss *session) Mail(from string, _ *smtp.MailOptions) error {
	ss.from = from
	return nil
}

func (ss *session) Rcpt(to string, _ *smtp.RcptOptions) error {
	if f := ss.s.o.RcptReply; f != nil {
		if e := f(to); e != nil {
			return e
		}
	}
	ss.rcpts = append(ss.rcpts, to)
	return nil
}

func (ss *session) Data(r io.Reader) error {
	data, err := io.ReadAll(r)
	if err != nil {
		return err
	}
	if f := ss.s.o.DataReply; f != nil && len(ss.rcpts) > 0 {
		if e := f(ss.rcpts[0], data); e != nil {
			return e
		}
	}
	// SMTP has one reply for the message: all recipients or none.
	got, wait := ss.s.reserve(len(ss.rcpts), true)
	if got < len(ss.rcpts) {
		return overloaded()
	}
	if err := ss.serve(wait); err != nil {
		return err
	}
	ss.record(ss.rcpts, data)
	return nil
}

func (ss *session) LMTPData(r io.Reader, status smtp.StatusCollector) error {
	data, err := io.ReadAll(r)
	if err != nil {
		return err
	}
	var ok []string
	for _, rcpt := range ss.rcpts {
		if f := ss.s.o.DataReply; f != nil {
			if e := f(rcpt, data); e != nil {
				status.SetStatus(rcpt, e)
				continue
			}
		}
		ok = append(ok, rcpt)
	}
	// The first recipients that fit in the capacity are delivered, the
	// rest refused; statuses are set only once the store has "written",
	// so a Down meanwhile leaves them unanswered and unrecorded.
	got, wait := ss.s.reserve(len(ok), false)
	for _, rcpt := range ok[got:] {
		status.SetStatus(rcpt, overloaded())
	}
	ok = ok[:got]
	if err := ss.serve(wait); err != nil {
		return err
	}
	for _, rcpt := range ok {
		status.SetStatus(rcpt, nil)
	}
	ss.record(ok, data)
	return nil
}

// overloaded is the reply for a delivery that found no capacity in time.
func overloaded() *smtp.SMTPError {
	return Reply(451, "4.3.0", "Mail store overloaded, try again later")
}

// serve takes the time the store needs for a message (see reserve). It
// fails if the store goes down meanwhile, so that what a crashed store
// never finished writing is not recorded.
func (ss *session) serve(wait time.Duration) error {
	if wait <= 0 {
		return nil
	}
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ss.down:
		return Reply(421, "4.3.2", "Mail store going down")
	}
}

func (ss *session) record(rcpts []string, data []byte) {
	if len(rcpts) == 0 {
		return
	}
	now := time.Now()
	id := QueueID(data)
	ss.s.mu.Lock()
	sec := int(now.Sub(ss.s.start) / time.Second)
	for len(ss.s.perSec) <= sec {
		ss.s.perSec = append(ss.s.perSec, 0)
	}
	ss.s.perSec[sec] += len(rcpts)
	ss.s.stats.Accepted += len(rcpts)
	for _, r := range rcpts {
		d := Delivery{From: ss.from, Rcpt: r, QueueID: id, Size: len(data), At: now}
		if ss.s.o.KeepData {
			d.Data = bytes.Clone(data)
		}
		ss.s.deliveries = append(ss.s.deliveries, d)
	}
	ss.s.mu.Unlock()
}

type discardLog struct{}

func (discardLog) Printf(string, ...any) {}
func (discardLog) Println(...any)        {}

// Reply builds an SMTP reply for RcptReply and DataReply.
func Reply(code int, enhanced string, text string) *smtp.SMTPError {
	var ec smtp.EnhancedCode
	if _, err := fmt.Sscanf(enhanced, "%d.%d.%d", &ec[0], &ec[1], &ec[2]); err != nil {
		ec = smtp.EnhancedCodeNotSet
	}
	return &smtp.SMTPError{Code: code, EnhancedCode: ec, Message: text}
}

// QueueID returns the queue ID in the first Received header mxq wrote
// ("... (mxq) with ESMTP id <ID>"), or "".
func QueueID(msg []byte) string {
	end := bytes.Index(msg, []byte("\r\n\r\n"))
	if end < 0 {
		end = len(msg)
	}
	hdr := msg[:end]
	i := bytes.Index(hdr, []byte(" (mxq) with "))
	if i < 0 {
		return ""
	}
	rest := hdr[i:]
	j := bytes.Index(rest, []byte(" id "))
	if j < 0 {
		return ""
	}
	rest = rest[j+4:]
	k := bytes.IndexAny(rest, "; \r\n")
	if k < 0 {
		return ""
	}
	return string(rest[:k])
}
