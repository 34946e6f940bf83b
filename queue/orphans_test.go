package queue

import (
	"bytes"
	"context"
	"math/rand"
	"strings"
	"testing"

	"github.com/mxq-dev/mxq/queue/envelope"
)

// orphan stores two chunks under a fresh token, as an upload cut off
// before its envelope would, and returns the token.
func orphan(t *testing.T, s *Store) string {
	t.Helper()
	env := testEnv("x@example.test")
	env.BodyToken = env.ID + ".0"
	for i := 0; i < 2; i++ {
		if err := s.storeChunk(context.Background(), env, i, bytes.Repeat([]byte("o"), 1000)); err != nil {
			t.Fatal(err)
		}
	}
	return env.BodyToken
}

func chunkTokens(t *testing.T, s *Store) map[string]bool {
	t.Helper()
	subs, _, err := s.subjects(context.Background(), s.prefix+".c.>")
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]bool{}
	for subj := range subs {
		out[strings.TrimPrefix(subj, s.prefix+".c.")] = true
	}
	return out
}

func TestCollectOrphans(t *testing.T) {
	ctx := context.Background()
	s := newTestStore(t, func(o *Options) { o.Origin = "n1" })
	other, err := Open(ctx, s.nc, Options{Stream: "MXQ", Replicas: 1, Durability: DurabilitySingle,
		ChunkSize: 256 << 10, Origin: "n2", Route: func(string) string { return "store" }})
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	anon, err := Open(ctx, s.nc, Options{Stream: "MXQ", Replicas: 1, Durability: DurabilitySingle,
		ChunkSize: 256 << 10, Route: func(string) string { return "store" }})
	if err != nil {
		t.Fatal(err)
	}
	defer anon.Close()

	// Mail that must keep its chunks: a queued message and a dead letter.
	queued, deadMsg := make([]byte, 600<<10), make([]byte, 300<<10)
	rand.Read(queued)
	rand.Read(deadMsg)
	if err := s.Enqueue(ctx, testEnv("q@example.test"), bytes.NewReader(queued)); err != nil {
		t.Fatal(err)
	}
	if err := other.Enqueue(ctx, testEnv("d@example.test"), bytes.NewReader(deadMsg)); err != nil {
		t.Fatal(err)
	}
	var toDie Record
	for _, r := range readAll(t, s, "store") {
		if r.Env.To[0] == "d@example.test" {
			toDie = r
		}
	}
	if err := s.Rewrite(ctx, toDie, []Output{{Env: toDie.Env.Clone(), Dead: true}}); err != nil {
		t.Fatal(err)
	}

	mine, theirs, unnamed := orphan(t, s), orphan(t, other), orphan(t, anon)

	// A node collects only what it wrote itself: the others may be
	// uploading theirs right now.
	got, err := s.CollectOrphans(ctx, false, lastSeq(t, s))
	if err != nil {
		t.Fatal(err)
	}
	left := chunkTokens(t, s)
	if got.Messages != 1 || got.Chunks != 2 || got.Bytes == 0 || left[mine] || !left[theirs] || !left[unnamed] {
		t.Fatalf("collected %+v; left %v; want only %s gone", got, left, mine)
	}
	// A node alone on its stream collects every orphan.
	if got, err = s.CollectOrphans(ctx, true, lastSeq(t, s)); err != nil {
		t.Fatal(err)
	}
	left = chunkTokens(t, s)
	if got.Messages != 2 || left[theirs] || left[unnamed] || len(left) != 2 {
		t.Fatalf("collected %+v; left %v; want the two bodies of mail only", got, left)
	}
	// Nothing collected again, and the mail is whole.
	if got, err = s.CollectOrphans(ctx, true, lastSeq(t, s)); err != nil || got.Messages != 0 {
		t.Fatalf("second collection: %+v %v", got, err)
	}
	q := readAll(t, s, "store")
	if len(q) != 1 || !bytes.Equal(body(t, s, q[0]), queued) {
		t.Fatalf("queued message damaged: %d records", len(q))
	}
	d, _, err := s.ReadFrom(ctx, s.DeadSubject("store"), 1, 10, 0)
	if err != nil || len(d) != 1 || !bytes.Equal(body(t, s, d[0]), deadMsg) {
		t.Fatalf("dead letter damaged: %d records, %v", len(d), err)
	}
}

// A record whose envelope cannot be read might own any chunks: with one
// in the queue, nothing is collected.
func TestCollectOrphansStopsAtDamagedRecord(t *testing.T) {
	ctx := context.Background()
	s := newTestStore(t, func(o *Options) { o.Origin = "n1" })
	tok := orphan(t, s)
	if _, err := s.js.Publish(ctx, s.QueueSubject("store"), []byte("no envelope")); err != nil {
		t.Fatal(err)
	}
	if _, err := envelope.Decode(envelope.Header(nil)); err == nil {
		t.Fatal("an empty header decodes: the damaged record is not damaged")
	}
	got, err := s.CollectOrphans(ctx, true, lastSeq(t, s))
	if err == nil || !strings.Contains(err.Error(), "damaged") {
		t.Fatalf("collected %+v, err %v; want a refusal naming the damaged record", got, err)
	}
	if !chunkTokens(t, s)[tok] {
		t.Fatal("chunks removed despite the damaged record")
	}
}

func lastSeq(t *testing.T, s *Store) uint64 {
	t.Helper()
	n, err := s.LastSeq(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// Collection runs while the node takes mail: chunks stored after the
// start (an upload under way, the copy of a body being rewritten) are not
// candidates, even though no record names them yet.
func TestCollectOrphansSparesChunksSinceStart(t *testing.T) {
	ctx := context.Background()
	s := newTestStore(t, nil)
	old := orphan(t, s)
	before := lastSeq(t, s)
	fresh := orphan(t, s) // an upload in progress
	got, err := s.CollectOrphans(ctx, true, before)
	if err != nil {
		t.Fatal(err)
	}
	left := chunkTokens(t, s)
	if got.Messages != 1 || left[old] || !left[fresh] {
		t.Fatalf("collected %d; left %v: want the old orphan %s gone and the upload %s kept", got.Messages, left, old, fresh)
	}
}
