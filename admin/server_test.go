package admin

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mxq-dev/mxq/internal/teststore"
	"github.com/mxq-dev/mxq/queue"
	"github.com/mxq-dev/mxq/queue/drain"
	"github.com/mxq-dev/mxq/queue/envelope"
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

// testDrain is a drain that runs here, in the state given.
type testDrain struct{ states []drain.RouteState }

func (d testDrain) State() []drain.RouteState { return d.states }
func (testDrain) Kick()                       {}
func (testDrain) Draining() bool              { return true }

// storeDown is what the test drain says the store last answered: a reply
// that names a recipient, as stores' replies do.
const storeDown = "550 5.1.1 <victim@example.test>: mailbox unavailable"

// newTestServer is a server on a real queue, its log in logs (JSON lines).
func newTestServer(t *testing.T, o Options) (*Server, *memControl, *bytes.Buffer) {
	t.Helper()
	store, _ := teststore.Start(t, nil)
	ctl := &memControl{rates: map[string]float64{}}
	logs := &bytes.Buffer{}
	o.Node, o.Routes = "t", []string{"store"}
	o.Ready = func(context.Context) error { return nil }
	o.Logger = slog.New(slog.NewJSONHandler(logs, nil))
	d := testDrain{[]drain.RouteState{{Route: "store", Circuit: "open", LastError: storeDown}}}
	return New(o, store, ctl, d, nil, NewMetrics()), ctl, logs
}

// enqueue stores a small message for bob@example.test and returns its
// queue ID.
func enqueue(t *testing.T, s *Server, ids *envelope.IDGen, subject string) string {
	t.Helper()
	env := &envelope.Envelope{ID: ids.New(), From: "alice@example.org", To: []string{"bob@example.test"}, Arrived: time.Now().UTC()}
	msg := "From: alice@example.org\r\nTo: bob@example.test\r\nSubject: " + subject + "\r\n\r\nthe body\r\n"
	if err := s.store.Enqueue(context.Background(), env, strings.NewReader(msg)); err != nil {
		t.Fatal(err)
	}
	return env.ID
}

// request is one call to the API; call and callReq make it.
type request struct {
	method, path, token, body string
	header                    map[string]string
}

func callReq(t *testing.T, s *Server, rq request) (int, string, http.Header) {
	t.Helper()
	req := httptest.NewRequest(rq.method, rq.path, strings.NewReader(rq.body))
	if rq.token != "" {
		req.Header.Set("Authorization", "Bearer "+rq.token)
	}
	for k, v := range rq.header {
		req.Header.Set(k, v)
	}
	rec := httptest.NewRecorder()
	s.ServeHTTP(rec, req)
	b, _ := io.ReadAll(rec.Result().Body)
	// Errors come as {"error": "..."}: compare the message itself.
	var e Error
	if json.Unmarshal(b, &e) == nil && e.Error != "" {
		return rec.Code, e.Error, rec.Result().Header
	}
	return rec.Code, string(b), rec.Result().Header
}

func call(t *testing.T, s *Server, method, path, token, body string) (int, string) {
	t.Helper()
	code, body, _ := callReq(t, s, request{method: method, path: path, token: token, body: body})
	return code, body
}

// Who may do what: every endpoint, on a node with no token, with the admin
// token only, with both tokens, and with the read-only token only, called
// without a token, with a wrong one, with the read-only one and with the
// admin one. The package comment's three levels.
func TestAuthorization(t *testing.T) {
	const (
		adminTok = "admin-token-0123456789"
		readTok  = "read-token-0123456789"
		wrongTok = "wrong-token-0123456789"
	)
	type level int
	const (
		open level = iota
		status
		read
		write
	)
	ids := envelope.NewIDGen(time.Now, 1)
	// The endpoints, with a message queued and a dead letter on every
	// node, so that an authorized call answers 200.
	type endpoint struct {
		level        level
		method, path string
		body         string
	}
	endpoints := func(queued, dead string) []endpoint {
		sel := `{"ids":["` + queued + `"],"dry_run":true}`
		return []endpoint{
			{open, "GET", "/healthz", ""},
			{open, "GET", "/readyz", ""},
			{open, "GET", "/metrics", ""},
			{status, "GET", "/api/v1/status", ""},
			{read, "GET", "/api/v1/queue", ""},
			{read, "GET", "/api/v1/queue?to=bob@example.test", ""},
			{read, "GET", "/api/v1/dlq", ""},
			{read, "GET", "/api/v1/queue/" + queued, ""},
			{read, "GET", "/api/v1/queue/" + queued + "/raw", ""},
			{read, "GET", "/api/v1/dlq/" + dead, ""},
			{read, "GET", "/api/v1/dlq/" + dead + "/raw", ""},
			{read, "GET", "/api/v1/continuity", ""},
			{read, "GET", "/debug/pprof/", ""},
			{read, "GET", "/debug/pprof/heap", ""},
			{read, "GET", "/debug/pprof/goroutine", ""},
			{read, "GET", "/debug/pprof/allocs", ""},
			{read, "GET", "/debug/pprof/threadcreate", ""},
			{read, "GET", "/debug/pprof/profile?seconds=1", ""},
			{write, "POST", "/api/v1/pause", `{}`},
			{write, "POST", "/api/v1/resume", `{}`},
			{write, "POST", "/api/v1/rate", `{"backend":"store","max":50}`},
			{write, "POST", "/api/v1/rate/reset", `{"backend":"store"}`},
			{write, "POST", "/api/v1/queue/hold", sel},
			{write, "POST", "/api/v1/queue/release", sel},
			{write, "POST", "/api/v1/queue/delete", sel},
			{write, "POST", "/api/v1/queue/requeue", sel},
			{write, "POST", "/api/v1/queue/bounce", sel},
			{write, "POST", "/api/v1/dlq/requeue", `{"ids":["` + dead + `"],"dry_run":true}`},
			{write, "POST", "/api/v1/dlq/purge", `{"ids":["` + dead + `"],"dry_run":true}`},
		}
	}
	// What each level answers: the code, and for a refusal a part of the
	// message that names the key to set. full is the whole status,
	// redacted the one without free text.
	type answer struct {
		code int
		want string
	}
	var (
		ok       = answer{200, ""}
		redacted = answer{200, `"redacted": true`}
		full     = answer{200, storeDown}
		// No token on the node: reads name both keys.
		noTokens = answer{401, "set admin.read_token (or admin.read_token_file) for read-only access, admin.token (or admin.token_file)"}
		badToken = answer{401, "needs the node's admin.token or admin.read_token"}
		badAdmin = answer{401, "changes need the node's admin.token"}
		noAdmin  = answer{403, "no admin token is configured (admin.token or admin.token_file)"}
		readOnly = answer{403, "read-only token (admin.read_token) cannot change anything: use the admin token (admin.token)"}
	)
	cases := []struct {
		name                    string
		token, readToken, given string
		open, status, read, wr  answer
	}{
		{"no token set, none given", "", "", "", ok, redacted, noTokens, noAdmin},
		{"no token set, one given", "", "", wrongTok, ok, noTokens, noTokens, noAdmin},
		{"admin token set, none given", adminTok, "", "", ok, redacted, badToken, badAdmin},
		{"admin token set, a wrong one given", adminTok, "", wrongTok, ok, badToken, badToken, badAdmin},
		{"admin token set, a prefix of it given", adminTok, "", adminTok[:10], ok, badToken, badToken, badAdmin},
		{"admin token set and given", adminTok, "", adminTok, ok, full, ok, ok},
		{"both set, none given", adminTok, readTok, "", ok, redacted, badToken, badAdmin},
		{"both set, a wrong one given", adminTok, readTok, wrongTok, ok, badToken, badToken, badAdmin},
		{"both set, the read token given", adminTok, readTok, readTok, ok, full, ok, readOnly},
		{"both set, the admin token given", adminTok, readTok, adminTok, ok, full, ok, ok},
		{"read token set, none given", "", readTok, "", ok, redacted, badToken, noAdmin},
		{"read token set and given", "", readTok, readTok, ok, full, ok, noAdmin},
		{"read token set, a wrong one given", "", readTok, wrongTok, ok, badToken, badToken, noAdmin},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			s, _, _ := newTestServer(t, Options{Token: tc.token, ReadToken: tc.readToken})
			queued := enqueue(t, s, ids, "stays queued")
			dead := enqueue(t, s, ids, "bounced")
			if _, err := s.run(context.Background(), queue.Queued, "bounce", queue.Filter{IDs: []string{dead}}, Selection{}, "test"); err != nil {
				t.Fatal(err)
			}
			for _, ep := range endpoints(queued, dead) {
				want := map[level]answer{open: tc.open, status: tc.status, read: tc.read, write: tc.wr}[ep.level]
				if strings.HasPrefix(ep.path, "/debug/pprof/profile") && want.code == 200 {
					continue // a CPU profile takes a second: checked where it is refused
				}
				code, body, hdr := callReq(t, s, request{method: ep.method, path: ep.path, token: tc.given, body: ep.body})
				if code != want.code || !strings.Contains(body, want.want) {
					t.Errorf("%s %s: %d %.200q, want %d containing %q", ep.method, ep.path, code, body, want.code, want.want)
				}
				if code == http.StatusUnauthorized && hdr.Get("WWW-Authenticate") == "" {
					t.Errorf("%s %s: 401 without WWW-Authenticate", ep.method, ep.path)
				}
			}
		})
	}
}

// Without a token the status has its numbers but no free text from mail:
// the store's last reply names a recipient and is hidden; with a token it
// is there. Every string field of the status is accounted for, so that a
// field added later gets a decision.
func TestStatusWithoutTokenIsContentFree(t *testing.T) {
	const token = "admin-token-0123456789"
	s, _, _ := newTestServer(t, Options{Token: token})
	enqueue(t, s, envelope.NewIDGen(time.Now, 2), "Secret merger plans")

	code, anon := call(t, s, "GET", "/api/v1/status", "", "")
	var st Status
	if code != 200 || json.Unmarshal([]byte(anon), &st) != nil {
		t.Fatalf("status without a token: %d %s", code, anon)
	}
	if !st.Redacted || st.Queue.Messages != 1 || len(st.Backends) != 1 || st.Backends[0].Circuit != "open" || st.Backends[0].Queued != 1 {
		t.Errorf("status without a token lost its numbers or its mark: %+v", st)
	}
	if st.Backends[0].LastError != Hidden {
		t.Errorf("last error %q, want %q", st.Backends[0].LastError, Hidden)
	}
	for _, secret := range []string{"victim@example.test", "550 5.1.1", "alice@example.org", "bob@example.test", "Secret merger"} {
		if strings.Contains(anon, secret) {
			t.Errorf("status without a token shows %q:\n%s", secret, anon)
		}
	}
	if _, full := call(t, s, "GET", "/api/v1/status", token, ""); !strings.Contains(full, storeDown) || strings.Contains(full, "redacted") {
		t.Errorf("status with the token lacks the last error or is marked redacted:\n%s", full)
	}

	// Every string in the status, by the path of its field: what Redact
	// keeps, and why (see Redact's comment).
	kept := map[string]bool{
		"Status.Node.Name": true, "Status.Node.Role": true, "Status.Node.ReadyError": true,
		"Status.Members.ID": true, "Status.Members.Addr": true,
		"Status.Backends.Name": true, "Status.Backends.Circuit": true, "Status.Backends.Phase": true, "Status.Backends.Bottleneck": true,
	}
	hidden := map[string]bool{"Status.Backends.LastError": true}
	var walk func(path string, typ reflect.Type)
	walk = func(path string, typ reflect.Type) {
		switch typ.Kind() {
		case reflect.Struct:
			if typ == reflect.TypeOf(time.Time{}) {
				return
			}
			for i := range typ.NumField() {
				walk(path+"."+typ.Field(i).Name, typ.Field(i).Type)
			}
		case reflect.Slice, reflect.Pointer, reflect.Array, reflect.Map:
			walk(path, typ.Elem())
		case reflect.String:
			if !kept[path] && !hidden[path] {
				t.Errorf("%s is free text in the status: decide whether Redact hides it", path)
			}
		}
	}
	walk("Status", reflect.TypeOf(Status{}))
}

// Each read of a message's content is logged with who, from where, with
// which token, and which message; a listing with its filter and how many
// it returned; a profile with its path.
func TestContentReadsAreAudited(t *testing.T) {
	const (
		adminTok = "admin-token-0123456789"
		readTok  = "read-token-0123456789"
	)
	s, _, logs := newTestServer(t, Options{Token: adminTok, ReadToken: readTok})
	id := enqueue(t, s, envelope.NewIDGen(time.Now, 3), "audited")
	op := map[string]string{"X-Mxq-Operator": "carol@desk"}
	cases := []struct {
		name  string
		rq    request
		want  map[string]any // fields of the log line
		wantN int            // the line's "items", -1 for none
	}{
		{"show with the read token", request{method: "GET", path: "/api/v1/queue/" + id, token: readTok, header: op},
			map[string]any{"msg": "admin: show", "id": id, "token": "read", "kind": "queue", "by": "carol@desk from 192.0.2.1:1234"}, -1},
		{"export with the admin token", request{method: "GET", path: "/api/v1/queue/" + id + "/raw", token: adminTok, header: op},
			map[string]any{"msg": "admin: export", "id": id, "token": "admin", "kind": "queue", "by": "carol@desk from 192.0.2.1:1234"}, -1},
		{"show without an operator name", request{method: "GET", path: "/api/v1/queue/" + id, token: readTok},
			map[string]any{"msg": "admin: show", "id": id, "token": "read", "by": "unknown from 192.0.2.1:1234"}, -1},
		{"list with a filter", request{method: "GET", path: "/api/v1/queue?to=bob@example.test&older_than=1h", token: readTok, header: op},
			map[string]any{"msg": "admin: list", "kind": "queue", "filter": "to=bob@example.test older_than=1h", "token": "read"}, 0},
		{"list everything", request{method: "GET", path: "/api/v1/queue", token: readTok, header: op},
			map[string]any{"msg": "admin: list", "kind": "queue", "filter": "all", "token": "read"}, 1},
		{"list the dead letters", request{method: "GET", path: "/api/v1/dlq", token: adminTok, header: op},
			map[string]any{"msg": "admin: list", "kind": "dead letters", "filter": "all", "token": "admin"}, 0},
		{"heap profile", request{method: "GET", path: "/debug/pprof/heap", token: readTok, header: op},
			map[string]any{"msg": "admin: profile", "path": "/debug/pprof/heap", "token": "read"}, -1},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			logs.Reset()
			if code, body, _ := callReq(t, s, tc.rq); code != 200 {
				t.Fatalf("%d %.200s", code, body)
			}
			var lines []map[string]any
			for _, l := range strings.Split(strings.TrimSpace(logs.String()), "\n") {
				var m map[string]any
				if err := json.Unmarshal([]byte(l), &m); err == nil && strings.HasPrefix(fmt.Sprint(m["msg"]), "admin: ") {
					lines = append(lines, m)
				}
			}
			if len(lines) != 1 {
				t.Fatalf("%d audit lines, want 1:\n%s", len(lines), logs)
			}
			got := lines[0]
			if got["level"] != "INFO" {
				t.Errorf("level %v, want INFO", got["level"])
			}
			for k, v := range tc.want {
				if got[k] != v {
					t.Errorf("%s = %v, want %v (line %v)", k, got[k], v, got)
				}
			}
			if tc.wantN >= 0 && got["items"] != float64(tc.wantN) {
				t.Errorf("items = %v, want %d", got["items"], tc.wantN)
			}
		})
	}
	// A refused call reads nothing and is no audit line of a read; it is
	// a warning.
	logs.Reset()
	if code, _ := call(t, s, "GET", "/api/v1/queue/"+id+"/raw", "wrong-token-0123456789", ""); code != 401 {
		t.Fatalf("raw with a wrong token: %d", code)
	}
	if strings.Contains(logs.String(), "admin: export") || !strings.Contains(logs.String(), "refused") {
		t.Errorf("a refused export logged:\n%s", logs)
	}
}

// Bad requests get a 4xx that says what is wrong, and change nothing.
func TestRateRequests(t *testing.T) {
	const token = "s3cret-token-0123456789"
	s, ctl, _ := newTestServer(t, Options{Token: token})
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
