package relay

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync/atomic"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/mxq-dev/mxq/internal/mailaddr"
	"github.com/mxq-dev/mxq/internal/membudget"
	"github.com/mxq-dev/mxq/internal/rcptcheck"
	"github.com/mxq-dev/mxq/queue/envelope"
)

// Replies the relay gives; each carries an enhanced status code (RFC 3463).
var (
	errRelayDenied  = &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 7, 1}, Message: "Relaying denied"}
	errBadRcpt      = &smtp.SMTPError{Code: 501, EnhancedCode: smtp.EnhancedCode{5, 1, 3}, Message: "Bad recipient address syntax"}
	errBadSender    = &smtp.SMTPError{Code: 501, EnhancedCode: smtp.EnhancedCode{5, 1, 7}, Message: "Bad sender address syntax"}
	errStorageFull  = &smtp.SMTPError{Code: 452, EnhancedCode: smtp.EnhancedCode{4, 3, 1}, Message: "Insufficient system storage, try again later"}
	errStorageError = &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 3, 0}, Message: "Temporary storage failure, try again later"}
	errNoMemory     = &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 3, 1}, Message: "Server short of memory, try again later"}
	errDataTimeout  = &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 4, 2}, Message: "Timeout reading message data"}
	errDataTooSlow  = &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 4, 2}, Message: "Message data arriving too slowly"}
	errTooBig       = &smtp.SMTPError{Code: 552, EnhancedCode: smtp.EnhancedCode{5, 3, 4}, Message: "Message size exceeds fixed maximum message size"}
	errUnknownUser  = &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "No such user here"}
	errTooManyRcpts = &smtp.SMTPError{Code: 452, EnhancedCode: smtp.EnhancedCode{4, 5, 3}, Message: "Too many recipients, send the others in another transaction"}
	errTLSRequired  = &smtp.SMTPError{Code: 530, EnhancedCode: smtp.EnhancedCode{5, 7, 0}, Message: "Must issue a STARTTLS command first"}
	errLongLine     = &smtp.SMTPError{Code: 554, EnhancedCode: smtp.EnhancedCode{5, 6, 0}, Message: "Message has a line longer than the limit"}
)

// session is one SMTP connection. go-smtp calls its methods from the
// connection's goroutine only.
type session struct {
	srv    *Server
	conn   *smtp.Conn
	gc     *conn // nil only if go-smtp was handed a connection not from our listener
	helo   string
	client string

	from     string
	utf8     bool
	rcpts    []string
	rcptKeys map[string]bool

	// busy is set while a message is read or stored, when Shutdown must
	// not cut the connection.
	busy atomic.Bool
}

func (s *session) Reset() {
	s.from, s.utf8, s.rcpts = "", false, nil
	clear(s.rcptKeys)
	s.checkErrors()
}

// refuse counts a refused command against the connection.
func (s *session) refuse(reply *smtp.SMTPError) error {
	if s.gc != nil {
		s.gc.errs.Add(1)
		s.checkErrors()
	}
	return reply
}

// checkErrors ends the session at the next command once it has had too
// many commands refused, unless a transaction with accepted recipients is
// under way: a list server with more dead addresses than the limit still
// gets its message through, and then has to reconnect for the next.
func (s *session) checkErrors() {
	max := s.srv.o.MaxErrors
	if s.gc == nil || max <= 0 || len(s.rcpts) > 0 {
		return
	}
	if s.gc.errs.Load() >= int64(max) {
		s.gc.stop.CompareAndSwap(nil, stopTooManyErrors)
	}
}

func (s *session) tls() bool {
	_, ok := s.conn.TLSConnectionState()
	return ok
}

// storageReply maps a storage error to its reply.
func (s *session) storageReply(err error, where string) error {
	m := s.srv.o.Metrics
	if errors.Is(err, envelope.ErrStorageFull) {
		m.Message("storage_full", 0)
		s.srv.log.Warn("storage full, refused with 452 4.3.1", "at", where, "client", s.client, "err", err)
		return errStorageFull
	}
	m.Message("storage_error", 0)
	s.srv.log.Warn("storage failed, refused with 451 4.3.0", "at", where, "client", s.client, "err", err)
	return errStorageError
}

func (s *session) Logout() error {
	s.srv.forget(s)
	return nil
}

func (s *session) closeIdle() {
	c := s.conn.Conn()
	_ = c.SetWriteDeadline(time.Now().Add(time.Second))
	_, _ = io.WriteString(c, "421 4.3.2 Service shutting down, try again later\r\n")
	_ = c.Close()
}

func (s *session) Mail(from string, opts *smtp.MailOptions) error {
	s.Reset()
	if s.helo == "" {
		s.helo = s.conn.Hostname()
	}
	o := &s.srv.o
	if s.gc != nil && !s.tls() && inAny(s.gc.client, o.RequireTLS) {
		s.srv.log.Info("sender refused: STARTTLS required for this client", "client", s.client)
		return s.refuse(errTLSRequired)
	}
	if from != "" {
		a, err := mailaddr.Parse(from)
		if err != nil {
			return s.refuse(errBadSender)
		}
		from = a.String()
	}
	if o.Space != nil {
		var size int64
		if opts != nil {
			size = opts.Size
		}
		if err := o.Space.Check(size); err != nil {
			return s.storageReply(err, "MAIL")
		}
	}
	s.from = from
	s.utf8 = opts != nil && opts.UTF8
	return nil
}

func (s *session) Rcpt(to string, _ *smtp.RcptOptions) error {
	o := &s.srv.o
	m := o.Metrics
	a, err := mailaddr.Parse(to)
	if errors.Is(err, mailaddr.ErrRelayTrick) {
		s.srv.log.Info("recipient refused", "client", s.client, "rcpt", to, "reason", err)
		m.Recipient("relay_denied")
		return s.refuse(errRelayDenied)
	}
	if err != nil {
		m.Recipient("bad_syntax")
		return s.refuse(errBadRcpt)
	}
	if !s.srv.domains[a.Domain] {
		s.srv.log.Info("recipient refused", "client", s.client, "rcpt", to, "reason", "domain not accepted")
		m.Recipient("relay_denied")
		return s.refuse(errRelayDenied)
	}
	// A recipient named twice gets the message once, and counts once.
	k := a.Key()
	if s.rcptKeys[k] {
		m.Recipient("accepted")
		return nil
	}
	if o.MaxRecipients > 0 && len(s.rcpts) >= o.MaxRecipients {
		s.srv.log.Info("recipient refused: too many recipients", "client", s.client, "rcpt", to, "max", o.MaxRecipients)
		m.Recipient("too_many")
		return errTooManyRcpts
	}
	if o.Recipients != nil {
		if err := o.Recipients.CheckRecipient(context.Background(), a); errors.Is(err, rcptcheck.ErrUnknown) {
			s.srv.log.Info("recipient refused", "client", s.client, "rcpt", to, "reason", err)
			m.Recipient("unknown_user")
			return s.refuse(errUnknownUser)
		}
	}
	m.Recipient("accepted")
	if s.rcptKeys == nil {
		s.rcptKeys = map[string]bool{}
	}
	s.rcptKeys[k] = true
	s.rcpts = append(s.rcpts, a.String())
	return nil
}

func (s *session) Data(r io.Reader) error {
	s.busy.Store(true)
	defer s.busy.Store(false)
	if gc := s.gc; gc != nil {
		gc.inData.Store(true)
		defer func() {
			gc.msgs.Add(1)
			gc.cmds.Store(0)
			gc.inData.Store(false)
		}()
	}
	o := &s.srv.o
	if o.Space != nil {
		if err := o.Space.Check(0); err != nil {
			return s.storageReply(err, "DATA")
		}
	}
	now := o.Now()
	env := &envelope.Envelope{
		ID:         o.NewID(),
		From:       s.from,
		To:         append([]string(nil), s.rcpts...),
		Arrived:    now.UTC(),
		ClientAddr: s.client,
		Helo:       sanitize(s.helo, 255),
		UTF8:       s.utf8,
	}
	received := received(env, s.srv.o.Hostname, s.tls(), now)
	body := &deadlineReader{r: r, conn: s.conn.Conn(), timeout: o.DataTimeout, minRate: o.MinDataRate}
	msg := io.MultiReader(strings.NewReader(received), body)

	err := s.srv.q.Enqueue(context.Background(), env, msg)
	if err != nil {
		return s.dataFailed(err, body)
	}
	s.srv.o.Metrics.Message("queued", env.Size)
	if log := s.srv.log; log.Enabled(context.Background(), slog.LevelInfo) {
		log.Info("queued", "id", env.ID, "from", env.From, "rcpts", len(env.To), "size", env.Size, "client", s.client)
	}
	return &smtp.SMTPError{Code: 250, EnhancedCode: smtp.EnhancedCode{2, 0, 0}, Message: "Ok: queued as " + env.ID}
}

// dataFailed is the reply to a message that was not queued. It is kept out
// of Data, whose frame every session's stack holds at its deepest read.
func (s *session) dataFailed(err error, body *deadlineReader) error {
	o := &s.srv.o
	m := o.Metrics
	var smtpErr *smtp.SMTPError
	switch {
	case errors.As(err, &smtpErr):
		// From the DATA reader: size limit exceeded.
		if smtpErr.Code == 552 {
			m.Message("too_big", 0)
			s.srv.log.Info("message refused: too big", "client", s.client, "max", o.MaxMessageSize)
			return errTooBig
		}
		m.Message("rejected", 0)
		return smtpErr
	case errors.Is(err, smtp.ErrTooLongLine):
		// Permanent: the same message will never fit. (A 4xx here would
		// have the sender retry it for days.)
		m.Message("rejected", 0)
		s.srv.log.Info("message refused: line too long", "client", s.client, "max", o.MaxLineLength)
		return errLongLine
	case body.timedOut || body.tooSlow:
		// The client may still be sending: what follows would be read
		// as commands. Close the session after this reply.
		if s.gc != nil {
			s.gc.stop.CompareAndSwap(nil, stopDataTimeout)
		}
		m.Message("timeout", 0)
		if body.tooSlow {
			s.srv.log.Info("data arriving too slowly, message refused", "client", s.client, "bytes", body.n, "min_rate", o.MinDataRate)
			return errDataTooSlow
		}
		s.srv.log.Info("data timeout, message refused", "client", s.client, "bytes", body.n, "timeout", o.DataTimeout)
		return errDataTimeout
	case errors.Is(err, membudget.ErrExhausted):
		// The sender keeps the message and tries again. It expects the
		// reply only after its last byte, which is read (and dropped)
		// under the same timeouts as a message. The budget logs this,
		// rate-limited: a flood would make a line per message.
		if _, derr := io.Copy(io.Discard, body); derr != nil && (body.timedOut || body.tooSlow) {
			return s.dataFailed(derr, body)
		}
		m.Message("no_memory", 0)
		return errNoMemory
	default:
		return s.storageReply(err, "DATA")
	}
}

// received builds the trace header (RFC 5321 4.4) that carries the queue ID,
// so the mailbox store and an operator can tell copies apart.
func received(env *envelope.Envelope, hostname string, tls bool, now time.Time) string {
	proto := "ESMTP"
	if env.UTF8 {
		proto = "UTF8SMTP"
	}
	if tls {
		proto += "S"
	}
	// Built by hand: fmt costs more than the rest of this per message. The
	// Builder's String does not copy, unlike string([]byte).
	var b strings.Builder
	b.Grow(256 + len(env.Helo) + len(env.ClientAddr) + len(hostname))
	b.WriteString("Received: from ")
	b.WriteString(env.Helo)
	b.WriteString(" ([")
	b.WriteString(env.ClientAddr)
	b.WriteString("])\r\n\tby ")
	b.WriteString(hostname)
	b.WriteString(" (mxq) with ")
	b.WriteString(proto)
	b.WriteString(" id ")
	b.WriteString(env.ID)
	if len(env.To) == 1 {
		b.WriteString("\r\n\tfor <")
		b.WriteString(env.To[0])
		b.WriteByte('>')
	}
	b.WriteString(";\r\n\t")
	var date [64]byte
	b.Write(now.AppendFormat(date[:0], time.RFC1123Z))
	b.WriteString("\r\n")
	return b.String()
}

// sanitize keeps a client-supplied string printable and bounded for a header.
func sanitize(s string, max int) string {
	if len(s) > max {
		s = s[:max]
	}
	return strings.Map(func(r rune) rune {
		if r < 0x21 || r == 0x7f || r == '(' || r == ')' || r == ';' {
			return '?'
		}
		return r
	}, s)
}

// deadlineReader extends the connection's read deadline on every read, so
// DataTimeout bounds the silence between two packets, not the whole
// transfer (a 50 MiB message on a slow link takes minutes). With a
// minimum rate, the deadline is also never later than the time by which
// the bytes received so far plus the next should have come at that rate
// after a first DataTimeout of grace: a trickle of a byte a minute ends.
type deadlineReader struct {
	r       io.Reader
	conn    net.Conn
	timeout time.Duration
	minRate int64

	start             time.Time
	n                 int64
	timedOut, tooSlow bool
}

func (d *deadlineReader) Read(p []byte) (int, error) {
	// go-smtp's data reader returns only once p is full or the data
	// ends; the queue asks for megabytes at a time. Smaller reads renew
	// the deadline as the data flows, so DataTimeout is about silence,
	// not about how long a slow sender takes for four megabytes.
	if len(p) > 16<<10 {
		p = p[:16<<10]
	}
	now := time.Now()
	if d.start.IsZero() {
		d.start = now
	}
	slow := false
	if d.timeout > 0 {
		deadline := now.Add(d.timeout)
		if d.minRate > 0 {
			budget := d.start.Add(d.timeout + time.Duration(float64(d.n)/float64(d.minRate)*float64(time.Second)))
			if budget.Before(deadline) {
				deadline, slow = budget, true
			}
		}
		_ = d.conn.SetReadDeadline(deadline)
	}
	n, err := d.r.Read(p)
	d.n += int64(n)
	if err != nil && errors.Is(err, os.ErrDeadlineExceeded) {
		d.timedOut = !slow
		d.tooSlow = slow
	}
	return n, err
}

func sprintf(format string, v ...any) string { return fmt.Sprintf(format, v...) }
func sprint(v ...any) string                 { return fmt.Sprint(v...) }
