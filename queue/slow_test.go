package queue

// Tests against a server that answers late: the walk, orphan collection
// and the write path must never take a late answer for the end of the
// data or for a failed write.

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
)

// slowConn delays every byte the server sends by delay, in order: a server
// (or a network) that answers correctly, only late.
type slowConn struct {
	net.Conn
	delay *atomic.Int64 // nanoseconds, read as each chunk arrives
	ch    chan timedChunk
	cur   []byte
	err   error
}

type timedChunk struct {
	due  time.Time
	data []byte
	err  error
}

func newSlowConn(c net.Conn, delay *atomic.Int64) *slowConn {
	s := &slowConn{Conn: c, delay: delay, ch: make(chan timedChunk, 4096)}
	go func() {
		for {
			b := make([]byte, 32<<10)
			n, err := c.Read(b)
			s.ch <- timedChunk{time.Now().Add(time.Duration(delay.Load())), b[:n], err}
			if err != nil {
				close(s.ch)
				return
			}
		}
	}()
	return s
}

func (s *slowConn) Read(p []byte) (int, error) {
	for len(s.cur) == 0 {
		if s.err != nil {
			return 0, s.err
		}
		c, ok := <-s.ch
		if !ok {
			return 0, io.EOF
		}
		time.Sleep(time.Until(c.due))
		s.cur, s.err = c.data, c.err
	}
	n := copy(p, s.cur)
	s.cur = s.cur[n:]
	return n, nil
}

// slowServer hands out in-process connections whose replies come late.
type slowServer struct {
	srv   *server.Server
	delay *atomic.Int64
}

func (s slowServer) InProcessConn() (net.Conn, error) {
	c, err := s.srv.InProcessConn()
	if err != nil {
		return nil, err
	}
	return newSlowConn(c, s.delay), nil
}

// slowStore opens a second Store on s's stream over a connection whose
// replies are delayed by delay.
func slowStore(t *testing.T, s *Store, emb *Embedded, delay time.Duration, mod func(*Options)) *Store {
	t.Helper()
	d := new(atomic.Int64)
	d.Store(int64(delay))
	return slowStoreVar(t, s, emb, d, mod)
}

// slowStoreVar is slowStore with a delay the test can change.
func slowStoreVar(t *testing.T, s *Store, emb *Embedded, delay *atomic.Int64, mod func(*Options)) *Store {
	t.Helper()
	var once sync.Once
	nc, err := nats.Connect("", nats.InProcessServer(slowServer{emb.Server(), delay}), nats.Timeout(20*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { once.Do(nc.Close) })
	o := s.o
	o.Durability, o.Timeout = DurabilitySingle, 5*time.Second
	if mod != nil {
		mod(&o)
	}
	slow, err := Open(context.Background(), nc, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(slow.Close)
	return slow
}

// A walk over a server that answers after the first fetch gave up waiting
// must still see every record: before the fix it ended early, without an
// error, as if it had reached the end.
func TestWalkOverSlowServerSeesEverything(t *testing.T) {
	if testing.Short() {
		t.Skip("slow by design")
	}
	s, emb := newTestStoreEmb(t, nil)
	ctx := context.Background()
	const n = 50
	for i := 0; i < n; i++ {
		if err := s.Enqueue(ctx, testEnv("u@example.test"), bytes.NewReader([]byte("Subject: x\r\n\r\nhi"))); err != nil {
			t.Fatal(err)
		}
	}
	// 1.7 s: longer than the first fetch's wait plus the client's own
	// second of grace, after which nats.go ends a fetch without an error.
	slow := slowStore(t, s, emb, 1700*time.Millisecond, nil)
	seen := 0
	_, err := slow.Walk(ctx, Queued, 0, func(Record) error { seen++; return nil })
	if err != nil {
		t.Fatalf("walk: %v", err)
	}
	if seen != n {
		t.Fatalf("walk over a slow server saw %d of %d records, without an error", seen, n)
	}
}

// The loss the early end caused: orphan collection over a slow connection
// took the chunks of a queued large message for orphans and purged them.
func TestCollectOrphansOverSlowServerKeepsQueuedChunks(t *testing.T) {
	if testing.Short() {
		t.Skip("slow by design")
	}
	s, emb := newTestStoreEmb(t, nil)
	ctx := context.Background()
	msg := make([]byte, 600<<10) // three chunks of 256 KiB
	rand.Read(msg)
	if err := s.Enqueue(ctx, testEnv("big@example.test"), bytes.NewReader(msg)); err != nil {
		t.Fatal(err)
	}
	slow := slowStore(t, s, emb, 1700*time.Millisecond, nil)
	got, err := slow.CollectOrphans(ctx, true, ^uint64(0))
	if err != nil && !errors.Is(err, ErrIncomplete) {
		t.Fatalf("collect: %v", err)
	}
	if got.Messages != 0 {
		t.Errorf("collected %d messages' chunks as orphans", got.Messages)
	}
	recs := readAll(t, s, "store")
	if len(recs) != 1 {
		t.Fatalf("%d records", len(recs))
	}
	b, err := io.ReadAll(s.Body(ctx, recs[0]))
	if err != nil || !bytes.Equal(b, msg) {
		t.Fatalf("queued large message damaged after orphan collection over a slow server: %d bytes, %v", len(b), err)
	}
}

// A write whose reply came after the attempt's deadline was stored; the
// next attempt, with a deadline of its own, learns so from the server's
// deduplication. Before the fix every attempt shared one deadline, the
// retry failed at once, and the session got 451 for mail that was stored.
func TestPublishRetryAfterLateReply(t *testing.T) {
	if testing.Short() {
		t.Skip("slow by design")
	}
	for _, tc := range []struct {
		name string
		to   []string // two routes: an atomic batch of two records
	}{
		{"one record", []string{"u@example.test"}},
		{"batch of two records", []string{"u@example.test", "v@other.test"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, emb := newTestStoreEmb(t, nil)
			ctx := context.Background()
			delay := new(atomic.Int64)
			slow := slowStoreVar(t, s, emb, delay, func(o *Options) {
				o.Durability, o.Committers, o.Timeout = DurabilityGroup, 1, time.Second
			})
			// The first reply comes 1.5 s late (after the first attempt
			// gave up at 1 s); later ones as soon as it is through.
			delay.Store(int64(1500 * time.Millisecond))
			go func() {
				time.Sleep(500 * time.Millisecond)
				delay.Store(0)
			}()
			err := slow.Enqueue(ctx, testEnv(tc.to...), bytes.NewReader([]byte("Subject: late\r\n\r\nhi")))
			if err != nil {
				t.Fatalf("enqueue answered %v for a message that was stored", err)
			}
			n := len(readAll(t, s, "store")) + len(readAll(t, s, "other"))
			if n != len(tc.to) {
				t.Fatalf("%d records stored, want %d (one per route, no duplicate)", n, len(tc.to))
			}
		})
	}
}
