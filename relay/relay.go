// Package relay is mxq's SMTP edge: it accepts mail for the configured
// domains, whatever the state of the mailbox store, and answers 250 only
// once the queue has the message durably.
//
// The relay knows nothing of JetStream. It hands each message to an
// Enqueuer and maps the outcome to a reply: stored → 250 with the queue ID,
// storage full → 452 4.3.1, anything else → 451 4.3.0, so the sender keeps
// the message and tries again. It never relays: a recipient outside the
// accepted domains is refused with 550 5.7.1 before any data is read.
//
// The edge is hardened in layers, each with its reply and its log line:
//
//   - Before go-smtp sees a connection (listener.go): the PROXY header
//     from trusted load balancers, then connections in total, per client
//     and new ones per client per minute (421 4.7.0, answered and closed
//     without a session).
//   - Per connection (conn.go): commands without a message (421 4.7.0),
//     refused commands (421 4.7.0, only between transactions, so a list
//     server with dead addresses still gets its message through), idle
//     (421 4.4.2; the timeout shortened to StressReadTimeout while three
//     quarters of the connections are taken) and line length (500
//     5.4.0, go-smtp's).
//   - Per transaction (session.go): STARTTLS required for listed
//     networks (530 5.7.0), recipients per message (452 4.5.3), unknown
//     mailboxes (550 5.1.1), message size (552 5.3.4), silence or a
//     trickle during DATA (451 4.4.2, then 421), disk below its reserve
//     (452 4.3.1), the memory budget for message buffers used up past
//     a short wait (451 4.3.1, queue/intake.go and internal/membudget).
//
// Addresses: go-smtp removes a source route (<@a,@b:user@d>) before the
// relay sees the path. That is what RFC 5321 (section 3.6.1 and appendix
// C) asks of a server, and it is safe here: the decision to accept is made
// on the final mailbox alone, so a route can neither make a foreign
// mailbox local nor send mail anywhere else (testdata/dialogs/
// source_route.dlg). %-hacks, bang paths, quoted @ and address literals
// are refused by internal/mailaddr.
package relay

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/mxq-dev/mxq/internal/connlimit"
	"github.com/mxq-dev/mxq/internal/mailaddr"
	"github.com/mxq-dev/mxq/queue/envelope"
)

// Enqueuer stores a message durably. It returns nil only once the message is
// safe; on error nothing of the message may remain visible.
type Enqueuer interface {
	Enqueue(ctx context.Context, env *envelope.Envelope, msg io.Reader) error
}

// Options configures the relay.
type Options struct {
	// Hostname is announced in the greeting and Received headers.
	Hostname string
	// Domains are the accepted recipient domains, normalized.
	Domains        []string
	MaxMessageSize int64
	MaxRecipients  int
	MaxLineLength  int
	ReadTimeout    time.Duration
	DataTimeout    time.Duration
	WriteTimeout   time.Duration
	// MinDataRate is the average rate, in bytes per second, a message
	// must arrive at once DataTimeout has passed; 0: no minimum. Without
	// it a client sending a byte just within every DataTimeout holds a
	// session for days.
	MinDataRate int64

	// TLS enables STARTTLS; nil: not offered. Its certificate may change
	// from one handshake to the next (tlsreload).
	TLS *tls.Config
	// RequireTLS lists client networks that must STARTTLS before MAIL.
	RequireTLS []netip.Prefix

	// ProxyNetworks are the load balancers whose connections start with
	// a PROXY protocol header (v1 or v2), which then names the client;
	// everyone else's address is their own, and a PROXY line from them is
	// just a bad command.
	ProxyNetworks      []netip.Prefix
	ProxyHeaderTimeout time.Duration

	// Connection limits; zero disables one. A client is an IPv4
	// address or an IPv6 /64.
	MaxConnections      int
	MaxConnectionsPerIP int
	ConnectionRatePerIP int // new connections per client per minute
	// LimitExempt are client networks the per-client limits do not apply
	// to (MaxConnections still does), as Postfix exempts $mynetworks.
	LimitExempt []netip.Prefix
	// StressReadTimeout replaces ReadTimeout while three quarters of
	// MaxConnections are open (Postfix's stress mode): a read timeout
	// bounds a slow client only per command, so under pressure the
	// commands must come fast. 0: ReadTimeout always.
	StressReadTimeout time.Duration
	// MaxCommands is how many commands a connection may send without
	// sending a message (DATA resets the count).
	MaxCommands int
	// MaxErrors is how many refused commands (bad addresses, relaying,
	// unknown users) a connection may have; beyond, it is closed at the
	// next command outside a transaction with accepted recipients.
	MaxErrors int

	// Recipients, if set, refuses unknown mailboxes at RCPT time.
	Recipients RecipientChecker
	// Space, if set, is asked whether there is room for a message
	// before MAIL and DATA are accepted.
	Space SpaceChecker

	// NewID returns a fresh queue ID (envelope.IDGen.New).
	NewID func() string
	// Now is the clock for Received headers and the connection rate.
	Now     func() time.Time
	Logger  *slog.Logger
	Metrics Metrics
}

// RecipientChecker knows which mailboxes exist (rcptcheck.Checker).
type RecipientChecker interface {
	// CheckRecipient returns an error wrapping rcptcheck.ErrUnknown for
	// a mailbox that does not exist, and nil when it exists or when it
	// cannot tell.
	CheckRecipient(ctx context.Context, a mailaddr.Address) error
}

// SpaceChecker says whether storage has room (diskguard.Guard).
type SpaceChecker interface {
	// Check returns nil if a message of need bytes (0: unknown) fits, or
	// an error wrapping envelope.ErrStorageFull or
	// envelope.ErrStorageUnavailable.
	Check(need int64) error
}

// Metrics counts what the relay does; the admin API's Prometheus registry
// implements it. Calls must be cheap: they are on the accept path.
type Metrics interface {
	// Session counts an SMTP connection by how it started: "accepted",
	// or why it was turned away: "shutting_down", "too_many_connections",
	// "too_many_connections_from_client", "connection_rate_exceeded",
	// "bad_proxy_header".
	Session(result string)
	// Message counts a DATA transaction by outcome: "queued",
	// "storage_full", "storage_error", "no_memory", "too_big",
	// "timeout", "rejected".
	Message(result string, bytes int64)
	// Recipient counts a RCPT by outcome: "accepted", "relay_denied",
	// "bad_syntax", "unknown_user", "too_many".
	Recipient(result string)
}

type nopMetrics struct{}

func (nopMetrics) Session(string)        {}
func (nopMetrics) Message(string, int64) {}
func (nopMetrics) Recipient(string)      {}

// Server is the SMTP relay.
type Server struct {
	o        Options
	q        Enqueuer
	smtp     *smtp.Server
	log      *slog.Logger
	domains  map[string]bool
	limits   *connlimit.Limiter
	refusals refusalLog
	stressed atomic.Bool

	mu       sync.Mutex
	sessions map[*session]struct{}
	closing  bool
}

// New returns a relay that stores accepted mail in q.
func New(o Options, q Enqueuer) *Server {
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.Metrics == nil {
		o.Metrics = nopMetrics{}
	}
	if o.ReadTimeout <= 0 {
		// Counting commands relies on go-smtp setting a read deadline
		// before each one, which it does only with a timeout.
		o.ReadTimeout = 5 * time.Minute
	}
	if o.ProxyHeaderTimeout <= 0 {
		o.ProxyHeaderTimeout = 10 * time.Second
	}
	s := &Server{o: o, q: q, log: o.Logger, domains: map[string]bool{}, sessions: map[*session]struct{}{}}
	s.limits = connlimit.New(connlimit.Limits{
		Total: o.MaxConnections, PerClient: o.MaxConnectionsPerIP, RatePerMinute: o.ConnectionRatePerIP,
	}, o.Now)
	for _, d := range o.Domains {
		s.domains[d] = true
	}
	srv := smtp.NewServer(s)
	srv.Domain = o.Hostname
	srv.MaxMessageBytes = o.MaxMessageSize
	// The relay counts recipients itself (session.Rcpt), to log it and to
	// count a repeated recipient once.
	srv.MaxRecipients = 0
	srv.MaxLineLength = o.MaxLineLength
	srv.ReadTimeout = o.ReadTimeout
	srv.WriteTimeout = o.WriteTimeout
	srv.EnableSMTPUTF8 = true
	srv.ErrorLog = slogPrinter{o.Logger}
	if o.TLS != nil {
		cfg := o.TLS.Clone()
		next := cfg.GetConfigForClient
		cfg.GetConfigForClient = func(h *tls.ClientHelloInfo) (*tls.Config, error) {
			// From here on, writing to the raw connection would be
			// writing clear text into a TLS stream.
			if c, ok := h.Conn.(*conn); ok {
				c.tls.Store(true)
			}
			if next != nil {
				return next(h)
			}
			return nil, nil
		}
		srv.TLSConfig = cfg
	}
	s.smtp = srv
	return s
}

// Serve accepts SMTP connections on ln until Shutdown.
func (s *Server) Serve(ln net.Listener) error {
	err := s.smtp.Serve(s.newListener(ln))
	if errors.Is(err, smtp.ErrServerClosed) || errors.Is(err, net.ErrClosed) {
		return nil
	}
	return err
}

// NewSession implements smtp.Backend.
func (s *Server) NewSession(c *smtp.Conn) (smtp.Session, error) {
	sess := &session{srv: s, conn: c, helo: c.Hostname(), client: remoteIP(c.Conn().RemoteAddr())}
	if gc := connOf(c.Conn()); gc != nil {
		sess.gc = gc
		sess.client = gc.client.String()
		gc.smtp.Store(c)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closing {
		s.o.Metrics.Session("shutting_down")
		return nil, &smtp.SMTPError{Code: 421, EnhancedCode: smtp.EnhancedCode{4, 3, 2}, Message: "Service shutting down, try again later"}
	}
	s.sessions[sess] = struct{}{}
	s.o.Metrics.Session("accepted")
	return sess, nil
}

func (s *Server) forget(sess *session) {
	s.mu.Lock()
	delete(s.sessions, sess)
	s.mu.Unlock()
}

// Shutdown stops accepting connections, closes idle sessions at once, lets
// the sessions that are transferring or storing a message finish, and after
// ctx ends closes whatever is left. A message cut off that way was never
// answered 250, so the sender still has it.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	s.closing = true
	s.mu.Unlock()
	done := make(chan error, 1)
	go func() { done <- s.smtp.Shutdown(context.Background()) }()
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		s.mu.Lock()
		for sess := range s.sessions {
			if !sess.busy.Load() {
				sess.closeIdle()
			}
		}
		s.mu.Unlock()
		select {
		case err := <-done:
			return err
		case <-ctx.Done():
			s.smtp.Close()
			<-done
			return ctx.Err()
		case <-tick.C:
		}
	}
}

func remoteIP(a net.Addr) string {
	if ta, ok := a.(*net.TCPAddr); ok {
		return ta.IP.String()
	}
	host, _, err := net.SplitHostPort(a.String())
	if err != nil {
		return a.String()
	}
	return host
}

// slogPrinter adapts go-smtp's ErrorLog to slog.
type slogPrinter struct{ l *slog.Logger }

func (p slogPrinter) Printf(format string, v ...any) {
	p.l.Warn("smtp", "msg", sprintf(format, v...))
}

func (p slogPrinter) Println(v ...any) {
	p.l.Warn("smtp", "msg", sprint(v...))
}

// stressTimeout is the read timeout while under stress, or 0.
func (s *Server) stressTimeout() time.Duration {
	d, max := s.o.StressReadTimeout, s.o.MaxConnections
	if d <= 0 || max <= 0 || d >= s.o.ReadTimeout {
		return 0
	}
	open := s.limits.Stats().Open
	stressed := open >= max-max/4
	if s.stressed.Swap(stressed) != stressed {
		if stressed {
			s.log.Warn("under stress: command timeout shortened", "open", open, "max", max, "read_timeout", d)
		} else {
			s.log.Info("stress over: command timeout back to normal", "open", open, "read_timeout", s.o.ReadTimeout)
		}
	}
	if stressed {
		return d
	}
	return 0
}

// Connections is the number of connections open now, including those
// still waiting for their PROXY header.
func (s *Server) Connections() int { return s.limits.Stats().Open }
