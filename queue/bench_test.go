package queue

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mxq-dev/mxq/queue/envelope"
)

// BenchmarkEnqueue measures the enqueue path alone (no SMTP): 10 KiB
// messages from concurrent writers, with fsync before each acknowledgement,
// one publish per message ("single") against the group committer ("group").
// Run: go test -run - -bench Enqueue -benchmem ./queue
// b.N messages are written in total by the writers; msgs/s is reported.
func BenchmarkEnqueue(b *testing.B) {
	msg := bytes.Repeat([]byte("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcde\r\n"), 160) // 10 KiB
	for _, mode := range []string{DurabilitySingle, DurabilityGroup} {
		for _, writers := range []int{1, 32, 128} {
			b.Run(fmt.Sprintf("%s/writers=%d", mode, writers), func(b *testing.B) {
				s := newTestStore(b, func(o *Options) {
					o.Durability = mode
					o.ChunkSize = 4 << 20
					o.GroupMaxMessages = 256
					if c := os.Getenv("MXQ_BENCH_COMMITTERS"); c != "" {
						fmt.Sscan(c, &o.Committers)
					}
				})
				ids := envelope.NewIDGen(time.Now, 9)
				envs := make(chan *envelope.Envelope, 1024)
				go func() {
					for i := 0; i < b.N; i++ {
						envs <- &envelope.Envelope{ID: ids.New(), From: "a@example.org", To: []string{"b@example.test"}, Arrived: time.Now()}
					}
					close(envs)
				}()
				var failed atomic.Int64
				b.SetBytes(int64(len(msg)))
				b.ReportAllocs()
				b.ResetTimer()
				start := time.Now()
				done := make(chan struct{})
				for w := 0; w < writers; w++ {
					go func() {
						defer func() { done <- struct{}{} }()
						r := bytes.NewReader(nil)
						for env := range envs {
							r.Reset(msg)
							if err := s.Enqueue(context.Background(), env, r); err != nil {
								failed.Add(1)
							}
						}
					}()
				}
				for w := 0; w < writers; w++ {
					<-done
				}
				b.StopTimer()
				if n := failed.Load(); n > 0 {
					b.Fatalf("%d enqueues failed", n)
				}
				b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "msgs/s")
			})
		}
	}
}
