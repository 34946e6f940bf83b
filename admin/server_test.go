package admin

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"

	"github.com/mxq-dev/mxq/internal/teststore"
	"github.com/mxq-dev/mxq/queue/drain"
)

// memControl is control state in memory: the API's contract with the raft
// adapter is only Apply and the reads.
type memControl struct {
	mu       sync.Mutex
	applied  []Command
	paused   bool
	rates    map[string]float64
	failWith error
}

func (c *memControl) Paused(route string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.paused
}
func (c *memControl) Held(string) bool { return false }
func (c *memControl) Overrides(route string) (float64, int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.rates[route], 0
}
func (c *memControl) Apply(_ context.Context, cmd Command) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.failWith != nil {
		return c.failWith
	}
	c.applied = append(c.applied, cmd)
	switch cmd.Op {
	case "pause":
		c.paused = true
	case "resume":
		c.paused = false
	case "set_rate":
		c.rates[cmd.Route] = cmd.MaxRate
	}
	return nil
}
func (c *memControl) Role() string      { return "leader" }
func (c *memControl) Members() []Member { return nil }

type idleDrain struct{}

func (idleDrain) State() []drain.RouteState { return nil }
func (idleDrain) Kick()                     {}
func (idleDrain) Draining() bool            { return true }

func newTestServer(t *testing.T, token string) (*Server, *memControl) {
	t.Helper()
	store, _ := teststore.Start(t, nil)
	ctl := &memControl{rates: map[string]float64{}}
	s := New(Options{Node: "t", Token: token, Routes: []string{"store"},
		Ready: func(context.Context) error { return nil }}, store, ctl, idleDrain{}, nil, NewMetrics())
	return s, ctl
}

func call(t *testing.T, s *Server, method, path, token, body string) (int, string) {
	t.Helper()
	req := httptest.NewRequest(method, path, strings.NewReader(body))
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	rec := httptest.NewRecorder()
	s.ServeHTTP(rec, req)
	b, _ := io.ReadAll(rec.Result().Body)
	// Errors come as {"error": "..."}: compare the message itself.
	var e Error
	if json.Unmarshal(b, &e) == nil && e.Error != "" {
		return rec.Code, e.Error
	}
	return rec.Code, string(b)
}

// Who may read and who may change: the matrix the package comment promises.
func TestAuthorization(t *testing.T) {
	const token = "s3cret-token-0123456789"
	withToken, _ := newTestServer(t, token)
	noToken, _ := newTestServer(t, "")
	cases := []struct {
		name         string
		s            *Server
		method, path string
		token        string
		want         int
		wantBody     string
	}{
		{"probe needs nothing", withToken, "GET", "/healthz", "", 200, "ok"},
		{"metrics need nothing", withToken, "GET", "/metrics", "", 200, "mxq_node_ready"},
		{"read without token", withToken, "GET", "/api/v1/status", "", 401, "bearer token"},
		{"read with a wrong token", withToken, "GET", "/api/v1/status", "wrong", 401, "bearer token"},
		{"read with a prefix of the token", withToken, "GET", "/api/v1/status", token[:10], 401, "bearer token"},
		{"read with the token", withToken, "GET", "/api/v1/status", token, 200, `"node"`},
		{"profiler without token", withToken, "GET", "/debug/pprof/", "", 401, "bearer token"},
		{"write without token", withToken, "POST", "/api/v1/pause", "", 401, "bearer token"},
		{"write with the token", withToken, "POST", "/api/v1/pause", token, 200, ""},
		{"open read when no token is set", noToken, "GET", "/api/v1/status", "", 200, `"node"`},
		{"no writes when no token is set", noToken, "POST", "/api/v1/pause", "", 403, "no admin token is configured"},
		{"no writes even with a token when none is set", noToken, "POST", "/api/v1/pause", "anything", 403, "no admin token"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			code, body := call(t, tc.s, tc.method, tc.path, tc.token, "")
			if code != tc.want || !strings.Contains(body, tc.wantBody) {
				t.Fatalf("%s %s: %d %q, want %d containing %q", tc.method, tc.path, code, body, tc.want, tc.wantBody)
			}
		})
	}
}

// Bad requests get a 4xx that says what is wrong, and change nothing.
func TestRateRequests(t *testing.T) {
	const token = "s3cret-token-0123456789"
	s, ctl := newTestServer(t, token)
	cases := []struct {
		name, body string
		want       int
		wantBody   string
	}{
		{"not JSON", `max=5`, http.StatusBadRequest, "bad request body"},
		{"unknown field", `{"backend":"store","maximum":5}`, http.StatusBadRequest, "unknown field"},
		{"unknown backend", `{"backend":"nosuch","max":5}`, http.StatusNotFound, `no backend "nosuch"`},
		{"negative", `{"backend":"store","max":-1}`, http.StatusBadRequest, "0 <= max"},
		{"absurd", `{"backend":"store","max":1e9}`, http.StatusBadRequest, "0 <= max"},
		{"good", `{"backend":"store","max":50}`, http.StatusOK, `"done": 1`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			code, body := call(t, s, "POST", "/api/v1/rate", token, tc.body)
			if code != tc.want || !strings.Contains(body, tc.wantBody) {
				t.Fatalf("%d %q, want %d containing %q", code, body, tc.want, tc.wantBody)
			}
		})
	}
	if len(ctl.applied) != 1 || ctl.applied[0].Op != "set_rate" || ctl.applied[0].MaxRate != 50 {
		t.Fatalf("applied %+v, want one set_rate to 50", ctl.applied)
	}
	// A control plane without a leader: the caller hears it, 503.
	ctl.failWith = context.DeadlineExceeded
	if code, body := call(t, s, "POST", "/api/v1/rate", token, `{"backend":"store","max":60}`); code != http.StatusServiceUnavailable {
		t.Fatalf("with the control plane down: %d %q", code, body)
	}
}
