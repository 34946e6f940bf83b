package delivery_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mxq-dev/mxq/internal/testbackend"
	"github.com/mxq-dev/mxq/queue/delivery"
)

// startBackend starts a testbackend that is closed when the test ends.
func startBackend(t *testing.T, o testbackend.Options) *testbackend.Server {
	t.Helper()
	be, err := testbackend.Start("127.0.0.1:0", o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(be.Close)
	return be
}

// longMessage is a well-formed message of about size bytes that ends in a
// line break: cut anywhere at a line end, it still looks whole to a store
// that is handed the end-of-data mark after it. Size 0 is no message at
// all.
func longMessage(size int) []byte {
	if size == 0 {
		return nil
	}
	var b bytes.Buffer
	b.WriteString("Subject: long\r\n\r\n")
	for i := 0; b.Len() < size; i++ {
		fmt.Fprintf(&b, "line %06d of a message that is read from the queue in chunks\r\n", i)
	}
	return b.Bytes()
}

// brokenBody is a body whose reading fails once data is used up, like a
// large message whose next chunk record is missing from the queue.
type brokenBody struct {
	data []byte
	err  error
}

func (b *brokenBody) Read(p []byte) (int, error) {
	if len(b.data) == 0 {
		return 0, b.err
	}
	n := copy(p, b.data)
	b.data = b.data[n:]
	return n, nil
}

func deliverOK(t *testing.T, c *delivery.Client, rcpt string) {
	t.Helper()
	res, err := c.Deliver(context.Background(), env(rcpt), strings.NewReader(msg))
	if err != nil || !res[0].Success() {
		t.Fatalf("delivery to %s: %v %+v", rcpt, err, res)
	}
}

// A body that cannot be read is the queue's problem: the error says so
// (ErrSource, and the reader's own error), says nothing about the store,
// and the store must not get the part that was read as if it were the
// whole message. The connection, abandoned in the middle of DATA, must not
// come back from the pool.
func TestUnreadableBody(t *testing.T) {
	cases := []struct {
		proto string
		// size is how much of the message is read before the failure:
		// none, less than go-smtp buffers, and more, so that part of the
		// message has reached the store when the connection is dropped.
		size int
	}{
		{"lmtp", 0}, {"lmtp", 1000}, {"lmtp", 200 << 10},
		{"smtp", 0}, {"smtp", 1000}, {"smtp", 200 << 10},
	}
	for _, tc := range cases {
		t.Run(fmt.Sprintf("%s/%d", tc.proto, tc.size), func(t *testing.T) {
			be := startBackend(t, testbackend.Options{SMTP: tc.proto == "smtp"})
			c := delivery.New(delivery.Options{Protocol: tc.proto, Address: be.Addr(), MaxIdle: 1, CommandTimeout: 5 * time.Second})
			defer c.Close()
			// So that the broken delivery runs on a pooled connection.
			deliverOK(t, c, "before@x.test")

			errChunk := errors.New("chunk missing")
			body := &brokenBody{data: longMessage(tc.size), err: fmt.Errorf("%w: chunk 3 of 00000000000000000001", errChunk)}
			res, err := c.Deliver(context.Background(), env("damaged@x.test", "damaged2@x.test"), body)
			if !errors.Is(err, delivery.ErrSource) {
				t.Errorf("err %v, want ErrSource", err)
			}
			if !errors.Is(err, errChunk) {
				t.Errorf("err %v does not wrap the reader's error", err)
			}
			if errors.Is(err, delivery.ErrUnreachable) || errors.Is(err, delivery.ErrBusy) {
				t.Errorf("err %v blames the store", err)
			}
			for _, r := range res {
				if r.Code != 0 || !strings.Contains(r.Text, "could not be read from the queue") {
					t.Errorf("result %+v, want no reply because of the queue", r)
				}
			}

			deliverOK(t, c, "after@x.test")
			if n := be.Sessions(); n != 2 {
				t.Errorf("%d connections, want 2: the abandoned one replaced by a new one", n)
			}
			// A store handed the end-of-data mark records the message in
			// microseconds; give it ample time to do what it must not.
			time.Sleep(100 * time.Millisecond)
			for _, d := range be.Deliveries() {
				if strings.HasPrefix(d.Rcpt, "damaged") {
					t.Errorf("store delivered the truncated message to %s (%d bytes)", d.Rcpt, d.Size)
				}
			}
			if n := be.Count(); n != 2 {
				t.Errorf("store recorded %d deliveries, want 2 (before and after)", n)
			}
		})
	}
}

// endlessBody is a body that never ends (up to a guard of a few hundred
// megabytes) and calls hook once, when off bytes have been read.
type endlessBody struct {
	off  int
	hook func()
	once sync.Once
	read int
}

func (b *endlessBody) Read(p []byte) (int, error) {
	if b.read >= b.off {
		b.once.Do(b.hook)
	}
	if b.read > 256<<20 {
		return 0, errors.New("endlessBody: the store never stopped taking the message")
	}
	for i := range p {
		p[i] = "x\r\n"[(b.read+i)%3]
	}
	b.read += len(p)
	return len(p), nil
}

// A store that goes away while the message is being written to it is a
// store failure (ErrUnreachable), not a queue one, although both show up
// in the same copy of the body.
func TestStoreGoneWhileSending(t *testing.T) {
	cases := []struct {
		proto string
		off   int // bytes of the body read before the store goes down
	}{
		{"lmtp", 0}, {"lmtp", 1 << 20},
		{"smtp", 0}, {"smtp", 1 << 20},
	}
	for _, tc := range cases {
		t.Run(fmt.Sprintf("%s/%d", tc.proto, tc.off), func(t *testing.T) {
			be := startBackend(t, testbackend.Options{SMTP: tc.proto == "smtp"})
			c := delivery.New(delivery.Options{Protocol: tc.proto, Address: be.Addr(), MaxIdle: 1})
			defer c.Close()
			res, err := c.Deliver(context.Background(), env("u@x.test"), &endlessBody{off: tc.off, hook: be.Down})
			if !errors.Is(err, delivery.ErrUnreachable) {
				t.Errorf("err %v, want ErrUnreachable", err)
			}
			if errors.Is(err, delivery.ErrSource) {
				t.Errorf("err %v blames the queue", err)
			}
			// The failure must be the write of the body, or this case tests
			// a path other than the one it is about.
			if res[0].Code != 0 || !strings.HasPrefix(res[0].Text, "sending message: ") {
				t.Errorf("result %+v, want no reply because sending the message failed", res[0])
			}
		})
	}
}
