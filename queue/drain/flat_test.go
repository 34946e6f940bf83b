package drain

import (
	"bytes"
	"context"
	"fmt"
	"strings"
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

// countingSource counts the records the drain reads from the queue.
type countingSource struct {
	*queue.Store
	read atomic.Int64
}

func (c *countingSource) Get(ctx context.Context, seq uint64) (queue.Record, error) {
	c.read.Add(1)
	return c.Store.Get(ctx, seq)
}

func (c *countingSource) ReadFrom(ctx context.Context, subject string, seq uint64, max, maxBytes int) ([]queue.Record, uint64, error) {
	recs, pending, err := c.Store.ReadFrom(ctx, subject, seq, max, maxBytes)
	c.read.Add(int64(len(recs)))
	return recs, pending, err
}

// Held mail costs nothing per pass: with 2 000 held records the drain
// reads the due ones and none of the held, even across many passes, and a
// record released later leaves at once. (Before, every rescan read every
// held record with its whole message, once a minute.)
func TestHeldRecordsAreNotReadAgain(t *testing.T) {
	st := testStore(t)
	be, err := testbackend.Start("127.0.0.1:0", testbackend.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer be.Close()
	ctl := &holdControl{held: map[string]bool{}}
	held := enqueue(t, st, 2000, "u@example.test")
	for _, id := range held {
		ctl.held[id] = true
	}
	due := enqueue(t, st, 20, "u@example.test")
	src := &countingSource{Store: st}
	idx := teststore.Catalog(t, st, ctl.Held)
	cl := delivery.New(delivery.Options{Protocol: "lmtp", Address: be.Addr(), MaxIdle: 4})
	defer cl.Close()
	d := New(src, idx, Options{
		Routes:   []Route{{Name: "store", Deliverer: cl, Ramp: flatRamp(1000, 4)}},
		RetryMin: 50 * time.Millisecond, RetryMax: time.Second, PollInterval: 10 * time.Millisecond, Control: ctl,
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { d.Run(ctx); close(done) }()
	defer func() { cancel(); <-done }()
	waitFor(t, "the due ones delivered", 20*time.Second, func() bool { return be.Count() == len(due) })
	// Many idle passes later, still nothing held was read.
	time.Sleep(500 * time.Millisecond)
	if n := src.read.Load(); n > int64(len(due)) {
		t.Fatalf("the drain read %d records for %d due ones: it read held mail", n, len(due))
	}
	ctl.mu.Lock()
	delete(ctl.held, held[1000])
	ctl.mu.Unlock()
	idx.HoldEvent(catalog.OpRelease, held[1000:1001])
	waitFor(t, "the released one delivered", 10*time.Second, func() bool { return be.Count() == len(due)+1 })
	if n := src.read.Load(); n > int64(len(due))+int64(d.o.Window) {
		t.Fatalf("the drain read %d records for %d due ones and one release", n, len(due))
	}
}

// No fault, a store that takes 20 ms: every message exactly once. Before,
// a rescan window could hold a record in flight, and a delivery that ended
// before the window reached it was made twice.
func TestNoDuplicateWithASlowStore(t *testing.T) {
	st := testStore(t)
	be, err := testbackend.Start("127.0.0.1:0", testbackend.Options{Capacity: testbackend.Capacity{Rate: 2000, Service: 20 * time.Millisecond}})
	if err != nil {
		t.Fatal(err)
	}
	defer be.Close()
	want := enqueue(t, st, 300, "u@example.test")
	startDrain(t, st, be, func(o *Options) { o.Routes[0].Ramp = flatRamp(1000, 16) })
	// New mail while the drain works, as in production.
	more := enqueue(t, st, 100, "v@example.test")
	want = append(want, more...)
	waitFor(t, "all delivered", 60*time.Second, func() bool { q, _ := queued(t, st); return q == 0 && be.Count() >= len(want) })
	time.Sleep(300 * time.Millisecond)
	seen := map[string]int{}
	for _, dl := range be.Deliveries() {
		seen[dl.QueueID]++
	}
	dups := 0
	for _, id := range want {
		if seen[id] != 1 {
			t.Errorf("%s delivered %d times", id, seen[id])
		}
		if seen[id] > 1 {
			dups++
		}
	}
	if dups > 0 {
		t.Fatalf("%d duplicates with no fault", dups)
	}
}

// A kick (a resume, a release) is not "retry everything now": records
// waiting for their next attempt keep waiting, unread. (Before, a kick made
// every deferred record due at once: each was read again, message and
// all, to find it was not due; a million over-quota recipients at once.)
func TestKickKeepsRetriesWaiting(t *testing.T) {
	st := testStore(t)
	var refuse atomic.Bool
	refuse.Store(true)
	be, err := testbackend.Start("127.0.0.1:0", testbackend.Options{
		DataReply: func(string, []byte) *smtp.SMTPError {
			if refuse.Load() {
				return testbackend.Reply(452, "4.2.2", "mailbox full")
			}
			return nil
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer be.Close()
	enqueue(t, st, 5, "full@example.test")
	src := &countingSource{Store: st}
	d := startDrainFrom(t, src, st, be, func(o *Options) { o.RetryMin, o.RetryMax = time.Hour, time.Hour })
	waitFor(t, "each tried once", 10*time.Second, func() bool { return d.State()[0].Deferrals == 5 })
	// Let the drain see the rewritten records before the kick.
	time.Sleep(300 * time.Millisecond)
	refuse.Store(false)
	before := src.read.Load()
	d.Kick()
	time.Sleep(500 * time.Millisecond)
	if n := src.read.Load() - before; n != 0 {
		t.Fatalf("a kick read %d records waiting for their next attempt", n)
	}
	if n := be.Count(); n != 0 {
		t.Fatalf("%d records delivered after a kick, before their next attempt (in an hour)", n)
	}
	if s := d.State()[0]; s.Deferrals != 5 {
		t.Fatalf("%d attempts after the kick, want the 5 before it", s.Deferrals)
	}
}

// A message whose body is gone (a chunk missing) is dead-lettered with the
// reason and its sender told; the circuit stays closed and other mail keeps
// flowing. Before, it was reported as "backend unreachable": it opened the
// circuit and was retried forever.
func TestMissingChunkIsDeadLetteredNotUnreachable(t *testing.T) {
	st, _ := teststore.Start(t, nil)
	be, err := testbackend.Start("127.0.0.1:0", testbackend.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer be.Close()
	// Three chunks of 256 KiB, in lines a store takes.
	big := []byte("Subject: big\r\n\r\n" + strings.Repeat("a line of a large message\r\n", 700<<10/27))
	env := &envelope.Envelope{ID: ids.New(), From: "a@example.org", To: []string{"u@example.test"}, Arrived: time.Now().UTC()}
	if err := st.Enqueue(context.Background(), env, bytes.NewReader(big)); err != nil {
		t.Fatal(err)
	}
	// Damage it: delete its middle chunk.
	if err := deleteChunk(st, env, 1); err != nil {
		t.Fatal(err)
	}
	ok := enqueue(t, st, 10, "u@example.test")
	d := startDrain(t, st, be, nil)
	waitFor(t, "the others delivered and the damaged one dead-lettered", 20*time.Second, func() bool {
		q, dead := queued(t, st)
		return q == 0 && dead == 1 && be.Count() == len(ok)
	})
	recs, _, err := st.ReadFrom(context.Background(), st.DeadSubject("store"), 1, 10, 0)
	if err != nil || len(recs) != 1 || !strings.HasPrefix(recs[0].Env.Errors[0], "554 5.3.0") {
		t.Fatalf("dead letter: %+v %v", recs, err)
	}
	s := d.State()[0]
	if s.Circuit != "closed" || s.Unreachable != 0 {
		t.Fatalf("circuit %s, %d unreachable (%s): the damaged message was taken for the store's fault", s.Circuit, s.Unreachable, s.LastError)
	}
	for _, dl := range be.Deliveries() {
		if dl.QueueID == env.ID {
			t.Fatalf("the damaged message reached the store")
		}
	}
}

// deleteChunk deletes chunk n of env's message from the stream.
func deleteChunk(st *queue.Store, env *envelope.Envelope, n int) error {
	ctx := context.Background()
	recs, _, err := st.ReadFrom(ctx, "mxq.c."+env.ID+".0", 1, 10, 0)
	if err != nil {
		return err
	}
	if len(recs) <= n {
		return fmt.Errorf("%d chunks, no chunk %d", len(recs), n)
	}
	s, err := st.JetStream().Stream(ctx, st.StreamName())
	if err != nil {
		return err
	}
	return s.DeleteMsg(ctx, recs[n].Seq)
}

// A window of records larger than one read's byte bound is read in several
// reads: the records past the bound are not taken for gone (and dropped
// from the catalog, never to be delivered).
func TestWindowLargerThanOneRead(t *testing.T) {
	st, _ := teststore.Start(t, func(o *queue.Options) { o.ChunkSize = 4 << 20 })
	be, err := testbackend.Start("127.0.0.1:0", testbackend.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer be.Close()
	line := "a line of a message of three and a half MiB, stored as one record\r\n"
	big := "Subject: big\r\n\r\n" + strings.Repeat(line, (7<<19)/len(line))
	var want []string
	for i := 0; i < 10; i++ {
		env := &envelope.Envelope{ID: ids.New(), From: "a@example.org", To: []string{"u@example.test"}, Arrived: time.Now().UTC()}
		msg := fmt.Sprintf("Received: from x ([127.0.0.1])\r\n\tby mx (mxq) with ESMTP id %s;\r\n\tdate\r\n%s", env.ID, big)
		if err := st.Enqueue(context.Background(), env, strings.NewReader(msg)); err != nil {
			t.Fatal(err)
		}
		want = append(want, env.ID)
	}
	startDrain(t, st, be, nil)
	waitFor(t, "all ten delivered", 30*time.Second, func() bool { q, _ := queued(t, st); return q == 0 && be.Count() == len(want) })
}
