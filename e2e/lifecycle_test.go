package e2e

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/mxq-dev/mxq/internal/testbackend"
	"github.com/mxq-dev/mxq/queue"
)

// bigMessage is a message of exactly size bytes, CRLF lines.
func bigMessage(size int) []byte {
	var b bytes.Buffer
	b.WriteString("From: big@example.org\r\nSubject: big\r\nMessage-ID: <big@example.org>\r\n\r\n")
	line := []byte("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-0123456789\r\n")
	for b.Len()+len(line) <= size-2 {
		b.Write(line)
	}
	for b.Len() < size-2 {
		b.WriteByte('x')
	}
	b.WriteString("\r\n")
	return b.Bytes()
}

// The largest message the default configuration allows (50 MiB) goes
// through: accepted, stored in chunks, delivered to Dovecot byte for byte.
// One byte more is refused with 552 5.3.4.
func TestLargestMessage(t *testing.T) {
	need(t, "dovecot", "doveadm")
	dc := newDovecot(t)
	dc.start()
	m := startMxq(t, fmt.Sprintf(coreConfig, dc.addr, 200))
	testLargest(t, m, dc)
}

func testLargest(t *testing.T, m *mxqProc, dc *dovecot) {
	// Leave room for the Received header mxq adds: the limit applies to
	// what the client sends.
	msg := bigMessage(50<<20 - 1)
	c, err := dial(m.smtp)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	id, err := sendOne(t.Context(), c, "big@example.org", []string{"bob@example.test"}, msg)
	if err != nil {
		t.Fatalf("50 MiB message: %v", err)
	}
	t.Logf("50 MiB message accepted as %s in %v", id, time.Since(start).Round(time.Millisecond))
	c.Quit()

	// One byte over the limit.
	c, err = dial(m.smtp)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := sendOne(t.Context(), c, "big@example.org", []string{"bob@example.test"}, bigMessage(50<<20+1)); err == nil || !strings.Contains(err.Error(), "552") {
		t.Fatalf("50 MiB + 1: err %v, want 552", err)
	}
	c.Close()

	deadline := time.Now().Add(2 * time.Minute)
	for dc.count() < 1 && time.Now().Before(deadline) {
		time.Sleep(100 * time.Millisecond)
	}
	msgs := dc.messages()
	if len(msgs) != 1 {
		t.Fatalf("%d messages delivered", len(msgs))
	}
	gotID, body, err := stripAdded(msgs[0].Data)
	if err != nil {
		t.Fatal(err)
	}
	if gotID != id || sha256.Sum256(body) != sha256.Sum256(msg) {
		t.Fatalf("delivered %s, %d bytes; sent %s, %d bytes", gotID, len(body), id, len(msg))
	}
}

// SIGTERM: new connections are refused at once, a message being sent is
// finished and answered 250, and the process exits cleanly; after a restart
// that message is delivered.
func TestGracefulShutdown(t *testing.T) {
	need(t, "dovecot", "doveadm")
	dc := newDovecot(t)
	m := startMxq(t, fmt.Sprintf(coreConfig, dc.addr, 200))

	conn, err := net.Dial("tcp", m.smtp)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	rd := bufio.NewReader(conn)
	expect := func(prefix string) {
		t.Helper()
		conn.SetReadDeadline(time.Now().Add(30 * time.Second))
		for {
			line, err := rd.ReadString('\n')
			if err != nil {
				t.Fatalf("waiting for %s: %v", prefix, err)
			}
			if len(line) >= 4 && line[3] == '-' {
				continue
			}
			if !strings.HasPrefix(line, prefix) {
				t.Fatalf("got %q, want %s", line, prefix)
			}
			return
		}
	}
	expect("220")
	fmt.Fprintf(conn, "EHLO sender.example.org\r\n")
	expect("250")
	fmt.Fprintf(conn, "MAIL FROM:<a@example.org>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n")
	expect("250")
	expect("250")
	expect("354")
	io.WriteString(conn, "Subject: in flight during SIGTERM\r\n\r\nfirst half\r\n")

	m.mu.Lock()
	proc := m.cmd.Process
	m.mu.Unlock()
	exited := make(chan error, 1)
	go func() { exited <- m.stop() }()
	time.Sleep(500 * time.Millisecond)

	// The listener is closed: a new client is not served.
	if c2, err := net.DialTimeout("tcp", m.smtp, time.Second); err == nil {
		c2.SetReadDeadline(time.Now().Add(2 * time.Second))
		line, _ := bufio.NewReader(c2).ReadString('\n')
		c2.Close()
		if strings.HasPrefix(line, "220") {
			t.Fatalf("a new connection was greeted during shutdown: %q", line)
		}
	}
	select {
	case err := <-exited:
		t.Fatalf("mxq exited (%v) with a message in flight", err)
	default:
	}
	io.WriteString(conn, "second half\r\n.\r\n")
	expect("250 2.0.0 Ok: queued as")
	if err := <-exited; err != nil {
		t.Fatalf("exit after SIGTERM: %v (pid %d)", err, proc.Pid)
	}
	// A clean stop leaves nothing of the batch staging area in /dev/shm.
	if stage := queue.TmpfsStagingDir(filepath.Join(m.dir, "data"), 0); stage != "" {
		if _, err := os.Stat(stage); !os.IsNotExist(err) {
			t.Errorf("batch staging %s still there after a clean stop (%v)", stage, err)
		}
	}

	dc.start()
	m.start()
	deadline := time.Now().Add(30 * time.Second)
	for dc.count() < 1 && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	msgs := dc.messages()
	if len(msgs) != 1 || !bytes.Contains(msgs[0].Data, []byte("first half\r\nsecond half\r\n")) {
		t.Fatalf("after restart, Dovecot holds %d messages", len(msgs))
	}
}

// A kill -9 in the middle of a large message's DATA leaves the chunks
// stored so far in the stream, named by no envelope. The next start removes
// them, and only them: a large message queued before is delivered whole.
func TestCrashMidUploadLeavesNoOrphans(t *testing.T) {
	beAddr := freePort(t) // the store is down until the end
	m := startMxq(t, fmt.Sprintf(coreConfig, beAddr, 200))

	whole := bigMessage(10 << 20)
	c, err := dial(m.smtp)
	if err != nil {
		t.Fatal(err)
	}
	id, err := sendOne(t.Context(), c, "big@example.org", []string{"bob@example.test"}, whole)
	if err != nil {
		t.Fatal(err)
	}
	c.Quit()

	// 20 MiB of a 30 MiB message: several 4 MiB chunks are stored by the
	// time the write returns, however much the sockets buffer.
	c, err = dial(m.smtp)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Mail("big@example.org", nil); err != nil {
		t.Fatal(err)
	}
	if err := c.Rcpt("carol@example.test", nil); err != nil {
		t.Fatal(err)
	}
	w, err := c.Data()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write(bigMessage(30 << 20)[:20<<20]); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second)
	m.kill()

	m.start()
	var logged string
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		b, _ := os.ReadFile(m.logPath)
		for _, l := range strings.Split(string(b), "\n") {
			if strings.Contains(l, "chunks of messages a crash cut off") {
				logged = l
			}
		}
		if logged != "" {
			break
		}
	}
	if !strings.Contains(logged, "messages=1 ") || strings.Contains(logged, "bytes=0 ") {
		t.Fatalf("restart after the crash: want one cut-off message's chunks removed, log says %q", logged)
	}
	t.Logf("restart: %s", logged)

	be, err := testbackend.Start(beAddr, testbackend.Options{KeepData: true})
	if err != nil {
		t.Fatal(err)
	}
	defer be.Close()
	for deadline := time.Now().Add(time.Minute); be.Stats().Accepted < 1 && time.Now().Before(deadline); {
		time.Sleep(100 * time.Millisecond)
	}
	time.Sleep(time.Second) // nothing else may follow
	ds := be.Deliveries()
	if len(ds) != 1 || ds[0].QueueID != id {
		t.Fatalf("%d deliveries, want just %s", len(ds), id)
	}
	if _, body, err := stripAdded(ds[0].Data); err != nil || sha256.Sum256(body) != sha256.Sum256(whole) {
		t.Fatalf("the queued 10 MiB message arrived damaged (%d bytes, %v)", len(body), err)
	}
}
