package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// The mail of the benchmark. Message i (0, 1, 2, … over the whole run) is
// a pure function of i, so that the refill after the first drain sends
// the same envelopes again:
//
//   - its recipient is one of Users mailboxes u<k>@example.test, chosen
//     by a hash of i (about N/Users messages each by the end of the run),
//     except the known user's messages (below);
//   - its sender is bulk@lists.example.org for a fifth of the messages
//     (by the same hash: the hold test's filter), else one of 1 000 others;
//   - the known user, known@example.test, gets exactly knownCount messages,
//     spread over the first step and from ordinary senders: the mailbox
//     that `queue ls --to` and the IMAP listing look at, the same at every
//     step.
const (
	domain     = "example.test"
	knownUser  = "known@" + domain
	knownCount = 40
	bulkSender = "bulk@lists.example.org"
	probeRcpt  = "probe@" + domain
)

type mailGen struct {
	users      int // recipients other than the known user
	firstStep  int // the known user's messages are among the first firstStep
	size       int // bytes per message, header included
	filler     []byte
	knownEvery int
}

func newMailGen(users, firstStep, size int) *mailGen {
	g := &mailGen{users: max(users, 1), firstStep: firstStep, size: size, knownEvery: max(firstStep/knownCount, 1)}
	// Filler lines of 76 letters, no leading dot (no dot-stuffing needed).
	line := make([]byte, 0, 78)
	for i := 0; i < 76; i++ {
		line = append(line, byte('a'+i%26))
	}
	line = append(line, '\r', '\n')
	for len(g.filler) < size {
		g.filler = append(g.filler, line...)
	}
	return g
}

// mix is splitmix64: a cheap, well-spread hash of the message number.
func mix(x uint64) uint64 {
	x += 0x9e3779b97f4a7c15
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9
	x = (x ^ (x >> 27)) * 0x94d049bb133111eb
	return x ^ (x >> 31)
}

func (g *mailGen) isKnown(i int) bool {
	return i < g.firstStep && i%g.knownEvery == g.knownEvery/2 && i/g.knownEvery < knownCount
}

// knownTotal is how many messages the known user gets.
func (g *mailGen) knownTotal() int {
	n := 0
	for i := g.knownEvery / 2; i < g.firstStep; i += g.knownEvery {
		if g.isKnown(i) {
			n++
		}
	}
	return n
}

func (g *mailGen) envelope(i int) (from, rcpt string) {
	h := mix(uint64(i))
	if g.isKnown(i) {
		return "friend" + strconv.Itoa(i%7) + "@senders.example.org", knownUser
	}
	rcpt = "u" + strconv.FormatUint((h>>8)%uint64(g.users), 10) + "@" + domain
	if h%5 == 0 {
		return bulkSender, rcpt
	}
	return "s" + strconv.FormatUint((h>>40)%1000, 10) + "@senders.example.org", rcpt
}

// message writes message i (header, filler to size bytes, and the final
// dot) into b.
func (g *mailGen) message(b []byte, i int, from, rcpt, tag string) []byte {
	b = b[:0]
	b = fmt.Appendf(b, "From: <%s>\r\nTo: <%s>\r\nSubject: scale message %d\r\nDate: %s\r\nMessage-ID: <%d.%s@scale.test>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n",
		from, rcpt, i, time.Now().Format(time.RFC1123Z), i, tag)
	if pad := g.size - len(b); pad > 0 {
		b = append(b, g.filler[:pad]...)
		if b[len(b)-1] != '\n' { // end on a full line
			b = append(b[:len(b)-2], '\r', '\n')
		}
	}
	return append(b, ".\r\n"...)
}

// loadResult is one batch of messages sent.
type loadResult struct {
	Sent     int           // messages attempted (each until accepted, or 3 times)
	Accepted int           // answered 250
	Failed   int           // not accepted after 3 tries
	Retries  int           // tries that failed and were repeated
	Elapsed  time.Duration // wall time of the batch
	FirstID  string        // the smallest queue ID answered (IDs sort by arrival)
	FirstErr string
	// Rest is what was not sent because the node died (the batch stopped
	// at once); nil when everything was tried.
	Rest *batch `json:"-"`
}

func (r loadResult) rate() float64 {
	if r.Elapsed <= 0 {
		return 0
	}
	return float64(r.Accepted) / r.Elapsed.Seconds()
}

// add sums a continuation of the same batch into r.
func (r *loadResult) add(o loadResult) {
	r.Accepted += o.Accepted
	r.Failed += o.Failed
	r.Retries += o.Retries
	r.Elapsed += o.Elapsed
	if o.FirstID != "" && (r.FirstID == "" || o.FirstID < r.FirstID) {
		r.FirstID = o.FirstID
	}
	if r.FirstErr == "" {
		r.FirstErr = o.FirstErr
	}
	r.Rest = o.Rest
}

// batch is the message numbers to send: extra, then lo..hi-1.
type batch struct {
	extra  []int
	lo, hi int
}

func (b *batch) len() int { return len(b.extra) + max(b.hi-b.lo, 0) }

func (b *batch) at(k int) int {
	if k < len(b.extra) {
		return b.extra[k]
	}
	return b.lo + k - len(b.extra)
}

// send delivers a batch of messages to addr from sessions concurrent
// sessions, one message per connection (how mail reaches an MX), with no
// pipelining. A message that is not accepted is tried again on a new
// connection, up to three times. If a try fails and alive says the node
// is gone, the batch stops at once and Rest says what was not sent.
func (g *mailGen) send(ctx context.Context, addr string, sessions int, b *batch, tag string, alive func() bool) loadResult {
	var next atomic.Int64
	var dead atomic.Bool
	var mu sync.Mutex
	var undone []int
	total := b.len()
	res := loadResult{Sent: total}
	start := time.Now()
	var wg sync.WaitGroup
	for w := 0; w < sessions; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var buf []byte
			var acc, failed, retries int
			var first, firstErr string
			for ctx.Err() == nil && !dead.Load() {
				k := int(next.Add(1) - 1)
				if k >= total {
					break
				}
				i := b.at(k)
				from, rcpt := g.envelope(i)
				buf = g.message(buf, i, from, rcpt, tag)
				var id string
				var err error
				for try := 0; try < 3; try++ {
					if id, err = transaction(addr, from, rcpt, buf); err == nil {
						break
					}
					if alive != nil && !alive() {
						dead.Store(true)
						break
					}
					retries++
					if firstErr == "" {
						firstErr = err.Error()
					}
					time.Sleep(100 * time.Millisecond)
				}
				if err != nil && dead.Load() {
					mu.Lock()
					undone = append(undone, i)
					mu.Unlock()
					break
				}
				if err != nil {
					failed++
					continue
				}
				acc++
				if first == "" || id < first {
					first = id
				}
			}
			mu.Lock()
			res.Accepted += acc
			res.Failed += failed
			res.Retries += retries
			if first != "" && (res.FirstID == "" || first < res.FirstID) {
				res.FirstID = first
			}
			if res.FirstErr == "" {
				res.FirstErr = firstErr
			}
			mu.Unlock()
		}()
	}
	wg.Wait()
	res.Elapsed = time.Since(start)
	if dead.Load() {
		// What was not taken yet, and what failed because of the death.
		rest := &batch{extra: undone}
		for k := min(int(next.Load()), total); k < total; k++ {
			rest.extra = append(rest.extra, b.at(k))
		}
		res.Rest = rest
	}
	return res
}

// transaction sends one message on a new connection: greeting, EHLO, MAIL,
// RCPT, DATA, the message (data ends with ".\r\n"), QUIT. It returns the
// queue ID from the 250.
func transaction(addr, from, rcpt string, data []byte) (string, error) {
	conn, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		return "", err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(60 * time.Second))
	r := bufio.NewReaderSize(conn, 1024)
	w := bufio.NewWriterSize(conn, 4096)
	step := func(cmd string, want int) (string, error) {
		if cmd != "" {
			w.WriteString(cmd)
			w.WriteString("\r\n")
			if err := w.Flush(); err != nil {
				return "", err
			}
		}
		return reply(r, want)
	}
	if _, err := step("", 220); err != nil {
		return "", err
	}
	if _, err := step("EHLO load.scale.test", 250); err != nil {
		return "", err
	}
	if _, err := step("MAIL FROM:<"+from+">", 250); err != nil {
		return "", err
	}
	if _, err := step("RCPT TO:<"+rcpt+">", 250); err != nil {
		return "", err
	}
	if _, err := step("DATA", 354); err != nil {
		return "", err
	}
	w.Write(data)
	if err := w.Flush(); err != nil {
		return "", err
	}
	text, err := reply(r, 250)
	if err != nil {
		return "", err
	}
	w.WriteString("QUIT\r\n")
	w.Flush()
	_, id, ok := strings.Cut(text, "queued as ")
	if !ok {
		return "", fmt.Errorf("250 without a queue ID: %q", text)
	}
	return strings.TrimSpace(id), nil
}

var errReply = errors.New("unexpected reply")

// reply reads a (multi-line) reply and checks its code; it returns the
// last line's text.
func reply(r *bufio.Reader, want int) (string, error) {
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			return "", err
		}
		if len(line) < 4 {
			return "", fmt.Errorf("%w: %q", errReply, line)
		}
		if line[3] == '-' {
			continue
		}
		code, _ := strconv.Atoi(line[:3])
		if code != want {
			return "", fmt.Errorf("%w: want %d, got %q", errReply, want, strings.TrimSpace(line))
		}
		return strings.TrimSpace(line[4:]), nil
	}
}
