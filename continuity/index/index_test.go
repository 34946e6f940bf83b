package index

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/mxq-dev/mxq/continuity/internal/teststore"
	"github.com/mxq-dev/mxq/queue"
)

func build(t *testing.T, s *queue.Store) *Index {
	t.Helper()
	x := New(teststore.Catalog(t, s), s, Options{})
	if err := x.Sync(context.Background()); err != nil {
		t.Fatal(err)
	}
	return x
}

func syncNow(t *testing.T, x *Index) {
	t.Helper()
	if err := x.Sync(context.Background()); err != nil {
		t.Fatal(err)
	}
}

// ids lists a mailbox as "UID:queueID" pairs.
func listed(x *Index, user string) map[uint32]string {
	msgs, _ := x.List(user)
	out := map[uint32]string{}
	for _, m := range msgs {
		out[m.UID] = m.ID
	}
	return out
}

func TestIsolationByRecipient(t *testing.T) {
	s := teststore.New(t, 0)
	a1 := teststore.Enqueue(t, s, teststore.Message("for alice", "1"), "alice@example.test")
	b1 := teststore.Enqueue(t, s, teststore.Message("for bob", "2"), "bob@example.test")
	both := teststore.Enqueue(t, s, teststore.Message("for both", "3"), "Alice@Example.TEST", "bob@example.test", "carol@other.test")
	x := build(t, s)

	tests := []struct {
		user string
		want []string
	}{
		{"alice@example.test", []string{a1.ID, both.ID}},
		{"bob@example.test", []string{b1.ID, both.ID}},
		{"carol@other.test", []string{both.ID}},
		{"dave@example.test", nil},
	}
	for _, tt := range tests {
		t.Run(tt.user, func(t *testing.T) {
			msgs, next := x.List(tt.user)
			if len(msgs) != len(tt.want) {
				t.Fatalf("listed %d messages, want %d", len(msgs), len(tt.want))
			}
			for i, m := range msgs {
				if m.ID != tt.want[i] || m.UID != uint32(i+1) {
					t.Errorf("message %d: UID %d ID %s, want UID %d ID %s", i, m.UID, m.ID, i+1, tt.want[i])
				}
			}
			if next != uint32(len(tt.want)+1) {
				t.Errorf("UIDNEXT %d", next)
			}
		})
	}
	// A UID names a message of the asker's own mailbox only: bob's UID 1
	// is bob's first message, never alice's.
	if m, ok := x.Get("bob@example.test", 1); !ok || m.ID != b1.ID {
		t.Fatalf("bob UID 1: %+v %v", m, ok)
	}
	if _, ok := x.Get("alice@example.test", 3); ok {
		t.Fatal("alice has no UID 3")
	}
	if _, ok := x.Get("dave@example.test", 1); ok {
		t.Fatal("dave has no mail")
	}
	st := x.Stats()
	if st.Messages != 5 || st.Records != 3 || st.Mailboxes != 3 {
		t.Fatalf("stats %+v", st)
	}
}

func TestFollowAddRemoveRewrite(t *testing.T) {
	s := teststore.New(t, 0)
	ctx := context.Background()
	const alice, bob = "alice@example.test", "bob@example.test"
	m1 := teststore.Enqueue(t, s, teststore.Message("one", "1"), alice, bob)
	x := build(t, s)
	watchA := x.Watch(alice)

	// A new message appears with the next UID.
	m2 := teststore.Enqueue(t, s, teststore.Message("two", "2"), alice)
	syncNow(t, x)
	if got := listed(x, alice); got[1] != m1.ID || got[2] != m2.ID || len(got) != 2 {
		t.Fatalf("alice after add: %v", got)
	}
	select {
	case <-watchA:
	default:
		t.Fatal("watch not signalled by an add")
	}

	// A retry of both recipients (4xx for both): a new record, same queue
	// ID, the old one deleted. UIDs stay.
	recs := teststore.Records(t, s, m1.ID)
	if len(recs) != 1 {
		t.Fatalf("records of m1: %d", len(recs))
	}
	retry := recs[0].Env.Clone()
	retry.Gen++
	retry.Attempts++
	if err := s.Rewrite(ctx, recs[0], []queue.Output{{Env: retry}}); err != nil {
		t.Fatal(err)
	}
	syncNow(t, x)
	if got := listed(x, alice); got[1] != m1.ID || len(got) != 2 {
		t.Fatalf("alice after retry: %v", got)
	}
	if got := listed(x, bob); got[1] != m1.ID || len(got) != 1 {
		t.Fatalf("bob after retry: %v", got)
	}
	if seqs := x.Records(alice, 1); len(seqs) != 1 || seqs[0] == recs[0].Seq {
		t.Fatalf("alice UID 1 records %v (old record %d)", seqs, recs[0].Seq)
	}

	// Delivered to alice, deferred for bob: the rewrite keeps bob only.
	recs = teststore.Records(t, s, m1.ID)
	bobOnly := recs[0].Env.Clone()
	bobOnly.To, bobOnly.Gen = []string{bob}, bobOnly.Gen+1
	watchA = x.Watch(alice)
	if err := s.Rewrite(ctx, recs[0], []queue.Output{{Env: bobOnly}}); err != nil {
		t.Fatal(err)
	}
	syncNow(t, x)
	if got := listed(x, alice); len(got) != 1 || got[2] != m2.ID {
		t.Fatalf("alice after her delivery: %v", got)
	}
	if got := listed(x, bob); got[1] != m1.ID || len(got) != 1 {
		t.Fatalf("bob keeps UID 1: %v", got)
	}
	select {
	case <-watchA:
	default:
		t.Fatal("watch not signalled by a removal")
	}

	// Dead-lettered for bob: dead letters leave the view.
	recs = teststore.Records(t, s, m1.ID)
	dead := recs[0].Env.Clone()
	if err := s.Rewrite(ctx, recs[0], []queue.Output{{Env: dead, Dead: true}}); err != nil {
		t.Fatal(err)
	}
	// Delivered: alice's m2 completes.
	recs = teststore.Records(t, s, m2.ID)
	if err := s.Complete(ctx, recs[0]); err != nil {
		t.Fatal(err)
	}
	syncNow(t, x)
	if got := listed(x, alice); len(got) != 0 {
		t.Fatalf("alice after delivery: %v", got)
	}
	if got := listed(x, bob); len(got) != 0 {
		t.Fatalf("bob after dead letter: %v", got)
	}

	// UIDs are never reused under the same UIDVALIDITY.
	m3 := teststore.Enqueue(t, s, teststore.Message("three", "3"), alice)
	syncNow(t, x)
	if got := listed(x, alice); got[3] != m3.ID || len(got) != 1 {
		t.Fatalf("alice's next message: %v", got)
	}
	if st := x.Stats(); st.Messages != 1 || st.Records != 1 {
		t.Fatalf("stats %+v", st)
	}
}

// TestLargeMessage: a message stored in chunks is indexed with its size,
// and removing it (record and chunks) removes it from the view.
func TestLargeMessage(t *testing.T) {
	s := teststore.New(t, 64<<10)
	big := append(teststore.Message("big", ""), []byte(strings.Repeat("x", 300<<10))...)
	env := teststore.Enqueue(t, s, big, "alice@example.test")
	x := build(t, s)
	m, ok := x.Get("alice@example.test", 1)
	if !ok || m.Size != int64(len(big)) || m.ID != env.ID {
		t.Fatalf("large message: %+v %v (size want %d)", m, ok, len(big))
	}
	if err := s.Complete(context.Background(), teststore.Records(t, s, env.ID)[0]); err != nil {
		t.Fatal(err)
	}
	syncNow(t, x)
	if _, ok := x.Get("alice@example.test", 1); ok {
		t.Fatal("delivered large message still listed")
	}
}

// TestFollows: writes reach the index without a Sync: the catalog follows
// the stream by itself.
func TestFollows(t *testing.T) {
	s := teststore.New(t, 0)
	x := New(teststore.Catalog(t, s), s, Options{})
	w := x.Watch("alice@example.test")
	env := teststore.Enqueue(t, s, teststore.Message("hi", "1"), "alice@example.test")
	select {
	case <-w:
	case <-time.After(5 * time.Second):
		t.Fatal("a local write did not reach the index")
	}
	if m, ok := x.Get("alice@example.test", 1); !ok || m.ID != env.ID {
		t.Fatalf("%+v %v", m, ok)
	}
}

// The cache of parsed headers is bounded: before, every header a user
// looked at stayed in memory for as long as the message was held.
func TestSummaryCacheIsBounded(t *testing.T) {
	s := teststore.New(t, 0)
	const alice = "alice@example.test"
	for i := 0; i < 3; i++ {
		teststore.Enqueue(t, s, teststore.Message("m", "x"), alice)
	}
	x := New(teststore.Catalog(t, s), s, Options{Summaries: 2})
	syncNow(t, x)
	for uid := uint32(1); uid <= 3; uid++ {
		x.SetSummary(alice, uid, &Summary{Subject: "s"})
	}
	if n := x.Stats().Summaries; n != 2 {
		t.Fatalf("%d summaries cached, want the bound of 2", n)
	}
	if m, _ := x.Get(alice, 1); m.Summary != nil {
		t.Fatal("the least recently used summary was kept")
	}
	if m, _ := x.Get(alice, 3); m.Summary == nil {
		t.Fatal("the newest summary was evicted")
	}
}
