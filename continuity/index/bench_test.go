package index

import (
	"bytes"
	"context"
	"fmt"
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

// BenchmarkListOneUser lists one user's held mail under a backlog of
// 10 000 messages across 1 000 users: from the catalog, and, for
// comparison, by the only other way there is, a headers-only walk of the
// whole stream picking the user's records. (Memory: the catalog is on
// disk; bench/scale measures the process's RSS as the backlog grows.)
//
//	go test -run - -bench ListOneUser -benchtime 2000x ./continuity/index/
func BenchmarkListOneUser(b *testing.B) {
	const messages, users = 10000, 1000
	s := backlog(b, messages, users)
	x := New(teststore.Catalog(b, s), s, Options{})
	if err := x.Sync(context.Background()); err != nil {
		b.Fatal(err)
	}
	if st := x.Stats(); st.Messages != messages {
		b.Fatalf("indexed %d messages, want %d", st.Messages, messages)
	}
	b.Run("index", func(b *testing.B) {
		b.ReportAllocs()
		for i := 0; b.Loop(); i++ {
			msgs, _ := x.List(fmt.Sprintf("user%d@example.test", i%users))
			if len(msgs) != messages/users {
				b.Fatalf("listed %d", len(msgs))
			}
		}
	})
	b.Run("full-walk", func(b *testing.B) {
		for i := 0; b.Loop(); i++ {
			user := fmt.Sprintf("user%d@example.test", i%users)
			n := 0
			_, err := s.Walk(context.Background(), queue.Queued, 1, func(r queue.Record) error {
				for _, to := range r.Env.To {
					if k, err := Key(to); err == nil && k == user {
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
