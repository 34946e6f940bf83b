// Package admin is mxq's operator interface over HTTP: a JSON API for the
// CLI (status, pause and resume, rate ceilings, listing and acting on
// queued mail and dead letters), Prometheus metrics, and the liveness and
// readiness probes Kubernetes asks.
//
// Reads need the bearer token when one is configured; writes always do,
// and with no token configured they are refused outright: an admin port
// that someone forgot to protect can show the queue but not empty it.
// Tokens are compared in constant time. Every write is logged with who
// asked (address and the operator name the CLI sends), what, and on how
// many messages.
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
	Node  string
	Token string // empty: read-only
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
	token    [32]byte

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
	if m != nil {
		m.reg.MustRegister(&stateCollector{s: s})
		s.mux.Handle("GET /metrics", promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{Registry: m.reg}))
	}
	s.mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { w.Write([]byte("ok\n")) })
	s.mux.HandleFunc("GET /readyz", s.readyz)

	s.read("GET /api/v1/status", s.status)
	s.read("GET /api/v1/continuity", s.continuity)
	// Go's profiler, for the operator chasing CPU or memory: behind the
	// token like every read.
	s.read("GET /debug/pprof/", pprof.Index)
	s.read("GET /debug/pprof/profile", pprof.Profile)
	s.read("GET /debug/pprof/heap", pprof.Handler("heap").ServeHTTP)
	s.read("GET /debug/pprof/goroutine", pprof.Handler("goroutine").ServeHTTP)
	s.read("GET /debug/pprof/allocs", pprof.Handler("allocs").ServeHTTP)
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

// authorized checks the bearer token in constant time (over hashes, so the
// length does not leak either).
func (s *Server) authorized(r *http.Request) bool {
	const prefix = "Bearer "
	h := r.Header.Get("Authorization")
	if len(h) <= len(prefix) || h[:len(prefix)] != prefix {
		return false
	}
	given := sha256.Sum256([]byte(h[len(prefix):]))
	return subtle.ConstantTimeCompare(given[:], s.token[:]) == 1
}

func (s *Server) read(pattern string, h http.HandlerFunc) {
	s.mux.HandleFunc(pattern, func(w http.ResponseWriter, r *http.Request) {
		if s.o.Token != "" && !s.authorized(r) {
			writeErr(w, http.StatusUnauthorized, "invalid or missing bearer token")
			return
		}
		h(w, r)
	})
}

func (s *Server) write(pattern string, h http.HandlerFunc) {
	s.mux.HandleFunc(pattern, func(w http.ResponseWriter, r *http.Request) {
		if s.o.Token == "" {
			writeErr(w, http.StatusForbidden, "changes are disabled: no admin token is configured (admin.token or admin.token_file)")
			return
		}
		if !s.authorized(r) {
			s.log.Warn("admin call refused: bad token", "call", r.URL.Path, "from", r.RemoteAddr)
			writeErr(w, http.StatusUnauthorized, "invalid or missing bearer token")
			return
		}
		h(w, r)
	})
}

// who names the caller for the audit log.
func who(r *http.Request) string {
	op := r.Header.Get("X-Mxq-Operator")
	if op == "" {
		op = "unknown"
	}
	return fmt.Sprintf("%s from %s", op, r.RemoteAddr)
}

func (s *Server) audit(r *http.Request, what string, attrs ...any) {
	s.log.Info("admin: "+what, append([]any{"by", who(r)}, attrs...)...)
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
