package drain

import "sync"

// breaker is a route's circuit. It opens when the backend cannot be
// reached threshold times in a row (refused connections, timeouts, broken
// sessions), or at once when the ramp sees most work refused (trip), and
// closes when a probe succeeds. A busy backend (421) counts toward the
// threshold only by half: it is up, and the ramp's slowing down is the
// first remedy.
type breaker struct {
	threshold int

	mu     sync.Mutex
	opened bool
	fails  float64
}

func (b *breaker) isOpen() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.opened
}

// failure records a failed attempt to reach the backend (down: not merely
// busy) and reports whether it opened the circuit.
func (b *breaker) failure(down bool) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if down {
		b.fails++
	} else {
		b.fails += 0.5
	}
	if b.opened || b.fails < float64(b.threshold) {
		return false
	}
	b.opened = true
	return true
}

func (b *breaker) success() {
	b.mu.Lock()
	b.fails = 0
	b.mu.Unlock()
}

// trip opens the circuit; it reports whether it was closed.
func (b *breaker) trip() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	was := b.opened
	b.opened = true
	return !was
}

func (b *breaker) close() {
	b.mu.Lock()
	b.opened, b.fails = false, 0
	b.mu.Unlock()
}

func (b *breaker) String() string {
	if b.isOpen() {
		return "open"
	}
	return "closed"
}
