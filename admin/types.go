package admin

import (
	"strconv"
	"strings"
	"time"
)

// The JSON documents of the admin API, shared by the server and the
// client the CLI uses.

// Status is GET /api/v1/status.
type Status struct {
	Time     time.Time       `json:"time"`
	Node     NodeStatus      `json:"node"`
	Members  []Member        `json:"members,omitempty"`
	Paused   bool            `json:"paused"`
	Queue    QueueStatus     `json:"queue"`
	Backends []BackendStatus `json:"backends"`
	// ETASeconds is the time to drain the queue at the current delivery
	// rate; -1 when nothing is being delivered.
	ETASeconds float64 `json:"eta_seconds"`
	// Redacted says the free text was left out (Redact): the caller had
	// no token.
	Redacted bool `json:"redacted,omitempty"`
}

// Hidden stands in for text a caller without a token may not read.
const Hidden = "hidden: needs a token (admin.read_token or admin.token)"

// Redact makes the status fit for a caller without a token: it keeps what
// a dashboard or an alert needs and nothing that can carry an address or a
// message's content. Field by field:
//
//   - Time, Paused, ETASeconds, Queue: numbers and flags;
//   - Node: its name and role are configuration; ReadyError is the node's
//     health (the queue storage does not answer, no leader), the same text
//     the open /readyz gives, and kept;
//   - Members: node IDs and cluster addresses, configuration;
//   - Backends: names (configuration), circuit, phase and bottleneck (fixed
//     words), rates and counters; but LastError is what the store last
//     said, and a store's reply names recipients ("550 5.1.1
//     <bob@example.com>: no such user"): replaced by Hidden.
//
// A field added to Status must be added to this list.
func (st *Status) Redact() {
	st.Redacted = true
	for i := range st.Backends {
		if st.Backends[i].LastError != "" {
			st.Backends[i].LastError = Hidden
		}
	}
}

// NodeStatus is the node answering.
type NodeStatus struct {
	Name       string `json:"name"`
	Role       string `json:"role"` // leader, follower, candidate, single
	Ready      bool   `json:"ready"`
	ReadyError string `json:"ready_error,omitempty"`
	Draining   bool   `json:"draining"` // runs the cluster's drain
}

// Member is a node of the cluster.
type Member struct {
	ID     string `json:"id"`
	Addr   string `json:"addr"`
	Leader bool   `json:"leader"`
	Voter  bool   `json:"voter"`
}

// QueueStatus sums up the queue.
type QueueStatus struct {
	Messages            uint64  `json:"messages"` // queued records
	Bytes               uint64  `json:"bytes"`    // the whole stream, chunks included
	Dead                uint64  `json:"dead_letters"`
	OldestAgeSeconds    float64 `json:"oldest_age_seconds"`
	DeliveriesPerSecond float64 `json:"deliveries_per_second"` // over the last minute
}

// BackendStatus is one backend (route) of the drain.
type BackendStatus struct {
	Name             string  `json:"name"`
	Circuit          string  `json:"circuit"` // closed, open; "" when this node does not drain
	Paused           bool    `json:"paused"`
	Phase            string  `json:"phase,omitempty"`
	Rate             float64 `json:"rate"` // allowed now
	MaxRate          float64 `json:"max_rate"`
	Concurrency      int     `json:"concurrency"`
	MaxConcurrency   int     `json:"max_concurrency"`
	InFlight         int     `json:"in_flight"`
	LatencyMS        float64 `json:"latency_ms"`
	BaselineMS       float64 `json:"baseline_ms"`
	Queued           uint64  `json:"queued"`
	Dead             uint64  `json:"dead_letters"`
	OldestAgeSeconds float64 `json:"oldest_age_seconds"`
	Delivered        uint64  `json:"delivered"`
	Deferrals        uint64  `json:"deferrals"`
	Bounces          uint64  `json:"bounces"`
	Unreachable      uint64  `json:"unreachable"`
	Overloads        uint64  `json:"overloads"`
	LastError        string  `json:"last_error,omitempty"`
	// Bottleneck is what limits the drain below its allowed rate:
	// "store", "mxq" (this process: CPU, reading the queue), or empty.
	Bottleneck string `json:"bottleneck,omitempty"`
}

// Item is a queued record in a listing.
type Item struct {
	ID          string    `json:"id"`
	Part        int       `json:"part,omitempty"`
	Seq         uint64    `json:"seq"`
	Backend     string    `json:"backend"`
	From        string    `json:"from"`
	To          []string  `json:"to"`
	Size        int64     `json:"size"`
	Arrived     time.Time `json:"arrived"`
	Attempts    int       `json:"attempts"`
	NextAttempt time.Time `json:"next_attempt,omitempty"`
	Errors      []string  `json:"errors,omitempty"`
	Held        bool      `json:"held"`
	Dead        bool      `json:"dead"`
	Kind        string    `json:"kind,omitempty"` // "dsn" for reports mxq wrote
	Damaged     string    `json:"damaged,omitempty"`
}

// List is GET /api/v1/queue and /api/v1/dlq.
type List struct {
	Items []Item `json:"items"`
	// Next is the cursor for the following page; 0 when the listing is
	// complete.
	Next    uint64 `json:"next"`
	Scanned int    `json:"scanned"`
}

// Message is GET /api/v1/queue/{id}: every record of a queue ID and the
// message's header.
type Message struct {
	ID      string      `json:"id"`
	Records []Item      `json:"records"`
	Headers [][2]string `json:"headers"`
	Held    bool        `json:"held"`
}

// Filter selects messages; empty fields match everything.
type Filter struct {
	From      string `json:"from,omitempty"`
	To        string `json:"to,omitempty"`
	Domain    string `json:"domain,omitempty"`
	Backend   string `json:"backend,omitempty"`
	OlderThan string `json:"older_than,omitempty"` // a Go duration: 2h, 30m
	Held      *bool  `json:"held,omitempty"`
}

// String is the filter for the audit log: the fields set, as key=value;
// "all" when none is.
func (f *Filter) String() string {
	var parts []string
	for _, kv := range [][2]string{{"from", f.From}, {"to", f.To}, {"domain", f.Domain}, {"backend", f.Backend}, {"older_than", f.OlderThan}} {
		if kv[1] != "" {
			parts = append(parts, kv[0]+"="+kv[1])
		}
	}
	if f.Held != nil {
		parts = append(parts, "held="+strconv.FormatBool(*f.Held))
	}
	if len(parts) == 0 {
		return "all"
	}
	return strings.Join(parts, " ")
}

// Selection is the body of a bulk action: IDs, or a filter (All must be
// set for an empty filter, so that "everything" is never an accident).
type Selection struct {
	IDs    []string `json:"ids,omitempty"`
	Filter *Filter  `json:"filter,omitempty"`
	All    bool     `json:"all,omitempty"`
	Reason string   `json:"reason,omitempty"`
	// DryRun counts what would be selected and does nothing.
	DryRun bool `json:"dry_run,omitempty"`
}

// Result is what a bulk action did.
type Result struct {
	Matched int      `json:"matched"`
	Done    int      `json:"done"`
	Errors  []string `json:"errors,omitempty"`
}

// RateRequest is POST /api/v1/rate.
type RateRequest struct {
	Backend     string  `json:"backend"`
	Max         float64 `json:"max"`
	Concurrency int     `json:"concurrency"`
}

// PauseRequest is POST /api/v1/pause and /resume.
type PauseRequest struct {
	Backend string `json:"backend,omitempty"`
}

// Error is the body of every error reply.
type Error struct {
	Error string `json:"error"`
}
