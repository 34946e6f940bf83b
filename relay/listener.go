package relay

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/pires/go-proxyproto"

	"github.com/mxq-dev/mxq/internal/connlimit"
)

// listener admits connections before go-smtp sees them: it reads the
// PROXY header of connections from trusted load balancers, applies the
// connection limits to the real client, and answers the ones it turns
// away with 421 4.7.0 itself, so a flood costs a write and a close each,
// not a session.
//
// The limits are checked in two steps because behind a load balancer the
// client is known only once the PROXY header is read: a connection counts
// against the total from its accept, and against its client once known.
// Headers are read on a goroutine per connection, bounded by the total
// limit and the header timeout, so a proxy that stalls does not stall
// the accept loop.
type listener struct {
	inner net.Listener
	srv   *Server
	conns chan net.Conn
	errc  chan error
	done  chan struct{}
	once  sync.Once
}

func (s *Server) newListener(inner net.Listener) *listener {
	l := &listener{inner: inner, srv: s, conns: make(chan net.Conn), errc: make(chan error, 1), done: make(chan struct{})}
	go l.acceptLoop()
	return l
}

func (l *listener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case err := <-l.errc:
		return nil, err
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *listener) Close() error {
	l.once.Do(func() { close(l.done) })
	return l.inner.Close()
}

func (l *listener) Addr() net.Addr { return l.inner.Addr() }

func (l *listener) acceptLoop() {
	var delay time.Duration
	for {
		raw, err := l.inner.Accept()
		if err != nil {
			// Out of file descriptors under a flood is temporary: back off
			// as net/http does, rather than stop serving.
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || isTemporary(err) {
				delay = min(max(2*delay, 5*time.Millisecond), time.Second)
				l.srv.log.Warn("accept failed, retrying", "err", err, "in", delay)
				select {
				case <-time.After(delay):
					continue
				case <-l.done:
					return
				}
			}
			select {
			case l.errc <- err:
			case <-l.done:
			}
			return
		}
		delay = 0
		slot, why := l.srv.limits.Open()
		if why != connlimit.OK {
			l.srv.refuse(raw, addrOf(raw.RemoteAddr()), why)
			continue
		}
		if l.srv.trustedProxy(addrOf(raw.RemoteAddr())) {
			go l.admitProxied(raw, slot)
			continue
		}
		l.admit(raw, slot, "")
	}
}

func isTemporary(err error) bool {
	var t interface{ Temporary() bool }
	return errors.As(err, &t) && t.Temporary()
}

// admitProxied reads the PROXY header (v1 or v2) of a connection from a
// trusted load balancer. The header is required: a load balancer that
// sends none is misconfigured, and guessing would let anyone behind it
// pass as the balancer (the spec says a receiver must not guess).
func (l *listener) admitProxied(raw net.Conn, slot *connlimit.Slot) {
	pc := proxyproto.NewConn(raw, proxyproto.WithPolicy(proxyproto.REQUIRE),
		proxyproto.SetReadHeaderTimeout(l.srv.o.ProxyHeaderTimeout))
	// A zero-length read processes the header and nothing else.
	if _, err := pc.Read(nil); err != nil {
		l.srv.log.Warn("PROXY header refused, closing", "proxy", raw.RemoteAddr().String(), "err", err)
		l.srv.o.Metrics.Session("bad_proxy_header")
		slot.Release()
		raw.Close()
		return
	}
	l.admit(pc, slot, raw.RemoteAddr().String())
}

func (l *listener) admit(c net.Conn, slot *connlimit.Slot, proxy string) {
	client := addrOf(c.RemoteAddr())
	if inAny(client, l.srv.o.LimitExempt) {
		slot.Exempt()
	} else if why := slot.Assign(client); why != connlimit.OK {
		slot.Release()
		l.srv.refuse(c, client, why)
		return
	}
	gc := &conn{Conn: c, srv: l.srv, client: client, slot: slot, proxy: proxy}
	l.srv.log.Debug("connection", "client", client.String(), "proxy", proxy)
	select {
	case l.conns <- gc:
	case <-l.done:
		gc.Close()
	}
}

// refuse answers a connection turned away by the limits.
func (s *Server) refuse(c net.Conn, client netip.Addr, why connlimit.Reason) {
	s.o.Metrics.Session(string(why))
	s.refusals.note(s, client, why)
	var text string
	switch why {
	case connlimit.PerClient:
		text = "Too many connections from your address, try again later"
	case connlimit.Rate:
		text = "Too many new connections from your address, try again later"
	default:
		text = "Too many connections, try again later"
	}
	go func() {
		// A fresh socket's send buffer is empty: the write does not block,
		// the deadline is for a peer that shrank its window to nothing.
		_ = c.SetWriteDeadline(time.Now().Add(time.Second))
		_, _ = io.WriteString(c, fmt.Sprintf("421 4.7.0 %s %s\r\n", s.o.Hostname, text))
		_ = c.Close()
	}()
}

// refusalLog logs refused connections without letting a flood flood the
// log: the first refusal of each second is logged with the client, and
// the count of the others follows with the next logged one.
type refusalLog struct {
	mu         sync.Mutex
	last       time.Time
	suppressed atomic.Int64
}

func (r *refusalLog) note(s *Server, client netip.Addr, why connlimit.Reason) {
	now := time.Now()
	r.mu.Lock()
	if now.Sub(r.last) < time.Second {
		r.mu.Unlock()
		r.suppressed.Add(1)
		return
	}
	r.last = now
	r.mu.Unlock()
	st := s.limits.Stats()
	s.log.Warn("connection refused with 421 4.7.0", "client", client.String(), "reason", string(why),
		"open", st.Open, "refused_since_last_line", r.suppressed.Swap(0))
}

// addrOf is the IP of a TCP address; the zero Addr for anything else
// (all such connections then share one client).
func addrOf(a net.Addr) netip.Addr {
	if ta, ok := a.(*net.TCPAddr); ok {
		ip, _ := netip.AddrFromSlice(ta.IP)
		return ip.Unmap()
	}
	if ap, err := netip.ParseAddrPort(a.String()); err == nil {
		return ap.Addr().Unmap()
	}
	return netip.Addr{}
}

func inAny(ip netip.Addr, nets []netip.Prefix) bool {
	for _, n := range nets {
		if n.Contains(ip) {
			return true
		}
	}
	return false
}

func (s *Server) trustedProxy(ip netip.Addr) bool { return inAny(ip, s.o.ProxyNetworks) }
