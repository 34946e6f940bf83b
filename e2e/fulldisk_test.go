package e2e

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/mxq-dev/mxq/internal/diskguard"
	"github.com/mxq-dev/mxq/internal/testbackend"
)

// fullDiskConfig keeps the queue on a small tmpfs and delivers to a test
// LMTP store that starts down, so everything accepted stays on that disk
// until the test lets it drain.
const fullDiskConfig = `
node_name: fulldisk
data_dir: %s
smtp:
  listen: {{smtp}}
  domains: [example.test]
  min_free_disk: %s
  shutdown_grace: 5s
queue:
  timeout: 2s
admin:
  listen: ""
backend: lmtp://%s
drain:
  retry_min: 1s
  retry_max: 2s
  probe_interval: 300ms
`

// mountTmpfs mounts a tmpfs of size at a new directory, unmounted at the
// end of the test (after mxq, whose cleanup is registered later).
func mountTmpfs(t *testing.T, size string) string {
	t.Helper()
	if os.Getuid() != 0 {
		if os.Getenv("MXQ_E2E") == "require" {
			t.Fatal("the full-disk test needs root to mount a tmpfs")
		}
		t.Skip("mounting a tmpfs needs root")
	}
	dir, err := os.MkdirTemp("", "mxq-fulldisk-")
	if err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size="+size, "tmpfs", dir).CombinedOutput(); err != nil {
		t.Fatalf("mount tmpfs: %v %s", err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("umount", dir).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v %s", dir, err, out)
		}
		os.Remove(dir)
	})
	return dir
}

// fill writes a file taking all the free space of dir's file system but
// leave bytes, and returns its path.
func fill(t *testing.T, dir string, leave uint64) string {
	t.Helper()
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		t.Fatal(err)
	}
	free := st.Bavail * uint64(st.Bsize)
	p := filepath.Join(dir, "filler")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 1<<20)
	for n := uint64(0); free > leave && n < free-leave; {
		k := min(uint64(len(buf)), free-leave-n)
		if _, err := f.Write(buf[:k]); err != nil {
			break // full: that was the point
		}
		n += k
	}
	return p
}

// accepted is a message mxq acknowledged.
type accepted struct{ id, rcpt string }

// sender sends numbered messages, each on its own connection.
type sender struct {
	t    *testing.T
	addr string
	n    int
	ok   []accepted
}

// send returns nil and records the queue ID on 250, or mxq's SMTP error.
func (s *sender) send(size int) error {
	s.n++
	rcpt := fmt.Sprintf("user%d@example.test", s.n%7)
	c, err := dial(s.addr)
	if err != nil {
		return err
	}
	defer c.Close()
	body := fmt.Sprintf("Subject: full disk %d\r\n\r\n%s", s.n, strings.Repeat(strings.Repeat("x", 78)+"\r\n", size/80+1))
	id, err := sendOne(context.Background(), c, "sender@example.org", []string{rcpt}, []byte(body))
	if err == nil {
		s.ok = append(s.ok, accepted{id, rcpt})
		c.Quit()
	}
	return err
}

// smtpCode is the reply code of an SMTP error, 0 for other errors.
func smtpCode(err error) (int, smtp.EnhancedCode) {
	var se *smtp.SMTPError
	if errors.As(err, &se) {
		return se.Code, se.EnhancedCode
	}
	return 0, smtp.EnhancedCode{}
}

// TestFullDisk fills the real file system under mxq's queue.
//
//   - reserve: with min_free_disk, mxq refuses with 452 4.3.1 at MAIL
//     while the disk is below the reserve, and accepts again as soon as
//     space returns.
//   - enospc: without a reserve, the store itself hits ENOSPC; nats-server
//     keeps a sticky write error and never answers that stream again.
//     mxq answers 451 4.3.0, and once space returns its watchdog restarts
//     JetStream and mail is accepted again.
//
// Either way every message acknowledged before, during and after is then
// delivered to the store, exactly the acknowledged queue IDs.
func TestFullDisk(t *testing.T) {
	cases := []struct {
		name    string
		reserve string
		code    int
		enh     smtp.EnhancedCode
	}{
		{"reserve", "8MiB", 452, smtp.EnhancedCode{4, 3, 1}},
		{"enospc", "0", 451, smtp.EnhancedCode{4, 3, 0}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := mountTmpfs(t, "64m")
			store, err := testbackend.Start("127.0.0.1:0", testbackend.Options{})
			if err != nil {
				t.Fatal(err)
			}
			storeAddr := store.Addr()
			store.Down()
			t.Cleanup(store.Close)
			p := startMxq(t, fmt.Sprintf(fullDiskConfig, dir, tc.reserve, storeAddr))
			s := &sender{t: t, addr: p.smtp}

			// Some mail while there is room.
			for i := 0; i < 20; i++ {
				if err := s.send(20 << 10); err != nil {
					t.Fatalf("with room: %v", err)
				}
			}
			// Where group commit stages its batches: a link to /dev/shm
			// when that is a tmpfs (queue.batch_staging: auto).
			staging := filepath.Join(dir, "jetstream", "$G", "streams", "MXQ", "batches")
			linked := func() bool { fi, err := os.Lstat(staging); return err == nil && fi.Mode()&os.ModeSymlink != 0 }
			stagedInMemory := linked()

			// The disk fills up (something else writes to it).
			filler := fill(t, dir, 0)
			// The guard reuses a free-space reading for a while (a mail
			// accepted within that time reaches the full store and gets
			// 451, the enospc case below); after that it must refuse first.
			time.Sleep(2 * diskguard.DefaultMaxAge)
			var refusal error
			deadline := time.Now().Add(60 * time.Second)
			for refusal == nil && time.Now().Before(deadline) {
				refusal = s.send(20 << 10)
			}
			if code, enh := smtpCode(refusal); code != tc.code || enh != tc.enh {
				t.Fatalf("full disk: %v, want %d %v", refusal, tc.code, tc.enh)
			}
			t.Logf("full disk after %d acknowledged messages: %v", len(s.ok), refusal)
			// It stays refused while the disk is full.
			if err := s.send(100); err == nil {
				t.Fatal("accepted with a full disk")
			}

			// Space returns: mxq accepts again by itself.
			os.Remove(filler)
			start := time.Now()
			for {
				err := s.send(20 << 10)
				if err == nil {
					break
				}
				if time.Since(start) > 60*time.Second {
					t.Fatalf("space freed %v ago, still refused: %v", time.Since(start).Round(time.Second), err)
				}
				time.Sleep(200 * time.Millisecond)
			}
			t.Logf("accepting again %v after space returned", time.Since(start).Round(time.Millisecond))
			// The restarted JetStream dropped the staging link; mxq puts it
			// back, or group commit would stay slow until a restart.
			if stagedInMemory && !linked() {
				t.Error("batch staging left on the disk after the recovery")
			}
			for i := 0; i < 10; i++ {
				if err := s.send(20 << 10); err != nil {
					t.Fatalf("after recovery: %v", err)
				}
			}

			// The store comes up: every acknowledged message is delivered.
			if err := store.Up(); err != nil {
				t.Fatal(err)
			}
			want := map[string]string{}
			for _, a := range s.ok {
				want[a.id] = a.rcpt
			}
			deadline = time.Now().Add(90 * time.Second)
			for store.Count() < len(want) && time.Now().Before(deadline) {
				time.Sleep(200 * time.Millisecond)
			}
			got := map[string]int{}
			for _, d := range store.Deliveries() {
				got[d.QueueID]++
				if want[d.QueueID] != d.Rcpt {
					t.Errorf("delivered %s to %s, acknowledged for %q", d.QueueID, d.Rcpt, want[d.QueueID])
				}
			}
			lost := 0
			for id := range want {
				if got[id] == 0 {
					lost++
				}
			}
			if lost > 0 {
				t.Fatalf("%d of %d acknowledged messages not delivered", lost, len(want))
			}
			t.Logf("%d acknowledged, %d delivered (duplicates allowed by at-least-once: %d)", len(want), store.Count(), store.Count()-len(want))
			log, _ := os.ReadFile(p.logPath)
			if tc.name == "enospc" && !bytes.Contains(log, []byte("restarting JetStream")) {
				t.Error("recovered without the watchdog's restart: the test no longer exercises it")
			}
			// And it still stops promptly. (After the restart, deleting some
			// delivered records answers "no message found", which the
			// store must take as deleted, or the drain retries for a
			// minute and SIGTERM waits for it; a stopping drain retries
			// for a few seconds only.)
			start = time.Now()
			if err := p.stop(); err != nil || time.Since(start) > 20*time.Second {
				t.Errorf("SIGTERM took %v: %v", time.Since(start).Round(time.Second), err)
			}
			// Delivered means gone for good: a record the recovered store
			// still held after its delete would come back after a restart.
			before := store.Count()
			p.start()
			time.Sleep(3 * time.Second)
			if n := store.Count(); n != before {
				t.Errorf("after a restart %d more deliveries: delivered records came back", n-before)
			}
			if log, _ := os.ReadFile(p.logPath); bytes.Contains(log, []byte("no longer holds")) {
				t.Logf("this run met a delete answered \"no message found\" after the JetStream restart")
			}
		})
	}
}
