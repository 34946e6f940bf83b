package relay_test

import (
	"context"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/mxq-dev/mxq/internal/membudget"
	"github.com/mxq-dev/mxq/internal/teststore"
	"github.com/mxq-dev/mxq/queue"
	"github.com/mxq-dev/mxq/relay"
)

// step is a message's first reservation: its 64 KiB buffer, twice.
const step = 128 << 10

func budgetStore(t *testing.T, size int64, wait time.Duration) (*membudget.Budget, *queue.Store) {
	t.Helper()
	mem := membudget.New(membudget.Options{Size: size, Wait: wait})
	st, _ := teststore.Start(t, func(o *queue.Options) { o.Memory = mem })
	return mem, st
}

// streamMsgs is every record in the stream: queued mail and chunks.
func streamMsgs(t *testing.T, st *queue.Store) uint64 {
	t.Helper()
	s, err := st.JetStream().Stream(context.Background(), st.StreamName())
	if err != nil {
		t.Fatal(err)
	}
	info, err := s.Info(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return info.State.Msgs
}

// With the budget used up, DATA and BDAT wait and are refused with 451
// 4.3.1, storing nothing; once memory is released the same session's next
// message is queued.
func TestMemoryBudgetExhausted(t *testing.T) {
	mem, st := budgetStore(t, 4*step, 300*time.Millisecond)
	addr := startRelay(t, st)
	if err := mem.Reserve(context.Background(), 4*step); err != nil {
		t.Fatal(err)
	}
	c := dialRaw(t, addr)
	c.expect("220")
	c.send("EHLO client.example.org")
	c.expect("250")
	for _, bdat := range []bool{false, true} {
		c.send("MAIL FROM:<alice@example.org>")
		c.expect("250")
		c.send("RCPT TO:<bob@example.test>")
		c.expect("250")
		start := time.Now()
		if bdat {
			const msg = "Subject: x\r\n\r\nchunked\r\n"
			c.send("BDAT " + strconv.Itoa(len(msg)) + " LAST")
			c.c.Write([]byte(msg))
		} else {
			c.send("DATA")
			c.expect("354")
			c.send("Subject: x\r\n\r\nbody\r\n.")
		}
		reply := c.expect("451 4.3.1 ")
		if !strings.Contains(reply, "short of memory") {
			t.Errorf("reply %q does not say why", reply)
		}
		if waited := time.Since(start); waited < 300*time.Millisecond {
			t.Errorf("refused after %v, before the wait of 300ms", waited)
		}
	}
	if n := streamMsgs(t, st); n != 0 {
		t.Fatalf("%d records stored for refused messages", n)
	}
	if mem.Refusals() != 2 || mem.Waits() != 2 {
		t.Errorf("refusals %d, waits %d; want 2 and 2", mem.Refusals(), mem.Waits())
	}

	mem.Release(4 * step)
	c.send("MAIL FROM:<alice@example.org>")
	c.expect("250")
	c.send("RCPT TO:<bob@example.test>")
	c.expect("250")
	c.send("DATA")
	c.expect("354")
	c.send("Subject: x\r\n\r\nbody\r\n.")
	c.expect("250 2.0.0 Ok: queued as ")
	if env, _ := storedClients(t, st); len(env) != 1 {
		t.Errorf("%d records after the release, want 1", len(env))
	}
	if n := mem.InUse(); n != 0 {
		t.Errorf("%d bytes still reserved after the 250", n)
	}
}

// However a session ends in the middle of a message, what it reserved
// comes back, and the chunks it stored early are removed.
func TestMemoryReleasedWhenSessionAborts(t *testing.T) {
	const size = 300_000 // over one 128 KiB buffer: part of it is stored early
	body := strings.Repeat(strings.Repeat("x", 98)+"\r\n", size/100)
	cases := []struct {
		name  string
		opts  func(*relay.Options)
		start func(c *smtpConn) // sends part of a message and leaves it open
		abort func(c *smtpConn)
	}{
		{"rset", nil, bdatPart(body), func(c *smtpConn) { c.send("RSET"); c.expect("250") }},
		{"quit", nil, bdatPart(body), func(c *smtpConn) { c.send("QUIT"); c.expect("221") }},
		{"connection drop", nil, dataPart(body), func(c *smtpConn) { c.c.Close() }},
		{"data rate", func(o *relay.Options) { o.DataTimeout, o.MinDataRate = time.Second, 1<<20 }, dataPart(body), func(c *smtpConn) {
			// A byte every 100 ms: never silent for the data timeout,
			// far below the minimum rate.
			done := make(chan struct{})
			go func() {
				defer close(done)
				for i := 0; i < 100; i++ {
					if _, err := c.c.Write([]byte("y")); err != nil {
						return
					}
					time.Sleep(100 * time.Millisecond)
				}
			}()
			c.expect("451 4.4.2 ")
			c.c.Close()
			<-done
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			mem, st := budgetStore(t, 2*step, time.Second)
			var opts []func(*relay.Options)
			if tc.opts != nil {
				opts = append(opts, tc.opts)
			}
			addr := startRelay(t, st, opts...)
			c := dialRaw(t, addr)
			c.expect("220")
			c.send("EHLO client.example.org")
			c.expect("250")
			c.send("MAIL FROM:<alice@example.org>")
			c.expect("250")
			c.send("RCPT TO:<bob@example.test>")
			c.expect("250")
			tc.start(c)
			waitFor(t, "part of the message stored early", func() bool { return st.Spills() > 0 })
			if mem.InUse() == 0 {
				t.Fatal("nothing reserved while a message is read")
			}
			tc.abort(c)
			waitFor(t, "the reservation released", func() bool { return mem.InUse() == 0 })
			waitFor(t, "the early chunks removed", func() bool { return streamMsgs(t, st) == 0 })
		})
	}
}

func dataPart(body string) func(c *smtpConn) {
	return func(c *smtpConn) {
		c.send("DATA")
		c.expect("354")
		c.c.Write([]byte(body))
	}
}

func bdatPart(body string) func(c *smtpConn) {
	return func(c *smtpConn) {
		c.send("BDAT " + strconv.Itoa(len(body)))
		c.c.Write([]byte(body))
		c.expect("250")
	}
}
