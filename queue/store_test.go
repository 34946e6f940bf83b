package queue

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mxq-dev/mxq/queue/envelope"
)

// newTestStore starts an embedded JetStream in a temporary directory.
func newTestStore(t testing.TB, mod func(*Options)) *Store {
	t.Helper()
	s, _ := newTestStoreEmb(t, mod)
	return s
}

// newTestStoreEmb is newTestStore that also returns the server.
func newTestStoreEmb(t testing.TB, mod func(*Options)) (*Store, *Embedded) {
	t.Helper()
	ctx := context.Background()
	emb, err := StartEmbedded(ctx, EmbeddedOptions{ServerName: "t", StoreDir: t.TempDir(), MaxPayload: 8 << 20, SyncAlways: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(emb.Shutdown)
	nc, err := emb.Connect("test")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	o := Options{
		Stream: "MXQ", Replicas: 1, Durability: DurabilityGroup, Committers: 2,
		GroupMaxMessages: 64, GroupMaxBytes: 8 << 20, ChunkSize: 256 << 10, Timeout: 5 * time.Second,
		Route: func(d string) string {
			if d == "other.test" {
				return "other"
			}
			return "store"
		},
	}
	if mod != nil {
		mod(&o)
	}
	s, err := Open(ctx, nc, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	return s, emb
}

var testIDs = envelope.NewIDGen(time.Now, 7)

func testEnv(to ...string) *envelope.Envelope {
	return &envelope.Envelope{ID: testIDs.New(), From: "a@example.org", To: to, Arrived: time.Now().UTC().Truncate(time.Millisecond)}
}

func readAll(t *testing.T, s *Store, route string) []Record {
	t.Helper()
	var all []Record
	seq := uint64(1)
	for {
		recs, _, err := s.ReadFrom(context.Background(), s.QueueSubject(route), seq, 100, 0)
		if err != nil {
			t.Fatal(err)
		}
		if len(recs) == 0 {
			return all
		}
		all = append(all, recs...)
		seq = recs[len(recs)-1].Seq + 1
	}
}

func body(t *testing.T, s *Store, r Record) []byte {
	t.Helper()
	b, err := io.ReadAll(s.Body(context.Background(), r))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestEnqueueSizes(t *testing.T) {
	for _, mode := range []string{DurabilityGroup, DurabilitySingle} {
		t.Run(mode, func(t *testing.T) {
			s := newTestStore(t, func(o *Options) { o.Durability = mode })
			sizes := []int{0, 1, 10 << 10, 256<<10 - 1, 256 << 10, 256<<10 + 1, 3 * 256 << 10, 3*256<<10 + 17}
			want := map[string][]byte{}
			for _, n := range sizes {
				msg := make([]byte, n)
				rand.Read(msg)
				env := testEnv("u@example.test")
				if err := s.Enqueue(context.Background(), env, bytes.NewReader(msg)); err != nil {
					t.Fatalf("size %d: %v", n, err)
				}
				want[env.ID] = msg
			}
			recs := readAll(t, s, "store")
			if len(recs) != len(sizes) {
				t.Fatalf("%d records, want %d", len(recs), len(sizes))
			}
			for _, r := range recs {
				if r.Err != nil {
					t.Fatal(r.Err)
				}
				got := body(t, s, r)
				if !bytes.Equal(got, want[r.Env.ID]) {
					t.Fatalf("%s: body of %d bytes differs from the %d sent", r.Env.ID, len(got), len(want[r.Env.ID]))
				}
				if r.Env.Size != int64(len(got)) {
					t.Fatalf("%s: Size %d, body %d", r.Env.ID, r.Env.Size, len(got))
				}
				if wantChunks := len(got) > 256<<10; wantChunks != (r.Env.Chunks > 0) {
					t.Fatalf("%s: %d bytes stored with %d chunks", r.Env.ID, len(got), r.Env.Chunks)
				}
			}
		})
	}
}

func TestSplitByRoute(t *testing.T) {
	s := newTestStore(t, nil)
	env := testEnv("a@example.test", "b@other.test", "c@example.test")
	if err := s.Enqueue(context.Background(), env, strings.NewReader("hello")); err != nil {
		t.Fatal(err)
	}
	st, ot := readAll(t, s, "store"), readAll(t, s, "other")
	if len(st) != 1 || len(ot) != 1 {
		t.Fatalf("records per route: store %d, other %d", len(st), len(ot))
	}
	if got := strings.Join(st[0].Env.To, ","); got != "a@example.test,c@example.test" {
		t.Fatalf("store recipients %s", got)
	}
	if st[0].Env.MsgID() == ot[0].Env.MsgID() {
		t.Fatal("split records share a deduplication ID")
	}
	if st[0].Env.ID != env.ID || ot[0].Env.ID != env.ID {
		t.Fatal("split records lost the queue ID")
	}
}

// A reader that fails half-way leaves nothing behind, small or large.
func TestEnqueueReaderErrorStoresNothing(t *testing.T) {
	s := newTestStore(t, nil)
	boom := errors.New("client went away")
	for _, n := range []int{100, 600 << 10} {
		r := io.MultiReader(bytes.NewReader(make([]byte, n)), errReader{boom})
		if err := s.Enqueue(context.Background(), testEnv("u@example.test"), r); !errors.Is(err, boom) {
			t.Fatalf("size %d: err %v, want %v", n, err, boom)
		}
	}
	if recs := readAll(t, s, "store"); len(recs) != 0 {
		t.Fatalf("%d records after failed enqueues", len(recs))
	}
	info, err := s.Info(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if info.Messages != 0 {
		t.Fatalf("stream holds %d messages (chunks of an aborted batch?)", info.Messages)
	}
}

type errReader struct{ err error }

func (e errReader) Read([]byte) (int, error) { return 0, e.err }

func TestGroupCommitConcurrent(t *testing.T) {
	s := newTestStore(t, nil)
	const sessions, each = 32, 40
	var wg sync.WaitGroup
	errs := make(chan error, sessions*each)
	for i := 0; i < sessions; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			for j := 0; j < each; j++ {
				msg := fmt.Sprintf("Subject: %d/%d\r\n\r\nbody\r\n", i, j)
				errs <- s.Enqueue(context.Background(), testEnv("u@example.test"), strings.NewReader(msg))
			}
		}(i)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	recs := readAll(t, s, "store")
	if len(recs) != sessions*each {
		t.Fatalf("%d records, want %d", len(recs), sessions*each)
	}
	seen := map[string]bool{}
	for _, r := range recs {
		if seen[string(r.Data)] {
			t.Fatalf("message stored twice: %q", r.Data)
		}
		seen[string(r.Data)] = true
	}
	// 32 sessions at once share batches: fewer fsyncs than messages.
	batches, msgs := s.CommitStats()
	if msgs != sessions*each || batches == 0 || batches >= msgs {
		t.Fatalf("commit stats: %d batches for %d messages (want %d messages in fewer batches)", batches, msgs, sessions*each)
	}
	t.Logf("%.1f messages per batch", float64(msgs)/float64(batches))
}

func TestFullStreamRefusesAndKeepsQueued(t *testing.T) {
	s := newTestStore(t, func(o *Options) { o.MaxBytes = 256 << 10 })
	msg := bytes.Repeat([]byte("x"), 20<<10)
	var stored int
	var err error
	for i := 0; i < 100; i++ {
		if err = s.Enqueue(context.Background(), testEnv("u@example.test"), bytes.NewReader(msg)); err != nil {
			break
		}
		stored++
	}
	if !errors.Is(err, ErrFull) {
		t.Fatalf("after %d messages: err %v, want ErrFull", stored, err)
	}
	if recs := readAll(t, s, "store"); len(recs) != stored {
		t.Fatalf("%d records, %d were acknowledged", len(recs), stored)
	}
}

func TestRewriteKeepsBodyAndCopiesChunks(t *testing.T) {
	s := newTestStore(t, nil)
	ctx := context.Background()
	msg := make([]byte, 700<<10)
	rand.Read(msg)
	env := testEnv("a@example.test", "b@example.test", "c@example.test")
	if err := s.Enqueue(ctx, env, bytes.NewReader(msg)); err != nil {
		t.Fatal(err)
	}
	r := readAll(t, s, "store")[0]
	retry := r.Env.Clone()
	retry.Gen++
	retry.To = []string{"a@example.test"}
	dead := r.Env.Clone()
	dead.Gen += 2
	dead.To = []string{"b@example.test"}
	if err := s.Rewrite(ctx, r, []Output{{Env: retry}, {Env: dead, Dead: true}}); err != nil {
		t.Fatal(err)
	}
	q := readAll(t, s, "store")
	if len(q) != 1 || q[0].Env.To[0] != "a@example.test" {
		t.Fatalf("queue after rewrite: %+v", q)
	}
	d, _, err := s.ReadFrom(ctx, s.DeadSubject("store"), 1, 10, 0)
	if err != nil || len(d) != 1 {
		t.Fatalf("dead letters: %v %v", d, err)
	}
	// Completing the retry must not take the dead letter's body with it.
	if err := s.Complete(ctx, q[0]); err != nil {
		t.Fatal(err)
	}
	if got := body(t, s, d[0]); !bytes.Equal(got, msg) {
		t.Fatalf("dead letter body: %d bytes, want %d identical", len(got), len(msg))
	}
	if err := s.Complete(ctx, d[0]); err != nil {
		t.Fatal(err)
	}
	info, err := s.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if info.Messages != 0 {
		t.Fatalf("%d messages left after completing everything", info.Messages)
	}
}

// Rewriting a message again and again (a retry, and a dead letter each
// time) never has a record taken for a duplicate of an earlier one: that
// would silently drop the retry.
func TestRewritesNeverCollideInDedup(t *testing.T) {
	s := newTestStore(t, nil)
	ctx := context.Background()
	rcpts := []string{"a@example.test", "b@example.test", "c@example.test", "d@example.test", "e@example.test", "f@example.test"}
	if err := s.Enqueue(ctx, testEnv(rcpts...), strings.NewReader("hi")); err != nil {
		t.Fatal(err)
	}
	for round := 0; round < 5; round++ {
		q := readAll(t, s, "store")
		if len(q) != 1 {
			t.Fatalf("round %d: %d queued records, want 1", round, len(q))
		}
		r := q[0]
		retry, dead := r.Env.Clone(), r.Env.Clone()
		retry.Gen++
		dead.Gen++
		retry.To, dead.To = r.Env.To[1:], r.Env.To[:1]
		if err := s.Rewrite(ctx, r, []Output{{Env: retry}, {Env: dead, Dead: true}}); err != nil {
			t.Fatal(err)
		}
	}
	if q := readAll(t, s, "store"); len(q) != 1 || len(q[0].Env.To) != 1 {
		t.Fatalf("after 5 rewrites: %+v", q)
	}
	d, _, err := s.ReadFrom(ctx, s.DeadSubject("store"), 1, 100, 0)
	if err != nil || len(d) != 5 {
		t.Fatalf("%d dead letters, want 5 (%v)", len(d), err)
	}
}

func TestWalkFindAndFilters(t *testing.T) {
	s := newTestStore(t, nil)
	ctx := context.Background()
	var ids []string
	for i := 0; i < 30; i++ {
		env := testEnv(fmt.Sprintf("u%d@example.test", i%3), "x@other.test")
		if i%10 == 0 {
			env.From = "boss@example.org"
		}
		if err := s.Enqueue(ctx, env, strings.NewReader(fmt.Sprintf("Subject: %d\r\n\r\n%s", i, strings.Repeat("x", 600<<10*(i%2))))); err != nil {
			t.Fatal(err)
		}
		ids = append(ids, env.ID)
	}
	count := func(k Kind, f Filter) int {
		n := 0
		if _, err := s.Walk(ctx, k, 0, func(r Record) error {
			if r.Data != nil {
				t.Fatal("Walk returned a body")
			}
			if f.Match(r.Env, time.Now()) {
				n++
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		return n
	}
	cases := []struct {
		name string
		f    Filter
		want int
	}{
		{"all records (split in two routes)", Filter{}, 60},
		{"route", Filter{Route: "other"}, 30},
		{"from", Filter{From: "BOSS@example.org"}, 6},
		{"to", Filter{To: "u1@example.test"}, 10},
		{"domain", Filter{Domain: "other.test"}, 30},
		{"ids", Filter{IDs: ids[:4]}, 8},
		{"older than", Filter{OlderThan: time.Hour}, 0},
		{"held", Filter{Held: func(id string) bool { return id == ids[7] }}, 2},
	}
	for _, tc := range cases {
		if got := count(Queued, tc.f); got != tc.want {
			t.Errorf("%s: %d, want %d", tc.name, got, tc.want)
		}
	}
	// Stopping early, and continuing from the returned sequence.
	seen := 0
	next, err := s.Walk(ctx, Queued, 0, func(Record) error {
		seen++
		if seen == 5 {
			return ErrStop
		}
		return nil
	})
	if err != nil || seen != 5 {
		t.Fatalf("stop: %d seen, %v", seen, err)
	}
	rest := 0
	if _, err := s.Walk(ctx, Queued, next, func(Record) error { rest++; return nil }); err != nil || rest != 55 {
		t.Fatalf("continue from %d: %d more, %v", next, rest, err)
	}
	// Find: both parts of a split message; then requeue a dead letter.
	recs, err := s.Find(ctx, ids[11])
	if err != nil || len(recs) != 2 {
		t.Fatalf("Find: %d records, %v", len(recs), err)
	}
	full, err := s.Get(ctx, recs[0].Seq)
	if err != nil {
		t.Fatal(err)
	}
	dead := full.Env.Clone()
	dead.Attempts = 3
	if err := s.Rewrite(ctx, full, []Output{{Env: dead, Dead: true}}); err != nil {
		t.Fatal(err)
	}
	if n := count(Dead, Filter{}); n != 1 {
		t.Fatalf("%d dead letters", n)
	}
	recs, _ = s.Find(ctx, ids[11])
	for _, r := range recs {
		if r.Dead() {
			full, _ := s.Get(ctx, r.Seq)
			if err := s.Requeue(ctx, full); err != nil {
				t.Fatal(err)
			}
		}
	}
	if n := count(Dead, Filter{}); n != 0 {
		t.Fatalf("%d dead letters after requeue", n)
	}
	recs, _ = s.Find(ctx, ids[11])
	if len(recs) != 2 || recs[0].Dead() || recs[1].Dead() {
		t.Fatalf("after requeue: %+v", recs)
	}
	for _, r := range recs {
		if r.Env.Attempts != 0 {
			t.Fatalf("requeued record keeps %d attempts", r.Env.Attempts)
		}
		full, _ := s.Get(ctx, r.Seq)
		if b := body(t, s, full); !strings.HasPrefix(string(b), "Subject: 11") {
			t.Fatalf("requeued body %q...", b[:20])
		}
	}
}

// A rewrite retried after its batch was stored (its reply lost) succeeds:
// the server's "contains duplicate" means the batch is there. Before the
// fix a first attempt that met it failed, and the drain's retries of the
// outcome failed the same way for good.
func TestRewriteRetriedAfterStored(t *testing.T) {
	s := newTestStore(t, nil)
	ctx := context.Background()
	if err := s.Enqueue(ctx, testEnv("a@example.test", "b@example.test"), strings.NewReader("Subject: x\r\n\r\nhi")); err != nil {
		t.Fatal(err)
	}
	recs := readAll(t, s, "store")
	if len(recs) != 1 {
		t.Fatalf("%d records", len(recs))
	}
	r := recs[0]
	a, b := r.Env.Clone(), r.Env.Clone()
	a.To, b.To = a.To[:1], b.To[1:]
	b.NextAttempt = time.Now().Add(time.Hour)
	outs := []Output{{Env: a}, {Env: b, Dead: true}}
	if err := s.Rewrite(ctx, r, outs); err != nil {
		t.Fatal(err)
	}
	if err := s.Rewrite(ctx, r, outs); err != nil {
		t.Fatalf("retried rewrite: %v", err)
	}
	if got := readAll(t, s, "store"); len(got) != 1 || got[0].Seq == r.Seq {
		t.Fatalf("queued after the retried rewrite: %d records", len(got))
	}
	dead, _, err := s.ReadFrom(ctx, s.DeadSubject("store"), 1, 10, 0)
	if err != nil || len(dead) != 1 {
		t.Fatalf("dead letters after the retried rewrite: %d, %v", len(dead), err)
	}
}

// Deletions write tombstones, and tombstones older than their TTL are
// purged; younger ones stay for the catalogs that have not read them.
func TestTombstonesWrittenAndPurged(t *testing.T) {
	s := newTestStore(t, func(o *Options) { o.TombstoneTTL = time.Hour })
	ctx := context.Background()
	for i := 0; i < 3; i++ {
		if err := s.Enqueue(ctx, testEnv("u@example.test"), strings.NewReader("x")); err != nil {
			t.Fatal(err)
		}
	}
	recs := readAll(t, s, "store")
	for _, r := range recs[:2] {
		if err := s.Complete(ctx, r); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.FlushTombstones(ctx); err != nil {
		t.Fatal(err)
	}
	tombs := func() []uint64 {
		var out []uint64
		got, _, err := s.ReadFrom(ctx, s.TombstoneSubject(), 1, 100, 0)
		if err != nil {
			t.Fatal(err)
		}
		for _, g := range got {
			m, err := s.stream.GetMsg(ctx, g.Seq)
			if err != nil {
				t.Fatal(err)
			}
			seqs, err := ParseTombstone(m.Header)
			if err != nil {
				t.Fatal(err)
			}
			out = append(out, seqs...)
		}
		return out
	}
	if got := tombs(); len(got) != 2 || got[0] != recs[0].Seq || got[1] != recs[1].Seq {
		t.Fatalf("tombstones list %v, want the two deleted records %d, %d", got, recs[0].Seq, recs[1].Seq)
	}
	if err := s.PurgeTombstones(ctx, time.Now()); err != nil {
		t.Fatal(err)
	}
	if got := tombs(); len(got) != 2 {
		t.Fatalf("a young tombstone was purged: %v left", got)
	}
	if err := s.PurgeTombstones(ctx, time.Now().Add(2*time.Hour)); err != nil {
		t.Fatal(err)
	}
	if got := tombs(); len(got) != 0 {
		t.Fatalf("tombstones older than their TTL not purged: %v", got)
	}
	if n := len(readAll(t, s, "store")); n != 1 {
		t.Fatalf("purging tombstones touched the queue: %d records left, want 1", n)
	}
}
