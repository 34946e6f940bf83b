package drain

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/mxq-dev/mxq/internal/testbackend"
	"github.com/mxq-dev/mxq/internal/teststore"
	"github.com/mxq-dev/mxq/queue"
	"github.com/mxq-dev/mxq/queue/catalog"
	"github.com/mxq-dev/mxq/queue/delivery"
	"github.com/mxq-dev/mxq/queue/envelope"
)

func testStore(t testing.TB) *queue.Store {
	st, _ := teststore.Start(t, nil)
	return st
}

var ids = envelope.NewIDGen(time.Now, 3)

// flatRamp starts at the ceilings: for tests about something else than the
// ramp.
func flatRamp(rate float64, conc int) RampConfig {
	r := DefaultRamp(rate, conc)
	r.StartRate, r.StartConcurrency = rate, conc
	return r
}

// enqueue stores n messages and returns their queue IDs.
func enqueue(t *testing.T, st *queue.Store, n int, rcpts ...string) []string {
	t.Helper()
	var out []string
	for i := 0; i < n; i++ {
		env := &envelope.Envelope{ID: ids.New(), From: "a@example.org", To: rcpts, Arrived: time.Now().UTC()}
		msg := fmt.Sprintf("Received: from x ([127.0.0.1])\r\n\tby mx (mxq) with ESMTP id %s;\r\n\tdate\r\nSubject: %d\r\n\r\nbody\r\n", env.ID, i)
		if err := st.Enqueue(context.Background(), env, strings.NewReader(msg)); err != nil {
			t.Fatal(err)
		}
		out = append(out, env.ID)
	}
	return out
}

func startDrain(t *testing.T, st *queue.Store, be *testbackend.Server, mod func(*Options)) *Drainer {
	t.Helper()
	return startDrainFrom(t, st, st, be, mod)
}

// startDrainFrom is startDrain reading the queue through src.
func startDrainFrom(t *testing.T, src Source, st *queue.Store, be *testbackend.Server, mod func(*Options)) *Drainer {
	t.Helper()
	cl := delivery.New(delivery.Options{Protocol: "lmtp", Address: be.Addr(), MaxIdle: 4, ConnectTimeout: time.Second, CommandTimeout: 5 * time.Second})
	o := Options{
		Routes:        []Route{{Name: "store", Deliverer: cl, Ramp: flatRamp(1000, 4)}},
		RetryMin:      50 * time.Millisecond,
		RetryMax:      200 * time.Millisecond,
		MaxLifetime:   time.Hour,
		ProbeInterval: 100 * time.Millisecond,
		PollInterval:  50 * time.Millisecond,
	}
	if mod != nil {
		mod(&o)
	}
	var held func(string) bool
	if o.Control != nil {
		held = o.Control.Held
	}
	d := New(src, teststore.Catalog(t, st, held), o)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { d.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done; cl.Close() })
	return d
}

func waitFor(t testing.TB, what string, d time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func queued(t testing.TB, st *queue.Store) (q, dead uint64) {
	in, err := st.Info(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return in.Queued["store"], in.Dead["store"]
}

func TestDrainDeliversEachOnce(t *testing.T) {
	st := testStore(t)
	be, err := testbackend.Start("127.0.0.1:0", testbackend.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer be.Close()
	want := enqueue(t, st, 300, "u@example.test")
	startDrain(t, st, be, nil)
	waitFor(t, "all delivered", 20*time.Second, func() bool { q, _ := queued(t, st); return q == 0 && be.Count() >= len(want) })
	seen := map[string]int{}
	for _, d := range be.Deliveries() {
		seen[d.QueueID]++
	}
	for _, id := range want {
		if seen[id] != 1 {
			t.Errorf("%s delivered %d times", id, seen[id])
		}
	}
}

func TestDrainNewestFirst(t *testing.T) {
	st := testStore(t)
	be, err := testbackend.Start("127.0.0.1:0", testbackend.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer be.Close()
	want := enqueue(t, st, 200, "u@example.test")
	startDrain(t, st, be, func(o *Options) {
		o.NewestFirst = true
		o.Routes[0].Ramp = flatRamp(1000, 1)
		o.Window = 16
	})
	waitFor(t, "all delivered", 20*time.Second, func() bool { return be.Count() >= len(want) })
	got := be.Deliveries()
	for i := range got {
		if got[i].QueueID != want[len(want)-1-i] {
			t.Fatalf("delivery %d is %s, want %s (newest first)", i, got[i].QueueID, want[len(want)-1-i])
		}
	}
}

// Per-recipient replies: 4xx retried later with its attempt counted, 5xx
// dead-lettered with the backend's reply, 2xx delivered once.
func TestDrainPerRecipientOutcomes(t *testing.T) {
	st := testStore(t)
	var busyLeft atomic.Int32
	busyLeft.Store(2)
	be, err := testbackend.Start("127.0.0.1:0", testbackend.Options{
		RcptReply: func(rcpt string) *smtp.SMTPError {
			if strings.HasPrefix(rcpt, "gone@") {
				return testbackend.Reply(550, "5.1.1", "no such user")
			}
			return nil
		},
		DataReply: func(rcpt string, _ []byte) *smtp.SMTPError {
			if strings.HasPrefix(rcpt, "full@") && busyLeft.Add(-1) >= 0 {
				return testbackend.Reply(452, "4.2.2", "mailbox full")
			}
			return nil
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer be.Close()
	id := enqueue(t, st, 1, "ok@example.test", "full@example.test", "gone@example.test")[0]
	startDrain(t, st, be, nil)
	waitFor(t, "queue empty", 20*time.Second, func() bool { q, _ := queued(t, st); return q == 0 })
	per := map[string]int{}
	for _, d := range be.Deliveries() {
		if d.QueueID != id {
			t.Fatalf("delivery of unknown message %q", d.QueueID)
		}
		per[d.Rcpt]++
	}
	if per["ok@example.test"] != 1 || per["full@example.test"] != 1 || per["gone@example.test"] != 0 {
		t.Fatalf("deliveries per recipient: %v", per)
	}
	recs, _, err := st.ReadFrom(context.Background(), st.DeadSubject("store"), 1, 10, 0)
	if err != nil || len(recs) != 1 {
		t.Fatalf("dead letters: %v, %v", recs, err)
	}
	dl := recs[0].Env
	if dl.ID != id || len(dl.To) != 1 || dl.To[0] != "gone@example.test" || !strings.HasPrefix(dl.Errors[0], "550 5.1.1 no such user") {
		t.Fatalf("dead letter %+v", dl)
	}
}

// While the backend is down, nothing is delivered and no attempt is counted;
// when it comes back, everything arrives once.
func TestDrainBackendDownThenUp(t *testing.T) {
	st := testStore(t)
	be, err := testbackend.Start("127.0.0.1:0", testbackend.Options{})
	if err != nil {
		t.Fatal(err)
	}
	be.Down()
	want := enqueue(t, st, 100, "u@example.test")
	d := startDrain(t, st, be, nil)
	waitFor(t, "circuit open", 10*time.Second, func() bool { return d.State()[0].Circuit == "open" })
	time.Sleep(500 * time.Millisecond) // several probe intervals
	if err := be.Up(); err != nil {
		t.Fatal(err)
	}
	defer be.Close()
	waitFor(t, "all delivered", 20*time.Second, func() bool { q, _ := queued(t, st); return q == 0 && be.Count() >= len(want) })
	if n := be.Count(); n != len(want) {
		t.Fatalf("%d deliveries for %d messages", n, len(want))
	}
	// No record was rewritten with a counted attempt while the store was down.
	if _, dead := queued(t, st); dead != 0 {
		t.Fatalf("%d dead letters", dead)
	}
}

type holdControl struct {
	mu     sync.Mutex
	held   map[string]bool
	paused bool
}

func (h *holdControl) Paused(string) bool { h.mu.Lock(); defer h.mu.Unlock(); return h.paused }
func (h *holdControl) Held(id string) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.held[id]
}

func TestDrainHoldAndPause(t *testing.T) {
	st := testStore(t)
	be, err := testbackend.Start("127.0.0.1:0", testbackend.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer be.Close()
	ctl := &holdControl{held: map[string]bool{}, paused: true}
	idsq := enqueue(t, st, 10, "u@example.test")
	ctl.held[idsq[3]] = true
	var idx *catalog.Catalog
	d := startDrain(t, st, be, func(o *Options) { o.Control = ctl })
	idx = d.idx.(*catalog.Catalog)
	time.Sleep(300 * time.Millisecond)
	if n := be.Count(); n != 0 {
		t.Fatalf("%d deliveries while paused", n)
	}
	ctl.mu.Lock()
	ctl.paused = false
	ctl.mu.Unlock()
	d.Kick()
	waitFor(t, "unheld delivered", 10*time.Second, func() bool { return be.Count() == 9 })
	time.Sleep(300 * time.Millisecond)
	if q, _ := queued(t, st); q != 1 {
		t.Fatalf("%d queued, want the held one", q)
	}
	ctl.mu.Lock()
	delete(ctl.held, idsq[3])
	ctl.mu.Unlock()
	idx.HoldEvent(catalog.OpRelease, idsq[3:4]) // what the control plane does
	waitFor(t, "released delivered", 10*time.Second, func() bool { return be.Count() == 10 })
}
