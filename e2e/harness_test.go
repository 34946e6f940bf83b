// Package e2e runs mxq as a real process against real peers: Dovecot's
// LMTP server, SMTP clients, SIGKILL. Each test says which programs it
// needs; without them it skips, unless MXQ_E2E=require (CI), where a missing
// program is a failure.
package e2e

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
)

var mxqBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "mxq-e2e-bin")
	if err != nil {
		panic(err)
	}
	mxqBin = filepath.Join(dir, "mxq")
	build := exec.Command("go", "build", "-o", mxqBin, "../cmd/mxq")
	build.Stdout, build.Stderr = os.Stdout, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "building mxq:", err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// need skips (or, under MXQ_E2E=require, fails) when a program is missing.
func need(t *testing.T, progs ...string) {
	t.Helper()
	for _, p := range progs {
		if _, err := exec.LookPath(p); err != nil {
			if os.Getenv("MXQ_E2E") == "require" {
				t.Fatalf("%s is required (MXQ_E2E=require) but not installed", p)
			}
			t.Skipf("%s not installed", p)
		}
	}
}

// handedOut holds the ports freePort has returned in this process.
var handedOut sync.Map

// freePort returns a loopback address that was free a moment ago. The port
// is below the kernel's ephemeral range: a port from "127.0.0.1:0", freed
// again, is the next thing the kernel hands to any other ":0" listener (mxq's
// single-node raft, a test backend) or outgoing connection, and a test once
// lost its continuity IMAP port to raft that way. No port is returned twice.
func freePort(t *testing.T) string {
	t.Helper()
	low := 32768
	if b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range"); err == nil {
		fmt.Sscan(string(b), &low)
	}
	for i := 0; i < 1000; i++ {
		port := 10000 + rand.IntN(max(low-10000, 1))
		if _, dup := handedOut.LoadOrStore(port, true); dup {
			continue
		}
		ln, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
		if err != nil {
			continue
		}
		ln.Close()
		return ln.Addr().String()
	}
	t.Fatal("no free loopback port below the ephemeral range")
	return ""
}

// mxqProc is an mxq serve process.
type mxqProc struct {
	t       *testing.T
	dir     string
	cfg     string
	smtp    string
	logPath string

	mu  sync.Mutex
	cmd *exec.Cmd
	n   int // starts
}

// startMxq writes config (YAML, with {{smtp}} and {{dir}} replaced) and
// starts mxq serve.
func startMxq(t *testing.T, config string) *mxqProc {
	t.Helper()
	dir := t.TempDir()
	p := &mxqProc{t: t, dir: dir, smtp: freePort(t), cfg: filepath.Join(dir, "mxq.yaml"), logPath: filepath.Join(dir, "mxq.log")}
	config = strings.NewReplacer("{{smtp}}", p.smtp, "{{dir}}", dir).Replace(config)
	if err := os.WriteFile(p.cfg, []byte(config), 0o644); err != nil {
		t.Fatal(err)
	}
	p.start()
	t.Cleanup(func() {
		p.stop()
		if t.Failed() || os.Getenv("MXQ_E2E_LOG") != "" {
			if b, err := os.ReadFile(p.logPath); err == nil {
				lines := strings.Split(string(b), "\n")
				if len(lines) > 60 {
					lines = lines[len(lines)-60:]
				}
				t.Logf("mxq log (tail):\n%s", strings.Join(lines, "\n"))
			}
		}
	})
	return p
}

func (p *mxqProc) start() {
	p.t.Helper()
	p.launch()
	p.waitSMTP(60 * time.Second)
}

// launch starts the process.
func (p *mxqProc) launch() {
	p.t.Helper()
	logf, err := os.OpenFile(p.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		p.t.Fatal(err)
	}
	cmd := exec.Command(mxqBin, "serve", "--config", p.cfg)
	cmd.Dir = p.dir
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		p.t.Fatal(err)
	}
	logf.Close()
	p.mu.Lock()
	p.cmd = cmd
	p.n++
	p.mu.Unlock()
}

// waitSMTP waits until the node greets SMTP clients.
func (p *mxqProc) waitSMTP(d time.Duration) {
	p.t.Helper()
	deadline := time.Now().Add(d)
	for {
		if c, err := net.DialTimeout("tcp", p.smtp, time.Second); err == nil {
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			line, _ := bufio.NewReader(c).ReadString('\n')
			c.Close()
			if strings.HasPrefix(line, "220") {
				return
			}
		}
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(p.logPath)
			p.t.Fatalf("mxq did not start listening on %s within %v; log:\n%s", p.smtp, d, tail(string(b), 30))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func tail(s string, n int) string {
	lines := strings.Split(s, "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// kill sends SIGKILL and reaps the process.
func (p *mxqProc) kill() {
	p.mu.Lock()
	cmd := p.cmd
	p.cmd = nil
	p.mu.Unlock()
	if cmd != nil {
		cmd.Process.Signal(syscall.SIGKILL)
		cmd.Wait()
	}
}

// stop sends SIGTERM and waits for a clean exit.
func (p *mxqProc) stop() error {
	p.mu.Lock()
	cmd := p.cmd
	p.cmd = nil
	p.mu.Unlock()
	if cmd == nil {
		return nil
	}
	cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		return err
	case <-time.After(60 * time.Second):
		// SIGQUIT: the Go runtime writes every goroutine's stack to the
		// log, which shows what the shutdown is waiting for.
		cmd.Process.Signal(syscall.SIGQUIT)
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			cmd.Process.Kill()
		}
		if b, err := os.ReadFile(p.logPath); err == nil {
			// Kept outside the test's own directory, which is removed.
			f := filepath.Join(os.TempDir(), fmt.Sprintf("mxq-stuck-%d.log", time.Now().UnixNano()))
			_ = os.WriteFile(f, b, 0o644)
			p.t.Logf("goroutines of the stuck mxq (SIGQUIT) in %s", f)
		}
		return fmt.Errorf("mxq did not stop within 60s of SIGTERM")
	}
}

// dovecot is a Dovecot LMTP server with Maildir storage, on a loopback port.
type dovecot struct {
	t    *testing.T
	dir  string
	conf string
	addr string
	up   bool
}

// newDovecot writes a configuration; start brings it up.
func newDovecot(t *testing.T) *dovecot {
	t.Helper()
	need(t, "dovecot")
	// Not t.TempDir: its parent is private to us, and Dovecot's processes
	// run as another user when the tests run as root.
	dir, err := os.MkdirTemp("", "mxq-dovecot-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	d := &dovecot{t: t, dir: dir, conf: filepath.Join(dir, "dovecot.conf"), addr: freePort(t)}
	for _, sub := range []string{"mail", "run", "state"} {
		if err := os.MkdirAll(filepath.Join(dir, sub), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	os.Chmod(dir, 0o755)
	userLine, firstUID, firstGID := d.mailUser()
	_, port, _ := net.SplitHostPort(d.addr)
	conf := fmt.Sprintf(`base_dir = %[1]s/run
state_dir = %[1]s/state
log_path = %[1]s/dovecot.log
info_log_path = %[1]s/dovecot.log
protocols = lmtp
ssl = no
listen = 127.0.0.1
%[3]s
first_valid_uid = %[4]s
first_valid_gid = %[5]s
mail_location = maildir:%[1]s/mail/%%n
# Keep the message as sent (CRLF), add no Delivered-To or Received, so the
# test can compare bytes; Dovecot still adds Return-Path.
mail_save_crlf = yes
lmtp_add_received_header = no
lmtp_hdr_delivery_address = none
service lmtp {
  inet_listener lmtp {
    address = 127.0.0.1
    port = %[2]s
  }
}
service anvil {
  chroot =
}
userdb {
  driver = static
  args = %[6]s home=%[1]s/mail/%%n allow_all_users=yes
}
passdb {
  driver = static
  args = nopassword=y
}
`, dir, port, userLine, firstUID, firstGID, d.userdbIDs())
	if err := os.WriteFile(d.conf, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(d.stop)
	return d
}

// mailUser picks who Dovecot's processes run as: the dovecot user when the
// tests run as root (Dovecot refuses uid 0 for mail), else the test's user.
func (d *dovecot) mailUser() (conf, uid, gid string) {
	if os.Getuid() == 0 {
		u, err := user.Lookup("dovecot")
		if err != nil {
			d.t.Fatalf("running as root needs the dovecot user: %v", err)
		}
		exec.Command("chown", "-R", "dovecot:dovecot", filepath.Join(d.dir, "mail")).Run()
		return "default_internal_user = dovecot\ndefault_internal_group = dovecot\ndefault_login_user = dovenull", u.Uid, u.Gid
	}
	u, _ := user.Current()
	g, _ := user.LookupGroupId(u.Gid)
	return fmt.Sprintf("default_internal_user = %[1]s\ndefault_internal_group = %[2]s\ndefault_login_user = %[1]s", u.Username, g.Name), u.Uid, u.Gid
}

func (d *dovecot) userdbIDs() string {
	if os.Getuid() == 0 {
		return "uid=dovecot gid=dovecot"
	}
	u, _ := user.Current()
	return fmt.Sprintf("uid=%s gid=%s", u.Uid, u.Gid)
}

func (d *dovecot) start() {
	d.t.Helper()
	// Dovecot daemonizes: give it a file, not a pipe, or the pipe stays
	// open in the daemon and Wait never returns.
	out, err := os.Create(filepath.Join(d.dir, "start.out"))
	if err != nil {
		d.t.Fatal(err)
	}
	defer out.Close()
	cmd := exec.Command("dovecot", "-c", d.conf)
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Run(); err != nil {
		b, _ := os.ReadFile(out.Name())
		d.t.Fatalf("starting dovecot: %v\n%s", err, b)
	}
	d.up = true
	deadline := time.Now().Add(20 * time.Second)
	for {
		if c, err := net.DialTimeout("tcp", d.addr, time.Second); err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			log, _ := os.ReadFile(filepath.Join(d.dir, "dovecot.log"))
			d.t.Fatalf("dovecot not listening on %s:\n%s", d.addr, log)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (d *dovecot) stop() {
	if !d.up {
		return
	}
	d.up = false
	exec.Command("doveadm", "-c", d.conf, "stop").Run()
	// doveadm stop returns before the master has exited; wait for the port.
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		c, err := net.DialTimeout("tcp", d.addr, 200*time.Millisecond)
		if err != nil {
			return
		}
		c.Close()
		time.Sleep(50 * time.Millisecond)
	}
}

// stored is a message file in a Maildir.
type stored struct {
	User string
	Path string
	Data []byte
}

// messages returns every message delivered so far.
func (d *dovecot) messages() []stored {
	var out []stored
	users, _ := os.ReadDir(filepath.Join(d.dir, "mail"))
	for _, u := range users {
		for _, sub := range []string{"new", "cur"} {
			dir := filepath.Join(d.dir, "mail", u.Name(), sub)
			files, _ := os.ReadDir(dir)
			for _, f := range files {
				p := filepath.Join(dir, f.Name())
				b, err := os.ReadFile(p)
				if err == nil {
					out = append(out, stored{User: u.Name(), Path: p, Data: b})
				}
			}
		}
	}
	return out
}

// count is how many message files there are, without reading them.
func (d *dovecot) count() int {
	n := 0
	users, _ := os.ReadDir(filepath.Join(d.dir, "mail"))
	for _, u := range users {
		for _, sub := range []string{"new", "cur"} {
			files, _ := os.ReadDir(filepath.Join(d.dir, "mail", u.Name(), sub))
			n += len(files)
		}
	}
	return n
}

// stripAdded removes what Dovecot (Return-Path) and mxq (its Received
// header) put in front of the message, and returns mxq's queue ID.
func stripAdded(b []byte) (id string, rest []byte, err error) {
	if bytes.HasPrefix(b, []byte("Return-Path:")) {
		i := bytes.Index(b, []byte("\r\n"))
		b = b[i+2:]
	}
	if !bytes.HasPrefix(b, []byte("Received: from ")) {
		return "", nil, fmt.Errorf("no Received header first: %q", firstLine(b))
	}
	// The Received header continues on lines starting with a tab.
	i := 0
	for {
		j := bytes.Index(b[i:], []byte("\r\n"))
		if j < 0 {
			return "", nil, fmt.Errorf("unterminated header")
		}
		i += j + 2
		if i >= len(b) || b[i] != '\t' {
			break
		}
	}
	hdr := string(b[:i])
	k := strings.Index(hdr, " id ")
	if k < 0 {
		return "", nil, fmt.Errorf("no id in %q", hdr)
	}
	id = strings.FieldsFunc(hdr[k+4:], func(r rune) bool { return r == ';' || r == ' ' || r == '\r' || r == '\n' })[0]
	return id, b[i:], nil
}

func firstLine(b []byte) string {
	if i := bytes.IndexByte(b, '\n'); i >= 0 {
		return string(b[:i])
	}
	return string(b)
}

// sendOne runs one SMTP transaction and returns the queue ID from the 250.
func sendOne(ctx context.Context, c *smtp.Client, from string, to []string, msg []byte) (string, error) {
	if err := c.Mail(from, nil); err != nil {
		return "", err
	}
	for _, r := range to {
		if err := c.Rcpt(r, nil); err != nil {
			return "", err
		}
	}
	w, err := c.Data()
	if err != nil {
		return "", err
	}
	if _, err := w.Write(msg); err != nil {
		return "", err
	}
	resp, err := w.CloseWithResponse()
	if err != nil {
		return "", err
	}
	const marker = "queued as "
	i := strings.Index(resp.StatusText, marker)
	if i < 0 {
		return "", fmt.Errorf("250 without queue ID: %q", resp.StatusText)
	}
	return strings.TrimSpace(resp.StatusText[i+len(marker):]), nil
}

func dial(addr string) (*smtp.Client, error) {
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return nil, err
	}
	c := smtp.NewClient(conn)
	c.CommandTimeout = 30 * time.Second
	c.SubmissionTimeout = 30 * time.Second
	if err := c.Hello("sender.example.org"); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

var _ = io.EOF

// startMxqFails runs mxq serve with config and expects it to exit with an
// error within a minute; it returns what mxq printed.
func startMxqFails(t *testing.T, config string) string {
	t.Helper()
	dir := t.TempDir()
	config = strings.NewReplacer("{{smtp}}", freePort(t), "{{dir}}", dir).Replace(config)
	cfg := filepath.Join(dir, "mxq.yaml")
	if err := os.WriteFile(cfg, []byte(config), 0o644); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, mxqBin, "serve", "--config", cfg).CombinedOutput()
	if err == nil {
		t.Fatalf("mxq serve succeeded; want it to fail:\n%s", out)
	}
	if ctx.Err() != nil {
		t.Fatalf("mxq serve did not exit within a minute:\n%s", out)
	}
	return string(out)
}

func containsAny(s string, subs ...string) bool {
	for _, sub := range subs {
		if strings.Contains(s, sub) {
			return true
		}
	}
	return false
}
