package testbackend

import (
	"math"
	"time"

	"golang.org/x/time/rate"
)

// Capacity is how much work the store can take. The zero value is a store
// without limits and without service time, as the tests that do not care
// about load expect.
type Capacity struct {
	// Rate is how many deliveries (one message into one mailbox) the store
	// completes per second; 0 is unlimited.
	Rate float64
	// Conns is how many connections it serves at once; 0 is unlimited.
	Conns int
	// Burst is how many deliveries it absorbs at once after a quiet spell
	// (its write cache); 0 means Rate/10, at least 1. It is also the slack
	// that absorbs a compliant client's scheduling jitter.
	Burst int
	// Service is the time every message takes when capacity is free (the
	// store's write and fsync); 0 means 1 ms when Rate or Conns is set.
	Service time.Duration
	// MaxWait is how long a delivery may wait for capacity before the store
	// gives up on it with 451 4.3.0; 0 means the time to serve Conns/2
	// deliveries at Rate (2 when Conns is 0). Equivalently, at most
	// MaxWait×Rate deliveries wait at once.
	MaxWait time.Duration
	// ConnWait is how long a connection beyond Conns waits for a free slot
	// (in the listen backlog, as with a real server's process limit) before
	// it is answered 421 4.7.0; 0 means 100 ms. The grace also covers the
	// moment between a client's QUIT and the server closing its end, so a
	// client that reconnects at once within Conns is not refused.
	ConnWait time.Duration
}

// limited reports whether any limit is set.
func (c Capacity) limited() bool { return c.Rate > 0 || c.Conns > 0 }

func (c Capacity) burst() int {
	if c.Burst > 0 {
		return c.Burst
	}
	return max(1, int(c.Rate/10))
}

func (c Capacity) service() time.Duration {
	if c.Service > 0 || !c.limited() {
		return c.Service
	}
	return time.Millisecond
}

func (c Capacity) maxWait() time.Duration {
	if c.MaxWait > 0 || c.Rate <= 0 {
		return c.MaxWait
	}
	waiting := 2.0
	if c.Conns > 0 {
		waiting = float64(c.Conns) / 2
	}
	return time.Duration(waiting / c.Rate * float64(time.Second))
}

func (c Capacity) connWait() time.Duration {
	if c.ConnWait > 0 {
		return c.ConnWait
	}
	return 100 * time.Millisecond
}

// Stats counts what the store did. Deliveries are per recipient.
type Stats struct {
	Accepted int
	// Slowed is how many deliveries had to wait for capacity, and MaxDelay
	// the longest such wait: the store slowing down.
	Slowed   int
	MaxDelay time.Duration
	// Refused451 is how many recipients were answered 451 4.3.0 because
	// capacity was not free within MaxWait.
	Refused451 int
	// Refused421 is how many connections were answered 421 4.7.0 because
	// Conns were already open.
	Refused421 int
	// MaxConns is the most connections served at once.
	MaxConns int
}

// Overloads is how many overload replies the store gave, of any kind.
func (st Stats) Overloads() int { return st.Refused451 + st.Refused421 }

// SetCapacity changes the rate and the connection limit while the store
// runs, as when a store loses half its disks. Burst and MaxWait follow if
// they were left to their defaults. Connections already open beyond a lower
// limit stay open; new ones are refused until the count drops.
func (s *Server) SetCapacity(rate float64, conns int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.capa.Rate, s.capa.Conns = rate, conns
	s.setLimiter()
	s.signalSlots()
}

// setLimiter makes s.lim follow s.capa. Changing an existing limiter
// (rather than replacing it) keeps the debt of deliveries already waiting.
func (s *Server) setLimiter() {
	c := s.capa
	switch {
	case c.Rate <= 0:
		s.lim = nil
	case s.lim == nil:
		s.lim = rate.NewLimiter(rate.Limit(c.Rate), c.burst())
	default:
		now := time.Now()
		s.lim.SetLimitAt(now, rate.Limit(c.Rate))
		s.lim.SetBurstAt(now, c.burst())
	}
}

// Capacity returns the current capacity, with its defaults filled in.
func (s *Server) Capacity() Capacity {
	s.mu.Lock()
	defer s.mu.Unlock()
	c := s.capa
	if c.Rate > 0 {
		c.Burst, c.MaxWait = c.burst(), c.maxWait()
	}
	c.Service, c.ConnWait = c.service(), c.connWait()
	return c
}

// reserve takes capacity for up to n deliveries of one message and
// returns how many it got (the first ones) and how long the message then
// takes: the wait for the last one's token plus the service time. With
// all, it takes either n or none. Deliveries that would wait longer than
// MaxWait get none: that is the store giving up.
//
// The count is computed from the bucket's tokens before reserving, so
// nothing has to be cancelled; s.mu makes the two steps one.
func (s *Server) reserve(n int, all bool) (int, time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if n == 0 {
		return 0, 0
	}
	if s.lim == nil {
		return n, s.capa.service()
	}
	now := time.Now()
	// Tokens may be negative: deliveries already waiting. The k-th next
	// delivery waits (k - tokens)/Rate.
	fits := s.lim.TokensAt(now) + s.capa.maxWait().Seconds()*s.capa.Rate
	got := min(n, max(0, int(math.Floor(fits+1e-9))))
	if all && got < n {
		got = 0
	}
	var delay time.Duration
	for range got {
		if delay = s.lim.ReserveN(now, 1).DelayFrom(now); delay > 0 {
			s.stats.Slowed++
		}
	}
	s.stats.MaxDelay = max(s.stats.MaxDelay, delay)
	s.stats.Refused451 += n - got
	if got == 0 {
		return 0, 0
	}
	return got, delay + s.capa.service()
}

// Stats returns the counters so far.
func (s *Server) Stats() Stats {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.stats
}

// PerSecond returns how many deliveries were accepted in each second since
// Start: element i counts [i s, i+1 s).
func (s *Server) PerSecond() []int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]int(nil), s.perSec...)
}
