package relay_test

import (
	"bufio"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pires/go-proxyproto"

	"github.com/mxq-dev/mxq/internal/testpki"
	"github.com/mxq-dev/mxq/internal/tlsreload"
	"github.com/mxq-dev/mxq/queue"
	"github.com/mxq-dev/mxq/relay"
)

// smtpConn is a raw client connection.
type smtpConn struct {
	t  *testing.T
	c  net.Conn
	rd *bufio.Reader
}

func dialRaw(t *testing.T, addr string) *smtpConn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(20 * time.Second))
	return &smtpConn{t: t, c: c, rd: bufio.NewReader(c)}
}

// expect reads a reply and checks the start of its last line.
func (s *smtpConn) expect(prefix string) string {
	s.t.Helper()
	reply, err := readReply(s.rd)
	if err != nil {
		s.t.Fatalf("waiting for %q: %v (%q)", prefix, err, reply)
	}
	last := reply[len(reply)-1]
	if !strings.HasPrefix(last, prefix) {
		s.t.Fatalf("want %q, got %q", prefix, strings.Join(reply, " | "))
	}
	return last
}

func (s *smtpConn) send(line string) { fmt.Fprintf(s.c, "%s\r\n", line) }

// sendMessage runs one transaction and returns the 250's text.
func (s *smtpConn) sendMessage(rcpt string) string {
	s.t.Helper()
	s.send("EHLO client.example.org")
	s.expect("250")
	s.send("MAIL FROM:<alice@example.org>")
	s.expect("250")
	s.send("RCPT TO:<" + rcpt + ">")
	s.expect("250")
	s.send("DATA")
	s.expect("354")
	s.send("Subject: edge\r\n\r\nbody\r\n.")
	return s.expect("250 2.0.0 Ok: queued as ")
}

// storedClients returns the client address of every queued record, and
// the client in its Received header.
func storedClients(t *testing.T, st *queue.Store) (env, received []string) {
	t.Helper()
	recs, _, err := st.ReadFrom(context.Background(), st.QueueSubject("store"), 1, 100, 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range recs {
		env = append(env, r.Env.ClientAddr)
		hdr := string(r.Data)
		i, j := strings.Index(hdr, "(["), strings.Index(hdr, "])")
		if i < 0 || j < i {
			t.Fatalf("no client in Received header %q", hdr[:min(len(hdr), 120)])
		}
		received = append(received, hdr[i+2:j])
	}
	return env, received
}

func TestProxyProtocol(t *testing.T) {
	st, _ := testStore(t, 0)
	addr := startRelay(t, st, func(o *relay.Options) {
		o.ProxyNetworks = []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}
		o.ProxyHeaderTimeout = 300 * time.Millisecond
		o.MaxConnectionsPerIP = 1
	})
	header := func(src string) []byte {
		h := proxyproto.HeaderProxyFromAddrs(2, &net.TCPAddr{IP: net.ParseIP(src), Port: 40000}, &net.TCPAddr{IP: net.ParseIP("192.0.2.1"), Port: 25})
		b, err := h.Format()
		if err != nil {
			t.Fatal(err)
		}
		return b
	}

	// v1, text.
	c := dialRaw(t, addr)
	io.WriteString(c.c, "PROXY TCP4 203.0.113.7 192.0.2.1 40000 25\r\n")
	c.expect("220")
	c.sendMessage("bob@example.test")

	// v2, binary, IPv6. The first client's connection is still open and
	// the limit is one per client: the limit counts the real client, not
	// the balancer (which has two connections open now).
	c2 := dialRaw(t, addr)
	c2.c.Write(header("2001:db8::7"))
	c2.expect("220")
	c2.sendMessage("carol@example.test")

	// A second connection of the first client is over its limit.
	c3 := dialRaw(t, addr)
	io.WriteString(c3.c, "PROXY TCP4 203.0.113.7 192.0.2.1 40001 25\r\n")
	c3.expect("421 4.7.0")

	// The balancer sends no header: refused, no greeting.
	c4 := dialRaw(t, addr)
	if reply, err := readReply(c4.rd); err == nil {
		t.Fatalf("connection without PROXY header from a trusted balancer got %q", reply)
	}

	env, rcv := storedClients(t, st)
	want := "203.0.113.7 2001:db8::7"
	if strings.Join(env, " ") != want || strings.Join(rcv, " ") != want {
		t.Fatalf("clients in envelopes %v, in Received headers %v, want %s", env, rcv, want)
	}
}

// A PROXY header from anyone else is just a bad command: nobody outside
// the trusted networks can choose the address mxq records and limits.
func TestProxyHeaderFromUntrusted(t *testing.T) {
	st, _ := testStore(t, 0)
	addr := startRelay(t, st, func(o *relay.Options) {
		o.ProxyNetworks = []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")}
	})
	c := dialRaw(t, addr)
	c.expect("220")
	io.WriteString(c.c, "PROXY TCP4 203.0.113.7 192.0.2.1 40000 25\r\n")
	c.expect("501 5.5.2")
	c.sendMessage("bob@example.test")
	env, rcv := storedClients(t, st)
	if strings.Join(env, " ") != "127.0.0.1" || strings.Join(rcv, " ") != "127.0.0.1" {
		t.Fatalf("untrusted PROXY header used: envelope %v, Received %v", env, rcv)
	}
}

// clock is a manual clock for the connection rate.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) step(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

func TestConnectionLimits(t *testing.T) {
	st, _ := testStore(t, 0)
	t.Run("total", func(t *testing.T) {
		srv, addr := startRelayServer(t, st, func(o *relay.Options) { o.MaxConnections = 2 })
		a, b := dialRaw(t, addr), dialRaw(t, addr)
		a.expect("220")
		b.expect("220")
		c := dialRaw(t, addr)
		if got := c.expect("421 4.7.0"); !strings.Contains(got, "Too many connections") {
			t.Fatalf("refusal %q", got)
		}
		// A slot comes free when a client leaves.
		a.send("QUIT")
		a.expect("221")
		waitFor(t, "the slot to be released", func() bool { return srv.Connections() < 2 })
		d := dialRaw(t, addr)
		d.expect("220")
		d.sendMessage("bob@example.test")
	})
	t.Run("exempt network", func(t *testing.T) {
		_, addr := startRelayServer(t, st, func(o *relay.Options) {
			o.MaxConnections, o.MaxConnectionsPerIP, o.ConnectionRatePerIP = 3, 1, 1
			o.LimitExempt = []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}
		})
		for i := 0; i < 3; i++ {
			dialRaw(t, addr).expect("220")
		}
		dialRaw(t, addr).expect("421 4.7.0") // the total still holds
	})
	t.Run("rate per client", func(t *testing.T) {
		clk := &clock{t: time.Date(2026, 11, 1, 0, 0, 0, 0, time.UTC)}
		_, addr := startRelayServer(t, st, func(o *relay.Options) {
			o.ConnectionRatePerIP = 3
			o.Now = clk.now
		})
		for i := 0; i < 3; i++ {
			c := dialRaw(t, addr)
			c.expect("220")
			c.c.Close()
		}
		c := dialRaw(t, addr)
		if got := c.expect("421 4.7.0"); !strings.Contains(got, "new connections") {
			t.Fatalf("refusal %q", got)
		}
		clk.step(20 * time.Second) // one connection's worth of the rate
		dialRaw(t, addr).expect("220")
		dialRaw(t, addr).expect("421 4.7.0")
	})
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// The certificate rotates while a TLS session is in the middle of a
// transaction: the session finishes on its old keys, new sessions get the
// new certificate, and the Received header says ESMTPS.
func TestTLSRotationKeepsSessions(t *testing.T) {
	st, _ := testStore(t, 0)
	ca, err := testpki.NewCA("mxq test CA")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	l1, _ := ca.Issue("mx.example.test")
	certFile, keyFile := filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	os.WriteFile(certFile, l1.CertPEM, 0o644)
	os.WriteFile(keyFile, l1.KeyPEM, 0o600)
	rl, err := tlsreload.New(certFile, keyFile, nil)
	if err != nil {
		t.Fatal(err)
	}
	addr := startRelay(t, st, func(o *relay.Options) { o.TLS = rl.Config() })

	starttls := func() (*smtpConn, int64) {
		c := dialRaw(t, addr)
		c.expect("220")
		c.send("EHLO client.example.org")
		c.expect("250")
		c.send("STARTTLS")
		c.expect("220")
		tc := tls.Client(c.c, &tls.Config{RootCAs: ca.Pool, ServerName: "mx.example.test"})
		if err := tc.Handshake(); err != nil {
			t.Fatal(err)
		}
		return &smtpConn{t: t, c: tc, rd: bufio.NewReader(tc)}, tc.ConnectionState().PeerCertificates[0].SerialNumber.Int64()
	}
	old, s1 := starttls()
	if s1 != l1.Cert.Leaf.SerialNumber.Int64() {
		t.Fatalf("served serial %d", s1)
	}
	old.send("EHLO client.example.org")
	old.expect("250")
	old.send("MAIL FROM:<alice@example.org>")
	old.expect("250")

	l2, _ := ca.Issue("mx.example.test")
	os.WriteFile(keyFile, l2.KeyPEM, 0o600)
	os.WriteFile(certFile, l2.CertPEM, 0o644)
	if changed, err := rl.Reload(); !changed || err != nil {
		t.Fatalf("reload: %v %v", changed, err)
	}
	nc, s2 := starttls()
	nc.c.Close()
	if s2 != l2.Cert.Leaf.SerialNumber.Int64() {
		t.Fatalf("after rotation serving %d, want %d", s2, l2.Cert.Leaf.SerialNumber.Int64())
	}

	old.send("RCPT TO:<bob@example.test>")
	old.expect("250")
	old.send("DATA")
	old.expect("354")
	old.send("Subject: across a rotation\r\n\r\n.")
	old.expect("250 2.0.0")
	recs, _, err := st.ReadFrom(context.Background(), st.QueueSubject("store"), 1, 10, 0)
	if err != nil || len(recs) != 1 {
		t.Fatalf("records %d, %v", len(recs), err)
	}
	if !strings.Contains(string(recs[0].Data[:200]), "with ESMTPS id") {
		t.Fatalf("Received header does not say ESMTPS: %q", recs[0].Data[:200])
	}
}

// A client that dribbles bytes without ever ending a line (slowloris) is
// not protected by go-smtp's per-command deadline as one would hope: at
// the deadline, what arrived of the line is run as a command
// (bufio.Reader.ReadLine returns a partial line without error) and the
// next command gets a fresh deadline. Junk fragments are protocol errors
// and go-smtp closes after its fourth; a trickle of valid commands is
// bounded by MaxCommands. Either way the connection ends; under stress,
// each step is StressReadTimeout instead of ReadTimeout.
func TestSlowloris(t *testing.T) {
	st, _ := testStore(t, 0)
	cases := []struct {
		name   string
		opts   func(*relay.Options)
		hold   int // connections held open before the slow one
		within time.Duration
	}{
		{"junk fragments, read timeout 300ms", func(o *relay.Options) { o.ReadTimeout = 300 * time.Millisecond }, 0, 3 * time.Second},
		{"under stress, 100ms instead of 5s", func(o *relay.Options) {
			o.ReadTimeout, o.StressReadTimeout, o.MaxConnections = 5*time.Second, 100*time.Millisecond, 8
		}, 5, 2 * time.Second},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			srv, addr := startRelayServer(t, st, tc.opts)
			for i := 0; i < tc.hold; i++ {
				dialRaw(t, addr).expect("220")
			}
			waitFor(t, "the held connections", func() bool { return srv.Connections() == tc.hold })
			c := dialRaw(t, addr)
			c.expect("220")
			start := time.Now()
			go func() {
				for {
					if _, err := c.c.Write([]byte("x")); err != nil {
						return
					}
					time.Sleep(20 * time.Millisecond)
				}
			}()
			for {
				if _, err := readReply(c.rd); err != nil {
					break // closed
				}
			}
			if d := time.Since(start); d > tc.within {
				t.Fatalf("the slow client held its session %v, want under %v", d, tc.within)
			}
		})
	}
}

// An idle client is told 421 4.4.2 after the read timeout, or after the
// stress timeout when most connections are taken.
func TestIdleUnderStress(t *testing.T) {
	st, _ := testStore(t, 0)
	srv, addr := startRelayServer(t, st, func(o *relay.Options) {
		o.ReadTimeout, o.StressReadTimeout, o.MaxConnections = 5*time.Second, 200*time.Millisecond, 4
	})
	held := []*smtpConn{dialRaw(t, addr), dialRaw(t, addr), dialRaw(t, addr)}
	for _, h := range held {
		h.expect("220")
	}
	waitFor(t, "three connections", func() bool { return srv.Connections() == 3 })
	start := time.Now()
	// 3 of 4 open: under stress from the next command read on.
	held[0].send("NOOP")
	held[0].expect("250")
	held[0].expect("421 4.4.2")
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("idle under stress for %v", d)
	}
}
