package queue

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/mxq-dev/mxq/internal/membudget"
)

// A message that cannot grow its buffer is stored in chunks as it comes,
// byte for byte, and the budget is whole again afterwards.
func TestEnqueueSpillsWhenBudgetIsShort(t *testing.T) {
	ctx := context.Background()
	step := int64(copyFactor * bufStep)
	mem := membudget.New(membudget.Options{Size: 3 * step, Wait: 100 * time.Millisecond})
	s := newTestStore(t, func(o *Options) { o.Memory = mem })

	// Room for one first step and nothing more.
	if err := mem.Reserve(ctx, 2*step); err != nil {
		t.Fatal(err)
	}
	msg := make([]byte, 600<<10)
	rand.Read(msg)
	env := testEnv("u@example.test")
	if err := s.Enqueue(ctx, env, bytes.NewReader(msg)); err != nil {
		t.Fatal(err)
	}
	if got := s.Spills(); got != 9 {
		t.Errorf("%d chunks stored early, want 9 (600 KiB through a 64 KiB buffer, the tail at the end)", got)
	}
	recs := readAll(t, s, "store")
	if len(recs) != 1 || recs[0].Env.Chunks != 10 || !bytes.Equal(body(t, s, recs[0]), msg) {
		t.Fatalf("stored %d records (chunks %d), want one of 10 chunks with the message's bytes", len(recs), recs[0].Env.Chunks)
	}
	if mem.InUse() != 2*step {
		t.Errorf("in use %d after the message, want %d", mem.InUse(), 2*step)
	}

	// No room for a first step: refused after the wait, nothing read or stored.
	if err := mem.Reserve(ctx, step); err != nil {
		t.Fatal(err)
	}
	r := &countingReader{r: bytes.NewReader(msg)}
	err := s.Enqueue(ctx, testEnv("u@example.test"), r)
	if !errors.Is(err, membudget.ErrExhausted) {
		t.Fatalf("with the budget used up: %v, want ErrExhausted", err)
	}
	if r.n != 0 || len(readAll(t, s, "store")) != 1 {
		t.Errorf("refused message: %d bytes read, %d records", r.n, len(readAll(t, s, "store")))
	}
	mem.Release(3 * step)
	if mem.InUse() != 0 {
		t.Errorf("in use %d, want 0", mem.InUse())
	}
}

type countingReader struct {
	r interface{ Read([]byte) (int, error) }
	n int
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += n
	return n, err
}

// Many messages at once within a budget that holds a few: all stored
// intact, the budget never over, and empty at the end.
func TestEnqueueConcurrentWithinBudget(t *testing.T) {
	ctx := context.Background()
	size := int64(6 * copyFactor * bufStep)
	mem := membudget.New(membudget.Options{Size: size, Wait: 30 * time.Second})
	s := newTestStore(t, func(o *Options) { o.Memory = mem })
	sizes := []int{100, 10 << 10, 70 << 10, 256 << 10, 300 << 10, 1 << 20}
	var mu sync.Mutex
	want := map[string][]byte{}
	var wg sync.WaitGroup
	stop := make(chan struct{})
	var peak int64
	go func() {
		for {
			select {
			case <-stop:
				return
			default:
			}
			if n := mem.InUse(); n > peak {
				peak = n
			}
			time.Sleep(100 * time.Microsecond)
		}
	}()
	for g := 0; g < 16; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 3; i++ {
				msg := make([]byte, sizes[(g+i)%len(sizes)])
				rand.Read(msg)
				env := testEnv("u@example.test")
				if err := s.Enqueue(ctx, env, bytes.NewReader(msg)); err != nil {
					t.Error(err)
					return
				}
				mu.Lock()
				want[env.ID] = msg
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	close(stop)
	recs := readAll(t, s, "store")
	if len(recs) != len(want) || len(want) != 48 {
		t.Fatalf("%d records for %d messages, want 48", len(recs), len(want))
	}
	for _, r := range recs {
		if !bytes.Equal(body(t, s, r), want[r.Env.ID]) {
			t.Fatalf("%s: body differs", r.Env.ID)
		}
	}
	if mem.InUse() != 0 || peak > size {
		t.Errorf("in use %d at the end (want 0), peak %d of %d", mem.InUse(), peak, size)
	}
	t.Logf("peak %d of %d bytes, %d chunks stored early", peak, size, s.Spills())
}

// A message for two routes is published twice, so it needs a second copy
// of its bytes: without room for it, it is refused and nothing is stored.
func TestEnqueueTwoRoutesNeedsTheirCopies(t *testing.T) {
	ctx := context.Background()
	step := int64(copyFactor * bufStep)
	mem := membudget.New(membudget.Options{Size: step, Wait: 50 * time.Millisecond})
	s := newTestStore(t, func(o *Options) { o.Memory = mem })
	msg := bytes.Repeat([]byte("x"), 10<<10)
	err := s.Enqueue(ctx, testEnv("u@example.test", "v@other.test"), bytes.NewReader(msg))
	if !errors.Is(err, membudget.ErrExhausted) {
		t.Fatalf("%v, want ErrExhausted", err)
	}
	if n := len(readAll(t, s, "store")) + len(readAll(t, s, "other")); n != 0 || mem.InUse() != 0 {
		t.Fatalf("%d records stored, %d bytes in use; want 0 and 0", n, mem.InUse())
	}
	mem2 := membudget.New(membudget.Options{Size: step + 10<<10, Wait: 50 * time.Millisecond})
	s2 := newTestStore(t, func(o *Options) { o.Memory = mem2 })
	if err := s2.Enqueue(ctx, testEnv("u@example.test", "v@other.test"), bytes.NewReader(msg)); err != nil {
		t.Fatal(err)
	}
	if len(readAll(t, s2, "store")) != 1 || len(readAll(t, s2, "other")) != 1 || mem2.InUse() != 0 {
		t.Fatal("with room for both copies: want one record per route and the budget empty")
	}
}
