package delivery_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/mxq-dev/mxq/internal/testbackend"
	"github.com/mxq-dev/mxq/queue/delivery"
	"github.com/mxq-dev/mxq/queue/envelope"
)

func env(to ...string) *envelope.Envelope {
	return &envelope.Envelope{ID: "00000000000000000001", From: "a@example.org", To: to, Size: 20}
}

const msg = "Subject: t\r\n\r\nbody\r\n"

func TestPerRecipientResults(t *testing.T) {
	rcptReply := func(rcpt string) *smtp.SMTPError {
		if strings.HasPrefix(rcpt, "unknown@") {
			return testbackend.Reply(550, "5.1.1", "no such user")
		}
		if strings.HasPrefix(rcpt, "later@") {
			return testbackend.Reply(450, "4.2.1", "try later")
		}
		return nil
	}
	dataReply := func(rcpt string, _ []byte) *smtp.SMTPError {
		if strings.HasPrefix(rcpt, "full@") {
			return testbackend.Reply(452, "4.2.2", "mailbox full")
		}
		return nil
	}
	cases := []struct {
		proto string
		smtp  bool
		want  map[string]int // recipient → code
	}{
		// LMTP answers for each recipient after DATA.
		{"lmtp", false, map[string]int{"ok@x.test": 250, "unknown@x.test": 550, "later@x.test": 450, "full@x.test": 452}},
		// SMTP has one reply for the message: a DATA refusal applies to all.
		{"smtp", true, map[string]int{"ok@x.test": 452, "unknown@x.test": 550, "later@x.test": 450, "full@x.test": 452}},
	}
	for _, tc := range cases {
		t.Run(tc.proto, func(t *testing.T) {
			be, err := testbackend.Start("127.0.0.1:0", testbackend.Options{SMTP: tc.smtp, RcptReply: rcptReply, DataReply: dataReply})
			if err != nil {
				t.Fatal(err)
			}
			defer be.Close()
			c := delivery.New(delivery.Options{Protocol: tc.proto, Address: be.Addr(), MaxIdle: 2})
			defer c.Close()
			// Recipient order matters for SMTP: the backend's DataReply sees
			// the first accepted recipient.
			to := []string{"full@x.test", "ok@x.test", "unknown@x.test", "later@x.test"}
			res, err := c.Deliver(context.Background(), env(to...), strings.NewReader(msg))
			if err != nil {
				t.Fatal(err)
			}
			for _, r := range res {
				if r.Code != tc.want[r.Rcpt] {
					t.Errorf("%s: %s, want %d", r.Rcpt, r, tc.want[r.Rcpt])
				}
			}
			if res[2].Enhanced != "5.1.1" || !strings.Contains(res[2].Text, "no such user") {
				t.Errorf("reply text lost: %+v", res[2])
			}
		})
	}
}

func TestConnectionReuse(t *testing.T) {
	be, err := testbackend.Start("127.0.0.1:0", testbackend.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer be.Close()
	c := delivery.New(delivery.Options{Protocol: "lmtp", Address: be.Addr(), MaxIdle: 1})
	defer c.Close()
	for i := 0; i < 20; i++ {
		if _, err := c.Deliver(context.Background(), env("u@x.test"), strings.NewReader(msg)); err != nil {
			t.Fatal(err)
		}
	}
	if n := be.Sessions(); n != 1 {
		t.Fatalf("%d connections for 20 sequential deliveries, want 1", n)
	}
}

func TestUnreachable(t *testing.T) {
	// A port nobody listens on.
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	addr := ln.Addr().String()
	ln.Close()
	c := delivery.New(delivery.Options{Protocol: "lmtp", Address: addr, ConnectTimeout: time.Second})
	res, err := c.Deliver(context.Background(), env("u@x.test"), strings.NewReader(msg))
	if !errors.Is(err, delivery.ErrUnreachable) {
		t.Fatalf("err %v, want ErrUnreachable", err)
	}
	if len(res) != 1 || res[0].Code != 0 || !res[0].Temporary() {
		t.Fatalf("results %+v", res)
	}
	if err := c.Probe(context.Background()); !errors.Is(err, delivery.ErrUnreachable) {
		t.Fatalf("probe: %v", err)
	}
}

// A store that answers 421 is shutting down: that is about the store, not
// the recipients, so it is ErrUnreachable.
func Test421IsUnreachable(t *testing.T) {
	be, err := testbackend.Start("127.0.0.1:0", testbackend.Options{
		RcptReply: func(string) *smtp.SMTPError { return testbackend.Reply(421, "4.3.2", "shutting down") },
	})
	if err != nil {
		t.Fatal(err)
	}
	defer be.Close()
	c := delivery.New(delivery.Options{Protocol: "lmtp", Address: be.Addr()})
	_, err = c.Deliver(context.Background(), env("u@x.test"), strings.NewReader(msg))
	if !errors.Is(err, delivery.ErrUnreachable) {
		t.Fatalf("err %v, want ErrUnreachable", err)
	}
}

// Non-ASCII addresses need SMTPUTF8 downstream; ASCII ones do not, even
// when the client asked for SMTPUTF8.
func TestSMTPUTF8(t *testing.T) {
	be, err := testbackend.Start("127.0.0.1:0", testbackend.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer be.Close()
	c := delivery.New(delivery.Options{Protocol: "lmtp", Address: be.Addr()})
	e := env("zoë@x.test")
	e.UTF8 = true
	res, err := c.Deliver(context.Background(), e, strings.NewReader(msg))
	if err != nil || !res[0].Success() {
		t.Fatalf("UTF-8 recipient to an SMTPUTF8 backend: %v %+v", err, res)
	}
}

// A store that restarted closed the pooled connections; the next delivery
// (an ASCII one, and one that needs SMTPUTF8) goes through on a new
// connection instead of failing as "unreachable" at MAIL (which opened the
// drain's circuit after every restart of the store), or being refused
// for good as if the store lacked SMTPUTF8.
func TestPooledConnectionsOfARestartedStore(t *testing.T) {
	for _, utf8 := range []bool{false, true} {
		t.Run(fmt.Sprintf("utf8=%v", utf8), func(t *testing.T) {
			be, err := testbackend.Start("127.0.0.1:0", testbackend.Options{})
			if err != nil {
				t.Fatal(err)
			}
			defer be.Close()
			c := delivery.New(delivery.Options{Protocol: "lmtp", Address: be.Addr(), MaxIdle: 4, ConnectTimeout: time.Second})
			defer c.Close()
			rcpt := "u@x.test"
			if utf8 {
				rcpt = "zoë@x.test"
			}
			e := env(rcpt)
			e.UTF8 = utf8
			if res, err := c.Deliver(context.Background(), e, strings.NewReader(msg)); err != nil || !res[0].Success() {
				t.Fatalf("first delivery: %v %+v", err, res)
			}
			be.Down()
			if err := be.Up(); err != nil {
				t.Fatal(err)
			}
			res, err := c.Deliver(context.Background(), e, strings.NewReader(msg))
			if err != nil || !res[0].Success() {
				t.Fatalf("delivery after the store restarted: %v %+v", err, res)
			}
		})
	}
}
