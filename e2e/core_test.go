package e2e

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// coreConfig is a node delivering to Dovecot, with short retry times so the
// test does not wait out Postfix-like schedules.
const coreConfig = `
node_name: e2e
data_dir: {{dir}}/data
log:
  level: info
smtp:
  listen: {{smtp}}
  domains: [example.test]
  shutdown_grace: 5s
admin:
  listen: ""
backends:
  dovecot:
    protocol: lmtp
    address: %s
    rate: %d
    concurrency: 8
drain:
  retry_min: 1s
  retry_max: 5s
  probe_interval: 300ms
`

// testMessage is message i as the sender writes it: CRLF lines, a line
// that starts with a dot, 8-bit UTF-8 text, sizes from 1 to about 40 KiB.
func testMessage(i int) (to []string, msg []byte) {
	to = []string{fmt.Sprintf("user%d@example.test", i%10)}
	if i%7 == 0 {
		to = append(to, fmt.Sprintf("user%d@example.test", (i+3)%10))
	}
	var b bytes.Buffer
	fmt.Fprintf(&b, "From: sender@example.org\r\nTo: %s\r\nMessage-ID: <%d.e2e@example.org>\r\nSubject: e2e message %d\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n", strings.Join(to, ", "), i, i)
	fmt.Fprintf(&b, ".a line that starts with a dot\r\nGrüße, ça va? 日本語\r\n")
	lines := 10 + (i*37)%500
	for l := 0; l < lines; l++ {
		fmt.Fprintf(&b, "line %d of message %d: the quick brown fox jumps over the lazy dog\r\n", l, i)
	}
	return to, b.Bytes()
}

// token finds which test message a delivered one is.
func token(body []byte) (int, bool) {
	i := bytes.Index(body, []byte("Message-ID: <"))
	if i < 0 {
		return 0, false
	}
	var n int
	if _, err := fmt.Sscanf(string(body[i+len("Message-ID: <"):]), "%d.e2e@", &n); err != nil {
		return 0, false
	}
	return n, true
}

// TestCoreDovecotCrash is the core scenario: Dovecot is down while 2 000
// messages arrive over 16 concurrent sessions and mxq is SIGKILLed twice at
// random moments; then Dovecot comes up. Every message answered 250 must be
// in the right Maildir, byte for byte; duplicates are counted and printed.
func TestCoreDovecotCrash(t *testing.T) {
	need(t, "dovecot", "doveadm")
	const total, sessions = 2000, 16
	seed := uint64(time.Now().UnixNano())
	rng := rand.New(rand.NewPCG(seed, 1))
	t.Logf("seed %d", seed)

	dc := newDovecot(t)
	m := startMxq(t, fmt.Sprintf(coreConfig, dc.addr, 2000))

	var (
		mu    sync.Mutex
		acked = map[int]string{} // message → queue ID of its 250
		ids   = map[string]int{}
	)
	killAt := []int{300 + rng.IntN(600), 1000 + rng.IntN(700)}
	var nacked atomic.Int64
	var restarts sync.WaitGroup
	killCh := make(chan struct{}, 2)
	go func() {
		for range killCh {
			m.kill()
			m.start()
			restarts.Done()
		}
	}()
	restarts.Add(len(killAt))

	work := make(chan int, total)
	for i := 0; i < total; i++ {
		work <- i
	}
	close(work)
	start := time.Now()
	var wg sync.WaitGroup
	var errorsSeen atomic.Int64
	for s := 0; s < sessions; s++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var c interface {
				Close() error
			}
			_ = c
			cl, _ := dial(m.smtp)
			for i := range work {
				to, msg := testMessage(i)
				for attempt := 0; ; attempt++ {
					if cl == nil {
						var err error
						if cl, err = dial(m.smtp); err != nil {
							time.Sleep(100 * time.Millisecond)
							continue
						}
					}
					id, err := sendOne(context.Background(), cl, "sender@example.org", to, msg)
					if err != nil {
						// Connection lost (kill) or a 4xx: the sender keeps
						// the message and tries again, as an MTA would.
						errorsSeen.Add(1)
						cl.Close()
						cl = nil
						time.Sleep(50 * time.Millisecond)
						if attempt > 200 {
							t.Errorf("message %d never accepted: %v", i, err)
							break
						}
						continue
					}
					mu.Lock()
					acked[i] = id
					ids[id] = i
					mu.Unlock()
					n := nacked.Add(1)
					for _, k := range killAt {
						if n == int64(k) {
							killCh <- struct{}{}
						}
					}
					break
				}
			}
			if cl != nil {
				cl.Quit()
			}
		}()
	}
	wg.Wait()
	restarts.Wait()
	close(killCh)
	acceptTime := time.Since(start)
	if len(acked) != total {
		t.Fatalf("%d of %d messages accepted", len(acked), total)
	}
	t.Logf("accepted %d messages in %v (%.0f msg/s) through 2 SIGKILLs, %d client-side retries",
		total, acceptTime.Round(time.Millisecond), float64(total)/acceptTime.Seconds(), errorsSeen.Load())

	// Nothing can have been delivered: Dovecot is down.
	if n := dc.count(); n != 0 {
		t.Fatalf("%d messages in Maildirs while Dovecot was down", n)
	}
	wantDeliveries := 0
	for i := range acked {
		to, _ := testMessage(i)
		wantDeliveries += len(to)
	}
	dc.start()
	drainStart := time.Now()
	deadline := time.Now().Add(3 * time.Minute)
	for dc.count() < wantDeliveries && time.Now().Before(deadline) {
		time.Sleep(100 * time.Millisecond)
	}
	drainTime := time.Since(drainStart)
	// Let stragglers (duplicates from the kills) arrive before counting.
	time.Sleep(2 * time.Second)

	type got struct {
		users []string
		ids   []string
	}
	delivered := map[int]*got{}
	for _, s := range dc.messages() {
		id, body, err := stripAdded(s.Data)
		if err != nil {
			t.Fatalf("%s: %v", s.Path, err)
		}
		n, ok := token(body)
		if !ok {
			t.Fatalf("%s: not a test message", s.Path)
		}
		_, sent := testMessage(n)
		if !bytes.Equal(body, sent) {
			t.Fatalf("%s (message %d, id %s): delivered bytes differ from those sent", s.Path, n, id)
		}
		g := delivered[n]
		if g == nil {
			g = &got{}
			delivered[n] = g
		}
		g.users = append(g.users, s.User)
		g.ids = append(g.ids, id)
	}
	lost, dups := 0, 0
	for i, id := range acked {
		to, _ := testMessage(i)
		g := delivered[i]
		for _, rcpt := range to {
			user := strings.SplitN(rcpt, "@", 2)[0]
			copies := 0
			if g != nil {
				for _, u := range g.users {
					if u == user {
						copies++
					}
				}
			}
			if copies == 0 {
				lost++
				t.Errorf("LOST: message %d (queue ID %s) for %s", i, id, rcpt)
			}
			if copies > 1 {
				dups += copies - 1
			}
		}
	}
	t.Logf("drained %d deliveries into Dovecot in %v (%.0f deliveries/s)", wantDeliveries, drainTime.Round(time.Millisecond), float64(wantDeliveries)/drainTime.Seconds())
	t.Logf("RESULT lost=%d duplicates=%d (of %d acknowledged messages, %d deliveries)", lost, dups, total, wantDeliveries)
	fmt.Fprintf(os.Stderr, "core e2e: accepted %.0f msg/s, drained %.0f deliveries/s, lost=%d duplicates=%d\n",
		float64(total)/acceptTime.Seconds(), float64(wantDeliveries)/drainTime.Seconds(), lost, dups)
	if lost != 0 {
		t.Fatalf("%d acknowledged deliveries lost", lost)
	}
	if err := m.stop(); err != nil {
		t.Fatalf("clean shutdown: %v", err)
	}
}

// TestSwaksTour is the README's quick tour, as a test: swaks sends a
// message, Dovecot gets it.
func TestSwaksTour(t *testing.T) {
	need(t, "swaks", "dovecot", "doveadm")
	dc := newDovecot(t)
	dc.start()
	m := startMxq(t, fmt.Sprintf(coreConfig, dc.addr, 200))
	out, err := exec.Command("swaks", "--server", m.smtp, "--from", "alice@example.org", "--to", "bob@example.test",
		"--header", "Subject: tour", "--body", "hello from swaks").CombinedOutput()
	if err != nil {
		t.Fatalf("swaks: %v\n%s", err, out)
	}
	if !bytes.Contains(out, []byte("250 2.0.0 Ok: queued as ")) {
		t.Fatalf("swaks output lacks the queue ID:\n%s", out)
	}
	deadline := time.Now().Add(15 * time.Second)
	for dc.count() == 0 && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	msgs := dc.messages()
	if len(msgs) != 1 || msgs[0].User != "bob" || !bytes.Contains(msgs[0].Data, []byte("hello from swaks")) {
		t.Fatalf("Maildir holds %d messages: %+v", len(msgs), msgs)
	}
	// A foreign domain is refused: no open relay.
	out, err = exec.Command("swaks", "--server", m.smtp, "--from", "alice@example.org", "--to", "victim@elsewhere.test").CombinedOutput()
	if err == nil || !bytes.Contains(out, []byte("550 5.7.1")) {
		t.Fatalf("relaying to elsewhere.test was not refused with 550 5.7.1:\n%s", out)
	}
	var users []string
	for _, s := range dc.messages() {
		users = append(users, s.User)
	}
	sort.Strings(users)
	if strings.Join(users, ",") != "bob" {
		t.Fatalf("Maildirs: %v", users)
	}
}
