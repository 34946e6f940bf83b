package tlsreload

import (
	"bufio"
	"crypto/tls"
	"io"
	"os"
	"path/filepath"
	"testing"

	"github.com/mxq-dev/mxq/internal/testpki"
)

// echoServer serves TLS with cfg and echoes lines back.
func echoServer(t *testing.T, cfg *tls.Config) string {
	t.Helper()
	ln, err := tls.Listen("tcp", "127.0.0.1:0", cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { defer c.Close(); io.Copy(c, c) }()
		}
	}()
	return ln.Addr().String()
}

// issue makes a certificate for mx.example.test and returns it, its key
// and its serial number.
func issue(t *testing.T, ca *testpki.CA) (certPEM, keyPEM []byte, serial int64) {
	t.Helper()
	l, err := ca.Issue("mx.example.test")
	if err != nil {
		t.Fatal(err)
	}
	return l.CertPEM, l.KeyPEM, l.Cert.Leaf.SerialNumber.Int64()
}

func newCA(t *testing.T) *testpki.CA {
	t.Helper()
	ca, err := testpki.NewCA("mxq test CA")
	if err != nil {
		t.Fatal(err)
	}
	return ca
}

func writePair(t *testing.T, dir string, certPEM, keyPEM []byte) (certFile, keyFile string) {
	t.Helper()
	certFile, keyFile = filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	if err := os.WriteFile(certFile, certPEM, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, keyPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	return certFile, keyFile
}

func dialSerial(t *testing.T, addr string, ca *testpki.CA) (*tls.Conn, int64) {
	t.Helper()
	c, err := tls.Dial("tcp", addr, &tls.Config{RootCAs: ca.Pool, ServerName: "mx.example.test"})
	if err != nil {
		t.Fatal(err)
	}
	return c, c.ConnectionState().PeerCertificates[0].SerialNumber.Int64()
}

func echo(t *testing.T, c *tls.Conn, line string) {
	t.Helper()
	if _, err := io.WriteString(c, line+"\n"); err != nil {
		t.Fatal(err)
	}
	got, err := bufio.NewReader(c).ReadString('\n')
	if err != nil || got != line+"\n" {
		t.Fatalf("echo: %q, %v", got, err)
	}
}

// A rotation is served from the next handshake on; a session that was
// open before keeps working; a half-written rotation keeps the old pair.
func TestRotation(t *testing.T) {
	ca := newCA(t)
	dir := t.TempDir()
	c1, k1, s1 := issue(t, ca)
	certFile, keyFile := writePair(t, dir, c1, k1)
	r, err := New(certFile, keyFile, nil)
	if err != nil {
		t.Fatal(err)
	}
	addr := echoServer(t, r.Config())

	old, got := dialSerial(t, addr, ca)
	defer old.Close()
	if got != s1 {
		t.Fatalf("serial %d, want %d", got, s1)
	}
	echo(t, old, "before")

	// Unchanged files: nothing to do.
	if changed, err := r.Reload(); changed || err != nil {
		t.Fatalf("reload of unchanged files: %v, %v", changed, err)
	}

	// Certificate written, key not yet: a mismatched pair is refused.
	c2, k2, s2 := issue(t, ca)
	if err := os.WriteFile(certFile, c2, 0o644); err != nil {
		t.Fatal(err)
	}
	if changed, err := r.Reload(); changed || err == nil {
		t.Fatalf("half rotation accepted: %v, %v", changed, err)
	}
	if _, got := dialSerial(t, addr, ca); got != s1 {
		t.Fatalf("after half rotation serving %d, want the old %d", got, s1)
	}

	// The key arrives: the new pair is served.
	if err := os.WriteFile(keyFile, k2, 0o600); err != nil {
		t.Fatal(err)
	}
	if changed, err := r.Reload(); !changed || err != nil {
		t.Fatalf("rotation not loaded: %v, %v", changed, err)
	}
	nc, got := dialSerial(t, addr, ca)
	nc.Close()
	if got != s2 {
		t.Fatalf("after rotation serving %d, want %d", got, s2)
	}
	if r.Leaf().SerialNumber.Int64() != s2 {
		t.Fatalf("Leaf reports %d", r.Leaf().SerialNumber.Int64())
	}
	// The session from before the rotation is still up.
	echo(t, old, "after")

	// Files gone (a Secret being recreated): keep serving.
	os.Remove(certFile)
	if _, err := r.Reload(); err == nil {
		t.Fatal("missing file not reported")
	}
	if _, got := dialSerial(t, addr, ca); got != s2 {
		t.Fatalf("with files missing serving %d, want %d", got, s2)
	}
}

// TLS 1.0 and 1.1 are refused.
func TestMinVersion(t *testing.T) {
	ca := newCA(t)
	c, k, _ := issue(t, ca)
	certFile, keyFile := writePair(t, t.TempDir(), c, k)
	r, err := New(certFile, keyFile, nil)
	if err != nil {
		t.Fatal(err)
	}
	if v := r.Config().MinVersion; v != tls.VersionTLS12 {
		t.Fatalf("MinVersion %x", v)
	}
	addr := echoServer(t, r.Config())
	for _, v := range []uint16{tls.VersionTLS10, tls.VersionTLS11} {
		conn, err := tls.Dial("tcp", addr, &tls.Config{RootCAs: ca.Pool, ServerName: "mx.example.test", MinVersion: v, MaxVersion: v})
		if err == nil {
			conn.Close()
			t.Fatalf("handshake with version %x succeeded", v)
		}
	}
	conn, err := tls.Dial("tcp", addr, &tls.Config{RootCAs: ca.Pool, ServerName: "mx.example.test", MaxVersion: tls.VersionTLS12})
	if err != nil {
		t.Fatalf("TLS 1.2: %v", err)
	}
	conn.Close()
}

func TestNewRefusesBadFiles(t *testing.T) {
	ca := newCA(t)
	dir := t.TempDir()
	c1, _, _ := issue(t, ca)
	_, k2, _ := issue(t, ca)
	certFile, keyFile := writePair(t, dir, c1, k2)
	if _, err := New(certFile, keyFile, nil); err == nil {
		t.Fatal("mismatched pair accepted")
	}
	if _, err := New(dir+"/none.crt", keyFile, nil); err == nil {
		t.Fatal("missing file accepted")
	}
}
