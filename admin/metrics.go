package admin

import (
	"context"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// NewMetrics returns a registry with mxq's counters, plus the Go runtime
// and process collectors. The relay and the drain feed the counters (it
// implements relay.Metrics and drain.Metrics); gauges are read from live
// state when Prometheus scrapes, so they cost nothing in between.
func NewMetrics() *Metrics {
	m := &Metrics{reg: prometheus.NewRegistry()}
	m.sessions = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "mxq_smtp_sessions_total", Help: "SMTP connections, by how they were received (accepted, or why not).",
	}, []string{"result"})
	m.messages = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "mxq_smtp_messages_total", Help: "SMTP transactions by outcome: queued, storage_full (452), storage_error (451), no_memory (451 4.3.1), too_big (552), timeout, rejected.",
	}, []string{"result"})
	m.bytes = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "mxq_smtp_queued_bytes_total", Help: "Bytes of the messages queued.",
	})
	m.rcpts = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "mxq_smtp_recipients_total", Help: "RCPT commands by outcome: accepted, relay_denied, bad_syntax.",
	}, []string{"result"})
	m.deliveries = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "mxq_deliveries_total", Help: "Delivery attempts by backend and result: delivered, deferred, bounced, unreachable.",
	}, []string{"backend", "result"})
	m.latency = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name: "mxq_delivery_duration_seconds", Help: "Time the backend took per delivery.",
		Buckets: []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30},
	}, []string{"backend"})
	m.probes = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "mxq_backend_probes_total", Help: "Probes of backends with an open circuit, by result.",
	}, []string{"backend", "result"})
	m.reg.MustRegister(m.sessions, m.messages, m.bytes, m.rcpts, m.deliveries, m.latency, m.probes,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// GroupCommit exports the group commit's counters, read at scrape time:
// their ratio is the messages each fsync covers.
func (m *Metrics) GroupCommit(stats func() (batches, messages uint64)) {
	m.reg.MustRegister(
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "mxq_queue_commit_batches_total", Help: "Group-commit batches written (one fsync each).",
		}, func() float64 { b, _ := stats(); return float64(b) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "mxq_queue_commit_messages_total", Help: "Messages written by group commit; divided by the batches, the messages per fsync.",
		}, func() float64 { _, n := stats(); return float64(n) }),
	)
}

// MemoryBudget is what MessageMemory reads (membudget.Budget).
type MemoryBudget interface {
	Size() int64
	InUse() int64
	Waits() uint64
	Refusals() uint64
}

// MessageMemory exports the SMTP sessions' memory budget for message
// buffers, read at scrape time, and spills, the chunks stored early
// because a buffer could not grow.
func (m *Metrics) MessageMemory(b MemoryBudget, spills func() uint64) {
	m.reg.MustRegister(
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "mxq_smtp_memory_budget_bytes", Help: "The memory budget for message buffers (smtp.memory_budget).",
		}, func() float64 { return float64(b.Size()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "mxq_smtp_memory_in_use_bytes", Help: "Bytes of the memory budget reserved by messages being read or stored.",
		}, func() float64 { return float64(b.InUse()) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "mxq_smtp_memory_waits_total", Help: "Messages that had to wait for memory before their data was read.",
		}, func() float64 { return float64(b.Waits()) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "mxq_smtp_memory_refusals_total", Help: "Messages refused with 451 4.3.1 because the memory budget stayed used up.",
		}, func() float64 { return float64(b.Refusals()) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "mxq_smtp_memory_spills_total", Help: "Chunks stored early because a message's buffer could not grow within the memory budget.",
		}, func() float64 { return float64(spills()) }),
	)
}

// Registerer is the registry, for components that bring their own
// metrics (the continuity view).
func (m *Metrics) Registerer() prometheus.Registerer { return m.reg }

// Session implements relay.Metrics.
func (m *Metrics) Session(result string) { m.sessions.WithLabelValues(result).Inc() }

// Message implements relay.Metrics.
func (m *Metrics) Message(result string, bytes int64) {
	m.messages.WithLabelValues(result).Inc()
	if bytes > 0 {
		m.bytes.Add(float64(bytes))
	}
}

// Recipient implements relay.Metrics.
func (m *Metrics) Recipient(result string) { m.rcpts.WithLabelValues(result).Inc() }

// Delivery implements drain.Metrics.
func (m *Metrics) Delivery(route, result string, latency time.Duration) {
	m.deliveries.WithLabelValues(route, result).Inc()
	if result != "unreachable" {
		m.latency.WithLabelValues(route).Observe(latency.Seconds())
	}
}

// Probe implements drain.Metrics.
func (m *Metrics) Probe(route string, ok bool) {
	r := "failed"
	if ok {
		r = "ok"
	}
	m.probes.WithLabelValues(route, r).Inc()
}

// stateCollector reports gauges from the live state at scrape time.
type stateCollector struct{ s *Server }

var (
	descQueue     = prometheus.NewDesc("mxq_queue_messages", "Messages (records) waiting for delivery, by backend.", []string{"backend"}, nil)
	descDead      = prometheus.NewDesc("mxq_dead_letters", "Dead letters, by backend.", []string{"backend"}, nil)
	descBytes     = prometheus.NewDesc("mxq_queue_bytes", "Bytes held by the queue's stream (queued mail, dead letters, large-message chunks).", nil, nil)
	descOldest    = prometheus.NewDesc("mxq_queue_oldest_age_seconds", "Age of the oldest queued message, by backend.", []string{"backend"}, nil)
	descRate      = prometheus.NewDesc("mxq_drain_allowed_rate", "Deliveries per second the drain allows itself now, by backend.", []string{"backend"}, nil)
	descMaxRate   = prometheus.NewDesc("mxq_drain_max_rate", "Configured rate ceiling, by backend.", []string{"backend"}, nil)
	descConc      = prometheus.NewDesc("mxq_drain_allowed_concurrency", "Connections the drain allows itself now, by backend.", []string{"backend"}, nil)
	descInflight  = prometheus.NewDesc("mxq_drain_in_flight", "Deliveries in progress, by backend.", []string{"backend"}, nil)
	descCircuit   = prometheus.NewDesc("mxq_backend_circuit_open", "1 while the backend's circuit is open (unreachable, probing).", []string{"backend"}, nil)
	descLatency   = prometheus.NewDesc("mxq_backend_latency_seconds", "Moving average of the backend's delivery time.", []string{"backend"}, nil)
	descOverloads = prometheus.NewDesc("mxq_backend_overload_replies_total", "Deliveries that met an overload reply (421, 451, 452 4.3.x), by backend.", []string{"backend"}, nil)
	descPaused    = prometheus.NewDesc("mxq_drain_paused", "1 while the drain is paused for the backend (or for all).", []string{"backend"}, nil)
	descLeader    = prometheus.NewDesc("mxq_node_draining", "1 on the node that runs the cluster's drain.", nil, nil)
	descReady     = prometheus.NewDesc("mxq_node_ready", "1 when the node can take mail (storage writable, quorum present).", nil, nil)
)

func (c *stateCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descQueue, descDead, descBytes, descOldest, descRate, descMaxRate, descConc,
		descInflight, descCircuit, descLatency, descOverloads, descPaused, descLeader, descReady} {
		ch <- d
	}
}

func (c *stateCollector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	st, err := c.s.Status(ctx)
	if err != nil {
		ch <- prometheus.MustNewConstMetric(descReady, prometheus.GaugeValue, 0)
		return
	}
	g := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	g(descBytes, float64(st.Queue.Bytes))
	g(descLeader, b2f(st.Node.Draining))
	g(descReady, b2f(st.Node.Ready))
	for _, b := range st.Backends {
		g(descQueue, float64(b.Queued), b.Name)
		g(descDead, float64(b.Dead), b.Name)
		g(descOldest, b.OldestAgeSeconds, b.Name)
		g(descPaused, b2f(b.Paused || st.Paused), b.Name)
		if !st.Node.Draining {
			continue // the drain's gauges come from the node that runs it
		}
		g(descRate, b.Rate, b.Name)
		g(descMaxRate, b.MaxRate, b.Name)
		g(descConc, float64(b.Concurrency), b.Name)
		g(descInflight, float64(b.InFlight), b.Name)
		g(descCircuit, b2f(b.Circuit == "open"), b.Name)
		g(descLatency, b.LatencyMS/1000, b.Name)
		ch <- prometheus.MustNewConstMetric(descOverloads, prometheus.CounterValue, float64(b.Overloads), b.Name)
	}
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
