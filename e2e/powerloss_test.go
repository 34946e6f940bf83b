package e2e

// TestPowerLoss cuts the power under mxq while it takes mail, for real as
// far as mxq can tell: its data directory is on lazyfs, a FUSE filesystem
// that keeps every write in memory until the file is fsynced, and whose
// PowerCut throws away whatever was not. (Killing a process, or a
// container, leaves the page cache intact and so proves nothing about
// fsync.) After the cut mxq is killed, the filesystem mounted again with
// only its durable content, mxq restarted on it and drained into a test
// LMTP server: every message answered 250 must come out. The directory
// that stands for the tmpfs where mxq stages atomic batches is emptied at
// the cut too, as a power loss empties a tmpfs.
//
// What it proves: with queue.durability group and single, a 250 is never
// sent for a message whose bytes were not fsynced (lost must be 0), and
// nats-server recovers the stream from the synced state. With unsafe
// (no SyncAlways) acknowledged mail is lost, which shows the test bites.
//
// What it does not prove: metadata durability (lazyfs applies creates,
// renames and unlinks at once, so a directory fsync that is missing goes
// unnoticed); torn or reordered writes inside the unsynced part (a cut
// loses all of it); a disk that lies about fsync; power loss of a
// cluster. Each mode is cut once, at a random moment.

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mxq-dev/mxq/internal/lazyfs"
	"github.com/mxq-dev/mxq/internal/testbackend"
)

// powerLossConfig: data on the lazyfs mount, the atomic-batch staging
// area in a directory of the test's that stands for the tmpfs it is in
// production (emptied at the cut, as a power loss empties a tmpfs), the
// backend somewhere (nothing listening during the load, the test backend
// after the cut).
const powerLossConfig = `
node_name: powerloss
data_dir: %s
log:
  level: info
smtp:
  listen: %s
  domains: [example.test]
  shutdown_grace: 5s
admin:
  listen: ""
queue:
  durability: %s
  batch_staging: %s
backends:
  store:
    protocol: lmtp
    address: %s
    rate: 5000
    concurrency: 8
drain:
  retry_min: 1s
  retry_max: 2s
  probe_interval: 200ms
`

func TestPowerLoss(t *testing.T) {
	need(t, "fusermount3")
	if _, err := os.Stat("/dev/fuse"); err != nil {
		if os.Getenv("MXQ_E2E") == "require" {
			t.Fatalf("/dev/fuse is required (MXQ_E2E=require): %v", err)
		}
		t.Skipf("no FUSE: %v", err)
	}
	for _, mode := range []string{"group", "single", "unsafe"} {
		t.Run(mode, func(t *testing.T) {
			lost, _ := powerLoss(t, mode)
			if mode == "unsafe" {
				if lost == 0 {
					t.Fatal("unsafe lost no acknowledged mail: the power cut did not bite")
				}
			} else if lost != 0 {
				t.Fatalf("%d acknowledged messages lost", lost)
			}
		})
	}
}

// powerLoss runs one cut in the given durability mode and returns how many
// acknowledged messages did not come out, and how many came out twice.
func powerLoss(t *testing.T, mode string) (lost, dups int) {
	seed := rand.Uint64()
	rng := rand.New(rand.NewPCG(seed, seed>>32))
	// Acknowledged messages before the cut: up to a few seconds of load
	// and some 40 MiB, so the cut can fall in a later message block.
	cutAfter := 200 + rng.IntN(2300)
	t.Logf("seed %d: cut after %d acknowledgements", seed, cutAfter)

	backing, mnt := t.TempDir(), t.TempDir()
	lfs := mountLazy(t, backing, mnt)
	// Registered before mxq's cleanup, so it runs after it: whichever
	// mount is current is unmounted once mxq has stopped.
	t.Cleanup(func() { unmountLazy(lfs) })
	dataDir := filepath.Join(mnt, "data")

	dir := t.TempDir() // config, log and batch staging, off the mount
	staging := filepath.Join(dir, "staging")
	p := &mxqProc{t: t, dir: dir, smtp: freePort(t), cfg: filepath.Join(dir, "mxq.yaml"), logPath: filepath.Join(dir, "mxq.log")}
	t.Cleanup(func() {
		p.stop()
		if t.Failed() {
			if b, err := os.ReadFile(p.logPath); err == nil {
				lines := strings.Split(string(b), "\n")
				t.Logf("mxq log (tail):\n%s", strings.Join(lines[max(0, len(lines)-60):], "\n"))
			}
		}
	})
	writePowerLossConfig(t, p, dataDir, staging, mode, freePort(t))
	p.start()

	// Load: sessions send until the cut; every 250 is recorded.
	const sessions = 24
	var (
		mu    sync.Mutex
		acked = map[string]int{} // queue ID → message
		n     atomic.Int64
		next  atomic.Int64
		cut   = make(chan struct{})
		once  sync.Once
	)
	powerCut := func() {
		once.Do(func() {
			// The cut first: from this instant no fsync succeeds, so
			// mxq may still answer 250 for a moment, but only for what
			// was durable. Then the kill, as the power would.
			if err := lfs.PowerCut(); err != nil {
				t.Error(err)
			}
			p.kill()
			if err := os.RemoveAll(staging); err != nil {
				t.Error(err)
			}
			close(cut)
		})
	}
	start := time.Now()
	var wg sync.WaitGroup
	for s := 0; s < sessions; s++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-cut:
					return
				default:
				}
				cl, err := dial(p.smtp)
				if err != nil {
					time.Sleep(20 * time.Millisecond)
					continue
				}
				for {
					i := int(next.Add(1))
					to, msg := testMessage(i)
					id, err := sendOne(context.Background(), cl, "sender@example.org", to, msg)
					if err != nil {
						break // a 4xx, or the connection died with mxq
					}
					mu.Lock()
					acked[id] = i
					mu.Unlock()
					if n.Add(1) == int64(cutAfter) {
						go powerCut()
					}
				}
				cl.Close()
			}
		}()
	}
	// Cut anyway if the load is slower than expected.
	select {
	case <-cut:
	case <-time.After(15 * time.Second):
		t.Logf("only %d acknowledgements after 15s; cutting now", n.Load())
		powerCut()
	}
	wg.Wait()
	loadTime := time.Since(start)
	st := lfs.Stats()
	t.Logf("%s: %d messages acknowledged in %v; lazyfs: %d writes (%d MiB), %d fsyncs, %d O_SYNC writes, %d dir fsyncs, %d truncates; cut lost %d bytes in %d files",
		mode, len(acked), loadTime.Round(time.Millisecond), st.Writes, st.WrittenBytes>>20, st.Fsyncs, st.SyncWrites, st.DirFsyncs, st.Truncates, st.LostBytes, st.LostFiles)
	if len(acked) == 0 {
		t.Fatal("nothing was acknowledged before the cut")
	}

	// Boot: mount again (only the durable state), restart mxq towards a
	// store that is up.
	if err := lfs.Unmount(); err != nil {
		t.Fatal(err)
	}
	lfs = mountLazy(t, backing, mnt)
	store, err := testbackend.Start("127.0.0.1:0", testbackend.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	writePowerLossConfig(t, p, dataDir, staging, mode, store.Addr())
	p.start()

	// Drain until every acknowledged message is out. The unsafe mode
	// never gets there: it stops once nothing has come for a while (the
	// durable modes do not, so a slow start cannot pass for a loss).
	want := map[string]bool{}
	for id := range acked {
		want[id] = true
	}
	deadline := time.Now().Add(30 * time.Second)
	last, lastChange := -1, time.Now()
	for time.Now().Before(deadline) {
		ds := store.Deliveries()
		missing := 0
		seen := map[string]bool{}
		for _, d := range ds {
			seen[d.QueueID] = true
		}
		for id := range want {
			if !seen[id] {
				missing++
			}
		}
		if missing == 0 {
			break
		}
		if len(ds) != last {
			last, lastChange = len(ds), time.Now()
		} else if mode == "unsafe" && time.Since(lastChange) > 4*time.Second {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	// Stragglers: let duplicates arrive before counting.
	time.Sleep(500 * time.Millisecond)

	copies := map[string]int{} // queue ID + recipient → deliveries
	delivered := map[string]bool{}
	for _, d := range store.Deliveries() {
		copies[d.QueueID+" "+d.Rcpt]++
		delivered[d.QueueID] = true
	}
	for id, i := range acked {
		if !delivered[id] {
			lost++
			if mode != "unsafe" {
				t.Errorf("LOST: message %d, queue ID %s", i, id)
			}
		}
	}
	for _, c := range copies {
		dups += c - 1
	}
	t.Logf("RESULT %s: lost=%d duplicates=%d of %d acknowledged (%d delivered, %d queue IDs)",
		mode, lost, dups, len(acked), len(store.Deliveries()), len(delivered))
	if err := p.stop(); err != nil {
		t.Errorf("clean shutdown after the restart: %v", err)
	}
	return lost, dups
}

func mountLazy(t *testing.T, backing, mnt string) *lazyfs.FS {
	t.Helper()
	f, err := lazyfs.Mount(backing, mnt)
	if err != nil {
		t.Fatal(err)
	}
	return f
}

// unmountLazy unmounts, lazily if something still holds the mount, so no
// mount outlives the test.
func unmountLazy(f *lazyfs.FS) {
	if err := f.Unmount(); err != nil {
		exec.Command("fusermount3", "-u", "-z", f.Mountpoint()).Run()
	}
}

func writePowerLossConfig(t *testing.T, p *mxqProc, dataDir, staging, mode, backend string) {
	t.Helper()
	cfg := fmt.Sprintf(powerLossConfig, dataDir, p.smtp, mode, staging, backend)
	if err := os.WriteFile(p.cfg, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
}
