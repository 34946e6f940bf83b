package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spf13/cobra"

	"github.com/mxq-dev/mxq/admin"
	"github.com/mxq-dev/mxq/internal/testpki"
	"github.com/mxq-dev/mxq/internal/teststore"
	"github.com/mxq-dev/mxq/queue/drain"
	"github.com/mxq-dev/mxq/queue/envelope"
)

const (
	testAdminToken = "cli-admin-token-0123456789"
	testReadToken  = "cli-read-token-0123456789"
)

// stillControl is control state that never changes: the CLI tests are
// about what reaches the server, not what it does.
type stillControl struct{}

func (stillControl) Paused(string) bool                         { return false }
func (stillControl) Held(string) bool                           { return false }
func (stillControl) Overrides(string) (float64, int)            { return 0, 0 }
func (stillControl) Apply(context.Context, admin.Command) error { return nil }
func (stillControl) Role() string                               { return "single" }
func (stillControl) Members() []admin.Member                    { return nil }

// openCircuit is a drain whose store is down and last said a recipient's
// address.
type openCircuit struct{}

func (openCircuit) State() []drain.RouteState {
	return []drain.RouteState{{Route: "store", Circuit: "open", LastError: "550 5.1.1 <victim@example.test>: no such user"}}
}
func (openCircuit) Kick()          {}
func (openCircuit) Draining() bool { return true }

// testAPI is a real admin server on a real queue holding one message, with
// both tokens set; it returns the handler and the message's queue ID.
func testAPI(t *testing.T) (*admin.Server, string) {
	t.Helper()
	store, _ := teststore.Start(t, nil)
	env := &envelope.Envelope{ID: envelope.NewIDGen(time.Now, 7).New(), From: "alice@example.org", To: []string{"bob@example.test"}, Arrived: time.Now().UTC()}
	msg := "From: alice@example.org\r\nTo: bob@example.test\r\nSubject: quarterly numbers\r\n\r\nthe body\r\n"
	if err := store.Enqueue(context.Background(), env, strings.NewReader(msg)); err != nil {
		t.Fatal(err)
	}
	s := admin.New(admin.Options{Node: "cli-test", Token: testAdminToken, ReadToken: testReadToken, Routes: []string{"store"}},
		store, stillControl{}, openCircuit{}, nil, admin.NewMetrics())
	return s, env.ID
}

// runCLI runs the operator commands with args, as the mxq binary would,
// and returns what they printed and the error main would report. The
// environment's MXQ_* settings are cleared first; env sets some.
func runCLI(t *testing.T, env map[string]string, args ...string) (string, error) {
	t.Helper()
	for _, k := range []string{"MXQ_SERVER", "MXQ_ADMIN_TOKEN", "MXQ_ADMIN_CA"} {
		t.Setenv(k, env[k])
	}
	root := &cobra.Command{Use: "mxq", SilenceUsage: true, SilenceErrors: true}
	var out bytes.Buffer
	addOperatorCommandsTo(root, &out, strings.NewReader(""))
	root.SetArgs(args)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	err := root.ExecuteContext(ctx)
	return out.String(), err
}

// exitCode is the code main exits with for err.
func exitCode(err error) int {
	var ee *exitError
	switch {
	case err == nil:
		return 0
	case errors.As(err, &ee):
		return ee.code
	}
	return 1
}

// The read-only token is enough for every command that only looks, and a
// change with it fails with the server's reason and the CLI's hint, exit
// code 3; without a token only the status answers, without free text.
func TestCLITokens(t *testing.T) {
	api, id := testAPI(t)
	srv := httptest.NewServer(api)
	defer srv.Close()
	cases := []struct {
		name     string
		token    string
		args     []string
		wantCode int
		want     []string // in the output, or in the error when wantCode != 0
		dontWant []string
	}{
		{"status, read token", testReadToken, []string{"status"}, 0, []string{"cli-test", "1 messages", "no such user"}, []string{"without a token"}},
		{"status as JSON, read token", testReadToken, []string{"status", "--json"}, 0, []string{`"last_error": "550 5.1.1`}, []string{"redacted"}},
		{"queue ls, read token", testReadToken, []string{"queue", "ls"}, 0, []string{id, "bob@example.test"}, nil},
		{"queue ls --to, read token", testReadToken, []string{"queue", "ls", "--to", "bob@example.test"}, 0, []string{id}, nil},
		{"queue show, read token", testReadToken, []string{"queue", "show", id}, 0, []string{"Subject: quarterly numbers"}, nil},
		{"queue export, read token", testReadToken, []string{"queue", "export", id}, 0, []string{"the body"}, nil},
		{"dlq ls, read token", testReadToken, []string{"dlq", "ls"}, 0, []string{"ID", "LAST ERROR"}, []string{id}},
		{"continuity status, read token", testReadToken, []string{"continuity", "status"}, 0, []string{"continuity: disabled"}, nil},
		{"pause, read token", testReadToken, []string{"pause"}, 3,
			[]string{"read-only token (admin.read_token) cannot change anything", "HTTP 403", "--token or MXQ_ADMIN_TOKEN"}, nil},
		{"hold, read token", testReadToken, []string{"queue", "hold", id}, 3, []string{"read-only token"}, nil},
		{"delete, read token", testReadToken, []string{"queue", "delete", id, "--yes"}, 3, []string{"read-only token"}, nil},
		{"pause, admin token", testAdminToken, []string{"pause"}, 0, []string{"paused: all backends"}, nil},
		{"status, no token", "", []string{"status"}, 0,
			[]string{"1 messages", "open", admin.Hidden, "without a token: counts only"}, []string{"no such user", "victim@"}},
		{"queue ls, no token", "", []string{"queue", "ls"}, 3, []string{"HTTP 401", "admin.read_token", "MXQ_ADMIN_TOKEN"}, []string{id}},
		{"queue export, no token", "", []string{"queue", "export", id}, 3, []string{"HTTP 401"}, []string{"the body"}},
		{"status, wrong token", "wrong-token-0123456789", []string{"status"}, 3, []string{"HTTP 401", "invalid or missing bearer token"}, nil},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			out, err := runCLI(t, map[string]string{"MXQ_SERVER": srv.URL, "MXQ_ADMIN_TOKEN": tc.token}, tc.args...)
			if code := exitCode(err); code != tc.wantCode {
				t.Fatalf("exit code %d (%v), want %d; output:\n%s", code, err, tc.wantCode, out)
			}
			got := out
			if err != nil {
				got += "\n" + err.Error()
			}
			for _, w := range tc.want {
				if !strings.Contains(got, w) {
					t.Errorf("no %q in:\n%s", w, got)
				}
			}
			for _, w := range tc.dontWant {
				if strings.Contains(got, w) {
					t.Errorf("%q in:\n%s", w, got)
				}
			}
		})
	}
}

// drain watch runs on the read-only token (and on none: it needs only the
// status's numbers); it redraws until the queue is empty, here until the
// test's deadline.
func TestCLIDrainWatchReadToken(t *testing.T) {
	api, _ := testAPI(t)
	srv := httptest.NewServer(api)
	defer srv.Close()
	for _, token := range []string{testReadToken, ""} {
		t.Setenv("MXQ_SERVER", srv.URL)
		t.Setenv("MXQ_ADMIN_TOKEN", token)
		t.Setenv("MXQ_ADMIN_CA", "")
		root := &cobra.Command{Use: "mxq", SilenceUsage: true, SilenceErrors: true}
		var out bytes.Buffer
		addOperatorCommandsTo(root, &out, strings.NewReader(""))
		root.SetArgs([]string{"drain", "watch", "--interval", "50ms"})
		ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
		err := root.ExecuteContext(ctx)
		cancel()
		if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(out.String(), "1 of 1 left") || !strings.Contains(out.String(), "circuit open") {
			t.Errorf("token %q: drain watch ended with %v, output:\n%s", token, err, out.String())
		}
	}
}

// An admin API over HTTPS (admin.tls) with a certificate from a private
// CA: the CLI refuses it, and says how to trust it; with --ca or
// MXQ_ADMIN_CA it works; a --ca that is no PEM is a usage error.
func TestCLIPrivateCA(t *testing.T) {
	ca, err := testpki.NewCA("mxq test CA")
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := ca.Issue("127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	caFile := filepath.Join(dir, "ca.pem")
	if err := os.WriteFile(caFile, ca.PEM, 0o600); err != nil {
		t.Fatal(err)
	}
	notPEM := filepath.Join(dir, "not.pem")
	if err := os.WriteFile(notPEM, []byte("not a certificate\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	otherCA, err := testpki.NewCA("another CA")
	if err != nil {
		t.Fatal(err)
	}
	otherFile := filepath.Join(dir, "other.pem")
	if err := os.WriteFile(otherFile, otherCA.PEM, 0o600); err != nil {
		t.Fatal(err)
	}
	api, _ := testAPI(t)
	srv := httptest.NewUnstartedServer(api)
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{leaf.Cert}} // as admin.tls: no client certificate, the token authorizes
	srv.StartTLS()
	defer srv.Close()

	cases := []struct {
		name     string
		env      map[string]string
		args     []string
		wantCode int
		want     string
	}{
		{"no CA", nil, []string{"status"}, 1, "--ca FILE or MXQ_ADMIN_CA"},
		{"another CA", nil, []string{"status", "--ca", otherFile}, 1, "certificate signed by unknown authority"},
		{"--ca", nil, []string{"status", "--ca", caFile}, 0, "cli-test"},
		{"MXQ_ADMIN_CA", map[string]string{"MXQ_ADMIN_CA": caFile}, []string{"status"}, 0, "cli-test"},
		{"--ca, read token, show a listing", nil, []string{"queue", "ls", "--ca", caFile}, 0, "bob@example.test"},
		{"--ca not PEM", nil, []string{"status", "--ca", notPEM}, 2, "no PEM certificate"},
		{"--ca missing", nil, []string{"status", "--ca", filepath.Join(dir, "nosuch.pem")}, 2, "no such file"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			env := map[string]string{"MXQ_SERVER": srv.URL, "MXQ_ADMIN_TOKEN": testReadToken}
			for k, v := range tc.env {
				env[k] = v
			}
			out, err := runCLI(t, env, tc.args...)
			if code := exitCode(err); code != tc.wantCode {
				t.Fatalf("exit code %d (%v), want %d; output:\n%s", code, err, tc.wantCode, out)
			}
			got := out
			if err != nil {
				got += "\n" + err.Error()
			}
			if !strings.Contains(got, tc.want) {
				t.Errorf("no %q in:\n%s", tc.want, got)
			}
		})
	}
}
