package main

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"
)

// Options is one run of the benchmark.
type Options struct {
	N          int    // the backlog of the last step
	Steps      []int  // backlogs to measure at, ascending; the last is N
	Continuity []bool // settings to run, one mxq process each
	Sessions   int    // concurrent SMTP sessions of the load
	Size       int    // bytes per message
	PerUser    int    // messages per recipient by the end (users = N / PerUser)
	Tries      int    // of each query per step (the median is reported)
	Timeout    time.Duration
	// RestartEveryStep restarts the node (kill -9) at every step, not
	// only at the last.
	RestartEveryStep bool
	// HeldDue runs the test "N/5 held, 10 k due" after the drain.
	HeldDue bool
	// DueCount is how many due messages that test sends.
	DueCount int
	// BaselineRounds is how many times the first step's backlog is
	// drained (and sent again); the median rate is the reference.
	BaselineRounds int
	// DrainWindow bounds the window the drain rate at N is measured over.
	DrainWindow time.Duration
	Repo        string    // the mxq source tree to build
	Work        string    // where the work directory is made; "" = $TMPDIR
	Keep        bool      // keep Work (logs, data)
	Log         io.Writer `json:"-"` // progress
}

// DefaultSteps are the backlogs measured up to n: 10 k, then 1-2-5 steps.
func DefaultSteps(n int) []int {
	var s []int
	for _, x := range []int{10_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_000_000, 5_000_000, 10_000_000} {
		if x < n {
			s = append(s, x)
		}
	}
	return append(s, n)
}

func (o *Options) defaults() {
	if o.Sessions == 0 {
		o.Sessions = 32
	}
	if o.Size == 0 {
		o.Size = 2048
	}
	if o.PerUser == 0 {
		o.PerUser = 40
	}
	if o.Tries == 0 {
		o.Tries = 5
	}
	if o.Timeout == 0 {
		o.Timeout = 60 * time.Second
	}
	if o.DueCount == 0 {
		o.DueCount = 10_000
	}
	if o.BaselineRounds == 0 {
		o.BaselineRounds = 3
	}
	if o.DrainWindow == 0 {
		o.DrainWindow = 60 * time.Second
	}
	if len(o.Steps) == 0 {
		o.Steps = DefaultSteps(o.N)
	}
	if len(o.Continuity) == 0 {
		o.Continuity = []bool{true, false}
	}
	if o.Log == nil {
		o.Log = io.Discard
	}
}

// Run builds mxq and runs every continuity setting in turn.
func Run(ctx context.Context, o Options) (*Report, error) {
	o.defaults()
	if o.N != o.Steps[len(o.Steps)-1] || !slices.IsSorted(o.Steps) || o.Steps[0] < knownCount {
		return nil, fmt.Errorf("steps %v: want ascending backlogs of at least %d, the last being N = %d", o.Steps, knownCount, o.N)
	}
	rep := &Report{Options: o, Start: time.Now(), Machine: machine(), LoadStart: loadavg()}
	rep.Commit = gitDescribe(o.Repo)
	// A new directory of our own (under Work, if given), so that only it
	// is removed at the end.
	if o.Work != "" {
		if err := os.MkdirAll(o.Work, 0o755); err != nil {
			return nil, err
		}
	}
	work, err := os.MkdirTemp(o.Work, "mxq-scale-")
	if err != nil {
		return nil, err
	}
	if o.Keep {
		fmt.Fprintf(o.Log, "work directory (kept): %s\n", work)
	} else {
		defer os.RemoveAll(work)
	}
	rep.Machine.Filesystem = filesystem(work)

	bin := filepath.Join(work, "mxq")
	logf(o.Log, "building mxq %s", rep.Commit)
	build := exec.CommandContext(ctx, "go", "build", "-o", bin, "./cmd/mxq")
	build.Dir = o.Repo
	if out, err := build.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("go build ./cmd/mxq: %v\n%s", err, out)
	}
	for _, cont := range o.Continuity {
		dir := filepath.Join(work, "continuity-"+onOff(cont))
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return nil, err
		}
		res := runSetting(ctx, o, bin, dir, cont)
		rep.Settings = append(rep.Settings, res)
		if !o.Keep { // 2.5 KiB a message: 12 GiB at 5 M
			os.RemoveAll(filepath.Join(dir, "data"))
		}
		if ctx.Err() != nil {
			break
		}
	}
	rep.End = time.Now()
	rep.LoadEnd = loadavg()
	return rep, nil
}

func onOff(b bool) string {
	if b {
		return "on"
	}
	return "off"
}

func logf(w io.Writer, format string, args ...any) {
	fmt.Fprintf(w, "[%s] %s\n", time.Now().Format("15:04:05"), fmt.Sprintf(format, args...))
}

// StepResult is one backlog step.
type StepResult struct {
	Step     int        // the nominal backlog
	Queued   uint64     // records in the queue after the fill (status)
	Load     loadResult // the step's fill
	RSS, HWM float64    // MiB, after the fill and rssSettle
	DataMiB  float64    // the data directory's size
	Queries  map[string]latency
	Restart  *RestartResult // nil: not restarted at this step
}

// RestartResult is kill -9 and a start on the same data: the times from
// the new process's exec until SMTP accepted a message (250) and until an
// IMAP LOGIN + SELECT showed the known user's mail.
type RestartResult struct {
	SMTP, IMAP       time.Duration
	SMTPErr, IMAPErr string
}

// DrainResult is a drain into the sink, rated over a window of its
// deliveries by the sink's clock.
type DrainResult struct {
	Due       int           // messages to deliver (the queue minus held ones)
	Delivered int           // distinct queue IDs that arrived
	Total     time.Duration // from the store's return to the last delivery
	Window    time.Duration
	InWindow  int
	Rate      float64 // deliveries per second in the window
	// Series is the delivery rate (msg/s) in buckets of Bucket from the
	// store's return: the ramp, the plateau, the kill -9.
	Series []float64
	Bucket time.Duration
	Err    string
}

// series fills d.Series from the sorted delivery times, from t0 on, in
// buckets of whole seconds (at most about 40 of them).
func (d *DrainResult) series(times []int64, t0 time.Time) {
	if len(times) == 0 {
		return
	}
	span := time.Duration(times[len(times)-1] - t0.UnixNano())
	d.Bucket = max(time.Second, (span / 40).Round(time.Second))
	n := int(span/d.Bucket) + 1
	counts := make([]int, n)
	for _, t := range times {
		if k := int(time.Duration(t-t0.UnixNano()) / d.Bucket); k >= 0 && k < n {
			counts[k]++
		}
	}
	d.Series = make([]float64, n)
	for i, c := range counts {
		d.Series[i] = float64(c) / d.Bucket.Seconds()
	}
}

// HoldResult is the bulk hold by filter.
type HoldResult struct {
	Filter  string
	Matched int
	Done    int
	Time    time.Duration
	PeakRSS float64 // MiB, sampled every 100 ms during the hold
	BaseRSS float64 // MiB, just before
	Err     string
}

// RecoveryResult is kill -9 during the drain at N.
type RecoveryResult struct {
	PreRate float64       // the drain rate before the kill
	First   time.Duration // restart to the first delivery
	// AtSpeed is from the restart to the start of the first 5 s in which
	// the deliveries averaged at least 0.9 × PreRate.
	AtSpeed time.Duration
	SMTP    time.Duration // restart to a 250
	// PostRate is the rate from AtSpeed on, over PostCount deliveries in
	// PostWindow (at most DrainWindow, and up to 90 % of the due mail).
	PostRate   float64
	PostCount  int
	PostWindow time.Duration
	Err        string
	restart    time.Time
}

// SettingResult is one continuity setting's run.
type SettingResult struct {
	Continuity bool
	Steps      []StepResult
	Baseline   DrainResult // the first step's backlog drained whole: the median round
	// BaselineRounds are the drains of the first step's backlog.
	BaselineRounds []DrainResult
	Refill         loadResult // the first step's backlog again after it
	Hold           *HoldResult
	Drain          *DrainResult // at N, with the held messages left in the queue
	Recovery       *RecoveryResult
	HeldDue        *DrainResult // DueCount new messages beside the held ones
	MaxRSS         float64      // MiB, sampled every 100 ms over the whole run
	MaxRSSAt       string       // in which phase
	Accepted       int          // 250s in the whole run
	Distinct       int          // distinct queue IDs the store got
	Dups           int          // deliveries of a queue ID already delivered
	Left           uint64       // records in the queue at the end (the held ones)
	LeftKnown      bool         // the node answered at the end
	Held           int
	Duration       time.Duration
	Err            string  // why the run stopped early
	Crashes        []Crash // mxq exiting on its own (it is restarted, up to 3 times)
	Notes          []string
}

// Lost is what was accepted and neither delivered nor still queued;
// meaningful only for a run that finished. It is negative when mxq stored
// more than the load counted as accepted: when a crash cut the
// connections, a message may be stored with its 250 lost, and the load
// sends it again, as any sender would.
func (r *SettingResult) Lost() int { return r.Accepted - r.Distinct - int(r.Left) }

// rssSampler follows the node's VmRSS every 100 ms: the maximum over the
// run (and in which phase), and the maximum since the last mark.
type rssSampler struct {
	mu             sync.Mutex
	n              *node
	phase          string
	max, sinceMark float64
	maxPhase       string
	stop           chan struct{}
	done           chan struct{}
}

func startSampler(n *node) *rssSampler {
	s := &rssSampler{n: n, stop: make(chan struct{}), done: make(chan struct{}), phase: "start"}
	go func() {
		defer close(s.done)
		t := time.NewTicker(100 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-s.stop:
				return
			case <-t.C:
			}
			rss, _ := memory(s.n.pid())
			s.mu.Lock()
			if rss > s.max {
				s.max, s.maxPhase = rss, s.phase
			}
			s.sinceMark = max(s.sinceMark, rss)
			s.mu.Unlock()
		}
	}()
	return s
}

func (s *rssSampler) setPhase(p string) {
	s.mu.Lock()
	s.phase = p
	s.mu.Unlock()
}

// mark starts a new "since mark" maximum and returns the old one.
func (s *rssSampler) mark() float64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	m := s.sinceMark
	s.sinceMark = 0
	return m
}

func (s *rssSampler) close() (float64, string) {
	close(s.stop)
	<-s.done
	return s.max, s.maxPhase
}

// setting carries one continuity setting's run.
type setting struct {
	o    Options
	ctx  context.Context
	res  *SettingResult
	node *node
	sink *sink
	gen  *mailGen
	rss  *rssSampler
	held int
	// gaveUp is set once the node is left dead (too many crashes).
	gaveUp error
}

func (s *setting) logf(format string, args ...any) {
	logf(s.o.Log, "continuity %s: %s", onOff(s.res.Continuity), fmt.Sprintf(format, args...))
}

func (s *setting) note(format string, args ...any) {
	s.res.Notes = append(s.res.Notes, fmt.Sprintf(format, args...))
	s.logf("note: "+format, args...)
}

// runSetting is the whole run for one continuity setting. An error stops
// it early; what was measured until then is kept.
func runSetting(ctx context.Context, o Options, bin, dir string, cont bool) *SettingResult {
	res := &SettingResult{Continuity: cont}
	start := time.Now()
	s := &setting{o: o, ctx: ctx, res: res, sink: newSink(freePort())}
	s.gen = newMailGen(o.N/o.PerUser, o.Steps[0], o.Size)
	defer s.sink.down()
	var err error
	if s.node, err = newNode(bin, dir, s.sink.addr, cont); err != nil {
		res.Err = err.Error()
		return res
	}
	s.logf("starting mxq (store down), SMTP %s, admin %s, IMAP %q", s.node.smtp, s.node.admin, s.node.imap)
	if err := s.node.start(2 * time.Minute); err != nil {
		res.Err = err.Error()
		return res
	}
	s.rss = startSampler(s.node)
	defer s.node.stop()

	if err := s.run(); err != nil {
		res.Err = err.Error()
		s.logf("stopped early: %v", err)
	}
	res.MaxRSS, res.MaxRSSAt = s.rss.close()
	_, res.Distinct, res.Dups = s.sink.counts()
	if s.sink.noID > 0 {
		s.note("%d messages reached the store without mxq's Received header (not counted as delivered)", s.sink.noID)
	}
	if st, err := s.node.status(context.Background()); err == nil {
		res.Left, res.LeftKnown = st.Queue.Messages, true
	} else if res.Err == "" {
		res.Err = "final status: " + err.Error()
	}
	res.Held = s.held
	res.Duration = time.Since(start)
	return res
}

func (s *setting) run() error {
	o := s.o
	prev := 0
	showID := ""
	for k, step := range o.Steps {
		if err := s.ctx.Err(); err != nil {
			return err
		}
		last := k == len(o.Steps)-1
		s.rss.setPhase(fmt.Sprintf("fill to %d", step))
		s.logf("step %d: sending messages %d..%d", step, prev, step)
		load, err := s.sendAll(&batch{lo: prev, hi: step}, fmt.Sprintf("s%d", step), fmt.Sprintf("fill to %d", step))
		if err != nil {
			return err
		}
		if showID == "" {
			showID = load.FirstID
		}
		s.logf("step %d: %d accepted in %v: %.0f msg/s", step, load.Accepted, load.Elapsed.Round(time.Millisecond), load.rate())
		r := StepResult{Step: step, Load: load}
		s.rss.setPhase(fmt.Sprintf("queries at %d", step))
		// Settle, so that RSS says what the backlog costs, not what the
		// fill that just ended did: JetStream keeps the blocks it wrote in
		// memory until they are 10 s unused. (The peak during the fill is
		// in the run's maximum RSS.)
		time.Sleep(rssSettle)
		if err := s.node.collectGarbage(s.ctx); err != nil {
			s.note("step %d: garbage collection before RSS: %v", step, err)
		}
		time.Sleep(time.Second)
		r.RSS, r.HWM = memory(s.node.pid())
		r.DataMiB = dirMiB(filepath.Join(s.node.dir, "data"))
		if st, err := s.node.status(s.ctx); err == nil {
			r.Queued = st.Queue.Messages
		} else {
			s.note("step %d: status: %v", step, err)
		}
		r.Queries = s.node.measureQueries(&stepState{known: s.gen.knownTotal(), showID: showID}, o.Tries, o.Timeout)
		if err := s.checkAlive(fmt.Sprintf("queries at %d", step)); err != nil {
			return err
		}
		for _, name := range queryNames {
			if l := r.Queries[name]; l.Note != "" || (l.Err != "" && l.Err != "off" && l.Err != "timeout") {
				s.note("step %d: %s: %s%s", step, name, l.Note, l.Err)
			}
		}
		s.logf("step %d: queued %d, RSS %.0f MiB, data %.0f MiB, queries %s", step, r.Queued, r.RSS, r.DataMiB, fmtQueries(r.Queries))
		if o.RestartEveryStep || last {
			s.rss.setPhase(fmt.Sprintf("restart at %d", step))
			rr, err := s.restart()
			if err != nil {
				return err
			}
			r.Restart = rr
			s.logf("step %d: restart: SMTP %v, IMAP %v %s%s", step, rr.SMTP.Round(time.Millisecond), rr.IMAP.Round(time.Millisecond), rr.SMTPErr, rr.IMAPErr)
		}
		s.res.Steps = append(s.res.Steps, r)

		if k == 0 {
			// The drain rate at the first backlog, the median of
			// BaselineRounds drains (each short, and the drain's rate
			// swings): the whole backlog delivered, then the store down
			// again and the same backlog sent again, so that the next
			// step starts from it.
			for round := 1; round <= o.BaselineRounds; round++ {
				s.rss.setPhase(fmt.Sprintf("drain of %d", step))
				s.logf("drain of the first backlog (%d), round %d of %d", step, round, o.BaselineRounds)
				d, err := s.drainAll(0.1, 0.9)
				if err != nil {
					return err
				}
				s.res.BaselineRounds = append(s.res.BaselineRounds, *d)
				rounds := slices.Clone(s.res.BaselineRounds)
				slices.SortFunc(rounds, func(a, b DrainResult) int { return cmp.Compare(a.Rate, b.Rate) })
				s.res.Baseline = rounds[(len(rounds)-1)/2]
				s.logf("drain of %d: %.0f msg/s (%d in %v), all in %v %s", step, d.Rate, d.InWindow, d.Window.Round(time.Millisecond), d.Total.Round(time.Millisecond), d.Err)
				s.sink.down()
				s.rss.setPhase(fmt.Sprintf("refill of %d", step))
				refill, err := s.sendAll(&batch{lo: 0, hi: step}, "refill", "refill")
				if err != nil {
					return err
				}
				s.res.Refill = refill
				showID = refill.FirstID
				s.logf("refill of %d: %.0f msg/s", step, refill.rate())
			}
		}
		prev = step
	}

	// At N, the store still down: hold a fifth of the queue by sender.
	s.rss.setPhase("hold")
	h := s.hold()
	s.res.Hold = h
	if err := s.checkAlive("hold"); err != nil {
		return err
	}
	s.logf("hold --from %s: %d of %d matched in %v, peak RSS %.0f MiB %s", bulkSender, h.Done, h.Matched, h.Time.Round(time.Millisecond), h.PeakRSS, h.Err)

	// The store back: the drain at N around the held messages, a kill -9
	// in the middle, and the rest.
	s.rss.setPhase(fmt.Sprintf("drain at %d", o.N))
	if err := s.drainAtN(); err != nil {
		return err
	}
	if o.HeldDue {
		s.rss.setPhase("held+due")
		s.sink.down()
		s.logf("held+due: sending %d new messages beside %d held ones", o.DueCount, s.held)
		base := o.N + 1_000_000 // indices of their own: not the known user's
		if _, err := s.sendAll(&batch{lo: base, hi: base + o.DueCount}, "due", "held+due"); err != nil {
			return err
		}
		time.Sleep(2 * time.Second)
		d, err := s.drainAll(0.1, 0.9)
		if err != nil {
			return err
		}
		s.res.HeldDue = d
		s.logf("held+due: %.0f msg/s (%d in %v) %s", d.Rate, d.InWindow, d.Window.Round(time.Millisecond), d.Err)
	}
	return nil
}

func fmtQueries(q map[string]latency) string {
	var b strings.Builder
	for _, name := range queryNames {
		if l := q[name]; l.Err != "off" {
			fmt.Fprintf(&b, "%s %s ms, ", name, l)
		}
	}
	return strings.TrimSuffix(b.String(), ", ")
}

// restart kills the node with SIGKILL, starts it on the same data and
// measures how long until it accepts mail and serves the IMAP view.
func (s *setting) restart() (*RestartResult, error) {
	s.node.kill()
	t0 := time.Now()
	if err := s.node.launch(); err != nil {
		return nil, err
	}
	rr := &RestartResult{}
	ctx, cancel := context.WithTimeout(s.ctx, 5*time.Minute)
	defer cancel()
	var wg sync.WaitGroup
	if s.node.imap != "" {
		wg.Add(1)
		go func() {
			defer wg.Done()
			at, err := s.node.untilIMAP(ctx, s.gen.knownTotal())
			if err != nil {
				rr.IMAPErr = "timeout"
				return
			}
			rr.IMAP = at.Sub(t0)
		}()
	}
	at, err := s.node.untilSMTP(ctx, s.gen)
	if err != nil {
		rr.SMTPErr = "timeout"
	} else {
		rr.SMTP = at.Sub(t0)
		s.res.Accepted++ // the probe message
	}
	wg.Wait()
	if rr.SMTPErr != "" && s.node.alive() {
		return nil, fmt.Errorf("mxq accepted no mail within 5 minutes of its restart (log: %s)", s.node.logPath)
	}
	return rr, s.checkAlive("restart")
}

// hold holds every message from the bulk sender (a fifth of the queue)
// with one bulk action, timing it and sampling the node's memory.
func (s *setting) hold() *HoldResult {
	h := &HoldResult{Filter: "--from " + bulkSender}
	h.BaseRSS, _ = memory(s.node.pid())
	s.rss.mark()
	ctx, cancel := context.WithTimeout(s.ctx, 30*time.Minute)
	defer cancel()
	var r resultDoc
	t0 := time.Now()
	err := s.node.call(ctx, "POST", "/api/v1/queue/hold", map[string]any{
		"filter": map[string]string{"from": bulkSender}, "reason": "scale benchmark",
	}, &r)
	h.Time = time.Since(t0)
	time.Sleep(200 * time.Millisecond) // one more sample
	h.PeakRSS = s.rss.mark()
	h.Matched, h.Done = r.Matched, r.Done
	s.held = r.Done
	switch {
	case errors.Is(err, context.DeadlineExceeded):
		h.Err = "timeout"
	case err != nil:
		h.Err = err.Error()
	case len(r.Errors) > 0:
		h.Err = strings.Join(r.Errors, "; ")
	}
	return h
}

// due is how many queued messages the drain has to deliver: the queue
// minus the held ones.
func (s *setting) due() (int, error) {
	st, err := s.node.status(s.ctx)
	if err != nil {
		return 0, err
	}
	return int(st.Queue.Messages) - s.held, nil
}

// drainAll brings the store up and waits until every due message arrived;
// the rate is over the deliveries from the lo-th to the hi-th fraction
// (the first drain: the middle 80 %, without the ramp and the tail).
func (s *setting) drainAll(lo, hi float64) (*DrainResult, error) {
	due, err := s.due()
	if err != nil {
		return nil, err
	}
	d := &DrainResult{Due: due}
	s.sink.resetTimes()
	_, d0, _ := s.sink.counts()
	t0 := time.Now()
	if err := s.sink.up(); err != nil {
		return nil, err
	}
	if err := s.waitDelivered(d0, due, nil); isFatal(err) {
		return nil, err
	} else if err != nil {
		d.Err = err.Error()
	}
	_, d1, _ := s.sink.counts()
	d.Delivered = d1 - d0
	times := s.sink.snapshot()
	if len(times) > 0 {
		d.Total = time.Duration(times[len(times)-1] - t0.UnixNano())
	}
	k0, k1 := int(lo*float64(due)), int(hi*float64(due))-1
	d.Rate, d.InWindow, d.Window = windowRate(times, k0, k1, 0)
	d.series(times, t0)
	return d, s.settle()
}

// waitDelivered waits until want more distinct messages than d0 arrived,
// or nothing arrived for two minutes; until returns true to stop early.
func (s *setting) waitDelivered(d0, want int, until func() bool) error {
	last, lastAt := -1, time.Now()
	for {
		_, d, _ := s.sink.counts()
		if d-d0 >= want {
			return nil
		}
		if until != nil && until() {
			return nil
		}
		if d != last {
			last, lastAt = d, time.Now()
		} else if time.Since(lastAt) > 2*time.Minute {
			return fmt.Errorf("stalled: %d of %d delivered, nothing for 2 min", d-d0, want)
		}
		if err := s.checkAlive("drain"); err != nil {
			return err
		}
		if err := s.ctx.Err(); err != nil {
			return err
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// windowRate is the delivery rate between the k0-th and the k1-th
// delivery (sorted times), the window cut at maxDur when that is set; it
// returns the rate, the deliveries in the window and its length.
func windowRate(times []int64, k0, k1 int, maxDur time.Duration) (float64, int, time.Duration) {
	k1 = min(k1, len(times)-1)
	k0 = max(k0, 0)
	if k1 <= k0 {
		return 0, 0, 0
	}
	if maxDur > 0 {
		end := times[k0] + int64(maxDur)
		for k1 > k0 && times[k1] > end {
			k1--
		}
	}
	dur := time.Duration(times[k1] - times[k0])
	if dur <= 0 {
		return 0, 0, 0
	}
	return float64(k1-k0) / dur.Seconds(), k1 - k0, dur
}

// drainAtN is the drain of the full backlog (minus the held mail): the
// rate over a window once the ramp is done (from the delivery the first
// drain's window started at, for at most DrainWindow and at most to 60 %
// of the backlog), then kill -9, the time back to 0.9 × that rate, and the
// rest of the drain.
func (s *setting) drainAtN() error {
	due, err := s.due()
	if err != nil {
		return err
	}
	d := &DrainResult{Due: due}
	s.res.Drain = d
	k0 := min(int(0.1*float64(s.o.Steps[0])), due/10)
	k1 := int(0.6 * float64(due))
	s.sink.resetTimes()
	_, d0, _ := s.sink.counts()
	t0 := time.Now()
	s.logf("drain at %d: %d due, %d held; store up", s.o.N, due, s.held)
	if err := s.sink.up(); err != nil {
		return err
	}
	windowDone := func() bool {
		n, _, _ := s.sink.counts()
		if n > k1 {
			return true
		}
		if n > k0 {
			t := s.sink.snapshotAt(k0)
			return time.Since(time.Unix(0, t)) > s.o.DrainWindow
		}
		return false
	}
	if err := s.waitDelivered(d0, due, windowDone); isFatal(err) {
		return err
	} else if err != nil {
		d.Err = err.Error()
		return nil
	}
	times := s.sink.snapshot()
	d.Rate, d.InWindow, d.Window = windowRate(times, k0, k1, s.o.DrainWindow)
	s.logf("drain at %d: %.0f msg/s (%d in %v)", s.o.N, d.Rate, d.InWindow, d.Window.Round(time.Millisecond))

	// kill -9 in the middle of the drain.
	rec := &RecoveryResult{PreRate: d.Rate}
	s.res.Recovery = rec
	if _, dd, _ := s.sink.counts(); dd-d0 < due {
		from, _, _ := s.sink.counts()
		s.node.kill()
		tr := time.Now()
		rec.restart = tr
		if err := s.node.launch(); err != nil {
			return err
		}
		ctx, cancel := context.WithTimeout(s.ctx, 5*time.Minute)
		smtpDone := make(chan struct{})
		go func() {
			defer close(smtpDone)
			if at, err := s.node.untilSMTP(ctx, s.gen); err == nil {
				rec.SMTP = at.Sub(tr)
				s.res.Accepted++
			}
		}()
		rec.AtSpeed, rec.First, rec.Err = s.recovery(from, tr, d0, due, 0.9*d.Rate)
		<-smtpDone
		cancel()
		s.logf("kill -9 during the drain: first delivery after %v, at speed after %v %s", rec.First.Round(time.Millisecond), rec.AtSpeed.Round(time.Millisecond), rec.Err)
	} else {
		rec.Err = "drained before the kill"
	}

	if err := s.waitDelivered(d0, due, nil); isFatal(err) {
		return err
	} else if err != nil {
		d.Err = err.Error()
	}
	times = s.sink.snapshot()
	if len(times) > 0 {
		d.Total = time.Duration(times[len(times)-1] - t0.UnixNano())
	}
	d.series(times, t0)
	if rec.AtSpeed > 0 {
		// The rate once back at speed, over a window like the one before
		// the kill (up to 90 % of the due mail, so the tail is left out).
		at := rec.restart.Add(rec.AtSpeed).UnixNano()
		k0, _ := slices.BinarySearch(times, at)
		rec.PostRate, rec.PostCount, rec.PostWindow = windowRate(times, k0, int(0.9*float64(due))-1, s.o.DrainWindow)
	}
	_, d1, _ := s.sink.counts()
	d.Delivered = d1 - d0
	s.logf("drain at %d: all %d delivered in %v (after the restart: %.0f msg/s) %s", s.o.N, d.Delivered, d.Total.Round(time.Second), rec.PostRate, d.Err)
	return s.settle()
}

// settle waits (up to 30 s) until the queue holds only the held mail: a
// record is deleted after the store answered, so the last deletions
// trail the last delivery.
func (s *setting) settle() error {
	for i := 0; i < 300; i++ {
		if err := s.checkAlive("drain"); err != nil {
			return err
		}
		if st, err := s.node.status(s.ctx); err == nil && int(st.Queue.Messages) <= s.held {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return nil
}

// recoveryWindow is how long the drain must keep 0.9 × its rate before
// the kill to count as back at speed.
const recoveryWindow = 5 * time.Second

// recovery watches the deliveries after a restart at tr (the series from
// index from on) until recoveryWindow of them average at least target per
// second; it returns when that window began, the first delivery's time,
// and why it did not get there.
func (s *setting) recovery(from int, tr time.Time, d0, due int, target float64) (atSpeed, first time.Duration, why string) {
	if target <= 0 {
		return 0, 0, "no drain rate before the kill"
	}
	deadline := time.Now().Add(5 * time.Minute)
	need := max(int(target*recoveryWindow.Seconds()), 1)
	// The deliveries since the restart, read in chunks as they come; the
	// window [ts[j], ts[j]+recoveryWindow) holds ts[j:i], and is judged
	// once a later delivery shows it complete.
	var ts []int64
	i, j := 0, 0
	for {
		chunk, next := s.sink.tail(from, tr.UnixNano())
		from = next
		ts = append(ts, chunk...)
		if len(ts) > 0 && first == 0 {
			first = time.Duration(ts[0] - tr.UnixNano())
		}
		for j < len(ts) {
			end := ts[j] + int64(recoveryWindow)
			for i < len(ts) && ts[i] < end {
				i++
			}
			if i == len(ts) {
				break // not complete yet
			}
			if i-j >= need {
				return time.Duration(ts[j] - tr.UnixNano()), first, ""
			}
			j++
		}
		_, d, _ := s.sink.counts()
		if d-d0 >= due {
			return 0, first, "the queue emptied first"
		}
		if time.Now().After(deadline) {
			return 0, first, "not within 5 min"
		}
		if !s.node.alive() {
			return 0, first, "mxq crashed"
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// dirMiB is the size of the files under dir.
func dirMiB(dir string) float64 {
	var n int64
	filepath.WalkDir(dir, func(_ string, e os.DirEntry, err error) error {
		if err == nil && !e.IsDir() {
			if fi, err := e.Info(); err == nil {
				n += fi.Size()
			}
		}
		return nil
	})
	return float64(n) / (1 << 20)
}

// Crash is mxq exiting on its own during the run.
type Crash struct {
	Phase string
	What  string // the panic or fatal error, and mxq's first frame
}

// maxCrashes is how many crashes a setting's run survives.
const maxCrashes = 20

// fatal is an error that ends a setting's run.
type fatal struct{ error }

func isFatal(err error) bool {
	var f fatal
	return errors.As(err, &f)
}

// checkAlive restarts the node if it crashed (recording the crash); it
// fails (fatally) after maxCrashes, or if the restart fails.
func (s *setting) checkAlive(phase string) error {
	if s.node.alive() {
		return nil
	}
	if s.gaveUp != nil {
		return s.gaveUp
	}
	c := Crash{Phase: phase, What: crashCause(s.node.logPath)}
	s.res.Crashes = append(s.res.Crashes, c)
	s.logf("mxq CRASHED during %s: %s", phase, c.What)
	if len(s.res.Crashes) > maxCrashes {
		s.gaveUp = fatal{fmt.Errorf("mxq crashed %d times; the last during %s: %s", len(s.res.Crashes), phase, c.What)}
		return s.gaveUp
	}
	s.node.kill() // reap
	if err := s.node.start(5 * time.Minute); err != nil {
		s.gaveUp = fatal{fmt.Errorf("restarting mxq after its crash: %w", err)}
		return s.gaveUp
	}
	s.logf("mxq restarted after its crash")
	return nil
}

// sendAll sends a batch, restarting a crashed node and sending the rest.
func (s *setting) sendAll(b *batch, tag, phase string) (loadResult, error) {
	res := s.gen.send(s.ctx, s.node.smtp, s.o.Sessions, b, tag, s.node.alive)
	for res.Rest != nil {
		if err := s.checkAlive(phase); err != nil {
			s.res.Accepted += res.Accepted
			return res, err
		}
		res.add(s.gen.send(s.ctx, s.node.smtp, s.o.Sessions, res.Rest, tag, s.node.alive))
	}
	s.res.Accepted += res.Accepted
	if res.Failed > 0 {
		s.note("%s: %d messages not accepted after 3 tries (first error: %s)", phase, res.Failed, res.FirstErr)
	}
	return res, nil
}

// crashCause finds the last start's panic or fatal error in the log, and
// the first frame of mxq's own code under it.
func crashCause(logPath string) string {
	b, err := os.ReadFile(logPath)
	if err != nil {
		return "exited (no log)"
	}
	log := string(b)
	if i := strings.LastIndex(log, "=== scale: start"); i >= 0 {
		log = log[i:]
	}
	lines := strings.Split(log, "\n")
	for i, l := range lines {
		if strings.HasPrefix(l, "panic: ") || strings.HasPrefix(l, "fatal error: ") {
			what := l
			for _, f := range lines[i+1:] {
				if strings.HasPrefix(f, "github.com/mxq-dev/mxq/") {
					what += " in " + strings.TrimSpace(f)
					break
				}
			}
			return what
		}
	}
	if n := len(lines); n > 0 {
		return "exited; last log line: " + strings.TrimSpace(lines[max(n-2, 0)])
	}
	return "exited"
}

// rssSettle is how long a step waits after its fill before it reads RSS.
const rssSettle = 12 * time.Second
