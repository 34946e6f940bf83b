package connlimit

import (
	"net/netip"
	"testing"
	"time"
)

// clock is a manual clock.
type clock struct{ t time.Time }

func (c *clock) now() time.Time       { return c.t }
func (c *clock) step(d time.Duration) { c.t = c.t.Add(d) }
func ip(s string) netip.Addr          { return netip.MustParseAddr(s) }
func newClock() *clock                { return &clock{t: time.Date(2026, 11, 1, 0, 0, 0, 0, time.UTC)} }

// admit opens a slot and assigns it, as the relay's listener does.
func admit(l *Limiter, a netip.Addr) (release func(), why Reason) {
	s, why := l.Open()
	if why != OK {
		return nil, why
	}
	if why := s.Assign(a); why != OK {
		s.Release()
		return nil, why
	}
	return s.Release, OK
}

func admitN(l *Limiter, a netip.Addr, n int) (releases []func(), last Reason) {
	for i := 0; i < n; i++ {
		r, why := admit(l, a)
		if why != OK {
			return releases, why
		}
		releases = append(releases, r)
	}
	return releases, OK
}

func TestLimits(t *testing.T) {
	type step struct {
		ip   string
		n    int           // connections to open
		want Reason        // outcome of the last one
		wait time.Duration // before the step
		free int           // connections to release before the step (oldest first)
	}
	cases := []struct {
		name  string
		lim   Limits
		steps []step
	}{
		{"total", Limits{Total: 3}, []step{
			{ip: "192.0.2.1", n: 2}, {ip: "192.0.2.2", n: 1}, {ip: "192.0.2.3", n: 1, want: Total},
			{ip: "192.0.2.3", n: 1, free: 1},
		}},
		{"per client", Limits{PerClient: 2}, []step{
			{ip: "192.0.2.1", n: 2}, {ip: "192.0.2.1", n: 1, want: PerClient},
			{ip: "192.0.2.2", n: 2}, {ip: "192.0.2.1", n: 1, free: 1},
		}},
		{"IPv6 /64 is one client", Limits{PerClient: 2}, []step{
			{ip: "2001:db8:1:1::1", n: 1}, {ip: "2001:db8:1:1::2", n: 1},
			{ip: "2001:db8:1:1:ffff::3", n: 1, want: PerClient},
			{ip: "2001:db8:1:2::1", n: 1},
		}},
		{"IPv4-mapped is IPv4", Limits{PerClient: 1}, []step{
			{ip: "192.0.2.9", n: 1}, {ip: "::ffff:192.0.2.9", n: 1, want: PerClient},
		}},
		{"rate: burst then refill", Limits{RatePerMinute: 6}, []step{
			{ip: "192.0.2.1", n: 6}, {ip: "192.0.2.1", n: 1, want: Rate},
			// one token every 10 s
			{ip: "192.0.2.1", n: 1, wait: 10 * time.Second},
			{ip: "192.0.2.1", n: 1, want: Rate},
			{ip: "192.0.2.2", n: 6},
			{ip: "192.0.2.1", n: 6, wait: time.Hour},
		}},
		{"rate counts connections, not open ones", Limits{RatePerMinute: 2, PerClient: 10}, []step{
			{ip: "192.0.2.1", n: 2}, {ip: "192.0.2.1", n: 1, free: 2, want: Rate},
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			clk := newClock()
			l := New(tc.lim, clk.now)
			var open []func()
			for i, s := range tc.steps {
				clk.step(s.wait)
				for ; s.free > 0; s.free-- {
					open[0]()
					open = open[1:]
				}
				rs, why := admitN(l, ip(s.ip), s.n)
				open = append(open, rs...)
				if why != s.want {
					t.Fatalf("step %d (%s ×%d): %q, want %q", i, s.ip, s.n, why, s.want)
				}
			}
			for _, r := range open {
				r()
			}
			if st := l.Stats(); st.Open != 0 {
				t.Fatalf("open after releasing everything: %d", st.Open)
			}
		})
	}
}

// A slot waiting for its client (a PROXY header) counts against the total.
func TestUnassignedSlotCounts(t *testing.T) {
	l := New(Limits{Total: 2, PerClient: 1}, newClock().now)
	a, _ := l.Open()
	b, _ := l.Open()
	if _, why := l.Open(); why != Total {
		t.Fatalf("third open: %q, want %q", why, Total)
	}
	if why := a.Assign(ip("192.0.2.1")); why != OK {
		t.Fatal(why)
	}
	if why := b.Assign(ip("192.0.2.1")); why != PerClient {
		t.Fatalf("second connection of one client: %q", why)
	}
	b.Release()
	a.Release()
	if st := l.Stats(); st.Open != 0 {
		t.Fatalf("open %d after releases", st.Open)
	}
}

// An exempt connection counts only against the total.
func TestExempt(t *testing.T) {
	l := New(Limits{Total: 3, PerClient: 1, RatePerMinute: 1}, newClock().now)
	for i := 0; i < 3; i++ {
		s, why := l.Open()
		if why != OK {
			t.Fatalf("exempt connection %d: %q", i, why)
		}
		s.Exempt()
	}
	if _, why := l.Open(); why != Total {
		t.Fatalf("total not enforced on exempt connections: %q", why)
	}
}

// Release is idempotent: a double release must not free someone else's slot.
func TestReleaseOnce(t *testing.T) {
	l := New(Limits{Total: 1}, newClock().now)
	r, _ := admit(l, ip("192.0.2.1"))
	r()
	r()
	r2, why := admit(l, ip("192.0.2.2"))
	if why != OK {
		t.Fatal(why)
	}
	if _, why := admit(l, ip("192.0.2.3")); why != Total {
		t.Fatalf("second admit after double release: %q", why)
	}
	r2()
}

// A flood from many addresses is forgotten once their buckets are full.
func TestForgetsIdleClients(t *testing.T) {
	clk := newClock()
	l := New(Limits{RatePerMinute: 10, PerClient: 5}, clk.now)
	for i := 0; i < 1000; i++ {
		a := netip.AddrFrom4([4]byte{10, 0, byte(i >> 8), byte(i)})
		r, why := admit(l, a)
		if why != OK {
			t.Fatal(why)
		}
		r()
	}
	if st := l.Stats(); st.Clients != 1000 {
		t.Fatalf("tracking %d clients, want 1000 (their buckets are not full)", st.Clients)
	}
	clk.step(time.Minute + time.Second)
	keep, _ := admit(l, ip("192.0.2.1"))
	if st := l.Stats(); st.Clients != 1 {
		t.Fatalf("after a minute tracking %d clients, want 1", st.Clients)
	}
	keep()
}
