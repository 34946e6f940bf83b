// Command smtpload is the benchmark's SMTP client: Sessions concurrent
// sessions send Messages messages of Size bytes in total, either one per
// connection (as most mail reaches an MX) or several per connection, and
// it prints one JSON object: throughput, reply classes and per-transaction
// latency. The same client and the same messages are used for every server
// so that only the server differs.
//
// It speaks plain SMTP without pipelining, writing each message in one
// go from a prebuilt buffer, so that the client costs as little CPU as
// possible: on a 2-core machine every cycle it spends is taken from the
// server being measured.
package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

type config struct {
	addr     string
	sessions int
	messages int
	size     int
	perConn  int // messages per connection; 0: all of a session's on one
	from, to string
	helo     string
	tag      string
	timeout  time.Duration
}

// result is what smtpload prints. Every message sent ends in exactly one
// of OK, Temp, Perm or Errors.
type result struct {
	Label      string  `json:"label,omitempty"`
	Addr       string  `json:"addr"`
	Sessions   int     `json:"sessions"`
	Messages   int     `json:"messages"`
	Size       int     `json:"size"`
	PerConn    int     `json:"per_conn"`
	Seconds    float64 `json:"seconds"`
	MsgsPerSec float64 `json:"msgs_per_s"` // 2xx per second of wall time
	OK         int64   `json:"ok_2xx"`
	Temp       int64   `json:"temp_4xx"`
	Perm       int64   `json:"perm_5xx"`
	Errors     int64   `json:"errors"` // I/O errors and unparsable replies
	Conns      int64   `json:"connections"`
	P50ms      float64 `json:"p50_ms"`
	P90ms      float64 `json:"p90_ms"`
	P99ms      float64 `json:"p99_ms"`
	FirstError string  `json:"first_error,omitempty"`
	// ClientCPUms is the CPU time smtpload itself used (user and system):
	// on a small machine the client's share is taken from the server.
	ClientCPUms float64 `json:"client_cpu_ms"`
}

func main() {
	var c config
	var label string
	flag.StringVar(&c.addr, "addr", "127.0.0.1:2525", "server address")
	flag.IntVar(&c.sessions, "s", 32, "concurrent sessions")
	flag.IntVar(&c.messages, "m", 1000, "messages in total")
	flag.IntVar(&c.size, "size", 10240, "message size in bytes (headers included)")
	flag.IntVar(&c.perConn, "per-conn", 1, "messages per connection (0: keep each session's connection for all its messages)")
	flag.StringVar(&c.from, "from", "load@example.org", "envelope sender")
	flag.StringVar(&c.to, "to", "user@example.test", "envelope recipient")
	flag.StringVar(&c.helo, "helo", "smtpload.example.org", "EHLO name")
	flag.StringVar(&c.tag, "tag", "", "string in every Message-ID (default: time and pid), so runs never repeat an ID")
	flag.DurationVar(&c.timeout, "timeout", time.Minute, "limit for each command's reply")
	flag.StringVar(&label, "label", "", "copied into the JSON output")
	flag.Parse()
	if c.sessions < 1 || c.messages < 1 || c.size < 512 || c.perConn < 0 {
		fmt.Fprintln(os.Stderr, "smtpload: need -s ≥ 1, -m ≥ 1, -size ≥ 512, -per-conn ≥ 0")
		os.Exit(2)
	}
	if c.tag == "" {
		c.tag = strconv.FormatInt(time.Now().UnixNano(), 36) + "." + strconv.Itoa(os.Getpid())
	}
	r := run(c)
	r.Label = label
	out, _ := json.Marshal(r)
	fmt.Println(string(out))
}

// message is a prebuilt message: the bytes before the Message-ID's number,
// and after it (ending with the final dot). Only the number changes.
type message struct {
	head, tail []byte
}

// newMessage generates a text message of about size bytes: headers, then
// lines of random lower-case words, 76 characters and CRLF each. No line
// starts with a dot, so the buffer needs no dot-stuffing.
func newMessage(c config) message {
	head := fmt.Sprintf("From: Load <%s>\r\nTo: <%s>\r\nSubject: smtpload %d bytes\r\nDate: %s\r\nMessage-ID: <%s.",
		c.from, c.to, c.size, time.Now().Format(time.RFC1123Z), c.tag)
	// The number and "@smtpload>\r\n" take about 20 bytes.
	var b strings.Builder
	b.WriteString("@smtpload>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n")
	rnd := rand.New(rand.NewPCG(1, uint64(c.size)))
	left := c.size - len(head) - 20 - b.Len()
	var line []byte
	for left > 2 {
		line = line[:0]
		width := min(76, left-2)
		for len(line) < width {
			if len(line) > 0 {
				line = append(line, ' ')
			}
			for n := 2 + rnd.IntN(8); n > 0 && len(line) < width; n-- {
				line = append(line, byte('a'+rnd.IntN(26)))
			}
		}
		line = append(line, '\r', '\n')
		b.Write(line)
		left -= len(line)
	}
	b.WriteString(".\r\n")
	return message{head: []byte(head), tail: []byte(b.String())}
}

type counters struct {
	ok, temp, perm, errs, conns atomic.Int64
	firstErr                    atomic.Pointer[string]
}

func (ct *counters) fail(err error) {
	ct.errs.Add(1)
	s := err.Error()
	ct.firstErr.CompareAndSwap(nil, &s)
}

func run(c config) result {
	msg := newMessage(c)
	var next atomic.Int64 // the next message number to send
	var ct counters
	lat := make([][]time.Duration, c.sessions)
	var wg sync.WaitGroup
	start := time.Now()
	for i := range c.sessions {
		wg.Go(func() {
			lat[i] = session(c, msg, &next, &ct)
		})
	}
	wg.Wait()
	elapsed := time.Since(start)

	all := slices.Concat(lat...)
	slices.Sort(all)
	r := result{
		Addr: c.addr, Sessions: c.sessions, Messages: c.messages, Size: c.size, PerConn: c.perConn,
		Seconds: elapsed.Seconds(),
		OK:      ct.ok.Load(), Temp: ct.temp.Load(), Perm: ct.perm.Load(), Errors: ct.errs.Load(),
		Conns: ct.conns.Load(),
		P50ms: ms(pct(all, 0.50)), P90ms: ms(pct(all, 0.90)), P99ms: ms(pct(all, 0.99)),
	}
	r.MsgsPerSec = float64(r.OK) / elapsed.Seconds()
	var ru syscall.Rusage
	if syscall.Getrusage(syscall.RUSAGE_SELF, &ru) == nil {
		r.ClientCPUms = float64(ru.Utime.Nano()+ru.Stime.Nano()) / 1e6
	}
	if p := ct.firstErr.Load(); p != nil {
		r.FirstError = *p
	}
	return r
}

func pct(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	return sorted[min(len(sorted)-1, int(p*float64(len(sorted))))]
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// session sends messages until none are left, opening a new connection
// every perConn messages and after any failure. It returns the latency of
// every transaction that got a reply to its final dot.
func session(c config, msg message, next *atomic.Int64, ct *counters) []time.Duration {
	var lat []time.Duration
	for {
		n := next.Add(1) - 1
		if n >= int64(c.messages) {
			return lat
		}
		ct.conns.Add(1)
		cl, err := dial(c)
		if err != nil {
			ct.fail(err)
			continue
		}
		for sent := 0; ; {
			d, code, err := cl.send(c, msg, n)
			switch {
			case err != nil:
				ct.fail(err)
			case code/100 == 2:
				ct.ok.Add(1)
				lat = append(lat, d)
			case code/100 == 4:
				ct.temp.Add(1)
			default:
				ct.perm.Add(1)
			}
			if err != nil {
				break // the connection's state is unknown: start over
			}
			if code/100 != 2 {
				if _, err := cl.cmd(c, "RSET"); err != nil {
					break
				}
			}
			sent++
			if c.perConn > 0 && sent >= c.perConn {
				cl.quit(c)
				break
			}
			if n = next.Add(1) - 1; n >= int64(c.messages) {
				cl.quit(c)
				break
			}
		}
		cl.conn.Close()
	}
}

type client struct {
	conn net.Conn
	r    *bufio.Reader
	w    *bufio.Writer
	num  []byte
}

func dial(c config) (*client, error) {
	conn, err := net.DialTimeout("tcp", c.addr, c.timeout)
	if err != nil {
		return nil, err
	}
	cl := &client{conn: conn, r: bufio.NewReaderSize(conn, 4096), w: bufio.NewWriterSize(conn, 64<<10)}
	conn.SetDeadline(time.Now().Add(c.timeout))
	if code, err := cl.reply(); err != nil || code != 220 {
		conn.Close()
		return nil, fmt.Errorf("greeting: %d %v", code, err)
	}
	if code, err := cl.cmd(c, "EHLO "+c.helo); err != nil || code != 250 {
		conn.Close()
		return nil, fmt.Errorf("EHLO: %d %v", code, err)
	}
	return cl, nil
}

// send runs one transaction and returns the time from MAIL FROM to the
// reply that ended it, and that reply's code.
func (cl *client) send(c config, msg message, n int64) (time.Duration, int, error) {
	start := time.Now()
	if code, err := cl.cmd(c, "MAIL FROM:<"+c.from+">"); err != nil || code != 250 {
		return 0, code, err
	}
	if code, err := cl.cmd(c, "RCPT TO:<"+c.to+">"); err != nil || code/100 != 2 {
		return 0, code, err
	}
	if code, err := cl.cmd(c, "DATA"); err != nil || code != 354 {
		if err == nil && code/100 == 2 {
			err = fmt.Errorf("DATA answered %d", code)
		}
		return 0, code, err
	}
	cl.num = strconv.AppendInt(cl.num[:0], n, 10)
	cl.w.Write(msg.head)
	cl.w.Write(cl.num)
	cl.w.Write(msg.tail)
	if err := cl.w.Flush(); err != nil {
		return 0, 0, err
	}
	code, err := cl.reply()
	return time.Since(start), code, err
}

func (cl *client) cmd(c config, line string) (int, error) {
	cl.conn.SetDeadline(time.Now().Add(c.timeout))
	cl.w.WriteString(line)
	cl.w.WriteString("\r\n")
	if err := cl.w.Flush(); err != nil {
		return 0, err
	}
	return cl.reply()
}

// quit says goodbye and waits for the server to close first, so the
// server's side holds the TIME_WAIT and the client does not run out of
// local ports over hundreds of thousands of connections.
func (cl *client) quit(c config) {
	if _, err := cl.cmd(c, "QUIT"); err != nil {
		return
	}
	io.Copy(io.Discard, cl.r)
}

// reply reads a (multi-line) reply and returns its code.
func (cl *client) reply() (int, error) {
	for {
		line, err := cl.r.ReadSlice('\n')
		if err != nil {
			return 0, err
		}
		if len(line) < 5 {
			return 0, fmt.Errorf("short reply %q", line)
		}
		code, err := strconv.Atoi(string(line[:3]))
		if err != nil {
			return 0, fmt.Errorf("bad reply %q", line)
		}
		switch line[3] {
		case ' ', '\r', '\n':
			return code, nil
		case '-':
			continue
		default:
			return 0, errors.New("bad reply separator")
		}
	}
}
