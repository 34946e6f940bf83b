package index

import (
	"bytes"
	"context"
	"fmt"
	"runtime"
	"sync"
	"testing"

	"github.com/mxq-dev/mxq/continuity/internal/teststore"
	"github.com/mxq-dev/mxq/queue"
)

// backlog fills a store with n messages of about 2 KiB spread over users
// mailboxes (message i goes to user i%users).
func backlog(b *testing.B, n, users int) *queue.Store {
	b.Helper()
	s := teststore.New(b, 0)
	body := bytes.Repeat([]byte("held mail line of text\r\n"), 80)
	var wg sync.WaitGroup
	work := make(chan int)
	errs := make(chan error, 1)
	for w := 0; w < 32; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range work {
				msg := append(teststore.Message(fmt.Sprintf("message %d", i), ""), body...)
				env := teststore.Env("sender@example.org", fmt.Sprintf("user%d@example.test", i%users))
				if err := s.Enqueue(context.Background(), env, bytes.NewReader(msg)); err != nil {
					select {
					case errs <- err:
					default:
					}
				}
			}
		}()
	}
	for i := 0; i < n; i++ {
		work <- i
	}
	close(work)
	wg.Wait()
	select {
	case err := <-errs:
		b.Fatal(err)
	default:
	}
	return s
}

// memoryPerMessage indexes n synthetic records for users mailboxes
// (without a store: the embedded server's own allocations would blur the
// figure) and returns the heap growth per message.
func memoryPerMessage(n, users int) float64 {
	recs := make([]queue.Record, n)
	keys := make([][]string, n)
	for i := range recs {
		env := teststore.Env(fmt.Sprintf("sender%d@example.org", i), fmt.Sprintf("user%d@example.test", i%users))
		env.Size = 10 << 10
		recs[i] = queue.Record{Seq: uint64(i + 1), Env: env}
		keys[i] = recipientKeys(recs[i])
	}
	before := heap()
	x := New(nil, Options{})
	x.mu.Lock()
	for i, r := range recs {
		x.addLocked(r, keys[i])
	}
	x.mu.Unlock()
	after := heap()
	runtime.KeepAlive(x)
	runtime.KeepAlive(recs)
	runtime.KeepAlive(keys)
	return float64(after-before) / float64(n)
}

func heap() uint64 {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc
}

// BenchmarkListOneUser lists one user's held mail under a backlog of
// 10 000 messages across 1 000 users: from the index, and, for
// comparison, by the only other way there is, a headers-only walk of the
// whole stream picking the user's records. It also reports the index's
// memory per message.
//
//	go test -run - -bench ListOneUser -benchtime 2000x ./continuity/index/
func BenchmarkListOneUser(b *testing.B) {
	const messages, users = 10000, 1000
	s := backlog(b, messages, users)
	x := New(s, Options{})
	if err := x.Build(context.Background()); err != nil {
		b.Fatal(err)
	}
	if st := x.Stats(); st.Messages != messages {
		b.Fatalf("indexed %d messages, want %d", st.Messages, messages)
	}
	perMsg := memoryPerMessage(100000, 10000)
	b.Logf("index memory: %.0f bytes of heap per message", perMsg)

	b.Run("index", func(b *testing.B) {
		b.ReportAllocs()
		for i := 0; b.Loop(); i++ {
			msgs, _ := x.List(fmt.Sprintf("user%d@example.test", i%users))
			if len(msgs) != messages/users {
				b.Fatalf("listed %d", len(msgs))
			}
		}
		b.ReportMetric(perMsg, "index-bytes/msg")
	})
	b.Run("full-walk", func(b *testing.B) {
		for i := 0; b.Loop(); i++ {
			user := fmt.Sprintf("user%d@example.test", i%users)
			n := 0
			_, err := s.Walk(context.Background(), queue.Queued, 1, func(r queue.Record) error {
				for _, k := range recipientKeys(r) {
					if k == user {
						n++
					}
				}
				return nil
			})
			if err != nil {
				b.Fatal(err)
			}
			if n != messages/users {
				b.Fatalf("walk found %d", n)
			}
		}
	})
}
