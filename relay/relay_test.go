package relay_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/mxq-dev/mxq/internal/diskguard"
	"github.com/mxq-dev/mxq/internal/rcptcheck"
	"github.com/mxq-dev/mxq/internal/testbackend"
	"github.com/mxq-dev/mxq/internal/testpki"
	"github.com/mxq-dev/mxq/internal/teststore"
	"github.com/mxq-dev/mxq/internal/tlsreload"
	"github.com/mxq-dev/mxq/queue"
	"github.com/mxq-dev/mxq/queue/envelope"
	"github.com/mxq-dev/mxq/relay"
)

// testStore starts a real embedded JetStream and opens the queue on it.
func testStore(t *testing.T, maxBytes int64) (*queue.Store, *queue.Embedded) {
	return teststore.Start(t, func(o *queue.Options) {
		o.MaxBytes, o.Timeout = maxBytes, 2*time.Second
	})
}

// baseOptions are the relay's settings in these tests.
func baseOptions() relay.Options {
	return relay.Options{
		Hostname:       "mx.example.test",
		Domains:        []string{"example.test", "xn--bcher-kva.example"},
		MaxMessageSize: 1 << 20,
		MaxRecipients:  3,
		MaxLineLength:  2000,
		ReadTimeout:    5 * time.Second,
		DataTimeout:    5 * time.Second,
		WriteTimeout:   5 * time.Second,
		NewID:          envelope.NewIDGen(time.Now, 1).New,
	}
}

// startRelay serves a relay on a loopback port; opts adjust baseOptions.
func startRelay(t *testing.T, q relay.Enqueuer, opts ...func(*relay.Options)) string {
	t.Helper()
	_, addr := startRelayServer(t, q, opts...)
	return addr
}

func startRelayServer(t *testing.T, q relay.Enqueuer, opts ...func(*relay.Options)) (*relay.Server, string) {
	t.Helper()
	o := baseOptions()
	for _, f := range opts {
		f(&o)
	}
	r := relay.New(o, q)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go r.Serve(ln)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		r.Shutdown(ctx)
	})
	return r, ln.Addr().String()
}

// dialogEnv is what a dialog may need besides the relay's address.
type dialogEnv struct {
	ca *testpki.CA // set when the relay offers STARTTLS
}

// TestDialogs replays the SMTP dialogs in testdata/dialogs: what the client
// sends ("c:"), and the reply it must get ("s:" a prefix of the reply's
// last line, "s~" a line the next reply must contain, "s!" one it must
// not, "s." the server closes the connection). "c!" sends generated
// input: "big N" (N bytes of text lines), "long N" (one line of N bytes),
// "raw ..." (with \r, \n and \x00 escapes), "sleep D", "trickle N D" (N bytes
// one by one, D apart), "starttls" (a TLS handshake, verifying the
// relay's certificate against the test CA).
//
// "#!" lines set the relay up: "storage full|down", "tls" (a certificate
// from a test CA), "require_tls CIDR", "max_commands N", "max_errors N",
// "data_timeout D", "min_data_rate N", "read_timeout D", "recipient
// ADDR" (a line of a recipient list), "verify" (RCPT verification
// against a real LMTP server that knows no "nobody@"), "disk_free N"
// (free bytes the disk guard sees; its reserve is 1000).
func TestDialogs(t *testing.T) {
	files, err := filepath.Glob("testdata/dialogs/*.dlg")
	if err != nil || len(files) == 0 {
		t.Fatalf("no dialogs: %v", err)
	}
	for _, f := range files {
		t.Run(strings.TrimSuffix(filepath.Base(f), ".dlg"), func(t *testing.T) {
			t.Parallel()
			script, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			var st *queue.Store
			switch {
			case bytes.Contains(script, []byte("#! storage full")):
				st, _ = testStore(t, 1024)
			case bytes.Contains(script, []byte("#! storage down")):
				var emb *queue.Embedded
				st, emb = testStore(t, 0)
				emb.Shutdown()
			default:
				st, _ = testStore(t, 0)
			}
			env, opt := dialogSetup(t, string(script))
			runDialogEnv(t, startRelay(t, st, opt), string(script), env)
		})
	}
}

// dialogSetup reads a dialog's "#!" lines.
func dialogSetup(t *testing.T, script string) (*dialogEnv, func(*relay.Options)) {
	env := &dialogEnv{}
	var fns []func(*relay.Options)
	var recipients []string
	for _, line := range strings.Split(script, "\n") {
		f := strings.Fields(strings.TrimPrefix(line, "#!"))
		if !strings.HasPrefix(line, "#! ") || len(f) == 0 {
			continue
		}
		// The argument is the rest of the line (a quoted address has spaces).
		arg := strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(strings.TrimPrefix(line, "#!")), f[0]))
		num := func() int {
			n, err := strconv.Atoi(arg)
			if err != nil {
				t.Fatalf("%q: %v", line, err)
			}
			return n
		}
		dur := func() time.Duration {
			d, err := time.ParseDuration(arg)
			if err != nil {
				t.Fatalf("%q: %v", line, err)
			}
			return d
		}
		switch f[0] {
		case "storage":
		case "tls":
			var err error
			if env.ca, err = testpki.NewCA("mxq test CA"); err != nil {
				t.Fatal(err)
			}
			leaf, err := env.ca.Issue("mx.example.test")
			if err != nil {
				t.Fatal(err)
			}
			cf, kf, _, err := leaf.Write(t.TempDir(), env.ca)
			if err != nil {
				t.Fatal(err)
			}
			rl, err := tlsreload.New(cf, kf, nil)
			if err != nil {
				t.Fatal(err)
			}
			fns = append(fns, func(o *relay.Options) { o.TLS = rl.Config() })
		case "require_tls":
			p := netip.MustParsePrefix(arg)
			fns = append(fns, func(o *relay.Options) { o.RequireTLS = append(o.RequireTLS, p) })
		case "max_commands":
			n := num()
			fns = append(fns, func(o *relay.Options) { o.MaxCommands = n })
		case "max_errors":
			n := num()
			fns = append(fns, func(o *relay.Options) { o.MaxErrors = n })
		case "data_timeout":
			d := dur()
			fns = append(fns, func(o *relay.Options) { o.DataTimeout = d })
		case "read_timeout":
			d := dur()
			fns = append(fns, func(o *relay.Options) { o.ReadTimeout = d })
		case "min_data_rate":
			n := num()
			fns = append(fns, func(o *relay.Options) { o.MinDataRate = int64(n) })
		case "recipient":
			recipients = append(recipients, arg)
		case "verify":
			be := startKnowingStore(t)
			v := rcptcheck.NewVerifier(rcptcheck.VerifierOptions{
				Backend: func(string) (rcptcheck.Backend, bool) {
					return rcptcheck.Backend{Protocol: "lmtp", Address: be.Addr()}, true
				},
				Timeout: 2 * time.Second,
			})
			fns = append(fns, func(o *relay.Options) { o.Recipients = &rcptcheck.Checker{Verifier: v} })
		case "disk_free":
			free := uint64(num())
			g := diskguard.New(t.TempDir(), 1000, nil)
			g.Statfs = func(string) (uint64, uint64, error) { return free, 1 << 30, nil }
			fns = append(fns, func(o *relay.Options) { o.Space = g })
		default:
			t.Fatalf("unknown setup %q", line)
		}
	}
	if recipients != nil {
		path := filepath.Join(t.TempDir(), "recipients")
		if err := os.WriteFile(path, []byte(strings.Join(recipients, "\n")), 0o644); err != nil {
			t.Fatal(err)
		}
		l, err := rcptcheck.LoadList(path, nil)
		if err != nil {
			t.Fatal(err)
		}
		fns = append(fns, func(o *relay.Options) { o.Recipients = &rcptcheck.Checker{List: l} })
	}
	return env, func(o *relay.Options) {
		for _, f := range fns {
			f(o)
		}
	}
}

// startKnowingStore is a real LMTP server that refuses "nobody@" as an
// unknown user.
func startKnowingStore(t *testing.T) *testbackend.Server {
	t.Helper()
	be, err := testbackend.Start("127.0.0.1:0", testbackend.Options{RcptReply: func(rcpt string) *smtp.SMTPError {
		if strings.HasPrefix(rcpt, "nobody@") {
			return &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "User doesn't exist"}
		}
		return nil
	}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(be.Close)
	return be
}

func runDialog(t *testing.T, addr, script string) { runDialogEnv(t, addr, script, &dialogEnv{}) }

func runDialogEnv(t *testing.T, addr, script string, env *dialogEnv) {
	raw, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	var conn net.Conn = raw
	defer func() { conn.Close() }()
	conn.SetDeadline(time.Now().Add(20 * time.Second))
	rd := bufio.NewReader(conn)
	var contains, lacks []string
	for n, line := range strings.Split(script, "\n") {
		where := fmt.Sprintf("line %d %q", n+1, line)
		switch {
		case line == "" || strings.HasPrefix(line, "#"):
		case strings.HasPrefix(line, "c:"):
			fmt.Fprintf(conn, "%s\r\n", strings.TrimPrefix(strings.TrimPrefix(line, "c:"), " "))
		case strings.HasPrefix(line, "c! "):
			f := strings.SplitN(line[3:], " ", 2)
			switch f[0] {
			case "big":
				size, _ := strconv.Atoi(f[1])
				l := strings.Repeat("0123456789", 7) + "\r\n"
				for sent := 0; sent < size; sent += len(l) {
					io.WriteString(conn, l)
				}
			case "long":
				size, _ := strconv.Atoi(f[1])
				io.WriteString(conn, strings.Repeat("x", size)+"\r\n")
			case "raw":
				io.WriteString(conn, strings.NewReplacer(`\r`, "\r", `\n`, "\n", `\x00`, "\x00").Replace(f[1]))
			case "sleep":
				d, _ := time.ParseDuration(f[1])
				time.Sleep(d)
			case "trickle":
				a := strings.Fields(f[1])
				count, _ := strconv.Atoi(a[0])
				d, _ := time.ParseDuration(a[1])
				for i := 0; i < count; i++ {
					if _, err := io.WriteString(conn, "x"); err != nil {
						break // the server gave up on us: what the dialog checks next
					}
					time.Sleep(d)
				}
			case "starttls":
				if env.ca == nil {
					t.Fatalf("%s: the relay has no TLS (#! tls)", where)
				}
				tc := tls.Client(raw, &tls.Config{RootCAs: env.ca.Pool, ServerName: "mx.example.test"})
				if err := tc.Handshake(); err != nil {
					t.Fatalf("%s: %v", where, err)
				}
				conn, rd = tc, bufio.NewReader(tc)
			default:
				t.Fatalf("%s: unknown generator", where)
			}
		case strings.HasPrefix(line, "s~ "):
			contains = append(contains, line[3:])
		case strings.HasPrefix(line, "s! "):
			lacks = append(lacks, line[3:])
		case line == "s.":
			if reply, err := readReply(rd); err == nil {
				t.Fatalf("%s: connection still open, got %q", where, strings.Join(reply, " | "))
			}
		case strings.HasPrefix(line, "s: "):
			want := line[3:]
			reply, err := readReply(rd)
			if err != nil {
				t.Fatalf("%s: reading reply: %v (got %q)", where, err, reply)
			}
			last := reply[len(reply)-1]
			if !strings.HasPrefix(last, want) {
				t.Fatalf("%s: got %q", where, strings.Join(reply, " | "))
			}
			for _, c := range contains {
				found := false
				for _, l := range reply {
					found = found || strings.HasPrefix(l, c)
				}
				if !found {
					t.Fatalf("%s: reply %q lacks %q", where, strings.Join(reply, " | "), c)
				}
			}
			for _, c := range lacks {
				for _, l := range reply {
					if strings.HasPrefix(l, c) {
						t.Fatalf("%s: reply %q has %q", where, strings.Join(reply, " | "), c)
					}
				}
			}
			contains, lacks = nil, nil
		default:
			t.Fatalf("%s: cannot parse", where)
		}
	}
}

// readReply reads one SMTP reply, all its lines.
func readReply(rd *bufio.Reader) ([]string, error) {
	var lines []string
	for {
		l, err := rd.ReadString('\n')
		if err != nil {
			return lines, err
		}
		l = strings.TrimRight(l, "\r\n")
		lines = append(lines, l)
		if len(l) < 4 || l[3] != '-' {
			return lines, nil
		}
	}
}

// TestQueuedRecord checks what a 250 leaves in the queue: the envelope, and
// the message byte for byte behind a Received header with the queue ID.
func TestQueuedRecord(t *testing.T) {
	st, _ := testStore(t, 0)
	addr := startRelay(t, st)
	body := "From: alice@example.org\r\nSubject: hi\r\n\r\n.leading dot\r\nline\r\n"
	script := strings.Join([]string{
		"s: 220", "c: EHLO client.example.org", "s: 250",
		"c: MAIL FROM:<alice@example.org>", "s: 250",
		"c: RCPT TO:<Bob@Example.TEST>", "s: 250",
		"c: RCPT TO:<bob@example.test>", "s: 250", // the same mailbox twice
		"c: RCPT TO:<carol@example.test>", "s: 250",
		"c: DATA", "s: 354",
		`c! raw From: alice@example.org\r\nSubject: hi\r\n\r\n..leading dot\r\nline\r\n.\r\n`,
		"s: 250 2.0.0 Ok: queued as", "c: QUIT", "s: 221",
	}, "\n")
	runDialog(t, addr, script)

	recs, _, err := st.ReadFrom(context.Background(), st.QueueSubject("store"), 1, 10, 0)
	if err != nil || len(recs) != 1 {
		t.Fatalf("records: %v, %v", recs, err)
	}
	r := recs[0]
	if r.Err != nil {
		t.Fatal(r.Err)
	}
	env := r.Env
	if env.From != "alice@example.org" || strings.Join(env.To, ",") != "Bob@example.test,carol@example.test" {
		t.Fatalf("envelope from %q to %q", env.From, env.To)
	}
	if env.ClientAddr != "127.0.0.1" || env.Helo != "client.example.org" || !envelope.ValidID(env.ID) {
		t.Fatalf("envelope %+v", env)
	}
	got := string(r.Data)
	hdrEnd := strings.Index(got, "\r\nFrom: ")
	if hdrEnd < 0 {
		t.Fatalf("stored message %q", got)
	}
	received, rest := got[:hdrEnd+2], got[hdrEnd+2:]
	if rest != body {
		t.Fatalf("stored body %q, sent %q", rest, body)
	}
	if !strings.HasPrefix(received, "Received: from client.example.org ([127.0.0.1])\r\n\tby mx.example.test (mxq) with ESMTP id "+env.ID+";\r\n\t") {
		t.Fatalf("Received header %q", received)
	}
	if int(env.Size) != len(got) {
		t.Fatalf("Size %d, stored %d", env.Size, len(got))
	}
}

// An idle client is told 421 4.4.2 and disconnected after the read timeout.
func TestIdleTimeout(t *testing.T) {
	st, _ := testStore(t, 0)
	ids := envelope.NewIDGen(time.Now, 1)
	r := relay.New(relay.Options{
		Hostname: "mx.example.test", Domains: []string{"example.test"},
		MaxMessageSize: 1 << 20, MaxRecipients: 3, MaxLineLength: 2000,
		ReadTimeout: 300 * time.Millisecond, DataTimeout: 300 * time.Millisecond, WriteTimeout: time.Second,
		NewID: ids.New,
	}, st)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go r.Serve(ln)
	defer r.Shutdown(context.Background())
	cases := []struct{ name, script string }{
		{"idle", "s: 220\nc: EHLO c.example.org\ns: 250\ns: 421 4.4.2"},
		// Silence in the middle of DATA: the message is refused, not stored.
		{"data", "s: 220\nc: EHLO c.example.org\ns: 250\nc: MAIL FROM:<a@example.org>\ns: 250\nc: RCPT TO:<b@example.test>\ns: 250\nc: DATA\ns: 354\nc: Subject: half\ns: 451 4.4.2"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) { runDialog(t, ln.Addr().String(), tc.script) })
	}
	recs, _, err := st.ReadFrom(context.Background(), st.QueueSubject("store"), 1, 10, 0)
	if err != nil || len(recs) != 0 {
		t.Fatalf("queue holds %d records after timeouts (%v)", len(recs), err)
	}
}
