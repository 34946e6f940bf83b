// Package admin is mxq's operator interface over HTTP: a JSON API for the
// CLI (status, pause and resume, rate ceilings, listing and acting on
// queued mail and dead letters), Prometheus metrics, and the liveness and
// readiness probes Kubernetes asks.
//
// Access has three levels, because the admin port is often reachable by
// more than the operators (a published Docker port, a Service in the
// cluster) and what it serves is people's mail:
//
//   - open, no token ever: /healthz, /readyz, /metrics, and GET
//     /api/v1/status without its free text (see Status.Redact): counts,
//     rates, circuits and ramps are what a dashboard or an alert needs and
//     carry no addresses;
//   - read, the admin token or the read-only token (admin.read_token):
//     listings, a message's envelope and header, its raw bytes, the dead
//     letters, the continuity view (which names users) and the profiler
//     (a heap profile holds whatever the process held, mail included);
//   - write, the admin token only: pause, rate ceilings, hold, delete,
//     bounce, requeue.
//
// With no token configured nothing but the open level is served: an admin
// port that someone forgot to protect shows how the queue is doing, not
// what is in it, and cannot empty it. A read-only token lets a dashboard
// or a support desk look at mail without being able to delete it. Tokens
// are compared in constant time, over their hashes so that the length does
// not leak either. Every write, and every read of a message's content
// (its header, its raw bytes, a listing of envelopes, a profile), is
// logged with who asked (address and the operator name the CLI sends),
// with which token, what, and on how many messages.
//
// Bulk actions stream: they walk the queue's envelopes (headers only) and
// act record by record, so bouncing a million messages needs no more
// memory than bouncing one.
package admin

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/pprof"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/mxq-dev/mxq/queue"
	"github.com/mxq-dev/mxq/queue/catalog"
	"github.com/mxq-dev/mxq/queue/drain"
)

// Control is the cluster's control state as the API uses it (the raft
// store, through an adapter).
type Control interface {
	Paused(route string) bool // "" : the global flag
	Held(id string) bool
	Overrides(route string) (rate float64, concurrency int)
	Apply(ctx context.Context, c Command) error
	Role() string
	Members() []Member
}

// Command is a change of control state.
type Command struct {
	Op             string // pause, resume, set_rate, reset_ramp, hold, release
	Route          string
	MaxRate        float64
	MaxConcurrency int
	IDs            []string
	Reason         string
	By             string
}

// Drain is the cluster's drain as this node sees it: live where it runs,
// from the replicated control state elsewhere.
type Drain interface {
	State() []drain.RouteState
	Kick()
	// Draining reports whether the drain runs on this node.
	Draining() bool
}

// Options configures the server.
type Options struct {
	Node string
	// Token authorizes everything (admin.token); empty: nothing can be
	// changed.
	Token string
	// ReadToken authorizes reading only (admin.read_token): listings,
	// messages, dead letters, the continuity view, profiles. Empty: only
	// Token reads. With neither, only the open endpoints answer.
	ReadToken string
	// Routes are the configured backends, for status even before any
	// delivery.
	Routes []string
	// Ready reports whether the node can take mail (storage writable,
	// quorum present).
	Ready  func(ctx context.Context) error
	Now    func() time.Time
	Logger *slog.Logger
	// Continuity reports the view of held mail (GET /api/v1/continuity);
	// nil: disabled.
	Continuity ContinuityReporter
	// Catalog finds a queue ID's records and a mailbox's messages without
	// walking the queue; nil (or not ready yet): the queue is walked.
	Catalog Catalog
}

// Catalog is the node's catalog of the queue (catalog.Catalog) as the API
// uses it.
type Catalog interface {
	IsReady() bool
	Seqs(id string) ([]uint64, error)
	Mailbox(mbox string, from uint32, max int) ([]catalog.Message, uint32, error)
	Forget(seqs ...uint64)
}

// Server is the admin HTTP handler.
type Server struct {
	o        Options
	store    *queue.Store
	ctl      Control
	drain    Drain
	reporter drain.Reporter
	metrics  *Metrics
	log      *slog.Logger
	mux      *http.ServeMux
	// The tokens' SHA-256; a zero hash stands for "not configured" (no
	// string hashes to zero).
	token, readToken [32]byte

	mu      sync.Mutex
	samples []sample // delivered totals over time, for the rate
}

type sample struct {
	at        time.Time
	delivered uint64
}

// New returns the server. rep may be nil (no DSN smarthost: bounce
// dead-letters only).
func New(o Options, store *queue.Store, ctl Control, d Drain, rep drain.Reporter, m *Metrics) *Server {
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	s := &Server{o: o, store: store, ctl: ctl, drain: d, reporter: rep, metrics: m, log: o.Logger, mux: http.NewServeMux()}
	if o.Token != "" {
		s.token = sha256.Sum256([]byte(o.Token))
	}
	if o.ReadToken != "" {
		s.readToken = sha256.Sum256([]byte(o.ReadToken))
	}
	if m != nil {
		m.reg.MustRegister(&stateCollector{s: s})
		s.mux.Handle("GET /metrics", promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{Registry: m.reg}))
	}
	s.mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { w.Write([]byte("ok\n")) })
	s.mux.HandleFunc("GET /readyz", s.readyz)

	// Open to all, but its free text only to a token (s.status).
	s.mux.HandleFunc("GET /api/v1/status", s.status)

	s.read("GET /api/v1/continuity", s.continuity)
	// Go's profiler, for the operator chasing CPU or memory: a heap
	// profile holds what the process held, mail included, so it is a read
	// of content like a message's, and logged like one.
	s.read("GET /debug/pprof/", s.profile(pprof.Index))
	s.read("GET /debug/pprof/profile", s.profile(pprof.Profile))
	s.read("GET /debug/pprof/heap", s.profile(pprof.Handler("heap").ServeHTTP))
	s.read("GET /debug/pprof/goroutine", s.profile(pprof.Handler("goroutine").ServeHTTP))
	s.read("GET /debug/pprof/allocs", s.profile(pprof.Handler("allocs").ServeHTTP))
	s.read("GET /api/v1/queue", s.list(queue.Queued))
	s.read("GET /api/v1/dlq", s.list(queue.Dead))
	s.read("GET /api/v1/queue/{id}", s.show)
	s.read("GET /api/v1/dlq/{id}", s.show)
	s.read("GET /api/v1/queue/{id}/raw", s.raw)
	s.read("GET /api/v1/dlq/{id}/raw", s.raw)
	s.write("POST /api/v1/pause", s.pause(true))
	s.write("POST /api/v1/resume", s.pause(false))
	s.write("POST /api/v1/rate", s.rate)
	s.write("POST /api/v1/rate/reset", s.rateReset)
	s.write("POST /api/v1/queue/hold", s.bulk(queue.Queued, "hold"))
	s.write("POST /api/v1/queue/release", s.bulk(queue.Queued, "release"))
	s.write("POST /api/v1/queue/delete", s.bulk(queue.Queued, "delete"))
	s.write("POST /api/v1/queue/requeue", s.bulk(queue.Queued, "requeue"))
	s.write("POST /api/v1/queue/bounce", s.bulk(queue.Queued, "bounce"))
	s.write("POST /api/v1/dlq/requeue", s.bulk(queue.Dead, "requeue"))
	s.write("POST /api/v1/dlq/purge", s.bulk(queue.Dead, "delete"))
	return s
}

func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) { s.mux.ServeHTTP(w, r) }

// access is what a request's bearer token allows.
type access int

const (
	anonymous access = iota // no Authorization header
	invalid                 // a bearer token that is neither of ours, or not a bearer token
	reader                  // the read-only token
	admin                   // the admin token
)

// String names the level in the audit log.
func (a access) String() string {
	switch a {
	case reader:
		return "read"
	case admin:
		return "admin"
	case invalid:
		return "invalid"
	}
	return "none"
}

// accessKey carries a request's access level from the wrappers below to
// the handlers (for the audit log).
type accessKey struct{}

// accessOf is the level the wrapper found; anonymous outside one.
func accessOf(r *http.Request) access {
	a, _ := r.Context().Value(accessKey{}).(access)
	return a
}

// The replies that refuse, each naming what to set. The CLI adds where
// its token comes from (--token, MXQ_ADMIN_TOKEN).
const (
	msgNoTokens = "reading mail, dead letters, the continuity view and profiles needs a token, and this node has none: " +
		"set admin.read_token (or admin.read_token_file) for read-only access, admin.token (or admin.token_file) for everything"
	msgBadToken      = "invalid or missing bearer token: this needs the node's admin.token or admin.read_token"
	msgBadAdminToken = "invalid or missing bearer token: changes need the node's admin.token"
	msgNoAdminToken  = "changes are disabled: no admin token is configured (admin.token or admin.token_file)"
	msgReadOnly      = "the read-only token (admin.read_token) cannot change anything: use the admin token (admin.token)"
)

// accessFor checks the bearer token in constant time, over hashes so that
// the length does not leak either, and always against both tokens, so
// that the time does not tell which one matched.
func (s *Server) accessFor(r *http.Request) access {
	h, ok := r.Header["Authorization"]
	if !ok {
		return anonymous
	}
	const prefix = "Bearer "
	if len(h) != 1 || len(h[0]) <= len(prefix) || h[0][:len(prefix)] != prefix {
		return invalid
	}
	// A token that is not configured is a zero hash, which no token
	// hashes to: it matches nothing.
	given := sha256.Sum256([]byte(h[0][len(prefix):]))
	isAdmin := subtle.ConstantTimeCompare(given[:], s.token[:])
	isReader := subtle.ConstantTimeCompare(given[:], s.readToken[:])
	switch {
	case isAdmin == 1:
		return admin
	case isReader == 1:
		return reader
	}
	return invalid
}

// tokens reports whether any token is configured.
func (s *Server) tokens() bool { return s.o.Token != "" || s.o.ReadToken != "" }

// unauthorized writes a 401 with the challenge RFC 6750 asks for.
func unauthorized(w http.ResponseWriter, msg string) {
	w.Header().Set("WWW-Authenticate", `Bearer realm="mxq"`)
	writeErr(w, http.StatusUnauthorized, msg)
}

// read serves h to the admin and the read-only token.
func (s *Server) read(pattern string, h http.HandlerFunc) {
	s.mux.HandleFunc(pattern, func(w http.ResponseWriter, r *http.Request) {
		a := s.accessFor(r)
		switch {
		case a == admin || a == reader:
			h(w, r.WithContext(context.WithValue(r.Context(), accessKey{}, a)))
		case !s.tokens():
			unauthorized(w, msgNoTokens)
		default:
			s.log.Warn("admin call refused: bad token", "call", r.URL.Path, "from", r.RemoteAddr, "token", a.String())
			unauthorized(w, msgBadToken)
		}
	})
}

// write serves h to the admin token only.
func (s *Server) write(pattern string, h http.HandlerFunc) {
	s.mux.HandleFunc(pattern, func(w http.ResponseWriter, r *http.Request) {
		if s.o.Token == "" {
			writeErr(w, http.StatusForbidden, msgNoAdminToken)
			return
		}
		switch a := s.accessFor(r); a {
		case admin:
			h(w, r.WithContext(context.WithValue(r.Context(), accessKey{}, a)))
		case reader:
			s.log.Warn("admin call refused: read-only token", "call", r.URL.Path, "by", who(r))
			writeErr(w, http.StatusForbidden, msgReadOnly)
		default:
			s.log.Warn("admin call refused: bad token", "call", r.URL.Path, "from", r.RemoteAddr, "token", a.String())
			unauthorized(w, msgBadAdminToken)
		}
	})
}

// profile logs a read of the profiler (a heap profile is the process's
// memory, mail included) and serves it.
func (s *Server) profile(h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		s.audit(r, "profile", "path", r.URL.Path)
		h(w, r)
	}
}

// who names the caller for the audit log.
func who(r *http.Request) string {
	op := r.Header.Get("X-Mxq-Operator")
	if op == "" {
		op = "unknown"
	}
	return fmt.Sprintf("%s from %s", op, r.RemoteAddr)
}

// audit logs a write or a read of content at info, with who asked and
// with which token.
func (s *Server) audit(r *http.Request, what string, attrs ...any) {
	s.log.Info("admin: "+what, append([]any{"by", who(r), "token", accessOf(r).String()}, attrs...)...)
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	// Operators read these with curl too: "0 <= max", not "0 \u003c= max".
	enc.SetEscapeHTML(false)
	_ = enc.Encode(v)
}

func writeErr(w http.ResponseWriter, code int, msg string) {
	writeJSON(w, code, Error{Error: msg})
}

// decode reads a JSON body; an empty body leaves v as it is.
func decode(r *http.Request, v any) error {
	if r.ContentLength == 0 {
		return nil
	}
	dec := json.NewDecoder(http.MaxBytesReader(nil, r.Body, 16<<20))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("bad request body: %w", err)
	}
	return nil
}

func (s *Server) readyz(w http.ResponseWriter, r *http.Request) {
	if s.o.Ready == nil {
		w.Write([]byte("ok\n"))
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), 3*time.Second)
	defer cancel()
	if err := s.o.Ready(ctx); err != nil {
		http.Error(w, "not ready: "+err.Error(), http.StatusServiceUnavailable)
		return
	}
	w.Write([]byte("ok\n"))
}

// Sample records the delivered total now; Run calls it periodically so
// that status can report a rate over the last minute.
func (s *Server) sample() {
	if !s.drain.Draining() {
		s.mu.Lock()
		s.samples = s.samples[:0]
		s.mu.Unlock()
		return
	}
	var total uint64
	for _, rs := range s.drain.State() {
		total += rs.Delivered + rs.Deferrals + rs.Bounces
	}
	s.mu.Lock()
	s.samples = append(s.samples, sample{s.o.Now(), total})
	if len(s.samples) > 13 {
		s.samples = s.samples[len(s.samples)-13:]
	}
	s.mu.Unlock()
}

func (s *Server) deliveryRate() float64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.samples) < 2 {
		return 0
	}
	a, b := s.samples[0], s.samples[len(s.samples)-1]
	dt := b.at.Sub(a.at).Seconds()
	if dt <= 0 {
		return 0
	}
	return float64(b.delivered-a.delivered) / dt
}

// Run samples the delivery rate every 5 s until ctx ends.
func (s *Server) Run(ctx context.Context) {
	t := time.NewTicker(5 * time.Second)
	defer t.Stop()
	s.sample()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			s.sample()
		}
	}
}

var errBadSelection = errors.New("select messages by ID or with a filter; an empty filter needs \"all\" (--all), so that everything is never selected by accident")

// Metrics is the Prometheus registry and the counters the relay and the
// drain feed. It is not a package global: each server has its own.
type Metrics struct {
	reg        *prometheus.Registry
	sessions   *prometheus.CounterVec
	messages   *prometheus.CounterVec
	bytes      prometheus.Counter
	rcpts      *prometheus.CounterVec
	deliveries *prometheus.CounterVec
	latency    *prometheus.HistogramVec
	probes     *prometheus.CounterVec
	audit      *prometheus.CounterVec
}
