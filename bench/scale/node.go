package main

import (
	"bufio"
	"crypto/tls"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/crypto/bcrypt"

	"github.com/mxq-dev/mxq/internal/testpki"
)

// node is one `mxq serve` process and everything it was started with: its
// configuration file, data directory, loopback ports and, with continuity
// on, its certificate and passwd-file.
type node struct {
	bin, dir, cfg, logPath string
	smtp, admin, imap      string // imap: "" with continuity off
	token                  string
	password               string // the known user's
	tls                    *tls.Config

	mu  sync.Mutex
	cmd *exec.Cmd
}

const adminToken = "scale-bench-token"

// newNode writes the configuration of a node whose store is at store.
func newNode(bin, dir, store string, continuity bool) (*node, error) {
	n := &node{
		bin: bin, dir: dir, cfg: filepath.Join(dir, "mxq.yaml"), logPath: filepath.Join(dir, "mxq.log"),
		smtp: freePort(), admin: freePort(), token: adminToken, password: "known-pw",
	}
	cont := "continuity: {enabled: false}\n"
	if continuity {
		n.imap = freePort()
		ca, err := testpki.NewCA("mxq scale benchmark")
		if err != nil {
			return nil, err
		}
		leaf, err := ca.Issue("127.0.0.1")
		if err != nil {
			return nil, err
		}
		cert, key, _, err := leaf.Write(dir, ca)
		if err != nil {
			return nil, err
		}
		// The certificate is valid for a day; a long run outlives it, and
		// on loopback there is nothing to verify.
		n.tls = &tls.Config{InsecureSkipVerify: true}
		// bcrypt at cost 5 (~2 ms here): the login in the measurement is
		// mxq's work, not a slow hash. Production hashes cost 10 or more
		// (50-100 ms on this kind of machine), once per login.
		h, err := bcrypt.GenerateFromPassword([]byte(n.password), 5)
		if err != nil {
			return nil, err
		}
		passwd := filepath.Join(dir, "passwd")
		if err := os.WriteFile(passwd, []byte(knownUser+":{BLF-CRYPT}"+string(h)+"::::::\n"), 0o600); err != nil {
			return nil, err
		}
		cont = fmt.Sprintf(`continuity:
  enabled: true
  imap: {listen: "%s"}
  web: {listen: ""}
  tls: {cert_file: "%s", key_file: "%s"}
  auth: {passwd_file: "%s", default_domain: %s, max_failures_per_user: 1000, max_failures_per_ip: 1000}
`, n.imap, cert, key, passwd, domain)
	}
	// The store's ceilings are far above what the machine can do, so that
	// the drain rate measured is mxq's. A short probe interval makes the
	// store's return noticed within a second; short retries make a
	// message deferred during a store transition come back within the
	// same phase (none is expected: an unreachable store counts no retry).
	cfg := fmt.Sprintf(`node_name: scale
data_dir: %s
log: {level: info}
smtp:
  listen: "%s"
  hostname: mx.scale.test
  domains: [%s]
admin: {listen: "%s", token: "%s"}
backends:
  store:
    protocol: lmtp
    address: "%s"
    rate: 100000
    concurrency: %d
drain:
  probe_interval: 1s
  retry_min: 2s
  retry_max: 10s
%s`, filepath.Join(dir, "data"), n.smtp, domain, n.admin, n.token, store, sinkConcurrency, cont)
	if err := os.WriteFile(n.cfg, []byte(cfg), 0o644); err != nil {
		return nil, err
	}
	return n, nil
}

// launch starts the process and returns at once.
func (n *node) launch() error {
	logf, err := os.OpenFile(n.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer logf.Close()
	fmt.Fprintf(logf, "\n=== scale: start at %s\n", time.Now().Format(time.RFC3339Nano))
	cmd := exec.Command(n.bin, "serve", "--config", n.cfg)
	cmd.Dir = n.dir
	cmd.Stdout, cmd.Stderr = logf, logf
	// Its own process group: a ^C to the benchmark is not also a SIGINT
	// to mxq, which the benchmark stops itself.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return err
	}
	n.mu.Lock()
	n.cmd = cmd
	n.mu.Unlock()
	return nil
}

// start launches and waits for the SMTP greeting.
func (n *node) start(timeout time.Duration) error {
	if err := n.launch(); err != nil {
		return err
	}
	deadline := time.Now().Add(timeout)
	for {
		if !n.alive() {
			return fmt.Errorf("mxq exited at start-up; log:\n%s", n.logTail(30))
		}
		if c, err := net.DialTimeout("tcp", n.smtp, time.Second); err == nil {
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			line, _ := bufio.NewReader(c).ReadString('\n')
			c.Close()
			if strings.HasPrefix(line, "220") {
				return nil
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("mxq did not greet on %s within %v; log:\n%s", n.smtp, timeout, n.logTail(30))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (n *node) pid() int {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.cmd == nil {
		return 0
	}
	return n.cmd.Process.Pid
}

// alive tells whether the process is still running (not a zombie).
func (n *node) alive() bool {
	pid := n.pid()
	if pid == 0 {
		return false
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	// pid (comm) state ...
	s := string(b)
	if i := strings.LastIndexByte(s, ')'); i >= 0 && i+2 < len(s) {
		return s[i+2] != 'Z'
	}
	return true
}

// kill is kill -9, and reaps the process.
func (n *node) kill() {
	n.mu.Lock()
	cmd := n.cmd
	n.cmd = nil
	n.mu.Unlock()
	if cmd != nil {
		cmd.Process.Signal(syscall.SIGKILL)
		cmd.Wait()
	}
}

// stop sends SIGTERM and waits up to a minute, then kills.
func (n *node) stop() {
	n.mu.Lock()
	cmd := n.cmd
	n.cmd = nil
	n.mu.Unlock()
	if cmd == nil {
		return
	}
	cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(time.Minute):
		cmd.Process.Kill()
		<-done
	}
}

func (n *node) logTail(lines int) string {
	b, _ := os.ReadFile(n.logPath)
	l := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(l) > lines {
		l = l[len(l)-lines:]
	}
	return strings.Join(l, "\n")
}

// memory returns VmRSS and VmHWM of the process in MiB (0 if gone).
func memory(pid int) (rss, hwm float64) {
	if pid == 0 {
		return 0, 0
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		kib, _ := strconv.ParseFloat(f[1], 64)
		switch f[0] {
		case "VmRSS:":
			rss = kib / 1024
		case "VmHWM:":
			hwm = kib / 1024
		}
	}
	return rss, hwm
}

// handedOut holds the ports freePort has returned.
var handedOut sync.Map

// freePort returns a loopback address that was free a moment ago, below
// the kernel's ephemeral range (as e2e's harness does): a port from
// "127.0.0.1:0", freed again, is the next thing the kernel hands to any
// other ":0" listener, such as mxq's own single-node raft.
func freePort() string {
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
	panic("no free loopback port below the ephemeral range")
}

// sinkConcurrency is the backend's concurrency ceiling: far above what the
// store needs on this machine, so that the store is never the limit.
const sinkConcurrency = 16
