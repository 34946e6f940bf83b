package queue

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"sync"
	"testing"
	"time"
)

// BenchmarkWalk walks the envelopes of a queue of MXQ_WALK_RECORDS
// (default 100 000) small records, as listing, bulk actions by filter and
// orphan collection do, and reports records per second.
//
//	go test -run - -bench Walk -benchtime 3x ./queue
func BenchmarkWalk(b *testing.B) {
	n := 100000
	if v := os.Getenv("MXQ_WALK_RECORDS"); v != "" {
		fmt.Sscan(v, &n)
	}
	s := newTestStore(b, nil)
	ctx := context.Background()
	msg := bytes.Repeat([]byte("x"), 2048)
	var wg sync.WaitGroup
	work := make(chan int)
	for w := 0; w < 32; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range work {
				if err := s.Enqueue(ctx, testEnv(fmt.Sprintf("u%d@example.test", i%1000)), bytes.NewReader(msg)); err != nil {
					b.Error(err)
				}
			}
		}()
	}
	for i := 0; i < n; i++ {
		work <- i
	}
	close(work)
	wg.Wait()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		start := time.Now()
		seen := 0
		if _, err := s.Walk(ctx, Queued, 0, func(Record) error { seen++; return nil }); err != nil {
			b.Fatal(err)
		}
		if seen != n {
			b.Fatalf("walked %d of %d", seen, n)
		}
		b.ReportMetric(float64(n)/time.Since(start).Seconds(), "records/s")
	}
}
