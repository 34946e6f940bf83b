// Package membudget bounds the memory that SMTP sessions hold in message
// buffers, with one semaphore counted in bytes that all of them share.
//
// Without it each session holds a buffer that grows with its message up to
// a chunk (4 MiB), plus the copy the NATS client makes of what it publishes
// until the server acknowledges it: at 500 connections, senders that send
// 4 MiB fast and then trickle at the minimum data rate could pin gigabytes.
// With it, every byte of buffer is reserved before it is allocated, and
// released once the message is stored (or refused).
//
// Two ways to reserve, for the two moments a session needs memory:
//
//   - Reserve, at the start of a message: it waits up to Options.Wait for
//     others to release, then fails with ErrExhausted (the relay answers
//     451 4.3.1; the sender keeps the message and tries again later).
//   - TryReserve, to grow a buffer mid-message: it never waits. A session
//     that cannot grow stores what it holds as a chunk instead, turning
//     memory into disk, so a trickling session never holds more than it
//     reserved and never blocks the others.
//
// Waiters are served first come, first served, and TryReserve fails while
// anyone waits: freed memory goes to the messages that have none yet,
// not to the growth of those already in. The clock is injected so that
// the wait is tested without sleeping.
package membudget

import (
	"container/list"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"
)

// ErrExhausted is returned by Reserve when the budget stayed used up for
// the whole wait.
var ErrExhausted = errors.New("memory budget for message buffers used up")

// Clock is the time the wait is measured on.
type Clock interface {
	Now() time.Time
	After(d time.Duration) <-chan time.Time
}

type realClock struct{}

func (realClock) Now() time.Time                         { return time.Now() }
func (realClock) After(d time.Duration) <-chan time.Time { return time.After(d) }

// Options configures a Budget.
type Options struct {
	// Size is the budget in bytes; it must be positive.
	Size int64
	// Wait is how long Reserve waits for memory; 0: it does not wait.
	Wait time.Duration
	// Clock defaults to real time.
	Clock Clock
	// Logger gets the line that says the budget is used up, at most once
	// per LogEvery (default 10 s), with the counts since the last one.
	Logger   *slog.Logger
	LogEvery time.Duration
}

// Budget is a weighted semaphore of bytes.
type Budget struct {
	size  int64
	wait  time.Duration
	clock Clock
	log   *slog.Logger
	every time.Duration

	mu       sync.Mutex
	used     int64
	waiters  list.List // of *waiter, first come first
	waits    uint64
	refusals uint64
	// What the last log line covered.
	logged           time.Time
	loggedW, loggedR uint64
}

type waiter struct {
	n     int64
	ready chan struct{} // closed once granted
}

// New returns a budget of o.Size bytes.
func New(o Options) *Budget {
	if o.Clock == nil {
		o.Clock = realClock{}
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.LogEvery <= 0 {
		o.LogEvery = 10 * time.Second
	}
	return &Budget{size: o.Size, wait: o.Wait, clock: o.Clock, log: o.Logger, every: o.LogEvery}
}

// Reserve takes n bytes, waiting up to the budget's wait (or until ctx
// ends) for them. The error wraps ErrExhausted, or is ctx's.
func (b *Budget) Reserve(ctx context.Context, n int64) error {
	if n <= 0 {
		return nil
	}
	b.mu.Lock()
	if b.waiters.Len() == 0 && b.used+n <= b.size {
		b.used += n
		b.mu.Unlock()
		return nil
	}
	if n > b.size || b.wait <= 0 {
		b.refusals++
		line := b.noteLocked()
		b.mu.Unlock()
		line.write(b.log)
		return b.exhausted(n)
	}
	w := &waiter{n: n, ready: make(chan struct{})}
	elem := b.waiters.PushBack(w)
	b.waits++
	line := b.noteLocked()
	b.mu.Unlock()
	line.write(b.log)

	var cause error
	select {
	case <-w.ready:
		return nil
	case <-b.clock.After(b.wait):
	case <-ctx.Done():
		cause = ctx.Err()
	}
	b.mu.Lock()
	select {
	case <-w.ready:
		// Granted while the timer fired: keep it.
		b.mu.Unlock()
		return nil
	default:
	}
	b.waiters.Remove(elem)
	// Those behind a large request may fit now that it is gone.
	b.grantLocked()
	if cause == nil {
		b.refusals++
		line = b.noteLocked()
	}
	b.mu.Unlock()
	if cause != nil {
		return cause
	}
	line.write(b.log)
	return b.exhausted(n)
}

func (b *Budget) exhausted(n int64) error {
	return fmt.Errorf("%w: %d bytes asked, %d of %d in use", ErrExhausted, n, b.InUse(), b.size)
}

// TryReserve takes n bytes if they are free and nobody waits, at once.
func (b *Budget) TryReserve(n int64) bool {
	if n <= 0 {
		return true
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.waiters.Len() > 0 || b.used+n > b.size {
		return false
	}
	b.used += n
	return true
}

// Release gives back n bytes taken by Reserve or TryReserve.
func (b *Budget) Release(n int64) {
	if n <= 0 {
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	b.used -= n
	if b.used < 0 {
		// A release without its reservation: the accounting is wrong,
		// and every figure after this would be too.
		panic(fmt.Sprintf("membudget: released %d bytes more than reserved", -b.used))
	}
	b.grantLocked()
}

// grantLocked hands freed memory to the waiters, in order.
func (b *Budget) grantLocked() {
	for e := b.waiters.Front(); e != nil; e = b.waiters.Front() {
		w := e.Value.(*waiter)
		if b.used+w.n > b.size {
			return
		}
		b.used += w.n
		b.waiters.Remove(e)
		close(w.ready)
	}
}

// Size is the budget in bytes.
func (b *Budget) Size() int64 { return b.size }

// InUse is the bytes reserved now.
func (b *Budget) InUse() int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.used
}

// Waiting is how many reservations wait now.
func (b *Budget) Waiting() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.waiters.Len()
}

// Waits counts the reservations that had to wait, since the start.
func (b *Budget) Waits() uint64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.waits
}

// Refusals counts the reservations that failed with ErrExhausted.
func (b *Budget) Refusals() uint64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.refusals
}

// logLine is what noteLocked decided to log, written outside the lock.
type logLine []any

func (l logLine) write(log *slog.Logger) {
	if l != nil {
		log.Warn("memory budget used up: new messages wait, then are refused with 451 4.3.1", l...)
	}
}

// noteLocked records a wait or a refusal for the log, and returns a line
// to write when the last one is at least b.every old.
func (b *Budget) noteLocked() logLine {
	now := b.clock.Now()
	if !b.logged.IsZero() && now.Sub(b.logged) < b.every {
		return nil
	}
	line := logLine{"budget", b.size, "in_use", b.used, "waiting", b.waiters.Len(),
		"waits", b.waits - b.loggedW, "refusals", b.refusals - b.loggedR, "waits_total", b.waits, "refusals_total", b.refusals}
	if !b.logged.IsZero() {
		line = append(line, "since", now.Sub(b.logged).Round(time.Second).String())
	}
	b.logged, b.loggedW, b.loggedR = now, b.waits, b.refusals
	return line
}
