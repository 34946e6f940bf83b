// Package delivery hands queued messages to a mailbox store over LMTP or
// SMTP and reports the outcome per recipient.
//
// A Client keeps a small pool of open connections, so a drain at hundreds
// of messages per second does not pay a TCP and LHLO handshake for each.
// Errors are split in two kinds, because the drain treats them differently:
// a per-recipient reply (a Result with its code) counts against that
// recipient's retry schedule; a failure to talk to the store at all
// (refused connection, timeout, 421, broken pipe) is returned as an error
// wrapping ErrUnreachable and counts against nobody: it feeds the circuit
// breaker instead. A third kind is not about the store at all: when the
// message cannot be read from the queue while it is being sent, the error
// wraps ErrSource, and the transaction is abandoned by closing the
// connection, so the store never takes a truncated message for a whole one.
//
// DeliverTimed also says where a delivery's time went (Timing): waiting on
// the store, reading the message from the queue, or getting a connection.
// Only the first is the store's speed; the others are mxq's own, and a
// drain that paced itself on the total would slow down whenever mxq, not
// the store, is the bottleneck.
package delivery

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/emersion/go-smtp"

	"github.com/mxq-dev/mxq/queue/envelope"
)

// ErrUnreachable wraps every failure to complete a transaction with the
// store for reasons that are not about a particular recipient.
var ErrUnreachable = errors.New("backend unreachable")

// ErrBusy is also wrapped when the store said 421: it is up but refuses
// work (too many connections, shutting down). The drain slows down.
var ErrBusy = errors.New("backend busy")

// ErrSource is wrapped, together with the reader's own error, when the
// message body could not be read from the queue (a missing chunk record,
// JetStream not answering). It is a problem of the queue, not of the store
// nor of a recipient, so it wraps neither ErrUnreachable nor ErrBusy: a
// damaged record must not open the circuit breaker.
var ErrSource = errors.New("reading the message from the queue failed")

// unreachable wraps err in ErrUnreachable, and in ErrBusy for a 421.
func unreachable(stage string, err error) error {
	if r, ok := replyOf(err); ok && r.Code == 421 {
		return fmt.Errorf("%w: %w: %s: %w", ErrUnreachable, ErrBusy, stage, err)
	}
	return fmt.Errorf("%w: %s: %w", ErrUnreachable, stage, err)
}

// Result is the store's answer for one recipient. Code 0 means the
// connection broke before the store answered for this recipient.
type Result struct {
	Rcpt     string
	Code     int
	Enhanced string // "4.2.2", or "" when the store gave none
	Text     string
}

// Success, Temporary and Permanent classify a result.
func (r Result) Success() bool   { return r.Code >= 200 && r.Code < 300 }
func (r Result) Temporary() bool { return r.Code == 0 || r.Code >= 400 && r.Code < 500 }
func (r Result) Permanent() bool { return r.Code >= 500 }

// Overload reports a reply that is about the store's condition rather than
// the recipient's mailbox: 421, 451 (local error), 452 with 4.3.x
// (insufficient system storage), and any 4.3.x or 4.4.x. A full mailbox
// (452 4.2.2) or an unknown state of one mailbox (450) is not.
func (r Result) Overload() bool {
	switch {
	case r.Code == 421:
		return true
	case strings.HasPrefix(r.Enhanced, "4.3.") || strings.HasPrefix(r.Enhanced, "4.4."):
		return true
	case r.Code == 451 && !strings.HasPrefix(r.Enhanced, "4.2."):
		return true
	}
	return false
}

// String is the reply as a single line, as it is recorded in the queue.
func (r Result) String() string {
	if r.Code == 0 {
		return "no reply: " + r.Text
	}
	s := fmt.Sprintf("%d", r.Code)
	if r.Enhanced != "" {
		s += " " + r.Enhanced
	}
	return s + " " + r.Text
}

// Options configures a Client.
type Options struct {
	Protocol       string // "lmtp" or "smtp"
	Address        string // host:port
	LocalName      string // LHLO/EHLO name
	ConnectTimeout time.Duration
	CommandTimeout time.Duration
	// MaxIdle is how many open connections are kept between deliveries.
	MaxIdle     int
	IdleTimeout time.Duration
	// Now is the clock for idle connections and for Timing; nil is
	// time.Now. Tests inject one that only moves when they say so, which
	// makes Timing exact.
	Now func() time.Time
}

// Timing is where the time of one delivery went. Its parts do not add up
// to the delivery's duration: what is left is mxq's own bookkeeping and
// scheduling, which belongs to none of them.
type Timing struct {
	// Store is the time spent waiting on the store: from sending each
	// command (MAIL, each RCPT, DATA, the end of data; also the RSET after
	// a refused transaction, and the QUIT of a connection the pool has no
	// room for) to receiving its reply, plus the time spent writing the
	// body to the connection, which is where a store that reads slowly
	// shows. This is the part that measures the store's speed.
	Store time.Duration
	// Source is the time spent reading the body from the queue, inside
	// the body's Read calls: for a large message, fetching its chunk
	// records from JetStream.
	Source time.Duration
	// Connect is the time to get a connection: the dial, the greeting and
	// LHLO/EHLO when a new one is opened, next to nothing when a pooled
	// one is reused. It is kept apart from Store because it is paid per
	// connection, not per delivery: in Store, it would make the store look
	// slower whenever the pool opens a connection. Part of it is still the
	// store's (a store at its connection limit is slow to greet), for the
	// caller to weigh on its own.
	Connect time.Duration
}

// stopwatch splits a delivery's time into laps, each starting where the
// previous one ended. Where steps follow each other without a gap (the
// reads and writes of the body), their laps cover all of the time, so no
// moment of the copy escapes both Source and Store; elsewhere the lap
// before a step is dropped, as mxq's own time.
type stopwatch struct {
	now  func() time.Time
	last time.Time
}

// lap returns the time since the previous lap and starts a new one.
func (s *stopwatch) lap() time.Duration {
	t := s.now()
	d := t.Sub(s.last)
	s.last = t
	return d
}

// Client delivers to one backend. It is safe for concurrent use; each
// delivery uses a connection of its own.
type Client struct {
	o    Options
	mu   sync.Mutex
	idle []*conn
}

type conn struct {
	c        *smtp.Client
	lastUsed time.Time
}

// New returns a Client.
func New(o Options) *Client {
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.LocalName == "" {
		o.LocalName = "localhost"
	}
	if o.ConnectTimeout <= 0 {
		o.ConnectTimeout = 10 * time.Second
	}
	if o.CommandTimeout <= 0 {
		o.CommandTimeout = time.Minute
	}
	if o.IdleTimeout <= 0 {
		o.IdleTimeout = 30 * time.Second
	}
	return &Client{o: o}
}

// Address is the backend's address.
func (c *Client) Address() string { return c.o.Address }

func (c *Client) dial(ctx context.Context) (*conn, error) {
	d := net.Dialer{Timeout: c.o.ConnectTimeout}
	nc, err := d.DialContext(ctx, "tcp", c.o.Address)
	if err != nil {
		return nil, unreachable("connect", err)
	}
	var sc *smtp.Client
	if c.o.Protocol == "lmtp" {
		sc = smtp.NewClientLMTP(nc)
	} else {
		sc = smtp.NewClient(nc)
	}
	sc.CommandTimeout = c.o.CommandTimeout
	sc.SubmissionTimeout = c.o.CommandTimeout
	stop := context.AfterFunc(ctx, func() { nc.SetDeadline(time.Now()) })
	defer stop()
	nc.SetDeadline(time.Now().Add(c.o.CommandTimeout))
	err = sc.Hello(c.o.LocalName)
	nc.SetDeadline(time.Time{})
	if err != nil {
		sc.Close()
		return nil, unreachable("greeting", err)
	}
	return &conn{c: sc}, nil
}

// get returns a pooled connection (pooled true) or a new one.
func (c *Client) get(ctx context.Context) (*conn, bool, error) {
	now := c.o.Now()
	c.mu.Lock()
	for len(c.idle) > 0 {
		cn := c.idle[len(c.idle)-1]
		c.idle = c.idle[:len(c.idle)-1]
		if now.Sub(cn.lastUsed) < c.o.IdleTimeout {
			c.mu.Unlock()
			return cn, true, nil
		}
		go cn.c.Close()
	}
	c.mu.Unlock()
	cn, err := c.dial(ctx)
	return cn, false, err
}

// dropIdle closes the pooled connections.
func (c *Client) dropIdle() {
	c.mu.Lock()
	idle := c.idle
	c.idle = nil
	c.mu.Unlock()
	for _, cn := range idle {
		go cn.c.Close()
	}
}

func (c *Client) put(cn *conn) {
	cn.lastUsed = c.o.Now()
	c.mu.Lock()
	if len(c.idle) < c.o.MaxIdle {
		c.idle = append(c.idle, cn)
		cn = nil
	}
	c.mu.Unlock()
	if cn != nil {
		cn.c.Quit()
	}
}

// Close closes the idle connections.
func (c *Client) Close() {
	c.mu.Lock()
	idle := c.idle
	c.idle = nil
	c.mu.Unlock()
	for _, cn := range idle {
		cn.c.Quit()
	}
}

// Probe opens a fresh connection, greets, and says goodbye: proof that the
// store is taking connections again.
func (c *Client) Probe(ctx context.Context) error {
	cn, err := c.dial(ctx)
	if err != nil {
		return err
	}
	if err := cn.c.Quit(); err != nil {
		return unreachable("quit", err)
	}
	return nil
}

// Deliver runs one transaction for env's recipients. It returns a Result
// for every recipient in env.To, and an error wrapping ErrUnreachable if
// the transaction could not be completed, or ErrSource if body could not
// be read; recipients the store accepted before that keep their 2xx
// result and must not be sent again. It is DeliverTimed without the
// timing.
func (c *Client) Deliver(ctx context.Context, env *envelope.Envelope, body io.Reader) ([]Result, error) {
	results, _, err := c.DeliverTimed(ctx, env, body)
	return results, err
}

// DeliverTimed is Deliver, and also reports where the delivery's time went,
// on the clock of Options.Now. The Timing covers what was done, also when
// an error is returned.
//
// When reading body fails (with anything but io.EOF) after DATA was
// accepted, the connection is closed without the end-of-data mark: the
// only way in either protocol to make the store drop what it received so
// far. The error wraps ErrSource and the reader's error, and the
// recipients not refused before DATA keep Code 0.
func (c *Client) DeliverTimed(ctx context.Context, env *envelope.Envelope, body io.Reader) ([]Result, Timing, error) {
	var tm Timing
	sw := stopwatch{now: c.o.Now}
	sw.lap()
	results := make([]Result, len(env.To))
	for i, r := range env.To {
		results[i] = Result{Rcpt: r}
	}
	cn, pooled, err := c.get(ctx)
	tm.Connect = sw.lap()
	if err != nil {
		return results, tm, err
	}
	nc := cn.c
	stop := context.AfterFunc(ctx, func() { nc.Close() })
	defer stop()

	// store runs one exchange with the store and charges its time to
	// tm.Store; what mxq did since the previous lap is dropped.
	store := func(f func() error) error {
		sw.lap()
		err := f()
		tm.Store += sw.lap()
		return err
	}
	unanswered := func(text string) {
		for i := range results {
			if results[i].Code == 0 {
				results[i].Text = text
			}
		}
	}
	fail := func(stage string, err error) ([]Result, Timing, error) {
		nc.Close()
		unanswered(stage + ": " + err.Error())
		return results, tm, unreachable(stage, err)
	}
	keep := func() {
		store(func() error { c.put(cn); return nil })
	}
	reset := func() {
		store(func() error { c.reset(cn); return nil })
	}
	// A 421 (or any reply to MAIL that is not about the message) means
	// the store is not serving: it is not a verdict on the recipients.
	utf8Needed := env.UTF8 && !allASCII(env.From, env.To)
	// begin asks for SMTPUTF8 when needed and says MAIL. ok false: the
	// store lacks SMTPUTF8 (a verdict on the recipients, in results).
	begin := func() (ok bool, err error) {
		if utf8Needed {
			// Extension may say LHLO again (go-smtp does after a RSET):
			// that is time on the store.
			var has bool
			store(func() error { has, _ = nc.Extension("SMTPUTF8"); return nil })
			if !has {
				// A dead connection answers "no such extension" too (its
				// greeting failed): make sure this one is alive.
				if err := store(nc.Noop); err != nil {
					return true, err
				}
				return false, nil
			}
		}
		return true, store(func() error { return nc.Mail(env.From, &smtp.MailOptions{UTF8: utf8Needed, Size: env.Size}) })
	}
	ok, err := begin()
	if err != nil && pooled {
		if _, isReply := replyOf(err); !isReply {
			// A pooled connection the store closed meanwhile (it
			// restarted, or timed out idle ones): nothing was sent yet, so
			// try once on a new connection; the other idle ones are likely
			// dead too.
			nc.Close()
			c.dropIdle()
			sw.lap()
			fresh, derr := c.dial(ctx)
			tm.Connect += sw.lap()
			if derr != nil {
				unanswered("connect: " + derr.Error())
				return results, tm, derr
			}
			cn, nc = fresh, fresh.c
			ok, err = begin()
		}
	}
	if !ok {
		for i := range results {
			results[i] = Result{Rcpt: env.To[i], Code: 550, Enhanced: "5.6.7", Text: "backend does not support SMTPUTF8 for a non-ASCII address"}
		}
		keep()
		return results, tm, nil
	}
	if err != nil {
		if r, ok := replyOf(err); ok && r.Code != 421 {
			// MAIL refused for this message (e.g. 552 size): same verdict
			// for every recipient.
			for i := range results {
				results[i].Code, results[i].Enhanced, results[i].Text = r.Code, r.Enhanced, r.Text
			}
			reset()
			return results, tm, nil
		}
		return fail("MAIL", err)
	}
	accepted := make([]int, 0, len(env.To))
	for i, rcpt := range env.To {
		if err := store(func() error { return nc.Rcpt(rcpt, nil) }); err != nil {
			r, ok := replyOf(err)
			if !ok || r.Code == 421 {
				return fail("RCPT", err)
			}
			results[i].Code, results[i].Enhanced, results[i].Text = r.Code, r.Enhanced, r.Text
			continue
		}
		accepted = append(accepted, i)
	}
	if len(accepted) == 0 {
		reset()
		return results, tm, nil
	}
	var w *smtp.DataCommand
	if err := store(func() (err error) { w, err = nc.Data(); return err }); err != nil {
		if r, ok := replyOf(err); ok && r.Code != 421 {
			for _, i := range accepted {
				results[i].Code, results[i].Enhanced, results[i].Text = r.Code, r.Enhanced, r.Text
			}
			reset()
			return results, tm, nil
		}
		return fail("DATA", err)
	}
	// Not io.Copy: a failed read and a failed write mean different things
	// (a damaged queue record, a store gone), and their times belong to
	// different parts of Timing. The laps follow each other without a gap,
	// so all of the copy's time is either Source or Store.
	buf := make([]byte, 32<<10)
	sw.lap()
	for {
		n, rerr := body.Read(buf)
		tm.Source += sw.lap()
		// Only io.EOF itself ends the message, as the io.Reader contract
		// has it: an error that merely wraps it (a chunk reader's
		// unexpected end) must not pass a short message for a whole one.
		if rerr != nil && rerr != io.EOF {
			// The end-of-data mark must not be sent: the store would
			// deliver what it has. Closing the connection in the middle of
			// DATA makes it discard the transaction, and the connection,
			// left in the middle of DATA, goes nowhere near the pool.
			nc.Close()
			unanswered("message could not be read from the queue: " + rerr.Error())
			return results, tm, fmt.Errorf("%w: %w", ErrSource, rerr)
		}
		if n > 0 {
			_, werr := w.Write(buf[:n])
			tm.Store += sw.lap()
			if werr != nil {
				return fail("sending message", werr)
			}
		}
		if rerr == io.EOF {
			break
		}
	}
	if c.o.Protocol == "lmtp" {
		var resp map[string]*smtp.DataResponse
		err := store(func() (err error) { resp, err = w.CloseWithLMTPResponse(); return err })
		for _, i := range accepted {
			if _, ok := resp[env.To[i]]; ok {
				results[i].Code, results[i].Enhanced, results[i].Text = 250, "2.0.0", "delivered"
			}
		}
		// err is nil, an LMTPDataError (replies for some recipients), or
		// a connection error, possibly joined with an LMTPDataError.
		var lmtpErr smtp.LMTPDataError
		var broken error
		switch e := err.(type) {
		case nil:
		case smtp.LMTPDataError:
			lmtpErr = e
		default:
			errors.As(err, &lmtpErr)
			broken = err
		}
		for _, i := range accepted {
			if se, ok := lmtpErr[env.To[i]]; ok {
				r := fromSMTPError(se)
				results[i].Code, results[i].Enhanced, results[i].Text = r.Code, r.Enhanced, r.Text
			}
		}
		if broken != nil {
			return fail("end of data", broken)
		}
		for _, i := range accepted {
			if results[i].Code == 421 {
				return fail("end of data", &smtp.SMTPError{Code: 421, Message: results[i].String()})
			}
		}
	} else {
		err := store(func() error { _, err := w.CloseWithResponse(); return err })
		if err != nil {
			r, ok := replyOf(err)
			if !ok || r.Code == 421 {
				return fail("end of data", err)
			}
			for _, i := range accepted {
				results[i].Code, results[i].Enhanced, results[i].Text = r.Code, r.Enhanced, r.Text
			}
		} else {
			for _, i := range accepted {
				results[i].Code, results[i].Enhanced, results[i].Text = 250, "2.0.0", "delivered"
			}
		}
	}
	keep()
	return results, tm, nil
}

// reset ends a transaction that did not reach DATA and keeps the connection.
func (c *Client) reset(cn *conn) {
	if err := cn.c.Reset(); err != nil {
		cn.c.Close()
		return
	}
	c.put(cn)
}

func replyOf(err error) (Result, bool) {
	var se *smtp.SMTPError
	if errors.As(err, &se) {
		return fromSMTPError(se), true
	}
	return Result{}, false
}

func fromSMTPError(se *smtp.SMTPError) Result {
	r := Result{Code: se.Code, Text: strings.TrimSpace(se.Message)}
	if se.EnhancedCode != smtp.NoEnhancedCode && se.EnhancedCode != smtp.EnhancedCodeNotSet {
		r.Enhanced = fmt.Sprintf("%d.%d.%d", se.EnhancedCode[0], se.EnhancedCode[1], se.EnhancedCode[2])
	}
	return r
}

func allASCII(from string, to []string) bool {
	ascii := func(s string) bool { return utf8.RuneCountInString(s) == len(s) }
	if !ascii(from) {
		return false
	}
	for _, t := range to {
		if !ascii(t) {
			return false
		}
	}
	return true
}
