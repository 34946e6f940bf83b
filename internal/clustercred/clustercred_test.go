package clustercred

import (
	"bytes"
	"crypto/ed25519"
	"crypto/tls"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/mxq-dev/mxq/internal/testpki"
)

var (
	secretA = []byte("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-one")
	secretB = []byte("bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-two")
)

func source(t *testing.T, host string, secrets ...[]byte) *Source {
	t.Helper()
	m, err := FromSecrets(secrets, host, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	return Static(m)
}

// handshake runs one connection on loopback: the server with srv, the
// client with cli dialing serverName; each side writes a byte and reads
// the other's, which is where TLS 1.3 reports a refused client
// certificate. It returns the client's and the server's errors.
func handshake(t *testing.T, srv, cli *tls.Config, serverName string) (cerr, serr error) {
	t.Helper()
	// As raftstore and nats-server do: the listener requires a client
	// certificate on top of whatever the configuration says.
	srv = srv.Clone()
	srv.ClientAuth = tls.RequireAndVerifyClientCert
	ln, err := tls.Listen("tcp", "127.0.0.1:0", srv)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	done := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			done <- err
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if err := c.(*tls.Conn).Handshake(); err != nil {
			done <- err
			return
		}
		b := make([]byte, 1)
		if _, err := io.ReadFull(c, b); err != nil {
			done <- err
			return
		}
		_, err = c.Write(b)
		done <- err
	}()
	cli = ForServer(cli, serverName)
	d := &net.Dialer{Timeout: 5 * time.Second}
	c, err := tls.DialWithDialer(d, "tcp", ln.Addr().String(), cli)
	if err == nil {
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err = c.Write([]byte{'x'}); err == nil {
			b := make([]byte, 1)
			_, err = io.ReadFull(c, b)
		}
		c.Close()
	}
	return err, <-done
}

func TestHandshake(t *testing.T) {
	stranger, err := testpki.NewCA("a stranger")
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := stranger.Issue("127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	strangerCfg := stranger.MutualTLS(leaf)
	for _, tc := range []struct {
		name     string
		srv, cli *tls.Config
		name2    string // server name the client checks
		ok       bool
	}{
		{"same secret", source(t, "127.0.0.1", secretA).Config(), source(t, "127.0.0.2", secretA).Config(), "127.0.0.1", true},
		{"same secret, DNS name", source(t, "mxq-0.peers", secretA).Config(), source(t, "mxq-1.peers", secretA).Config(), "mxq-0.peers", true},
		{"different secret", source(t, "127.0.0.1", secretA).Config(), source(t, "127.0.0.2", secretB).Config(), "127.0.0.1", false},
		{"rotation: new server, old client", source(t, "127.0.0.1", secretB, secretA).Config(), source(t, "127.0.0.2", secretA).Config(), "127.0.0.1", true},
		{"rotation: old server, new client", source(t, "127.0.0.1", secretA).Config(), source(t, "127.0.0.2", secretB, secretA).Config(), "127.0.0.1", true},
		{"rotation: both new", source(t, "127.0.0.1", secretB, secretA).Config(), source(t, "127.0.0.2", secretB).Config(), "127.0.0.1", true},
		{"rotation done: old secret dropped", source(t, "127.0.0.1", secretB).Config(), source(t, "127.0.0.2", secretA).Config(), "127.0.0.1", false},
		{"certificate for another IP", source(t, "127.0.0.3", secretA).Config(), source(t, "127.0.0.2", secretA).Config(), "127.0.0.1", false},
		{"certificate for another name", source(t, "mxq-2.peers", secretA).Config(), source(t, "mxq-1.peers", secretA).Config(), "mxq-0.peers", false},
		{"client from a random CA", source(t, "127.0.0.1", secretA).Config(), strangerCfg, "127.0.0.1", false},
		{"server from a random CA", strangerCfg, source(t, "127.0.0.2", secretA).Config(), "127.0.0.1", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cerr, serr := handshake(t, tc.srv, tc.cli, tc.name2)
			if tc.ok && (cerr != nil || serr != nil) {
				t.Fatalf("want a connection, got client %v, server %v", cerr, serr)
			}
			if !tc.ok && (cerr == nil || serr == nil) {
				t.Fatalf("want both ends refused, got client %v, server %v", cerr, serr)
			}
		})
	}
}

func TestDeriveCA(t *testing.T) {
	a1, err := DeriveCA(secretA)
	if err != nil {
		t.Fatal(err)
	}
	a2, _ := DeriveCA(append([]byte(nil), secretA...))
	b, _ := DeriveCA(secretB)
	if !bytes.Equal(a1.Cert.Raw, a2.Cert.Raw) {
		t.Error("the same secret made two different CA certificates: nodes would not agree")
	}
	if bytes.Equal(a1.Cert.Raw, b.Cert.Raw) || a1.Fingerprint == b.Fingerprint {
		t.Error("two secrets made the same CA")
	}
	if !a1.Cert.IsCA || !strings.Contains(a1.Cert.Subject.CommonName, a1.Fingerprint) {
		t.Errorf("CA certificate: IsCA %v, subject %q", a1.Cert.IsCA, a1.Cert.Subject)
	}
	if _, err := DeriveCA(secretA[:MinSecretLen-1]); err == nil {
		t.Error("a 31-byte secret was accepted")
	}
	// Two leaves of one node differ (fresh keys) and chain to the CA.
	l1, _ := a1.Issue("127.0.0.1", time.Now())
	l2, _ := a1.Issue("127.0.0.1", time.Now())
	if l1.Leaf.PublicKey.(ed25519.PublicKey).Equal(l2.Leaf.PublicKey) {
		t.Error("two starts share a node key")
	}
}

func TestParseSecrets(t *testing.T) {
	long := strings.Repeat("s", 32)
	for _, tc := range []struct {
		in   string
		want int    // secrets
		err  string // part of the error
	}{
		{long + "\n", 1, ""},
		{long + "\r\n" + long + "x\n\n" + long + "y", 3, ""},
		{"", 0, "empty"},
		{"\n\n", 0, "empty"},
		{"\n" + long, 0, "line 1"},
		{long + "\nshort", 0, "line 2"},
		{"short", 0, "line 1"},
	} {
		got, err := ParseSecrets([]byte(tc.in))
		switch {
		case tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)):
			t.Errorf("%q: error %v, want one about %q", tc.in, err, tc.err)
		case tc.err == "" && (err != nil || len(got) != tc.want):
			t.Errorf("%q: %d secrets, %v; want %d", tc.in, len(got), err, tc.want)
		}
	}
}

// Rotation without restart: the file changes, the next handshake uses the
// new material, and a bad file keeps the old.
func TestWatchSecretFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "secret")
	write := func(lines ...[]byte) {
		if err := os.WriteFile(path, append(bytes.Join(lines, []byte("\n")), '\n'), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write(secretA)
	node, err := WatchSecretFile(path, "127.0.0.1", nil)
	if err != nil {
		t.Fatal(err)
	}
	newPeer := source(t, "127.0.0.2", secretB).Config()
	if cerr, serr := handshake(t, node.Config(), newPeer, "127.0.0.1"); cerr == nil && serr == nil {
		t.Fatal("a peer with another secret connected")
	}

	write(secretB, secretA)
	if changed, err := node.Reload(); !changed || err != nil {
		t.Fatalf("Reload: changed %v, %v", changed, err)
	}
	cfg := node.Config()
	if cerr, serr := handshake(t, cfg, newPeer, "127.0.0.1"); cerr != nil || serr != nil {
		t.Fatalf("after rotation, new peer as client: client %v, server %v", cerr, serr)
	}
	if cerr, serr := handshake(t, source(t, "127.0.0.1", secretA).Config(), cfg, "127.0.0.1"); cerr != nil || serr != nil {
		t.Fatalf("after rotation, old peer as server: client %v, server %v", cerr, serr)
	}

	// A file caught half-written keeps what worked.
	if err := os.WriteFile(path, []byte("short\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if changed, err := node.Reload(); changed || err == nil {
		t.Fatalf("a bad file: changed %v, err %v", changed, err)
	}
	if cerr, serr := handshake(t, cfg, newPeer, "127.0.0.1"); cerr != nil || serr != nil {
		t.Fatalf("after a bad file: client %v, server %v", cerr, serr)
	}

	// The old secret dropped: its peers are out.
	write(secretB)
	if _, err := node.Reload(); err != nil {
		t.Fatal(err)
	}
	if cerr, serr := handshake(t, cfg, source(t, "127.0.0.2", secretA).Config(), "127.0.0.1"); cerr == nil && serr == nil {
		t.Fatal("a peer with the dropped secret still connects")
	}
}

// The private PKI's files rotate the same way.
func TestWatchPEMFiles(t *testing.T) {
	dir := t.TempDir()
	ca1, _ := testpki.NewCA("one")
	ca2, _ := testpki.NewCA("two")
	l1, _ := ca1.Issue("127.0.0.1")
	l2, _ := ca2.Issue("127.0.0.1")
	cert, key, caFile, err := l1.Write(dir, ca1)
	if err != nil {
		t.Fatal(err)
	}
	node, err := WatchPEMFiles(caFile, cert, key, nil)
	if err != nil {
		t.Fatal(err)
	}
	peer2 := ca2.MutualTLS(l2)
	if cerr, serr := handshake(t, node.Config(), peer2, "127.0.0.1"); cerr == nil && serr == nil {
		t.Fatal("a peer of another CA connected")
	}
	if _, _, _, err := l2.Write(dir, ca2); err != nil {
		t.Fatal(err)
	}
	if changed, err := node.Reload(); !changed || err != nil {
		t.Fatalf("Reload: changed %v, %v", changed, err)
	}
	if cerr, serr := handshake(t, node.Config(), peer2, "127.0.0.1"); cerr != nil || serr != nil {
		t.Fatalf("after rotation: client %v, server %v", cerr, serr)
	}
}
