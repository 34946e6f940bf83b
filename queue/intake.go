package queue

import (
	"context"
	"fmt"
	"io"
	"strconv"

	"github.com/nats-io/nats.go"

	"github.com/mxq-dev/mxq/queue/envelope"
)

// How a message is read into memory, and how much of it is held.
//
// A message is read into one buffer that starts at bufStep and doubles,
// up to a chunk, as the data comes. Every byte of it is reserved from
// Options.Memory before it is allocated, twice over (copyFactor): once for
// the buffer, once for the copy the NATS client makes when it is published
// (its write buffer, and the embedded server's read of it), which lives
// until the publish is acknowledged. Reserving the copy with the buffer
// means that storing never waits for memory: sessions that all hold full
// buffers and all wait for room to store them would wait for each other.
//
// The first step is reserved with a bounded wait (Memory.Reserve); if it
// fails, nothing has been read and the error wraps the budget's, for a 451
// 4.3.1. Growing never waits: a buffer that cannot grow is stored as a
// chunk of the message (any chunk size reads back the same) and read into
// again, so a message under memory pressure costs fsyncs, not memory, and
// a session that trickles holds only what it reserved. The reservation
// is released once the message is stored or refused.
//
// A message that fits in a chunk and was never spilled is one record,
// group-committed with other sessions' messages. Otherwise its chunks are
// stored as they fill, each before the next is read, and the envelope is
// written last: until then the drain does not see the message (see
// storeLarge's notes in finishChunked).

// Memory is a budget of bytes shared by all messages being read
// (membudget.Budget).
type Memory interface {
	// Reserve takes n bytes, waiting a bounded time; the error says the
	// budget stayed used up.
	Reserve(ctx context.Context, n int64) error
	// TryReserve takes n bytes only if it can at once.
	TryReserve(n int64) bool
	// Release gives back what Reserve or TryReserve took.
	Release(n int64)
}

const (
	// bufStep is the first buffer of every message and the size of the
	// pooled buffers: most mail fits in it.
	bufStep = 64 << 10
	// copyFactor is how many bytes are reserved per byte of buffer.
	copyFactor = 2
)

// noMemory is the Memory of a Store without a budget.
type noMemory struct{}

func (noMemory) Reserve(context.Context, int64) error { return nil }
func (noMemory) TryReserve(int64) bool                { return true }
func (noMemory) Release(int64)                        {}

// Spills counts the chunks stored early because a message's buffer could
// not grow within the memory budget.
func (s *Store) Spills() uint64 { return s.spills.Load() }

// Enqueue stores a message: env (with ID, sender and all recipients) and
// the message read from msg. It returns only when every record is durable
// (fsync'd, or held by a quorum), or with an error after which nothing of
// the message is visible in the queue.
func (s *Store) Enqueue(ctx context.Context, env *envelope.Envelope, msg io.Reader) error {
	parts, err := s.split(env)
	if err != nil {
		return err
	}
	in := &intake{s: s, mem: s.o.Memory, parts: parts}
	if in.mem == nil {
		in.mem = noMemory{}
	}
	defer in.release()
	if err := in.start(ctx); err != nil {
		return err
	}
	err = in.read(ctx, msg)
	env.Size = parts[0].Size
	return err
}

// intake is one message being read and stored.
type intake struct {
	s      *Store
	mem    Memory
	parts  []*envelope.Envelope
	held   int64   // reserved from mem
	pooled *[]byte // the pooled buffer in use, if buf is it
	buf    []byte
	chunks int   // stored so far
	size   int64 // bytes in the stored chunks
}

func (in *intake) start(ctx context.Context) error {
	step := min(bufStep, in.s.o.ChunkSize)
	if err := in.mem.Reserve(ctx, copyFactor*int64(step)); err != nil {
		return fmt.Errorf("queue: no memory for a new message: %w", err)
	}
	in.held = copyFactor * int64(step)
	bp, ok := in.s.bufPool.Get().(*[]byte)
	if !ok {
		b := make([]byte, 0, bufStep)
		bp = &b
	}
	in.pooled = bp
	in.buf = (*bp)[:0:step]
	return nil
}

func (in *intake) release() {
	in.mem.Release(in.held)
	in.held = 0
	if in.pooled != nil {
		in.s.bufPool.Put(in.pooled)
		in.pooled = nil
	}
	in.buf = nil
}

// read reads the message to its end and stores it.
func (in *intake) read(ctx context.Context, r io.Reader) error {
	chunk := in.s.o.ChunkSize
	for {
		if len(in.buf) == cap(in.buf) {
			switch {
			case cap(in.buf) < chunk && in.grow(min(2*cap(in.buf), chunk)):
			case cap(in.buf) < chunk:
				// No memory to grow: the disk takes what we hold.
				in.s.spills.Add(1)
				if err := in.spill(ctx); err != nil {
					return in.fail(ctx, err)
				}
			default:
				// A full chunk: it is the whole message only if
				// nothing follows.
				var one [1]byte
				n, err := io.ReadFull(r, one[:])
				if n == 0 {
					if err == io.EOF {
						return in.finish(ctx)
					}
					return in.fail(ctx, err)
				}
				if err := in.spill(ctx); err != nil {
					return in.fail(ctx, err)
				}
				in.buf = append(in.buf, one[0])
			}
			continue
		}
		n, err := r.Read(in.buf[len(in.buf):cap(in.buf)])
		in.buf = in.buf[:len(in.buf)+n]
		if err == io.EOF {
			return in.finish(ctx)
		}
		if err != nil {
			return in.fail(ctx, err)
		}
	}
}

// grow gives the buffer size bytes, if the budget has them at once.
func (in *intake) grow(size int) bool {
	more := copyFactor * int64(size-cap(in.buf))
	if !in.mem.TryReserve(more) {
		return false
	}
	in.held += more
	b := make([]byte, len(in.buf), size)
	copy(b, in.buf)
	in.buf = b
	if in.pooled != nil {
		in.s.bufPool.Put(in.pooled)
		in.pooled = nil
	}
	return true
}

// spill stores the buffer as the message's next chunk and empties it.
func (in *intake) spill(ctx context.Context) error {
	if in.chunks == 0 {
		for _, p := range in.parts {
			p.BodyToken = p.ID + "." + strconv.Itoa(p.Part)
		}
	}
	for _, p := range in.parts {
		if err := in.s.storeChunk(ctx, p, in.chunks, in.buf); err != nil {
			return err
		}
	}
	in.chunks++
	in.size += int64(len(in.buf))
	in.buf = in.buf[:0]
	return nil
}

// fail purges the chunks stored so far and returns err.
func (in *intake) fail(ctx context.Context, err error) error {
	if in.chunks == 0 {
		return err
	}
	pctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), in.s.o.Timeout)
	defer cancel()
	for _, p := range in.parts {
		if perr := in.s.purgeChunks(pctx, p.BodyToken); perr != nil {
			in.s.log.Warn("purging chunks of a refused message", "id", p.ID, "err", perr)
		}
	}
	return err
}

// finish stores what the buffer holds at the end of the message.
func (in *intake) finish(ctx context.Context) error {
	if in.chunks == 0 {
		for _, p := range in.parts {
			p.Size = int64(len(in.buf))
		}
		if extra := int64(len(in.parts)-1) * int64(len(in.buf)); extra > 0 {
			// One copy per record: a message for several routes is
			// published once for each.
			if err := in.mem.Reserve(ctx, extra); err != nil {
				return fmt.Errorf("queue: no memory to store a message for %d routes: %w", len(in.parts), err)
			}
			in.held += extra
		}
		return in.s.storeSmall(ctx, in.parts, in.buf)
	}
	if len(in.buf) > 0 {
		if err := in.spill(ctx); err != nil {
			return in.fail(ctx, err)
		}
	}
	return in.finishChunked(ctx)
}

// finishChunked writes the envelope(s) of a message stored as chunks.
//
// Not an atomic batch with the chunks: a batch is staged whole by the
// server, and tens of MiB per message would not fit the small staging
// area group commit uses. If the session fails half-way, its chunks are
// purged; a crash at that moment leaves orphan chunks that no envelope
// names (wasted space, not visible mail), which CollectOrphans removes at
// the next start.
func (in *intake) finishChunked(ctx context.Context) error {
	msgs := make([]*nats.Msg, len(in.parts))
	for i, p := range in.parts {
		p.Size, p.Chunks = in.size, in.chunks
		m, err := in.s.record(in.s.QueueSubject(p.Route), p, nil)
		if err != nil {
			return in.fail(ctx, err)
		}
		msgs[i] = m
	}
	if err := in.s.w.publishAll(ctx, msgs); err != nil {
		return in.fail(ctx, err)
	}
	in.s.wake()
	return nil
}
