package e2e

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
)

const floodMemConfig = `
node_name: memflood
data_dir: {{dir}}/data
# The ordinary senders are a steady fill (500 messages/s): under it JetStream keeps the blocks it wrote in the last ~10 s in
# memory, which only the collector's pressure bounds. A small soft limit
# keeps that part of the overhead near fixed.
memory_limit: 96MiB
smtp:
  listen: {{smtp}}
  domains: [example.test]
  max_connections: 600
  data_timeout: 30s
  min_data_rate: 1KiB
  memory_budget: %[1]dMiB
  memory_wait: 1s
  shutdown_grace: 5s
admin: {listen: "%[2]s", token: "%[3]s"}
# Nothing listens there: what is accepted stays in the queue, to be counted.
backend: lmtp://%[4]s
`

// floodBudgetMiB is the flood test's memory budget: small, so that the
// flood uses it up at once.
const floodBudgetMiB = 8

// floodOverheadMiB is what mxq's RSS may exceed the budget by under the
// flood. Measured here: 44 MiB at rest (38 of them the binary's mapped
// code); peaks of 142 to 212 MiB over runs while the flood's 2 GiB arrive,
// the budget is used up, chunks are stored early and the 50 ordinary
// senders store 500 messages a second: the Go heap near and over
// memory_limit (96 MiB: JetStream's caches of the blocks just written, the
// catalog's memtables, garbage; the limit is soft), the binary, 550
// connections' stacks and buffers. Unpaced, the ordinary senders stored up
// to 2 000 msg/s and the peak reached 245 MiB: that part grows with the
// write rate, not with the flood. The bound is fixed whatever the flood;
// without the budget the flood alone would pin 500 x 4 to 8 MiB.
const floodOverheadMiB = 300

// TestFlood sends 500 messages that each start with 4 MiB sent at once and
// then trickle at the minimum data rate (1 KiB/s) for 5 to 25 s before
// they end, beside 50 ordinary senders that send small messages in a loop.
// The memory budget (8 MiB) bounds what the sessions hold: mxq's RSS stays
// under budget + a fixed overhead, every ordinary message is answered 250
// or 451 4.3.1, every message answered 250 is in the queue, nothing is
// reserved once the sessions are gone, and the log says why mail waited.
func TestFlood(t *testing.T) {
	if testing.Short() {
		t.Skip("flood: a minute or two of load")
	}
	const (
		floods   = 500
		ordinary = 50
		start    = 4 << 20
		rate     = 1 << 10 // smtp.min_data_rate
	)
	adminAddr := freePort(t)
	p := startMxq(t, fmt.Sprintf(floodMemConfig, floodBudgetMiB, adminAddr, cliToken, freePort(t)))
	n := &cliNode{t: t, m: p, admin: "http://" + adminAddr}
	pid := p.cmd.Process.Pid
	baseRSS := rssKiB(t, pid, "VmRSS")

	// Sample the RSS throughout.
	var peakRSS atomic.Int64
	var series []int64 // MiB, every 50 ms
	sampling := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		for {
			if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid)); err == nil {
				for _, line := range strings.Split(string(b), "\n") {
					if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
						var kib int64
						fmt.Sscan(v, &kib)
						if kib > peakRSS.Load() {
							peakRSS.Store(kib)
						}
						series = append(series, kib>>10)
					}
				}
			}
			select {
			case <-sampling:
				return
			case <-time.After(50 * time.Millisecond):
			}
		}
	}()

	var mu sync.Mutex
	var queued []string // every ID answered 250
	var others []string // replies that are neither 250 nor 451
	note := func(list *[]string, s string) {
		mu.Lock()
		*list = append(*list, s)
		mu.Unlock()
	}

	// The flood.
	line := strings.Repeat("x", 1022) + "\r\n" // 1 KiB
	burst := []byte("Subject: flood\r\n\r\n" + strings.Repeat(line, start/len(line)))
	var floodOK, floodRefused, floodFailed atomic.Int64
	var fwg sync.WaitGroup
	for i := 0; i < floods; i++ {
		fwg.Add(1)
		go func() {
			defer fwg.Done()
			id, code, err := floodSession(p.smtp, burst, line, time.Duration(5+rand.IntN(21))*time.Second, rate)
			switch {
			case err != nil:
				floodFailed.Add(1)
				note(&others, fmt.Sprintf("flood %d: %v", i, err))
			case code == 250:
				floodOK.Add(1)
				note(&queued, id)
			case code == 451:
				floodRefused.Add(1)
			}
		}()
	}

	// Ordinary senders, until the flood is over.
	floodDone := make(chan struct{})
	go func() { fwg.Wait(); close(floodDone) }()
	var ordOK, ordRefused atomic.Int64
	var owg sync.WaitGroup
	for i := 0; i < ordinary; i++ {
		owg.Add(1)
		go func() {
			defer owg.Done()
			var c *smtp.Client
			// An ordinary sender's pace: 10 messages a second each, 500
			// for the 50, whatever the machine. Unpaced they filled the
			// queue at 650 to 2 000 msg/s depending on the machine's
			// speed, and JetStream's cache of the blocks just written
			// (its part of the overhead) grows with that rate.
			pace := time.NewTicker(100 * time.Millisecond)
			defer pace.Stop()
			for k := 0; ; k++ {
				select {
				case <-floodDone:
					if c != nil {
						c.Quit()
					}
					return
				default:
				}
				select {
				case <-pace.C:
				case <-floodDone:
					continue
				}
				if c == nil {
					var err error
					if c, err = dial(p.smtp); err != nil {
						note(&others, fmt.Sprintf("ordinary %d: %v", i, err))
						time.Sleep(100 * time.Millisecond)
						continue
					}
				}
				id, err := sendOne(t.Context(), c, "sender@example.org", []string{fmt.Sprintf("user%d@example.test", i)},
					[]byte(fmt.Sprintf("Subject: ordinary %d/%d\r\n\r\nhello\r\n", i, k)))
				var se *smtp.SMTPError
				switch {
				case err == nil:
					ordOK.Add(1)
					note(&queued, id)
				case errors.As(err, &se) && se.Code == 451 && se.EnhancedCode == smtp.EnhancedCode{4, 3, 1}:
					ordRefused.Add(1)
					if c.Reset() != nil {
						c.Close()
						c = nil
					}
				default:
					note(&others, fmt.Sprintf("ordinary %d/%d: %v", i, k, err))
					c.Close()
					c = nil
				}
			}
		}()
	}
	began := time.Now()
	if dir := os.Getenv("MXQ_FLOOD_PROFILE"); dir != "" {
		// Heap profiles and memory figures during the run, to see what
		// the memory beside the budget is.
		go func() {
			for _, at := range []time.Duration{10 * time.Second, 20 * time.Second, 30 * time.Second, 38 * time.Second} {
				time.Sleep(time.Until(began.Add(at)))
				req, _ := http.NewRequest("GET", n.admin+"/debug/pprof/heap", nil)
				req.Header.Set("Authorization", "Bearer "+cliToken)
				if resp, err := http.DefaultClient.Do(req); err == nil {
					b, _ := io.ReadAll(resp.Body)
					resp.Body.Close()
					os.WriteFile(filepath.Join(dir, fmt.Sprintf("heap-%d.pb.gz", at/time.Second)), b, 0o644)
				}
				if resp, err := http.Get(n.admin + "/metrics"); err == nil {
					b, _ := io.ReadAll(resp.Body)
					resp.Body.Close()
					st, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
					os.WriteFile(filepath.Join(dir, fmt.Sprintf("metrics-%d.txt", at/time.Second)), append(st, b...), 0o644)
				}
			}
		}()
	}
	owg.Wait()
	took := time.Since(began)
	close(sampling)
	<-sampled
	peak := peakRSS.Load()
	var b strings.Builder
	for i := 0; i < len(series); i += 20 {
		fmt.Fprintf(&b, "%d ", series[i])
	}
	t.Logf("mxq RSS (MiB) each second: %s", b.String())
	hwm := rssKiB(t, pid, "VmHWM")

	t.Logf("flood of %d × 4 MiB then 1 KiB/s: %d queued, %d refused with 451 4.3.1, %d failed; in %v",
		floods, floodOK.Load(), floodRefused.Load(), floodFailed.Load(), took.Round(time.Second))
	t.Logf("ordinary senders (%d): %d answered 250, %d answered 451 4.3.1", ordinary, ordOK.Load(), ordRefused.Load())
	t.Logf("mxq RSS: %d MiB at rest, peak %d MiB sampled (high-water mark %d MiB); budget %d MiB + overhead %d MiB allowed",
		baseRSS>>10, peak>>10, hwm>>10, floodBudgetMiB, floodOverheadMiB)

	if len(others) > 0 {
		t.Errorf("%d replies neither 250 nor 451 4.3.1, e.g.:\n%s", len(others), strings.Join(others[:min(len(others), 10)], "\n"))
	}
	if limit := int64(floodBudgetMiB+floodOverheadMiB) << 10; peak > limit {
		t.Errorf("RSS peaked at %d MiB, over budget + overhead (%d MiB)", peak>>10, limit>>10)
	}
	if floodRefused.Load() == 0 {
		t.Error("the flood never met the budget: no message refused")
	}
	if ordOK.Load() == 0 {
		t.Error("no ordinary message got through the whole flood")
	}

	// Every 250 is in the queue; nothing is reserved any more.
	eventually(t, "the budget empty once the sessions are gone", func() bool {
		m := n.scrape()
		return m["mxq_smtp_memory_in_use_bytes"] == 0
	})
	m := n.scrape()
	if m["mxq_smtp_memory_budget_bytes"] != floodBudgetMiB<<20 || m["mxq_smtp_memory_refusals_total"] < float64(floodRefused.Load()+ordRefused.Load()) ||
		m["mxq_smtp_memory_waits_total"] < m["mxq_smtp_memory_refusals_total"] {
		t.Errorf("memory metrics: budget %v, refusals %v (counted %d), waits %v", m["mxq_smtp_memory_budget_bytes"],
			m["mxq_smtp_memory_refusals_total"], floodRefused.Load()+ordRefused.Load(), m["mxq_smtp_memory_waits_total"])
	}
	t.Logf("metrics: %v waits, %v refusals, %v chunks stored early", m["mxq_smtp_memory_waits_total"],
		m["mxq_smtp_memory_refusals_total"], m["mxq_smtp_memory_spills_total"])
	inQueue := map[string]bool{}
	for _, it := range n.ls("queue", "ls", "--all") {
		inQueue[it.ID] = true
	}
	missing := 0
	for _, id := range queued {
		if !inQueue[id] {
			missing++
		}
	}
	if missing > 0 || len(inQueue) != len(queued) {
		t.Errorf("%d of %d messages answered 250 missing from the queue (%d listed)", missing, len(queued), len(inQueue))
	}
	log, _ := os.ReadFile(p.logPath)
	if !strings.Contains(string(log), "memory budget used up") {
		t.Error("no line in the log says the memory budget was used up")
	}
}

// floodSession sends one message: burst at once, then a line at a time at
// rate bytes/s for trickle, then the end of data. It returns the reply.
func floodSession(addr string, burst []byte, line string, trickle time.Duration, rate int) (id string, code int, err error) {
	c, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		return "", 0, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(90 * time.Second))
	rd := bufio.NewReader(c)
	reply := func() (string, error) {
		for {
			l, err := rd.ReadString('\n')
			if err != nil {
				return l, err
			}
			if len(l) < 4 || l[3] != '-' {
				return strings.TrimRight(l, "\r\n"), nil
			}
		}
	}
	if l, err := reply(); err != nil || !strings.HasPrefix(l, "220") {
		return "", 0, fmt.Errorf("greeting %q: %v", l, err)
	}
	for _, cmd := range []string{"EHLO flood.example.org", "MAIL FROM:<flood@example.org>", "RCPT TO:<victim@example.test>", "DATA"} {
		fmt.Fprintf(c, "%s\r\n", cmd)
		if l, err := reply(); err != nil || !(strings.HasPrefix(l, "250") || strings.HasPrefix(l, "354")) {
			return "", 0, fmt.Errorf("%s: %q %v", cmd, l, err)
		}
	}
	for off := 0; off < len(burst); off += 64 << 10 {
		if _, err := c.Write(burst[off:min(off+64<<10, len(burst))]); err != nil {
			return "", 0, fmt.Errorf("burst: %w", err)
		}
	}
	every := time.Duration(float64(len(line)) / float64(rate) * float64(time.Second))
	for end := time.Now().Add(trickle); time.Now().Before(end); {
		time.Sleep(every)
		if _, err := c.Write([]byte(line)); err != nil {
			return "", 0, fmt.Errorf("trickle: %w", err)
		}
	}
	fmt.Fprintf(c, ".\r\n")
	l, err := reply()
	if err != nil {
		return "", 0, fmt.Errorf("end of data: %q %w", l, err)
	}
	fmt.Fprintf(c, "QUIT\r\n")
	switch {
	case strings.HasPrefix(l, "250 "):
		i := strings.Index(l, "queued as ")
		if i < 0 {
			return "", 0, fmt.Errorf("250 without an ID: %q", l)
		}
		return strings.TrimSpace(l[i+len("queued as "):]), 250, nil
	case strings.HasPrefix(l, "451 4.3.1 "):
		return "", 451, nil
	}
	return "", 0, fmt.Errorf("end of data: %q", l)
}
