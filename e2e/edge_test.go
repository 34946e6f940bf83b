package e2e

import (
	"bufio"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/mxq-dev/mxq/internal/testpki"
)

// dialFrom connects to addr from a given loopback address: every address
// of 127.0.0.0/8 is this host, so each stands for a different client.
func dialFrom(src, addr string) (net.Conn, error) {
	d := net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}}
	return d.Dial("tcp", addr)
}

// rssKiB reads a field (VmRSS, VmHWM) of /proc/<pid>/status.
func rssKiB(t *testing.T, pid int, field string) int {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, field+":"); ok {
			n, _ := strconv.Atoi(strings.Fields(v)[0])
			return n
		}
	}
	t.Fatalf("no %s in /proc/%d/status", field, pid)
	return 0
}

// legitSend sends one message from src on a fresh connection, as an MTA
// does, and returns the queue ID.
func legitSend(src, addr string, i int) (string, error) {
	conn, err := dialFrom(src, addr)
	if err != nil {
		return "", err
	}
	c := smtp.NewClient(conn)
	c.CommandTimeout, c.SubmissionTimeout = 10*time.Second, 10*time.Second
	defer c.Close()
	if err := c.Hello("legit.example.org"); err != nil {
		return "", err
	}
	id, err := sendOne(context.Background(), c, "sender@example.org", []string{fmt.Sprintf("user%d@example.test", i%5)},
		[]byte(fmt.Sprintf("Subject: legit %d\r\n\r\nhello\r\n", i)))
	if err == nil {
		c.Quit()
	}
	return id, err
}

const floodConfig = `
node_name: flood
data_dir: {{dir}}/data
smtp:
  listen: {{smtp}}
  domains: [example.test]
  read_timeout: 5s
  stress_read_timeout: 1s
  data_timeout: 2s
  min_data_rate: 2KiB
  max_connections: 400
  max_connections_per_ip: 10
  connection_rate_per_ip: 60
  max_commands: 120
  limit_exempt_networks: []
  shutdown_grace: 5s
admin:
  listen: ""
backend: lmtp://%s
`

// TestEdgeFlood attacks a running mxq from 200 local addresses at once:
//
//   - flood: 20 clients, 15 connections each in a loop, holding every
//     connection they get, idle;
//   - slowloris: 120 clients dribbling a byte every 50 ms, never a line
//     (cut after one read timeout, 5s, or 1s under stress);
//   - slow DATA: 20 clients that start a message and send 10 bytes a
//     second;
//
// while 10 legitimate clients send 10 messages each. The per-client limit
// holds, the slow clients are cut off, every legitimate message is
// accepted, and the process's memory stays bounded (logged).
func TestEdgeFlood(t *testing.T) {
	p := startMxq(t, fmt.Sprintf(floodConfig, freePort(t)))
	pid := p.cmd.Process.Pid
	baseRSS := rssKiB(t, pid, "VmRSS")

	ctx, stop := context.WithTimeout(context.Background(), 10*time.Second)
	defer stop()
	var wg sync.WaitGroup
	var mu sync.Mutex
	var conns []net.Conn // closed at the end, whatever their state
	track := func(c net.Conn) {
		mu.Lock()
		conns = append(conns, c)
		mu.Unlock()
	}

	// Flood. The first round is exact: each client's 15 connections dial
	// at once and read their greeting within 800 ms, before any of them
	// could have been timed out (1 s at the earliest) and its slot freed,
	// so at most 10 per client may be greeted. Then they keep coming.
	var greeted, refused, peakOpen atomic.Int64
	firstRound := make([]atomic.Int64, 20)
	round := time.Now().Add(300 * time.Millisecond)
	for ip := 0; ip < 20; ip++ {
		src := fmt.Sprintf("127.0.1.%d", ip+1)
		for g := 0; g < 15; g++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				first := true
				for ctx.Err() == nil {
					if first {
						time.Sleep(time.Until(round))
					}
					c, err := dialFrom(src, p.smtp)
					if err != nil {
						first = false
						time.Sleep(50 * time.Millisecond)
						continue
					}
					track(c)
					deadline := time.Now().Add(15 * time.Second)
					if first {
						deadline = round.Add(800 * time.Millisecond)
					}
					c.SetReadDeadline(deadline)
					rd := bufio.NewReader(c)
					line, err := rd.ReadString('\n')
					if err != nil || !strings.HasPrefix(line, "220") {
						if strings.HasPrefix(line, "421 4.7.0") {
							refused.Add(1)
						}
						c.Close()
						first = false
						time.Sleep(20 * time.Millisecond)
						continue
					}
					greeted.Add(1)
					if first {
						firstRound[ip].Add(1)
						first = false
					}
					// Hold it until the server gives up on us.
					c.SetReadDeadline(time.Now().Add(15 * time.Second))
					rd.ReadString('\n')
					c.Close()
				}
			}()
		}
	}

	// Slowloris: junk without a line end.
	var lorisCut, lorisSurvived atomic.Int64
	var lorisLongest atomic.Int64
	for i := 0; i < 120; i++ {
		src := fmt.Sprintf("127.0.2.%d", i+1)
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := dialFrom(src, p.smtp)
			if err != nil {
				return
			}
			track(c)
			start := time.Now()
			closed := make(chan struct{})
			go func() { io.Copy(io.Discard, c); close(closed) }()
			for {
				select {
				case <-closed:
					d := time.Since(start)
					lorisCut.Add(1)
					for m := lorisLongest.Load(); int64(d) > m && !lorisLongest.CompareAndSwap(m, int64(d)); m = lorisLongest.Load() {
					}
					return
				case <-ctx.Done():
					lorisSurvived.Add(1)
					return
				case <-time.After(50 * time.Millisecond):
					c.Write([]byte("x"))
				}
			}
		}()
	}

	// Slow DATA.
	var dataCut atomic.Int64
	for i := 0; i < 20; i++ {
		src := fmt.Sprintf("127.0.3.%d", i+1)
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := dialFrom(src, p.smtp)
			if err != nil {
				return
			}
			track(c)
			c.SetDeadline(time.Now().Add(15 * time.Second))
			rd := bufio.NewReader(c)
			rd.ReadString('\n')
			for _, cmd := range []string{"EHLO slow.example.org", "MAIL FROM:<a@example.org>", "RCPT TO:<bob@example.test>", "DATA"} {
				fmt.Fprintf(c, "%s\r\n", cmd)
				for {
					l, err := rd.ReadString('\n')
					if err != nil || len(l) < 4 || l[3] != '-' {
						break
					}
				}
			}
			replies := make(chan string, 4)
			go func() {
				for {
					l, err := rd.ReadString('\n')
					if err != nil {
						close(replies)
						return
					}
					replies <- l
				}
			}()
			for {
				select {
				case l, ok := <-replies:
					if !ok {
						return
					}
					if strings.HasPrefix(l, "451 4.4.2") {
						dataCut.Add(1)
					}
				case <-ctx.Done():
					return
				case <-time.After(100 * time.Millisecond):
					c.Write([]byte("x"))
				}
			}
		}()
	}

	// Sample the server's memory while all that goes on.
	go func() {
		for ctx.Err() == nil {
			if n := int64(rssKiB(t, pid, "VmRSS")); n > peakOpen.Load() {
				peakOpen.Store(n)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}()

	// Legitimate mail, in the middle of it.
	time.Sleep(2 * time.Second)
	legitStart := time.Now()
	var legitOK, legitFailed atomic.Int64
	var lwg sync.WaitGroup
	var failures []string
	for ip := 0; ip < 10; ip++ {
		src := fmt.Sprintf("127.0.4.%d", ip+1)
		lwg.Add(1)
		go func() {
			defer lwg.Done()
			for i := 0; i < 10; i++ {
				if _, err := legitSend(src, p.smtp, i); err != nil {
					legitFailed.Add(1)
					mu.Lock()
					failures = append(failures, fmt.Sprintf("%s #%d: %v", src, i, err))
					mu.Unlock()
				} else {
					legitOK.Add(1)
				}
			}
		}()
	}
	lwg.Wait()
	legitTook := time.Since(legitStart)

	<-ctx.Done()
	mu.Lock()
	for _, c := range conns {
		c.Close()
	}
	mu.Unlock()
	wg.Wait()
	hwm := rssKiB(t, pid, "VmHWM")

	t.Logf("flood: %d connections greeted, %d refused with 421 4.7.0; greeted in the first round, per client of 15 at once: %v",
		greeted.Load(), refused.Load(), loadAll(firstRound))
	t.Logf("slowloris: %d of 120 cut off (the longest lasted %v), %d still open at the end; slow DATA: %d of 20 refused with 451 4.4.2",
		lorisCut.Load(), time.Duration(lorisLongest.Load()).Round(100*time.Millisecond), lorisSurvived.Load(), dataCut.Load())
	t.Logf("legitimate: %d accepted, %d failed, in %v", legitOK.Load(), legitFailed.Load(), legitTook.Round(time.Millisecond))
	t.Logf("mxq memory: %d MiB at rest, %d MiB peak RSS sampled under attack, %d MiB high-water mark",
		baseRSS>>10, peakOpen.Load()>>10, hwm>>10)

	for ip := range firstRound {
		if n := firstRound[ip].Load(); n > 10 || n < 5 {
			t.Errorf("client 127.0.1.%d: %d of 15 simultaneous connections greeted, limit 10", ip+1, n)
		}
	}
	if refused.Load() == 0 {
		t.Error("the flood was never refused")
	}
	if lorisSurvived.Load() > 0 || lorisCut.Load() == 0 {
		t.Errorf("slowloris: %d connections outlived the attack", lorisSurvived.Load())
	}
	if dataCut.Load() < 20 {
		t.Errorf("slow DATA: only %d of 20 refused", dataCut.Load())
	}
	if legitFailed.Load() > 0 {
		t.Errorf("legitimate mail failed under attack:\n%s", strings.Join(failures, "\n"))
	}
	// Bounded: a few hundred connections must not cost more than a few
	// hundred KiB each (the figure is logged above for the record).
	if grown := hwm - baseRSS; grown > 200<<10 {
		t.Errorf("memory grew by %d MiB under attack", grown>>10)
	}
	// And it still serves.
	if _, err := legitSend("127.0.4.200", p.smtp, 0); err != nil {
		t.Fatalf("after the attack: %v", err)
	}
	log, _ := os.ReadFile(p.logPath)
	for _, want := range []string{"connection refused with 421 4.7.0", "under stress", "idle timeout", "message refused"} {
		if !strings.Contains(string(log), want) {
			t.Errorf("no %q in the log", want)
		}
	}
}

func loadAll(a []atomic.Int64) []int64 {
	out := make([]int64, len(a))
	for i := range a {
		out[i] = a[i].Load()
	}
	return out
}

const tlsConfig = `
node_name: tls
data_dir: {{dir}}/data
smtp:
  listen: {{smtp}}
  domains: [example.test]
  shutdown_grace: 5s
  tls:
    cert_file: %[1]s/smtp/cert.pem
    key_file: %[1]s/smtp/key.pem
    required_for: [127.0.0.3]
  proxy_protocol:
    trusted_networks: [127.0.0.2]
admin:
  listen: %[2]s
  tls:
    cert_file: %[1]s/admin/cert.pem
    key_file: %[1]s/admin/key.pem
backend: lmtp://%[3]s
`

// TestEdgeTLSAndProxy runs mxq with STARTTLS, HTTPS on the admin API and a
// trusted load balancer: a message over STARTTLS (certificate verified),
// a client that must use TLS refused in clear, the admin API over HTTPS,
// a certificate rotation picked up from the files, and a message through
// the "load balancer" whose Received header names the real client.
func TestEdgeTLSAndProxy(t *testing.T) {
	ca, err := testpki.NewCA("mxq e2e CA")
	if err != nil {
		t.Fatal(err)
	}
	files := t.TempDir()
	issue := func(sub string) *testpki.Leaf {
		l, err := ca.Issue("mx.example.test", "127.0.0.1")
		if err != nil {
			t.Fatal(err)
		}
		os.MkdirAll(filepath.Join(files, sub), 0o755)
		if _, _, _, err := l.Write(filepath.Join(files, sub), ca); err != nil {
			t.Fatal(err)
		}
		return l
	}
	first := issue("smtp")
	issue("admin")
	admin := freePort(t)
	p := startMxq(t, fmt.Sprintf(tlsConfig, files, admin, freePort(t)))
	tlsc := &tls.Config{RootCAs: ca.Pool, ServerName: "mx.example.test"}

	serial := func() int64 {
		// Says EHLO, sees STARTTLS offered, upgrades, says EHLO again.
		c, err := smtp.DialStartTLS(p.smtp, tlsc)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		id, err := sendOne(context.Background(), c, "alice@example.org", []string{"bob@example.test"}, []byte("Subject: tls\r\n\r\nhi\r\n"))
		if err != nil || id == "" {
			t.Fatalf("over TLS: %q %v", id, err)
		}
		// The handshake happened with the first command after STARTTLS.
		st, ok := c.TLSConnectionState()
		if !ok || st.Version < tls.VersionTLS12 || len(st.PeerCertificates) == 0 {
			t.Fatalf("TLS state %v %+v", ok, st)
		}
		return st.PeerCertificates[0].SerialNumber.Int64()
	}
	if s := serial(); s != first.Cert.Leaf.SerialNumber.Int64() {
		t.Fatalf("serving serial %d", s)
	}

	// 127.0.0.3 must use TLS.
	conn, err := dialFrom("127.0.0.3", p.smtp)
	if err != nil {
		t.Fatal(err)
	}
	c := smtp.NewClient(conn)
	c.Hello("client.example.org")
	if err := c.Mail("alice@example.org", nil); err == nil || !strings.Contains(err.Error(), "530") {
		t.Fatalf("MAIL in clear from a TLS-required client: %v", err)
	}
	c.Close()

	// The admin API over HTTPS.
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: ca.Pool}}, Timeout: 10 * time.Second}
	resp, err := hc.Get("https://" + admin + "/healthz")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 || resp.TLS == nil {
		t.Fatalf("admin over HTTPS: %s", resp.Status)
	}

	// PROXY protocol from the trusted balancer (127.0.0.2).
	lb, err := dialFrom("127.0.0.2", p.smtp)
	if err != nil {
		t.Fatal(err)
	}
	io.WriteString(lb, "PROXY TCP4 198.51.100.23 192.0.2.1 51000 25\r\n")
	pc := smtp.NewClient(lb)
	pc.Hello("client.example.org")
	if _, err := sendOne(context.Background(), pc, "alice@example.org", []string{"carol@example.test"}, []byte("Subject: proxied\r\n\r\nhi\r\n")); err != nil {
		t.Fatalf("through the balancer: %v", err)
	}
	pc.Close()
	waitLog(t, p, "client=198.51.100.23", 5*time.Second)

	// Rotation: the files change, new sessions get the new certificate.
	second := issue("smtp")
	deadline := time.Now().Add(30 * time.Second)
	for serial() != second.Cert.Leaf.SerialNumber.Int64() {
		if time.Now().After(deadline) {
			t.Fatal("rotated certificate not served within 30s")
		}
		time.Sleep(time.Second)
	}
}

// waitLog waits until mxq's log contains s.
func waitLog(t *testing.T, p *mxqProc, s string, d time.Duration) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		b, _ := os.ReadFile(p.logPath)
		if strings.Contains(string(b), s) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("no %q in mxq's log", s)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
