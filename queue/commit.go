package queue

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
)

// committer is group commit for the queue: SMTP sessions that reach the end
// of DATA at about the same time share one atomic batch, and so one fsync.
//
// Each of a few workers takes the first waiting request, then whatever
// else is already waiting (up to the count and byte bounds), and commits
// them as one batch. There is no timer: a lone session is committed at
// once, and under load the requests that arrive while a batch is being
// written form the next one. This is the classic "leader collects
// followers" group commit; the batch size follows the load by itself.
type committer struct {
	reqs     chan *commitReq
	linger   time.Duration
	maxMsgs  int
	maxBytes int
	wg       sync.WaitGroup

	mu     sync.RWMutex // guards closed against a send on a closed channel
	closed bool
	// done channels are reused: one per message otherwise.
	donePool sync.Pool

	// Counted for the metrics: messages per batch is how well group
	// commit works (each batch is one fsync).
	batches, messages atomic.Uint64
}

type commitReq struct {
	ctx   context.Context
	msgs  []*nats.Msg
	bytes int
	done  chan error
}

// newCommitter starts one worker per writer.
func newCommitter(writers []*writer, maxMsgs, maxBytes int, linger time.Duration) *committer {
	if maxMsgs < 1 {
		maxMsgs = 256
	}
	if maxBytes < 1 {
		maxBytes = 8 << 20
	}
	c := &committer{reqs: make(chan *commitReq, 4096), maxMsgs: maxMsgs, maxBytes: maxBytes, linger: linger}
	c.donePool.New = func() any { return make(chan error, 1) }
	c.wg.Add(len(writers))
	for _, w := range writers {
		go c.work(w)
	}
	return c
}

// submit hands msgs (the records of one message) to the committer and
// waits for the outcome. All of msgs land in the same batch.
func (c *committer) submit(ctx context.Context, msgs []*nats.Msg, bytes int) error {
	done := c.donePool.Get().(chan error)
	r := &commitReq{ctx: ctx, msgs: msgs, bytes: bytes, done: done}
	c.mu.RLock()
	if c.closed {
		c.mu.RUnlock()
		c.donePool.Put(done)
		return classify(errClosed)
	}
	select {
	case c.reqs <- r:
		c.mu.RUnlock()
	case <-ctx.Done():
		c.mu.RUnlock()
		c.donePool.Put(done)
		return classify(ctx.Err())
	}
	// Wait for the outcome even if ctx ends meanwhile: the batch may be
	// on its way to disk, and the buffer of msgs must not be reused
	// before the publish is over.
	err := <-done
	c.donePool.Put(done)
	return err
}

var errClosed = errors.New("queue is shutting down")

func (c *committer) close() {
	c.mu.Lock()
	if !c.closed {
		c.closed = true
		close(c.reqs)
	}
	c.mu.Unlock()
	c.wg.Wait()
}

func (c *committer) work(w *writer) {
	defer c.wg.Done()
	var (
		batch []*commitReq
		msgs  []*nats.Msg
		carry *commitReq
		avg   float64 // moving average of requests per batch
	)
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	for {
		first := carry
		carry = nil
		if first == nil {
			var ok bool
			if first, ok = <-c.reqs; !ok {
				return
			}
		}
		batch = append(batch[:0], first)
		n, bytes := len(first.msgs), first.bytes
		// Under load (recent batches held several messages), wait a little
		// for the sessions about to finish: a bigger batch costs about the
		// same as a small one. A lone session never waits.
		var linger <-chan time.Time
		if c.linger > 0 && avg > 1.5 {
			timer.Reset(c.linger)
			linger = timer.C
		}
	gather:
		for n < c.maxMsgs && bytes < c.maxBytes {
			var r *commitReq
			var ok bool
			select {
			case r, ok = <-c.reqs:
			default:
				if linger == nil {
					break gather
				}
				select {
				case r, ok = <-c.reqs:
				case <-linger:
					linger = nil
					break gather
				}
			}
			if !ok {
				break gather
			}
			if n+len(r.msgs) > c.maxMsgs || bytes+r.bytes > c.maxBytes {
				carry = r
				break gather
			}
			batch = append(batch, r)
			n += len(r.msgs)
			bytes += r.bytes
		}
		if linger != nil && !timer.Stop() {
			<-timer.C
		}
		avg = 0.8*avg + 0.2*float64(len(batch))
		// Sessions that gave up while waiting are not written: their
		// client was told 451 and will send again.
		msgs = msgs[:0]
		live := batch[:0]
		for _, r := range batch {
			if r.ctx.Err() != nil {
				r.done <- classify(r.ctx.Err())
				continue
			}
			live = append(live, r)
			msgs = append(msgs, r.msgs...)
		}
		if len(live) == 0 {
			continue
		}
		err := w.publishAll(context.Background(), msgs)
		c.batches.Add(1)
		c.messages.Add(uint64(len(live)))
		for _, r := range live {
			r.done <- err
		}
		clear(msgs)
		clear(batch)
	}
}
