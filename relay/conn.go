package relay

import (
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"sync/atomic"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/mxq-dev/mxq/internal/connlimit"
)

// conn is an admitted connection as go-smtp sees it. It carries the real
// client address (from a PROXY header), gives back the connection's
// limiter slot when closed, and enforces the per-connection limits that
// go-smtp has no hook for.
//
// Counting commands: go-smtp sets the read deadline right before it
// reads each command line (Conn.readLine, go-smtp v0.25), and after
// STARTTLS the TLS layer passes that call down to this conn. So
// SetReadDeadline sees every command, encrypted or not, without reading
// the stream, and can end the session before the next command is read:
// it writes the 421 itself (through the TLS layer when there is one) and
// returns net.ErrClosed, which go-smtp takes as a quiet end of the
// connection, so commands the client pipelined behind are never run.
// relay_test's limit dialogs fail if a go-smtp upgrade changes this.
type conn struct {
	net.Conn
	srv    *Server
	client netip.Addr
	proxy  string // the load balancer's address, if any
	slot   *connlimit.Slot

	smtp   atomic.Pointer[smtp.Conn] // set at the first EHLO/HELO
	tls    atomic.Bool               // a TLS handshake began
	inData atomic.Bool               // a message is being read
	cmds   atomic.Int64              // commands read since the last message
	errs   atomic.Int64              // commands refused on this connection
	msgs   atomic.Int64
	stop   atomic.Pointer[stopReason] // end the session at the next command
	idle   atomic.Bool                // idle timeout logged
	closed atomic.Bool
}

// stopReason is why a session is ended, and how.
type stopReason struct {
	reply  *smtp.SMTPError
	reason string
}

// Replies that end a session.
var (
	stopTooManyCommands = &stopReason{&smtp.SMTPError{Code: 421, EnhancedCode: smtp.EnhancedCode{4, 7, 0}, Message: "Too many commands without a message, closing connection"}, "too_many_commands"}
	stopTooManyErrors   = &stopReason{&smtp.SMTPError{Code: 421, EnhancedCode: smtp.EnhancedCode{4, 7, 0}, Message: "Too many errors, closing connection"}, "too_many_errors"}
	stopDataTimeout     = &stopReason{&smtp.SMTPError{Code: 421, EnhancedCode: smtp.EnhancedCode{4, 4, 2}, Message: "Timeout reading message data, closing connection"}, "data_timeout"}
	stopIdle            = &stopReason{&smtp.SMTPError{Code: 421, EnhancedCode: smtp.EnhancedCode{4, 4, 2}, Message: "Idle timeout, closing connection"}, "idle_timeout"}
)

func (c *conn) SetReadDeadline(t time.Time) error {
	if !c.inData.Load() {
		n := c.cmds.Add(1)
		if r := c.stop.Load(); r != nil {
			return c.kill(r)
		}
		// n counts the command about to be read.
		if max := c.srv.o.MaxCommands; max > 0 && n > int64(max) {
			return c.kill(stopTooManyCommands)
		}
		if d := c.srv.stressTimeout(); d > 0 {
			if short := time.Now().Add(d); short.Before(t) {
				t = short
			}
		}
	}
	return c.Conn.SetReadDeadline(t)
}

// kill answers with r's reply and closes the connection.
func (c *conn) kill(r *stopReason) error {
	line := fmt.Sprintf("%d %d.%d.%d %s %s\r\n", r.reply.Code, r.reply.EnhancedCode[0], r.reply.EnhancedCode[1], r.reply.EnhancedCode[2], c.srv.o.Hostname, r.reply.Message)
	// Before EHLO there is no smtp.Conn to write through; that is plain
	// text unless the client did STARTTLS first, when the 421 is skipped
	// rather than written in clear into a TLS stream.
	var w net.Conn
	if sc := c.smtp.Load(); sc != nil {
		w = sc.Conn()
	} else if !c.tls.Load() {
		w = c.Conn
	}
	if w != nil {
		_ = w.SetWriteDeadline(time.Now().Add(time.Second))
		_, _ = io.WriteString(w, line)
	}
	c.srv.log.Info("closing session: "+r.reply.Message, "client", c.client.String(), "reason", r.reason,
		"commands", c.cmds.Load(), "errors", c.errs.Load(), "messages", c.msgs.Load())
	_ = c.Conn.Close()
	return fmt.Errorf("relay: %s: %w", r.reason, net.ErrClosed)
}

// Read notices the read timeout between commands. With nothing received
// go-smtp answers 421 4.4.2 and closes by itself. With part of a line
// received, it would not: bufio.Reader.ReadLine returns the fragment
// without the error, go-smtp runs it as a command and gives the next one
// a fresh deadline, so a client dribbling a byte at a time would never
// time out. The session is ended at the next command instead: a command
// not completed within the timeout ends it, as the timeout means.
func (c *conn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if err != nil && !c.inData.Load() && errors.Is(err, os.ErrDeadlineExceeded) && !c.idle.Swap(true) {
		c.stop.CompareAndSwap(nil, stopIdle)
		c.srv.log.Info("idle timeout, closing session", "client", c.client.String())
	}
	return n, err
}

func (c *conn) Close() error {
	err := c.Conn.Close()
	if !c.closed.Swap(true) {
		c.slot.Release()
	}
	return err
}

// connOf finds the conn under what go-smtp hands the session: the conn
// itself, or the TLS connection over it after STARTTLS.
func connOf(nc net.Conn) *conn {
	if tc, ok := nc.(*tls.Conn); ok {
		nc = tc.NetConn()
	}
	c, _ := nc.(*conn)
	return c
}
