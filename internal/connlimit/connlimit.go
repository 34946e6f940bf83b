// Package connlimit decides whether a new connection may be served: at most
// so many connections at once in total and per client, and at most so many
// new connections per client per minute.
//
// A client is an IPv4 address or an IPv6 /64: one host on IPv6 usually has
// a whole /64 and could otherwise take a fresh address per connection.
// The rate is a token bucket per client (RatePerMinute tokens deep,
// refilled at RatePerMinute per minute), so a client that was quiet may
// open a burst of connections at once, and one that keeps coming is held
// to the rate. The clock is injected: the tests step it instead of
// sleeping.
//
// State is kept only for clients with a connection open or a bucket not
// yet full again; anything else is forgotten, so a flood from many
// addresses costs memory for at most a minute.
package connlimit

import (
	"net/netip"
	"sync"
	"time"
)

// Limits are the ceilings; zero disables one.
type Limits struct {
	// Total is the most connections open at once.
	Total int
	// PerClient is the most connections open at once from one client.
	PerClient int
	// RatePerMinute is the most new connections from one client per
	// minute (and the burst a quiet client may open at once).
	RatePerMinute int
}

// Reason says why a connection was refused.
type Reason string

// Reasons Admit gives.
const (
	OK        Reason = ""
	Total     Reason = "too_many_connections"
	PerClient Reason = "too_many_connections_from_client"
	Rate      Reason = "connection_rate_exceeded"
)

// Limiter counts connections. It is safe for concurrent use.
type Limiter struct {
	lim Limits
	now func() time.Time

	mu      sync.Mutex
	total   int
	clients map[netip.Prefix]*client
	sweep   time.Time
}

type client struct {
	open   int
	tokens float64
	last   time.Time
}

// New returns a Limiter; now may be nil for time.Now.
func New(lim Limits, now func() time.Time) *Limiter {
	if now == nil {
		now = time.Now
	}
	return &Limiter{lim: lim, now: now, clients: map[netip.Prefix]*client{}}
}

// Key is the client an address belongs to: the address itself for IPv4
// (and IPv4-mapped IPv6), its /64 for IPv6.
func Key(ip netip.Addr) netip.Prefix {
	ip = ip.Unmap()
	if ip.Is4() {
		return netip.PrefixFrom(ip, 32)
	}
	p, _ := ip.Prefix(64)
	return p
}

// Slot is one connection's place in the Limiter.
type Slot struct {
	l        *Limiter
	key      netip.Prefix
	assigned bool
	once     sync.Once
}

// Open takes a slot from the total, before the client is known (behind a
// load balancer, the client is known only once the PROXY header is read,
// and a connection waiting for it must count already). The caller must
// Release the slot when the connection ends, admitted or not.
func (l *Limiter) Open() (*Slot, Reason) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.lim.Total > 0 && l.total >= l.lim.Total {
		return nil, Total
	}
	l.total++
	return &Slot{l: l}, OK
}

// Assign attributes the slot to the client at ip and checks that client's
// limits. A refused connection does not count as open, but it does count
// against its client's rate: hammering the port while refused does not
// earn a client its way in.
func (s *Slot) Assign(ip netip.Addr) Reason {
	l := s.l
	now := l.now()
	key := Key(ip)
	l.mu.Lock()
	defer l.mu.Unlock()
	if s.assigned {
		panic("connlimit: slot assigned twice")
	}
	l.maybeSweep(now)
	c := l.clients[key]
	if c == nil {
		c = &client{tokens: float64(l.lim.RatePerMinute), last: now}
		l.clients[key] = c
	}
	if l.lim.PerClient > 0 && c.open >= l.lim.PerClient {
		return PerClient
	}
	if l.lim.RatePerMinute > 0 {
		c.refill(now, l.lim.RatePerMinute)
		if c.tokens < 1 {
			return Rate
		}
		c.tokens--
	}
	c.open++
	s.key, s.assigned = key, true
	return OK
}

// Exempt attributes the slot to no client: only the total applies (local
// health checks, a trusted submission host).
func (s *Slot) Exempt() {
	s.l.mu.Lock()
	defer s.l.mu.Unlock()
	if s.assigned {
		panic("connlimit: slot assigned twice")
	}
}

// Release frees the slot; calling it again does nothing.
func (s *Slot) Release() {
	s.once.Do(func() {
		l := s.l
		l.mu.Lock()
		defer l.mu.Unlock()
		l.total--
		if !s.assigned {
			return
		}
		if c := l.clients[s.key]; c != nil {
			c.open--
		}
	})
}

func (c *client) refill(now time.Time, perMinute int) {
	if d := now.Sub(c.last); d > 0 {
		c.tokens = min(float64(perMinute), c.tokens+d.Minutes()*float64(perMinute))
	}
	c.last = now
}

// maybeSweep forgets idle clients whose bucket is full again, at most once
// a second, so the map does not grow with every address ever seen.
func (l *Limiter) maybeSweep(now time.Time) {
	if now.Sub(l.sweep) < time.Second {
		return
	}
	l.sweep = now
	for k, c := range l.clients {
		if c.open > 0 {
			continue
		}
		c.refill(now, l.lim.RatePerMinute)
		if l.lim.RatePerMinute == 0 || c.tokens >= float64(l.lim.RatePerMinute) {
			delete(l.clients, k)
		}
	}
}

// Stats is a snapshot of what the Limiter holds.
type Stats struct {
	Open    int // connections open
	Clients int // clients tracked
}

// Stats returns the current counts.
func (l *Limiter) Stats() Stats {
	l.mu.Lock()
	defer l.mu.Unlock()
	return Stats{Open: l.total, Clients: len(l.clients)}
}
