// Package continuity lets users read the mail mxq holds for them while
// their mailbox store is down: with their own mail client over IMAP
// (read-only), or on a web page mxq serves itself.
//
// It is off by default and costs nothing then. On, it keeps an index of
// the held mail per recipient (package index: about 300 bytes a message
// and recipient, built by one headers-only walk of the queue at start and
// following the stream after), authenticates users without the store
// (package auth: a Dovecot passwd-file, behind a pluggable interface),
// and serves the views (packages imapview and web) through one door that
// names messages only by the user's own mailbox and UID (package mail).
// A message delivered to the store leaves the views: the index sees its
// record deleted, IMAP clients get an EXPUNGE.
//
// Nothing here writes to the queue: the views read records and bodies,
// and every refusal of a change says so to the user.
package continuity

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sort"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/mxq-dev/mxq/continuity/auth"
	"github.com/mxq-dev/mxq/continuity/imapview"
	"github.com/mxq-dev/mxq/continuity/index"
	"github.com/mxq-dev/mxq/continuity/mail"
	"github.com/mxq-dev/mxq/continuity/web"
	"github.com/mxq-dev/mxq/queue"
	"github.com/mxq-dev/mxq/queue/catalog"
)

// Options configures the service.
type Options struct {
	Store *queue.Store
	// Catalog is the node's catalog of the queue, running (queue/catalog).
	Catalog *catalog.Catalog
	Folder  string
	// Listen addresses; empty disables one.
	IMAPListen         string // implicit TLS
	IMAPStartTLSListen string // STARTTLS
	WebListen          string // HTTPS
	TLS                *tls.Config
	// Auth checks passwords; DefaultDomain completes bare user names.
	Auth          auth.Authenticator
	DefaultDomain string
	Limits        auth.Limits
	WebIdle       time.Duration
	WebMaxSession time.Duration
	// Registerer receives the metrics; nil: none.
	Registerer prometheus.Registerer
	Logger     *slog.Logger
	Now        func() time.Time
}

// Service is the running view of held mail.
type Service struct {
	o     Options
	log   *slog.Logger
	idx   *index.Index
	imap  *imapview.Server
	web   *web.Server
	addrs Addrs
	m     *metrics
	done  chan struct{}

	mu     sync.Mutex
	seen   map[string]UserSeen
	logins map[string]uint64
	reads  uint64
}

// Addrs are the addresses the service listens on.
type Addrs struct {
	IMAP         string `json:"imap,omitempty"`
	IMAPStartTLS string `json:"imap_starttls,omitempty"`
	Web          string `json:"web,omitempty"`
}

// UserSeen is a user who logged in.
type UserSeen struct {
	User  string    `json:"user"`
	Proto string    `json:"proto"`
	Last  time.Time `json:"last"`
}

// Status is what `mxq continuity status` shows.
type Status struct {
	Enabled bool `json:"enabled"`
	// Error is why the service is not running, when it is not.
	Error    string      `json:"error,omitempty"`
	Listen   Addrs       `json:"listen"`
	Index    index.Stats `json:"index"`
	Sessions struct {
		IMAP int `json:"imap"`
		Web  int `json:"web"`
	} `json:"sessions"`
	UsersSeen int `json:"users_seen"`
	// RecentUsers are the last users who logged in, newest first (at most
	// 20).
	RecentUsers []UserSeen        `json:"recent_users,omitempty"`
	Logins      map[string]uint64 `json:"logins"`
	Reads       uint64            `json:"reads"`
}

// Start listens, builds the index in the background and serves until ctx
// ends. A listener that cannot be opened is an error, and nothing is left
// running.
func Start(ctx context.Context, o Options) (*Service, error) {
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Folder == "" {
		o.Folder = "INBOX"
	}
	s := &Service{o: o, log: o.Logger, done: make(chan struct{}), seen: map[string]UserSeen{}, logins: map[string]uint64{}}
	s.m = newMetrics(s)
	if o.Registerer != nil {
		if err := o.Registerer.Register(s.m); err != nil {
			return nil, fmt.Errorf("continuity metrics: %w", err)
		}
	}
	audit := o.Logger.With("component", "continuity-audit")
	s.idx = index.New(o.Catalog, o.Store, index.Options{Logger: o.Logger})
	reader := mail.New(o.Store, s.idx, audit, s)
	guard := auth.NewGuard(o.Auth, o.Limits, o.DefaultDomain, o.Now, audit, s)

	var lns []net.Listener
	fail := func(err error) (*Service, error) {
		for _, ln := range lns {
			ln.Close()
		}
		if o.Registerer != nil {
			o.Registerer.Unregister(s.m)
		}
		return nil, err
	}
	listen := func(key, addr string) (net.Listener, error) {
		if addr == "" {
			return nil, nil
		}
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			return nil, fmt.Errorf("continuity %s: %w", key, err)
		}
		lns = append(lns, ln)
		return ln, nil
	}
	imapLn, err := listen("IMAP", o.IMAPListen)
	if err != nil {
		return fail(err)
	}
	startLn, err := listen("IMAP STARTTLS", o.IMAPStartTLSListen)
	if err != nil {
		return fail(err)
	}
	webLn, err := listen("web", o.WebListen)
	if err != nil {
		return fail(err)
	}
	if imapLn != nil || startLn != nil {
		// Each server its own copy: the HTTP server adds its ALPN protocols
		// to the config it is given, which IMAP clients would then fail.
		imapTLS := o.TLS.Clone()
		imapTLS.NextProtos = []string{"imap"}
		s.imap = imapview.New(imapview.Options{Folder: o.Folder, Reader: reader, Guard: guard, TLS: imapTLS, Logger: o.Logger.With("component", "continuity-imap")})
	}
	var httpSrv *http.Server
	if webLn != nil {
		if s.web, err = web.New(web.Options{Reader: reader, Guard: guard, IdleTimeout: o.WebIdle, MaxSession: o.WebMaxSession,
			Now: o.Now, Logger: o.Logger.With("component", "continuity-web")}); err != nil {
			return fail(err)
		}
		httpSrv = &http.Server{Handler: s.web, TLSConfig: o.TLS.Clone(), ReadHeaderTimeout: 10 * time.Second,
			ReadTimeout: time.Minute, IdleTimeout: 2 * time.Minute,
			ErrorLog: slog.NewLogLogger(o.Logger.With("component", "continuity-web").Handler(), slog.LevelDebug)}
	}

	var wg sync.WaitGroup
	run := func(name string, f func() error) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := f(); err != nil && ctx.Err() == nil && !errors.Is(err, http.ErrServerClosed) && !errors.Is(err, net.ErrClosed) {
				s.log.Error("continuity: "+name+" stopped", "err", err)
			}
		}()
	}
	if imapLn != nil {
		s.addrs.IMAP = imapLn.Addr().String()
		run("IMAP", func() error { return s.imap.ServeTLS(imapLn) })
	}
	if startLn != nil {
		s.addrs.IMAPStartTLS = startLn.Addr().String()
		run("IMAP STARTTLS", func() error { return s.imap.ServeSTARTTLS(startLn) })
	}
	if httpSrv != nil {
		s.addrs.Web = webLn.Addr().String()
		run("web", func() error { return httpSrv.ServeTLS(webLn, "", "") })
	}
	go func() {
		<-ctx.Done()
		if s.imap != nil {
			s.imap.Close()
		}
		if httpSrv != nil {
			sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			httpSrv.Shutdown(sctx)
			cancel()
		}
		wg.Wait()
		close(s.done)
	}()
	s.log.Info("continuity view of held mail started", "imap", s.addrs.IMAP, "imap_starttls", s.addrs.IMAPStartTLS,
		"web", s.addrs.Web, "folder", o.Folder, "auth", o.Auth.Name())
	return s, nil
}

// Done is closed once the service stopped after its context ended.
func (s *Service) Done() <-chan struct{} { return s.done }

// Addrs returns the addresses listened on (with the ports chosen when
// ":0" was asked).
func (s *Service) Addrs() Addrs { return s.addrs }

// Index is the index of held mail.
func (s *Service) Index() *index.Index { return s.idx }

// Login implements auth.Observer.
func (s *Service) Login(proto, user, result string) {
	s.m.logins.WithLabelValues(proto, result).Inc()
	s.mu.Lock()
	defer s.mu.Unlock()
	s.logins[result]++
	if result == "ok" {
		s.seen[user] = UserSeen{User: user, Proto: proto, Last: s.o.Now()}
	}
}

// Read implements mail.Observer.
func (s *Service) Read(proto string) {
	s.m.reads.WithLabelValues(proto).Inc()
	s.mu.Lock()
	s.reads++
	s.mu.Unlock()
}

// Status describes the service now.
func (s *Service) Status() Status {
	st := Status{Enabled: true, Listen: s.addrs, Index: s.idx.Stats(), Logins: map[string]uint64{}}
	if s.imap != nil {
		st.Sessions.IMAP = s.imap.Sessions()
	}
	if s.web != nil {
		st.Sessions.Web = s.web.Sessions()
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	st.UsersSeen = len(s.seen)
	for _, u := range s.seen {
		st.RecentUsers = append(st.RecentUsers, u)
	}
	sort.Slice(st.RecentUsers, func(i, j int) bool { return st.RecentUsers[i].Last.After(st.RecentUsers[j].Last) })
	if len(st.RecentUsers) > 20 {
		st.RecentUsers = st.RecentUsers[:20]
	}
	for k, v := range s.logins {
		st.Logins[k] = v
	}
	st.Reads = s.reads
	return st
}

// ContinuityStatus is Status for the admin API.
func (s *Service) ContinuityStatus() any { return s.Status() }

// metrics are the service's Prometheus metrics; gauges are read from the
// live state at scrape time.
type metrics struct {
	s        *Service
	logins   *prometheus.CounterVec
	reads    *prometheus.CounterVec
	sessions *prometheus.Desc
	held     *prometheus.Desc
	boxes    *prometheus.Desc
	users    *prometheus.Desc
}

func newMetrics(s *Service) *metrics {
	return &metrics{
		s: s,
		logins: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "mxq_continuity_logins_total", Help: "Logins to the view of held mail, by protocol (imap, web) and result (ok, failed, rate_limited, unavailable).",
		}, []string{"proto", "result"}),
		reads: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "mxq_continuity_reads_total", Help: "Held messages read by their recipients, by protocol.",
		}, []string{"proto"}),
		sessions: prometheus.NewDesc("mxq_continuity_sessions", "Open sessions of the view of held mail, by protocol.", []string{"proto"}, nil),
		held:     prometheus.NewDesc("mxq_continuity_indexed_messages", "Held messages in the continuity index (once per recipient mailbox).", nil, nil),
		boxes:    prometheus.NewDesc("mxq_continuity_mailboxes", "Recipients with held mail in the continuity index.", nil, nil),
		users:    prometheus.NewDesc("mxq_continuity_users_seen", "Distinct users who logged in to the view since mxq started.", nil, nil),
	}
}

func (m *metrics) Describe(ch chan<- *prometheus.Desc) {
	m.logins.Describe(ch)
	m.reads.Describe(ch)
	ch <- m.sessions
	ch <- m.held
	ch <- m.boxes
	ch <- m.users
}

func (m *metrics) Collect(ch chan<- prometheus.Metric) {
	m.logins.Collect(ch)
	m.reads.Collect(ch)
	st := m.s.Status()
	ch <- prometheus.MustNewConstMetric(m.sessions, prometheus.GaugeValue, float64(st.Sessions.IMAP), "imap")
	ch <- prometheus.MustNewConstMetric(m.sessions, prometheus.GaugeValue, float64(st.Sessions.Web), "web")
	ch <- prometheus.MustNewConstMetric(m.held, prometheus.GaugeValue, float64(st.Index.Messages))
	ch <- prometheus.MustNewConstMetric(m.boxes, prometheus.GaugeValue, float64(st.Index.Mailboxes))
	ch <- prometheus.MustNewConstMetric(m.users, prometheus.GaugeValue, float64(st.UsersSeen))
}
