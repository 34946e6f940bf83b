package queue

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/mxq-dev/mxq/queue/envelope"
)

// BenchmarkEnqueueAlternatives compares, on the enqueue path alone, the
// group commit mxq ships with the alternative the design notes name: the
// server writes without fsync (SyncAlways off) and mxq makes its own fsync
// barrier over the stream's block files before acknowledging ("barrier":
// writers that finish while an fsync runs share the next one).
//
// The barrier is measured, not shipped: with SyncAlways off nats-server
// also rewrites blocks (compaction after deletions, tmp file + rename)
// without fsync, so a power cut could take acknowledged mail that sat in a
// rewritten block; mxq's own barrier cannot cover writes it does not see.
//
// Run: go test -run - -bench EnqueueAlternatives -benchmem ./queue
func BenchmarkEnqueueAlternatives(b *testing.B) {
	msg := bytes.Repeat([]byte("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcde\r\n"), 160) // 10 KiB
	for _, mode := range []string{"group", "barrier"} {
		for _, writers := range []int{1, 32} {
			b.Run(fmt.Sprintf("%s/writers=%d", mode, writers), func(b *testing.B) {
				dir := b.TempDir()
				emb, err := StartEmbedded(context.Background(), EmbeddedOptions{ServerName: "b", StoreDir: dir, MaxPayload: 8 << 20, SyncAlways: mode == "group"})
				if err != nil {
					b.Fatal(err)
				}
				b.Cleanup(emb.Shutdown)
				nc, err := emb.Connect("bench")
				if err != nil {
					b.Fatal(err)
				}
				b.Cleanup(nc.Close)
				o := Options{Stream: "MXQ", Replicas: 1, Durability: DurabilityGroup, Committers: 1,
					GroupMaxMessages: 256, GroupMaxBytes: 8 << 20, GroupLinger: time.Millisecond,
					ChunkSize: 4 << 20, Timeout: 10 * time.Second, Route: func(string) string { return "store" }}
				var bar *fsyncBarrier
				if mode == "barrier" {
					o.Durability = DurabilityUnsafe
					bar = &fsyncBarrier{dir: filepath.Join(dir, "jetstream", "$G", "streams", "MXQ", "msgs"), fds: map[string]*os.File{}}
					b.Cleanup(bar.close)
				}
				s, err := Open(context.Background(), nc, o)
				if err != nil {
					b.Fatal(err)
				}
				b.Cleanup(s.Close)
				if mode == "group" {
					if stage := TmpfsStagingDir(dir, 64<<20); stage != "" {
						if err := emb.StageBatches(dir, "MXQ", stage); err != nil {
							b.Fatal(err)
						}
						b.Cleanup(func() { os.RemoveAll(stage) })
					}
				}
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
				cpu0 := cpuTime()
				b.ResetTimer()
				start := time.Now()
				var wg sync.WaitGroup
				for w := 0; w < writers; w++ {
					wg.Add(1)
					go func() {
						defer wg.Done()
						r := bytes.NewReader(nil)
						for env := range envs {
							r.Reset(msg)
							err := s.Enqueue(context.Background(), env, r)
							if err == nil && bar != nil {
								err = bar.sync()
							}
							if err != nil {
								failed.Add(1)
							}
						}
					}()
				}
				wg.Wait()
				b.StopTimer()
				if n := failed.Load(); n > 0 {
					b.Fatalf("%d enqueues failed", n)
				}
				elapsed := time.Since(start)
				b.ReportMetric(float64(b.N)/elapsed.Seconds(), "msgs/s")
				b.ReportMetric(float64((cpuTime()-cpu0).Microseconds())/float64(b.N), "cpu-µs/msg")
				if bar != nil {
					b.ReportMetric(float64(bar.fsyncs.Load())/float64(b.N), "fsyncs/msg")
				} else {
					batches, n := s.CommitStats()
					b.ReportMetric(float64(batches)/float64(n), "fsyncs/msg")
				}
			})
		}
	}
}

// fsyncBarrier makes everything written to the stream's block files so
// far durable, sharing one round of fsyncs among the writers waiting.
type fsyncBarrier struct {
	dir       string
	requested atomic.Uint64
	fsyncs    atomic.Int64

	mu     sync.Mutex
	synced uint64
	fds    map[string]*os.File
	tail   string
}

func blkNum(name string) int {
	var n int
	fmt.Sscanf(name, "%d.blk", &n)
	return n
}

func (b *fsyncBarrier) sync() error {
	ticket := b.requested.Add(1)
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.synced >= ticket {
		return nil // an fsync that started after our write covered it
	}
	upTo := b.requested.Load()
	// Writes since the last round went to the block that was the tail
	// then, and to blocks created since.
	ents, err := os.ReadDir(b.dir)
	if err != nil {
		return err
	}
	var created []string
	for _, e := range ents {
		if strings.HasSuffix(e.Name(), ".blk") {
			if _, ok := b.fds[e.Name()]; !ok {
				created = append(created, e.Name())
			}
		}
	}
	toSync := created
	if b.tail != "" {
		toSync = append(toSync, b.tail)
	}
	for _, name := range toSync {
		f, ok := b.fds[name]
		if !ok {
			if f, err = os.Open(filepath.Join(b.dir, name)); err != nil {
				return err
			}
			b.fds[name] = f
		}
		if err := syscall.Fdatasync(int(f.Fd())); err != nil {
			return err
		}
		b.fsyncs.Add(1)
	}
	if len(created) > 0 { // their directory entries
		d, err := os.Open(b.dir)
		if err != nil {
			return err
		}
		err = d.Sync()
		d.Close()
		if err != nil {
			return err
		}
		b.fsyncs.Add(1)
		for _, n := range created { // block files are numbered in order
			if b.tail == "" || blkNum(n) > blkNum(b.tail) {
				b.tail = n
			}
		}
	}
	b.synced = upTo
	return nil
}

func (b *fsyncBarrier) close() {
	for _, f := range b.fds {
		f.Close()
	}
}

func cpuTime() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
