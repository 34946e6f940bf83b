package diskguard

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mxq-dev/mxq/queue"
	"github.com/mxq-dev/mxq/queue/envelope"
)

func TestCheck(t *testing.T) {
	cases := []struct {
		name          string
		free, reserve uint64
		need          int64
		statErr       error
		want          error
	}{
		{"room", 100 << 20, 10 << 20, 1 << 20, nil, nil},
		{"below reserve", 9 << 20, 10 << 20, 0, nil, envelope.ErrStorageFull},
		{"message does not fit above the reserve", 11 << 20, 10 << 20, 2 << 20, nil, envelope.ErrStorageFull},
		{"exactly enough", 12 << 20, 10 << 20, 2 << 20, nil, nil},
		{"no reserve, full disk", 0, 0, 1, nil, envelope.ErrStorageFull},
		{"unknown size", 10 << 20, 10 << 20, -1, nil, nil},
		{"statfs fails: let the store decide", 0, 10 << 20, 0, errors.New("EIO"), nil},
		// A 1 GiB file system: a 1 GiB reserve is capped to 100 MiB.
		{"reserve capped to a tenth", 200 << 20, 1 << 30, 0, nil, nil},
		{"below the capped reserve", 90 << 20, 1 << 30, 0, nil, envelope.ErrStorageFull},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			g := New("/data", tc.reserve, nil)
			g.Statfs = func(string) (uint64, uint64, error) { return tc.free, 1 << 30, tc.statErr }
			err := g.Check(tc.need)
			if tc.want == nil && err != nil || tc.want != nil && !errors.Is(err, tc.want) {
				t.Fatalf("Check(%d) with %d free, reserve %d: %v, want %v", tc.need, tc.free, tc.reserve, err, tc.want)
			}
		})
	}
}

// Check reuses a reading for MaxAge and no longer; a failed reading is
// not reused.
func TestCheckReusesReading(t *testing.T) {
	g := New("/data", 10, nil)
	start := time.Unix(1_700_000_000, 0)
	now := start
	g.Now = func() time.Time { return now }
	var calls int
	free, statErr := uint64(100), error(nil)
	g.Statfs = func(string) (uint64, uint64, error) { calls++; return free, 1 << 30, statErr }
	steps := []struct {
		at        time.Duration
		free      uint64
		statErr   error
		wantCalls int
		wantFull  bool
	}{
		{0, 100, nil, 1, false},
		{50 * time.Millisecond, 5, nil, 1, false},       // reused: the disk filled in between
		{99 * time.Millisecond, 5, nil, 1, false},       // still within MaxAge
		{100 * time.Millisecond, 5, nil, 2, true},       // read again
		{150 * time.Millisecond, 100, nil, 2, true},     // reused: full until the next reading
		{200 * time.Millisecond, 100, errEIO, 3, false}, // failed: not kept, mail accepted
		{201 * time.Millisecond, 5, nil, 4, true},       // asked again at once
		{100 * time.Millisecond, 100, nil, 5, false},    // the clock went back: read again
	}
	for i, st := range steps {
		now, free, statErr = start.Add(st.at), st.free, st.statErr
		err := g.Check(0)
		if calls != st.wantCalls {
			t.Fatalf("step %d: %d statfs calls, want %d", i, calls, st.wantCalls)
		}
		if full := errors.Is(err, envelope.ErrStorageFull); full != st.wantFull {
			t.Fatalf("step %d: Check = %v, want full %v", i, err, st.wantFull)
		}
	}
}

var errEIO = errors.New("EIO")

// fakeJS is a store that stays broken until restarted.
type fakeJS struct {
	broken   atomic.Pointer[error]
	restarts chan struct{}
}

func (f *fakeJS) Broken() error {
	if p := f.broken.Load(); p != nil {
		return *p
	}
	return nil
}
func (f *fakeJS) Restart() error { f.broken.Store(nil); f.restarts <- struct{}{}; return nil }

// A broken store is reported to Check (451 at once, not a publish timeout)
// and restarted only when the disk has room again.
func TestWatchRestartsWhenThereIsRoom(t *testing.T) {
	g := New("/data", 10, nil)
	g.MaxAge = 0 // the free space changes under the test; see TestCheckReusesReading
	var free atomic.Uint64
	free.Store(5) // full
	g.Statfs = func(string) (uint64, uint64, error) { return free.Load(), 1 << 30, nil }
	js := &fakeJS{restarts: make(chan struct{}, 100)}
	enospc := errors.New("write error: no space left on device")
	js.broken.Store(&enospc)
	var restarted atomic.Int32
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		g.Watch(ctx, js, WatchOptions{Interval: time.Millisecond, MaxBackoff: time.Millisecond, Restarted: func() { restarted.Add(1) }})
		close(done)
	}()
	defer func() { cancel(); <-done }()

	waitFor := func(what string, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for !cond() {
			if time.Now().After(deadline) {
				t.Fatalf("timed out waiting until %s", what)
			}
			time.Sleep(time.Millisecond)
		}
	}
	if err := g.Check(0); !errors.Is(err, envelope.ErrStorageFull) {
		t.Fatalf("full disk: %v", err)
	}
	// Give Watch many rounds: it must not restart into a full disk.
	time.Sleep(30 * time.Millisecond)
	if len(js.restarts) != 0 {
		t.Fatal("restarted into a full disk")
	}
	free.Store(100)
	// Space is back but the store is still broken: 451, not 250.
	if err := g.Check(0); !errors.Is(err, envelope.ErrStorageUnavailable) && len(js.restarts) == 0 {
		t.Fatalf("broken store with room: %v", err)
	}
	waitFor("the store is restarted", func() bool { return len(js.restarts) > 0 })
	waitFor("Check accepts again", func() bool { return g.Check(0) == nil })
	if n := len(js.restarts); n != 1 {
		t.Fatalf("%d restarts, want 1", n)
	}
	waitFor("Restarted runs after the restart", func() bool { return restarted.Load() > 0 })
	if n := restarted.Load(); n != 1 {
		t.Fatalf("Restarted ran %d times, want once after the restart", n)
	}
}

// TestRealENOSPC fills a real (tmpfs) file system under an embedded
// nats-server until a publish fails with ENOSPC, and shows what v2.15.2
// does: the stream keeps a sticky write error and never answers again,
// even after space returns, until JetStream is restarted; then it takes
// writes again and every message acknowledged before is still there.
func TestRealENOSPC(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("mounting a tmpfs needs root")
	}
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", dir).CombinedOutput(); err != nil {
		t.Skipf("mount tmpfs: %v %s", err, out)
	}
	// Cleanups run last-in first-out: the server stops before the unmount.
	t.Cleanup(func() { exec.Command("umount", dir).Run() })
	ctx := context.Background()
	emb, err := queue.StartEmbedded(ctx, queue.EmbeddedOptions{ServerName: "t", StoreDir: dir, MaxPayload: 8 << 20, SyncAlways: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(emb.Shutdown)
	nc, err := emb.Connect("t")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	st, err := queue.Open(ctx, nc, queue.Options{Stream: "MXQ", Replicas: 1, Durability: queue.DurabilitySingle,
		ChunkSize: 256 << 10, Timeout: time.Second, Route: func(string) string { return "store" }})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(st.Close)
	js, err := NATS(emb.Server())
	if err != nil {
		t.Fatal(err)
	}

	// Leave about 4 MiB free, then store 100 KiB messages until one fails.
	g := New(dir, 0, nil)
	free, _, _ := g.Statfs(dir)
	filler := filepath.Join(dir, "filler")
	if err := os.WriteFile(filler, make([]byte, free-4<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	ids := envelope.NewIDGen(time.Now, 1)
	body := bytes.Repeat([]byte("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcde\r\n"), 1600)
	var acked []string
	enqueue := func() error {
		env := &envelope.Envelope{ID: ids.New(), From: "a@example.org", To: []string{"b@example.test"}, Arrived: time.Now()}
		err := st.Enqueue(ctx, env, bytes.NewReader(body))
		if err == nil {
			acked = append(acked, env.ID)
		}
		return err
	}
	var failed error
	for i := 0; i < 200 && failed == nil; i++ {
		failed = enqueue()
	}
	if failed == nil {
		t.Fatal("the disk never filled")
	}
	t.Logf("%d messages stored, then: %v", len(acked), failed)
	if js.Broken() == nil {
		t.Fatal("store not reported broken after ENOSPC")
	}
	os.Remove(filler)
	if err := enqueue(); err == nil {
		t.Fatal("nats-server recovered by itself; the restart may no longer be needed")
	}
	if err := js.Restart(); err != nil {
		t.Fatal(err)
	}
	if err := js.Broken(); err != nil {
		t.Fatalf("still broken after restart: %v", err)
	}
	for i := 0; i < 3; i++ {
		if err := enqueue(); err != nil {
			t.Fatalf("after restart: %v", err)
		}
	}
	recs, _, err := st.ReadFrom(ctx, st.QueueSubject("store"), 1, 1000, 0)
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]bool{}
	for _, r := range recs {
		if r.Err != nil {
			t.Fatalf("damaged record: %v", r.Err)
		}
		got[r.Env.ID] = true
	}
	for _, id := range acked {
		if !got[id] {
			t.Fatalf("acknowledged message %s lost (%d acked, %d read)", id, len(acked), len(recs))
		}
	}
}
