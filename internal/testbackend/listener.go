package testbackend

import (
	"net"
	"sync"
	"time"
)

// slotListener enforces Capacity.Conns at accept time. go-smtp calls
// NewSession only at LHLO, and answers its errors after the greeting; a
// real store at its connection limit refuses before it greets, so the
// limit lives here, under go-smtp.
type slotListener struct {
	net.Listener
	s    *Server
	down <-chan struct{} // closed by Down
}

func (l *slotListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		if l.s.takeSlot(l.down) {
			return l.s.track(c), nil
		}
		select {
		case <-l.down:
			c.Close()
			return nil, net.ErrClosed
		default:
			refuse(c)
		}
	}
}

// refuse answers a connection over the limit, like Postfix's anvil does.
func refuse(c net.Conn) {
	c.SetWriteDeadline(time.Now().Add(time.Second))
	c.Write([]byte("421 4.7.0 backend.test Too many connections, try again later\r\n"))
	c.Close()
}

// takeSlot waits until fewer than Conns connections are open, at most
// ConnWait, and counts one more. Waiting in Accept holds up the
// connections behind this one too, as a full listen backlog does.
func (s *Server) takeSlot(down <-chan struct{}) bool {
	var timeout <-chan time.Time
	s.mu.Lock()
	for s.capa.Conns > 0 && s.active >= s.capa.Conns {
		if timeout == nil {
			t := time.NewTimer(s.capa.connWait())
			defer t.Stop()
			timeout = t.C
		}
		freed := s.freed
		s.mu.Unlock()
		select {
		case <-freed:
		case <-down:
			return false
		case <-timeout:
			s.mu.Lock()
			s.stats.Refused421++
			s.mu.Unlock()
			return false
		}
		s.mu.Lock()
	}
	s.active++
	s.stats.MaxConns = max(s.stats.MaxConns, s.active)
	s.mu.Unlock()
	return true
}

// signalSlots wakes every takeSlot waiting for a slot. Called with s.mu.
func (s *Server) signalSlots() {
	close(s.freed)
	s.freed = make(chan struct{})
}

// slotConn gives its slot back when closed, by go-smtp or by Down.
type slotConn struct {
	net.Conn
	s    *Server
	once sync.Once
}

func (s *Server) track(c net.Conn) *slotConn {
	sc := &slotConn{Conn: c, s: s}
	s.mu.Lock()
	s.conns[sc] = struct{}{}
	s.mu.Unlock()
	return sc
}

func (c *slotConn) Close() error {
	c.once.Do(func() {
		c.s.mu.Lock()
		delete(c.s.conns, c)
		c.s.active--
		c.s.signalSlots()
		c.s.mu.Unlock()
	})
	return c.Conn.Close()
}
