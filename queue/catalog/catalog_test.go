package catalog

import (
	"context"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/mxq-dev/mxq/queue"
	"github.com/mxq-dev/mxq/queue/envelope"
)

type env struct {
	t     *testing.T
	store *queue.Store
	emb   *queue.Embedded
	dir   string
	held  *holds
}

// holds is a stand-in for the control plane's holds.
type holds struct {
	mu  sync.Mutex
	ids map[string]bool
}

func (h *holds) held(id string) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.ids[id]
}

func (h *holds) rangeHolds(fn func(string) bool) {
	h.mu.Lock()
	ids := make([]string, 0, len(h.ids))
	for id := range h.ids {
		ids = append(ids, id)
	}
	h.mu.Unlock()
	for _, id := range ids {
		if !fn(id) {
			return
		}
	}
}

func (h *holds) set(id string, on bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if on {
		h.ids[id] = true
	} else {
		delete(h.ids, id)
	}
}

func newEnv(t *testing.T) *env {
	t.Helper()
	dir := t.TempDir()
	emb, err := queue.StartEmbedded(context.Background(), queue.EmbeddedOptions{ServerName: "t", StoreDir: dir, MaxPayload: 8 << 20, SyncAlways: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(emb.Shutdown)
	e := &env{t: t, emb: emb, dir: dir, held: &holds{ids: map[string]bool{}}}
	e.store = e.open("MXQ")
	return e
}

func (e *env) open(stream string) *queue.Store {
	nc, err := e.emb.Connect("test")
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(nc.Close)
	s, err := queue.Open(context.Background(), nc, queue.Options{
		Stream: stream, Replicas: 1, Durability: queue.DurabilityGroup, Committers: 1,
		ChunkSize: 256 << 10, Timeout: 5 * time.Second, TombstoneInterval: 10 * time.Millisecond,
		Route: func(d string) string {
			if d == "other.test" {
				return "other"
			}
			return "store"
		},
	})
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(s.Close)
	return s
}

// catalog opens the catalog and runs it until the test ends or stop is
// called.
func (e *env) catalog(now func() time.Time) (c *Catalog, stop func()) {
	e.t.Helper()
	c, err := Open(context.Background(), e.store, Options{
		Dir: filepath.Join(e.dir, "catalog"), Held: e.held.held, RangeHolds: e.held.rangeHolds, Now: now,
	})
	if err != nil {
		e.t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				e.t.Errorf("catalog run: %v", err)
			}
			c.Close()
		})
	}
	e.t.Cleanup(stop)
	select {
	case <-c.Ready():
	case <-time.After(10 * time.Second):
		e.t.Fatal("catalog not ready")
	}
	return c, stop
}

var ids = envelope.NewIDGen(time.Now, 9)

func (e *env) enqueue(from string, to ...string) *envelope.Envelope {
	e.t.Helper()
	env := &envelope.Envelope{ID: ids.New(), From: from, To: to, Arrived: time.Now().UTC().Truncate(time.Millisecond)}
	if err := e.store.Enqueue(context.Background(), env, strings.NewReader("Subject: x\r\n\r\nhello")); err != nil {
		e.t.Fatal(err)
	}
	return env
}

// record reads the queued record of id.
func (e *env) record(c *Catalog, id string) queue.Record {
	e.t.Helper()
	seqs, err := c.Seqs(id)
	if err != nil || len(seqs) == 0 {
		e.t.Fatalf("no records for %s: %v", id, err)
	}
	r, err := e.store.Get(context.Background(), seqs[len(seqs)-1])
	if err != nil {
		e.t.Fatal(err)
	}
	return r
}

// eventually waits for cond, for a catalog that follows the stream.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting until %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func dueIDs(t *testing.T, c *Catalog, route string, until time.Time) []string {
	t.Helper()
	d, err := c.DueAfter(route, Pos{}, until, 1000)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, x := range d {
		out = append(out, x.ID)
	}
	return out
}

func TestFollowsRecordsAndTombstones(t *testing.T) {
	e := newEnv(t)
	a := e.enqueue("s@example.org", "u1@example.test", "U2@example.test")
	b := e.enqueue("s@example.org", "u1@example.test", "x@other.test")
	c, _ := e.catalog(nil)
	if err := c.CatchUp(context.Background()); err != nil {
		t.Fatal(err)
	}
	if got, want := dueIDs(t, c, "store", time.Now()), []string{a.ID, b.ID}; !slices.Equal(got, want) {
		t.Fatalf("due on store: %v, want %v", got, want)
	}
	if got := dueIDs(t, c, "other", time.Now()); !slices.Equal(got, []string{b.ID}) {
		t.Fatalf("due on other: %v", got)
	}
	msgs, next, err := c.Mailbox("u1@example.test", 0, 0)
	if err != nil || next != 0 || len(msgs) != 2 || msgs[0].ID != a.ID || msgs[1].ID != b.ID || msgs[0].UID != 1 || msgs[1].UID != 2 {
		t.Fatalf("mailbox u1: %+v next %d err %v", msgs, next, err)
	}
	st := c.Stats()
	if st.Records != 3 || st.Mailboxes != 3 || st.Messages != 4 {
		t.Fatalf("stats %+v", st)
	}
	// Delivery removes a record; its tombstone removes its keys.
	if err := e.store.Complete(context.Background(), e.record(c, a.ID)); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the delivered record leaves the catalog", func() bool {
		s, _ := c.Seqs(a.ID)
		return len(s) == 0
	})
	if got := dueIDs(t, c, "store", time.Now()); !slices.Equal(got, []string{b.ID}) {
		t.Fatalf("due after delivery: %v", got)
	}
	msgs, _, _ = c.Mailbox("u1@example.test", 0, 0)
	if len(msgs) != 1 || msgs[0].UID != 2 {
		t.Fatalf("mailbox after delivery: %+v", msgs)
	}
	if msgs, _, _ := c.Mailbox("u2@example.test", 0, 0); len(msgs) != 0 {
		t.Fatalf("u2's only message was delivered but is listed: %+v", msgs)
	}
	if st := c.Stats(); st.Records != 2 || st.Mailboxes != 2 || st.Messages != 2 {
		t.Fatalf("stats after delivery %+v", st)
	}
}

// A retry rewrites the record later in the stream with its next attempt:
// it is due then, not now, and keeps its place (UID) in the mailbox.
func TestRewriteKeepsUIDAndIsDueAtNextAttempt(t *testing.T) {
	e := newEnv(t)
	now := time.Now()
	c, _ := e.catalog(nil)
	a := e.enqueue("s@example.org", "u1@example.test")
	b := e.enqueue("s@example.org", "u1@example.test")
	eventually(t, "both indexed", func() bool { return len(dueIDs(t, c, "store", time.Now())) == 2 })
	r := e.record(c, a.ID)
	n := r.Env.Clone()
	n.Gen++
	n.Attempts++
	n.NextAttempt = now.Add(time.Hour)
	if err := e.store.Rewrite(context.Background(), r, []queue.Output{{Env: n}}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the old record leaves", func() bool {
		s, _ := c.Seqs(a.ID)
		return len(s) == 1 && s[0] != r.Seq
	})
	if got := dueIDs(t, c, "store", time.Now()); !slices.Equal(got, []string{b.ID}) {
		t.Fatalf("due now: %v, want only %s", got, b.ID)
	}
	if got := dueIDs(t, c, "store", now.Add(2*time.Hour)); !slices.Equal(got, []string{b.ID, a.ID}) {
		t.Fatalf("due in two hours: %v", got)
	}
	at, ok, err := c.NextDue("store", time.Now())
	if err != nil || !ok || !at.Equal(n.NextAttempt) {
		t.Fatalf("next due %v %v %v, want %v", at, ok, err, n.NextAttempt)
	}
	msgs, _, _ := c.Mailbox("u1@example.test", 0, 0)
	if len(msgs) != 2 || msgs[0].ID != a.ID || msgs[0].UID != 1 || len(msgs[0].Seqs) != 1 {
		t.Fatalf("mailbox after the rewrite: %+v", msgs)
	}
}

func TestHoldAndRelease(t *testing.T) {
	e := newEnv(t)
	a := e.enqueue("s@example.org", "u1@example.test")
	e.held.set(a.ID, true) // held before the catalog saw it
	c, _ := e.catalog(nil)
	b := e.enqueue("s@example.org", "u1@example.test")
	eventually(t, "b indexed", func() bool { return len(dueIDs(t, c, "store", time.Now())) == 1 })
	if got := dueIDs(t, c, "store", time.Now()); !slices.Equal(got, []string{b.ID}) {
		t.Fatalf("due: %v, want only the unheld %s", got, b.ID)
	}
	e.held.set(b.ID, true)
	c.HoldEvent(OpHold, []string{b.ID})
	eventually(t, "b held", func() bool { return len(dueIDs(t, c, "store", time.Now())) == 0 })
	before := time.Now()
	e.held.set(a.ID, false)
	c.HoldEvent(OpRelease, []string{a.ID})
	eventually(t, "a released", func() bool { return len(dueIDs(t, c, "store", time.Now())) == 1 })
	d, _ := c.DueAfter("store", Pos{}, time.Now(), 10)
	if d[0].ID != a.ID || d[0].Due < before.UnixNano() {
		t.Fatalf("released record due at %v, want at its release (after %v)", time.Unix(0, d[0].Due), before)
	}
	// Held mail stays listed for its recipient.
	if msgs, _, _ := c.Mailbox("u1@example.test", 0, 0); len(msgs) != 2 {
		t.Fatalf("mailbox: %d messages, want 2 (held mail is held for its user too)", len(msgs))
	}
}

// A catalog reopened after a stop (or a kill: it never syncs) continues
// where it was, with the same UIDs and UIDVALIDITY; holds changed while it
// was stopped are reconciled.
func TestReopenKeepsUIDsAndReconcilesHolds(t *testing.T) {
	e := newEnv(t)
	a := e.enqueue("s@example.org", "u1@example.test")
	b := e.enqueue("s@example.org", "u1@example.test")
	c, stop := e.catalog(nil)
	e.held.set(a.ID, true)
	c.HoldEvent(OpHold, []string{a.ID})
	eventually(t, "a held", func() bool { return len(dueIDs(t, c, "store", time.Now())) == 1 })
	uidv := c.UIDValidity()
	stop()
	// While stopped: a released (the event is lost), b held, c arrives.
	e.held.set(a.ID, false)
	e.held.set(b.ID, true)
	x := e.enqueue("s@example.org", "u1@example.test")
	c2, _ := e.catalog(func() time.Time { return time.Now().Add(time.Second) })
	if c2.UIDValidity() != uidv {
		t.Fatalf("UIDVALIDITY %d after reopening, was %d", c2.UIDValidity(), uidv)
	}
	eventually(t, "holds reconciled", func() bool {
		got := dueIDs(t, c2, "store", time.Now().Add(time.Minute))
		return slices.Equal(got, []string{x.ID, a.ID}) || slices.Equal(got, []string{a.ID, x.ID})
	})
	msgs, _, _ := c2.Mailbox("u1@example.test", 0, 0)
	var got []string
	for _, m := range msgs {
		got = append(got, fmt.Sprintf("%d:%s", m.UID, m.ID))
	}
	want := []string{"1:" + a.ID, "2:" + b.ID, "3:" + x.ID}
	if !slices.Equal(got, want) {
		t.Fatalf("mailbox after reopening %v, want %v", got, want)
	}
}

// A catalog made for a stream that no longer exists is rebuilt, with a new
// UIDVALIDITY.
func TestRebuiltForANewStream(t *testing.T) {
	e := newEnv(t)
	e.enqueue("s@example.org", "u1@example.test")
	c, stop := e.catalog(func() time.Time { return time.Now().Add(-time.Hour) })
	uidv := c.UIDValidity()
	stop()
	if err := e.store.JetStream().DeleteStream(context.Background(), "MXQ"); err != nil {
		t.Fatal(err)
	}
	e.store = e.open("MXQ")
	x := e.enqueue("s@example.org", "u9@example.test")
	c2, _ := e.catalog(nil)
	if c2.UIDValidity() <= uidv {
		t.Fatalf("UIDVALIDITY %d after a rebuild, was %d", c2.UIDValidity(), uidv)
	}
	if err := c2.CatchUp(context.Background()); err != nil {
		t.Fatal(err)
	}
	if got := dueIDs(t, c2, "store", time.Now()); !slices.Equal(got, []string{x.ID}) {
		t.Fatalf("due after the rebuild: %v", got)
	}
	if msgs, _, _ := c2.Mailbox("u1@example.test", 0, 0); len(msgs) != 0 {
		t.Fatalf("the old stream's mail is still listed: %+v", msgs)
	}
}

func TestForgetDropsAGoneRecord(t *testing.T) {
	e := newEnv(t)
	a := e.enqueue("s@example.org", "u1@example.test")
	c, _ := e.catalog(nil)
	seqs, _ := c.Seqs(a.ID)
	c.Forget(seqs...)
	eventually(t, "forgotten", func() bool { s, _ := c.Seqs(a.ID); return len(s) == 0 })
	if msgs, _, _ := c.Mailbox("u1@example.test", 0, 0); len(msgs) != 0 {
		t.Fatalf("forgotten record still listed")
	}
}

// A follower that stops bringing records without an error (an ordered
// consumer that went quiet) is noticed and made anew: the records stored
// meanwhile reach the catalog, and the stall is counted.
func TestStalledFollowerIsMadeAnew(t *testing.T) {
	e := newEnv(t)
	c, err := Open(context.Background(), e.store, Options{
		Dir: filepath.Join(e.dir, "catalog"), Held: e.held.held, RangeHolds: e.held.rangeHolds,
		StallAfter: 600 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	// The first follower is silent until it is stopped; the next are real.
	var calls atomic.Int32
	c.followFn = func(ctx context.Context, from uint64, msgs chan<- jetstream.Msg) error {
		if calls.Add(1) == 1 {
			<-ctx.Done()
			return nil
		}
		return c.follow(ctx, from, msgs)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("catalog run: %v", err)
		}
		c.Close()
	}()
	env := e.enqueue("a@example.org", "b@example.test")
	deadline := time.Now().Add(20 * time.Second)
	for {
		seqs, err := c.Seqs(env.ID)
		if err != nil {
			t.Fatal(err)
		}
		if len(seqs) == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the record never reached the catalog (followers made: %d, stalls: %d)", calls.Load(), c.Stalls())
		}
		time.Sleep(20 * time.Millisecond)
	}
	if got := c.Stalls(); got != 1 {
		t.Errorf("stalls = %d, want 1", got)
	}
	if got := calls.Load(); got < 2 {
		t.Errorf("followers made = %d, want at least 2", got)
	}
}
