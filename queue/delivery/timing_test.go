package delivery_test

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mxq-dev/mxq/internal/testbackend"
	"github.com/mxq-dev/mxq/queue/delivery"
)

// fakeClock is a clock that moves only when it is told to. Whoever stands
// for a slow party (the store, the queue) advances it where that party
// would take its time, so Timing can be checked exactly.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func newFakeClock() *fakeClock {
	return &fakeClock{now: time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)}
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	c.mu.Unlock()
}

// slowStore stands between the client and the store at addr. It makes the
// store slow in two ways, each as a client on clk would see it:
//   - every reply (a multi-line one counting once) advances clk by delay
//     before it is passed on, as if the store took delay to answer;
//   - if hold is set, the message is not read on after the reply to DATA
//     until hold returns, as a store whose disks are busy reads slowly.
//
// The testbackend answers at once, and go-smtp hides its connections, so
// the slowness is put on the wire, outside both.
func slowStore(t *testing.T, addr string, clk *fakeClock, delay time.Duration, hold func()) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var (
		wg     sync.WaitGroup
		mu     sync.Mutex
		closed bool
		conns  []net.Conn
	)
	// track reports false when the test is over and c was closed instead.
	track := func(c ...net.Conn) bool {
		mu.Lock()
		defer mu.Unlock()
		if closed {
			for _, c := range c {
				c.Close()
			}
			return false
		}
		conns = append(conns, c...)
		return true
	}
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		closed = true
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			client, err := ln.Accept()
			if err != nil {
				return
			}
			server, err := net.Dial("tcp", addr)
			if err != nil {
				client.Close()
				continue
			}
			if !track(client, server) {
				return
			}
			// A small receive buffer, so that holding the message back
			// soon blocks the client's writes instead of filling memory.
			client.(*net.TCPConn).SetReadBuffer(64 << 10)
			dataSent := make(chan struct{}, 1) // the reply to DATA is passed on
			wg.Add(2)
			go func() {
				defer wg.Done()
				defer server.Close()
				buf := make([]byte, 32<<10)
				for {
					n, err := client.Read(buf)
					if n > 0 {
						// Only once part of the message is here: a client
						// that gave up before would leave hold waiting.
						select {
						case <-dataSent:
							hold()
						default:
						}
						if _, err := server.Write(buf[:n]); err != nil {
							return
						}
					}
					if err != nil {
						return
					}
				}
			}()
			go func() {
				defer wg.Done()
				defer client.Close()
				r := bufio.NewReader(server)
				for {
					line, err := r.ReadString('\n')
					if err != nil {
						return
					}
					if len(line) >= 4 && line[3] == ' ' { // the reply's last line
						clk.Advance(delay)
					}
					if hold != nil && strings.HasPrefix(line, "354") {
						dataSent <- struct{}{}
					}
					if _, err := io.WriteString(client, line); err != nil {
						return
					}
				}
			}()
		}
	}()
	return ln.Addr().String()
}

// slowBody is a message read from a slow queue: every Read, the last one
// (io.EOF) included, advances clk by delay, and returns at most 7 bytes so
// that there are several.
type slowBody struct {
	r     io.Reader
	clk   *fakeClock
	delay time.Duration
	reads int
}

func (b *slowBody) Read(p []byte) (int, error) {
	b.reads++
	b.clk.Advance(b.delay)
	return b.r.Read(p[:min(len(p), 7)])
}

// Timing must charge the store's slowness to Store and the queue's to
// Source, each exactly, whatever the other does; and a pooled connection
// costs no Connect time.
func TestTiming(t *testing.T) {
	const ms = time.Millisecond
	cases := []struct {
		name         string
		proto        string
		rcpts        int
		store, queue time.Duration // delay of each reply, of each body read
	}{
		{"lmtp/slow store", "lmtp", 1, 50 * ms, 0},
		// LMTP answers the end of data once per recipient.
		{"lmtp/slow store/3 recipients", "lmtp", 3, 50 * ms, 0},
		{"smtp/slow store/3 recipients", "smtp", 3, 50 * ms, 0},
		{"lmtp/slow queue", "lmtp", 1, 0, 50 * ms},
		{"smtp/slow queue", "smtp", 2, 0, 50 * ms},
		{"lmtp/both slow", "lmtp", 2, 30 * ms, 70 * ms},
		{"smtp/both slow", "smtp", 2, 70 * ms, 30 * ms},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			clk := newFakeClock()
			be := startBackend(t, testbackend.Options{SMTP: tc.proto == "smtp"})
			addr := slowStore(t, be.Addr(), clk, tc.store, nil)
			c := delivery.New(delivery.Options{Protocol: tc.proto, Address: addr, MaxIdle: 1, Now: clk.Now})
			defer c.Close()
			var to []string
			for i := range tc.rcpts {
				to = append(to, fmt.Sprintf("u%d@x.test", i))
			}
			// Replies in a transaction: MAIL, each RCPT, DATA, and the end
			// of data, answered for each recipient in LMTP.
			replies := 3 + tc.rcpts
			if tc.proto == "lmtp" {
				replies = 2 + 2*tc.rcpts
			}
			// The first delivery opens a connection (greeting, LHLO/EHLO),
			// the second reuses it.
			for i, connect := range []time.Duration{2 * tc.store, 0} {
				body := &slowBody{r: strings.NewReader(msg), clk: clk, delay: tc.queue}
				res, tm, err := c.DeliverTimed(context.Background(), env(to...), body)
				if err != nil || !res[0].Success() {
					t.Fatalf("delivery %d: %v %+v", i, err, res)
				}
				want := delivery.Timing{
					Store:   time.Duration(replies) * tc.store,
					Source:  time.Duration(body.reads) * tc.queue,
					Connect: connect,
				}
				if tm != want {
					t.Errorf("delivery %d: %+v, want %+v", i, tm, want)
				}
			}
			if n := be.Sessions(); n != 1 {
				t.Errorf("%d connections, want 1", n)
			}
		})
	}
}

// watchedBody is a body that tells when it was last read.
type watchedBody struct {
	r    io.Reader
	mu   sync.Mutex
	in   bool // inside Read
	last time.Time
}

func (b *watchedBody) Read(p []byte) (int, error) {
	b.mu.Lock()
	b.in = true
	b.mu.Unlock()
	n, err := b.r.Read(p)
	b.mu.Lock()
	b.in, b.last = false, time.Now()
	b.mu.Unlock()
	return n, err
}

// idle is how long the body has not been read, on the real clock.
func (b *watchedBody) idle() time.Duration {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.in || b.last.IsZero() {
		return 0
	}
	return time.Since(b.last)
}

// A store that reads the message slowly makes mxq wait in its writes of
// the body, and that is the store's time too. The store holds the message
// back until the client has stopped reading the body for a while, which,
// with a message larger than the kernel buffers (at most 4 MiB to send,
// 128 KiB to receive here), means that it is blocked writing; only then
// does the store's slowness move the clock.
func TestTimingSlowReadingStore(t *testing.T) {
	const slow = 10 * time.Second
	clk := newFakeClock()
	// The copy of the body is the same for both protocols, and a large
	// message is slow under the race detector: LMTP only.
	be := startBackend(t, testbackend.Options{})
	body := &watchedBody{r: bytes.NewReader(longMessage(8 << 20))}
	addr := slowStore(t, be.Addr(), clk, 0, func() {
		for body.idle() < 100*time.Millisecond {
			time.Sleep(10 * time.Millisecond)
		}
		clk.Advance(slow)
	})
	c := delivery.New(delivery.Options{Protocol: "lmtp", Address: addr, Now: clk.Now})
	defer c.Close()
	res, tm, err := c.DeliverTimed(context.Background(), env("u@x.test"), body)
	if err != nil || !res[0].Success() {
		t.Fatalf("%v %+v", err, res)
	}
	if want := (delivery.Timing{Store: slow}); tm != want {
		t.Errorf("%+v, want %+v", tm, want)
	}
}
