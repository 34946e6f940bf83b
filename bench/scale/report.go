package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"time"
)

// Report is a whole run.
type Report struct {
	Options    Options
	Commit     string
	Machine    Machine
	Start, End time.Time
	LoadStart  string
	LoadEnd    string
	Settings   []*SettingResult
}

// Machine is where the run happened.
type Machine struct {
	CPU        string
	Cores      int
	Kernel     string
	Filesystem string
	Go         string
}

func machine() Machine {
	m := Machine{Cores: runtime.NumCPU(), Go: runtime.Version()}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPU = strings.TrimSpace(v)
				break
			}
		}
	}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m.Kernel = strings.TrimSpace(string(b))
	}
	return m
}

// filesystem names the file system dir is on: type and device of the
// longest mount point above it.
func filesystem(dir string) string {
	abs, err := filepath.EvalSymlinks(dir)
	if err != nil {
		abs = dir
	}
	b, err := os.ReadFile("/proc/mounts")
	if err != nil {
		return "?"
	}
	best, out := -1, "?"
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 3 {
			continue
		}
		mp := f[1]
		if (abs == mp || strings.HasPrefix(abs, strings.TrimSuffix(mp, "/")+"/")) && len(mp) > best {
			best, out = len(mp), fmt.Sprintf("%s on %s (mounted at %s)", f[2], f[0], mp)
		}
	}
	return out
}

func loadavg() string {
	b, _ := os.ReadFile("/proc/loadavg")
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}

func gitDescribe(repo string) string {
	out, err := exec.Command("git", "-C", repo, "describe", "--always", "--dirty").Output()
	if err != nil {
		return "unknown"
	}
	return strings.TrimSpace(string(out))
}

// The targets of issue 16.
const (
	targetRatio       = 0.9
	targetQueryMS     = 100
	targetRSSOn       = 400
	targetRSSOff      = 200
	targetHold        = 60 * time.Second
	targetRestartSMTP = 5 * time.Second
	targetRestartSlow = 30 * time.Second
)

// Ratios are the figures the targets name, for one setting.
type Ratios struct {
	Accept  float64 // accept at N / accept at the first step
	Drain   float64 // drain at N / drain at the first step
	HeldDue float64 // due beside held / drain at the first step
	// Steady is accept at N / accept at the first step of at least
	// steadyStep, and SteadyStep that step (0: none). Under a sustained
	// load JetStream's duplicate window (2 minutes of message IDs, some 80
	// MiB at 4 000 msg/s) fills, and the collector's work with it: the first
	// steps run before that, the later ones after.
	Steady     float64
	SteadyStep int
}

// steadyStep is the first backlog measured in steady state: about two
// minutes of filling at this machine's rate.
const steadyStep = 250_000

func (r *SettingResult) Ratios() Ratios {
	var x Ratios
	if len(r.Steps) > 1 && r.Steps[0].Load.rate() > 0 {
		x.Accept = r.Steps[len(r.Steps)-1].Load.rate() / r.Steps[0].Load.rate()
	}
	for _, st := range r.Steps[:max(len(r.Steps)-1, 0)] {
		if st.Step >= steadyStep && st.Load.rate() > 0 {
			x.Steady = r.Steps[len(r.Steps)-1].Load.rate() / st.Load.rate()
			x.SteadyStep = st.Step
			break
		}
	}
	if b := r.Baseline.Rate; b > 0 {
		if r.Drain != nil {
			x.Drain = r.Drain.Rate / b
		}
		if r.HeldDue != nil {
			x.HeldDue = r.HeldDue.Rate / b
		}
	}
	return x
}

func num(n int) string {
	s := fmt.Sprint(n)
	var b strings.Builder
	for i, c := range s {
		if i > 0 && (len(s)-i)%3 == 0 && s[0] != '-' {
			b.WriteString(" ")
		}
		b.WriteRune(c)
	}
	return b.String()
}

func secs(d time.Duration) string {
	if d == 0 {
		return "–"
	}
	if d < 10*time.Second {
		return fmt.Sprintf("%.2f", d.Seconds())
	}
	return fmt.Sprintf("%.1f", d.Seconds())
}

func verdict(ok bool) string {
	if ok {
		return "PASS"
	}
	return "**FAIL**"
}

// Markdown renders the report.
func (rep *Report) Markdown() string {
	var b strings.Builder
	o := rep.Options
	p := func(format string, args ...any) { fmt.Fprintf(&b, format+"\n", args...) }
	p("# mxq: one node at a growing backlog (bench/scale)")
	p("")
	p("| | |")
	p("|---|---|")
	p("| date | %s |", rep.Start.UTC().Format("2006-01-02 15:04 UTC"))
	p("| mxq | %s |", rep.Commit)
	p("| CPU | %d × %s |", rep.Machine.Cores, rep.Machine.CPU)
	p("| kernel | %s |", rep.Machine.Kernel)
	p("| data directory | %s |", rep.Machine.Filesystem)
	p("| Go | %s |", rep.Machine.Go)
	p("| load average at start / end | %s / %s |", rep.LoadStart, rep.LoadEnd)
	p("| duration | %s |", rep.End.Sub(rep.Start).Round(time.Second))
	p("| mail | %d B messages over SMTP, %d sessions, one message per connection; %s recipients (about %d messages each by the end) plus %s with %d; a fifth from %s |",
		o.Size, o.Sessions, num(max(o.N/o.PerUser, 1)), o.PerUser, knownUser, newMailGen(1, o.Steps[0], o.Size).knownTotal(), bulkSender)
	p("")
	p("Each step fills the queue to the backlog with the store down, waits %v (JetStream keeps the blocks it wrote cached for 10 s; the peak during the fill is in the maximum below), has mxq collect its garbage twice (what an idle process does by itself within minutes), reads VmRSS, then runs every query %d times, interleaved, and reports the median (ms, the HTTP request or the IMAP session; `timeout` after %v). `(!)` marks an answer that was wrong (see the notes). Restart: kill -9, start on the same data, seconds until a message is answered 250 and until an IMAP LOGIN + SELECT shows the known user's mail.", rssSettle, o.Tries, o.Timeout)
	for _, r := range rep.Settings {
		p("")
		p("## Continuity %s", onOff(r.Continuity))
		p("")
		p("| backlog | queued | accept msg/s | RSS MiB | HWM MiB | data MiB | status ms | ls ms | ls --to ms | show ms | IMAP login+list ms | restart: SMTP s | restart: IMAP s |")
		p("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
		for _, s := range r.Steps {
			rs, ri := "–", "–"
			if s.Restart != nil {
				rs, ri = secs(s.Restart.SMTP), secs(s.Restart.IMAP)
				if s.Restart.SMTPErr != "" {
					rs = s.Restart.SMTPErr
				}
				if s.Restart.IMAPErr != "" {
					ri = s.Restart.IMAPErr
				}
			}
			p("| %s | %s | %.0f | %.0f | %.0f | %.0f | %s | %s | %s | %s | %s | %s | %s |",
				num(s.Step), num(int(s.Queued)), s.Load.rate(), s.RSS, s.HWM, s.DataMiB,
				s.Queries["status"], s.Queries["ls"], s.Queries["ls_to"], s.Queries["show"], s.Queries["imap"], rs, ri)
		}
		p("")
		if len(r.Steps) > 0 && len(r.BaselineRounds) > 0 {
			first := r.Steps[0].Step
			bl := r.Baseline
			var rates []string
			for _, d := range r.BaselineRounds {
				rates = append(rates, fmt.Sprintf("%.0f", d.Rate))
			}
			p("- **Drain of the first backlog** (%s due), %d rounds: %s msg/s, median **%.0f msg/s** (each: deliveries 10 %% to 90 %% over the time between them, by the store's clock; the median round's %s in %s s, all delivered %s s after the store came back). After each, the store went down and the same %s messages were sent again (the last time at %.0f msg/s). %s",
				num(bl.Due), len(r.BaselineRounds), strings.Join(rates, ", "), bl.Rate, num(bl.InWindow), secs(bl.Window), secs(bl.Total), num(first), r.Refill.rate(), bl.Err)
			if len(bl.Series) > 0 {
				p("  The median round's deliveries per second, in %v buckets from the store's return: %s.", bl.Bucket, fmtSeries(bl.Series))
			}
		}
		if h := r.Hold; h != nil {
			p("- **Hold** `mxq queue hold %s` at %s: %s matched, %s held, in **%s s**; RSS %.0f MiB before, **peak %.0f MiB** during. %s",
				h.Filter, num(o.N), num(h.Matched), num(h.Done), secs(h.Time), h.BaseRSS, h.PeakRSS, h.Err)
		}
		if d := r.Drain; d != nil {
			p("- **Drain at %s** (%s due, %s held beside them): **%.0f msg/s** over %s deliveries in %s s (from the delivery the first drain's window started at, at most %v or to 60 %% of the due mail); all %s delivered %s s after the store came back. %s",
				num(o.N), num(d.Due), num(r.Held), d.Rate, num(d.InWindow), secs(d.Window), o.DrainWindow, num(d.Delivered), secs(d.Total), d.Err)
		}
		if d := r.Drain; d != nil && len(d.Series) > 0 {
			p("  Deliveries per second, in %v buckets from the store's return (the kill -9 included): %s.", d.Bucket, fmtSeries(d.Series))
		}
		if rc := r.Recovery; rc != nil {
			post := ""
			if rc.PostRate > 0 {
				post = fmt.Sprintf(" From then on: %.0f msg/s (%s deliveries in %s s), %.2f × the rate before the kill.", rc.PostRate, num(rc.PostCount), secs(rc.PostWindow), rc.PostRate/rc.PreRate)
			}
			p("- **kill -9 during that drain**, restarted at once: a message answered 250 after %s s, the first delivery after %s s; from **%s s** on, %v averaging ≥ 0.9 × %.0f msg/s (the rate before the kill).%s %s",
				secs(rc.SMTP), secs(rc.First), secs(rc.AtSpeed), recoveryWindow, rc.PreRate, post, rc.Err)
		}
		if d := r.HeldDue; d != nil {
			p("- **Held + due**: %s new messages beside %s held ones, store down then up: **%.0f msg/s** (10 %% to 90 %%: %s in %s s). %s",
				num(d.Due), num(r.Held), d.Rate, num(d.InWindow), secs(d.Window), d.Err)
		}
		p("- **Memory**: VmRSS sampled every 100 ms over the whole run: at most **%.0f MiB** (%s).", r.MaxRSS, r.MaxRSSAt)
		if r.Err == "" && r.LeftKnown {
			extra := ""
			if r.Lost() < 0 {
				extra = fmt.Sprintf(" (and %d stored that the load did not count as accepted: their 250 was cut off by a crash, and the load sent them again)", -r.Lost())
			}
			p("- **Mail**: %s answered 250, %s distinct queue IDs delivered (%s duplicate deliveries: after a kill -9 or a crash, at least once means some), %s left queued (%s held): **%d lost**%s.",
				num(r.Accepted), num(r.Distinct), num(r.Dups), num(int(r.Left)), num(r.Held), max(r.Lost(), 0), extra)
		} else {
			p("- **Mail**: %s accepted, %s distinct queue IDs delivered (%s duplicate deliveries); the run did not finish, so what is lost is not known.",
				num(r.Accepted), num(r.Distinct), num(r.Dups))
		}
		p("- Run time %s.", r.Duration.Round(time.Second))
		if r.Err != "" {
			p("- **Stopped early**: %s", strings.ReplaceAll(strings.TrimSpace(r.Err), "\n", " / "))
		}
		for _, c := range r.Crashes {
			p("- **mxq crashed** during %s (restarted, and the run went on): `%s`", c.Phase, c.What)
		}
		for _, n := range r.Notes {
			p("- Note: %s", n)
		}
		p("")
		p("### Targets of issue 16, continuity %s", onOff(r.Continuity))
		p("")
		p("| target | measured | |")
		p("|---|---|---|")
		for _, t := range r.targets(o) {
			p("| %s | %s | %s |", t.what, t.measured, t.verdict)
		}
	}
	return b.String()
}

type target struct{ what, measured, verdict string }

func (r *SettingResult) targets(o Options) []target {
	var out []target
	add := func(what, measured string, ok, known bool) {
		v := verdict(ok)
		if !known {
			v = "–"
		}
		out = append(out, target{what, measured, v})
	}
	x := r.Ratios()
	first := num(o.Steps[0])
	n := num(o.N)
	add(fmt.Sprintf("accept at %s ≥ 0.9 × at %s", n, first), fmt.Sprintf("%.2f", x.Accept), x.Accept >= targetRatio, x.Accept > 0)
	if x.SteadyStep > 0 {
		add(fmt.Sprintf("… and at %s ≥ 0.9 × at %s (both after JetStream's 2-minute duplicate window filled)", n, num(x.SteadyStep)), fmt.Sprintf("%.2f", x.Steady), x.Steady >= targetRatio, true)
	}
	add(fmt.Sprintf("drain at %s ≥ 0.9 × at %s", n, first), fmt.Sprintf("%.2f", x.Drain), x.Drain >= targetRatio, x.Drain > 0)
	add(fmt.Sprintf("due mail beside %s held leaves at ≥ 0.9 × the drain at %s", num(r.Held), first), fmt.Sprintf("%.2f", x.HeldDue), x.HeldDue >= targetRatio, x.HeldDue > 0)
	limit := float64(targetRSSOff)
	if r.Continuity {
		limit = targetRSSOn
	}
	add(fmt.Sprintf("RSS ≤ %.0f MiB at any time", limit), fmt.Sprintf("%.0f MiB", r.MaxRSS), r.MaxRSS <= limit, r.MaxRSS > 0)
	if len(r.Steps) > 0 && r.Steps[len(r.Steps)-1].Step == o.N {
		last := r.Steps[len(r.Steps)-1]
		for _, q := range []struct{ name, label string }{
			{"status", "`status`"}, {"ls", "first page of `queue ls`"}, {"ls_to", "`queue ls --to USER`"},
			{"show", "`queue show ID` (the oldest)"}, {"imap", "IMAP login + INBOX listing"},
		} {
			l := last.Queries[q.name]
			if l.Err == "off" {
				continue
			}
			add(fmt.Sprintf("%s at %s ≤ %d ms", q.label, n, targetQueryMS), l.String()+" ms", l.ok() && l.Note == "" && l.MS <= targetQueryMS, true)
		}
		if rr := last.Restart; rr != nil {
			add("after kill -9: SMTP accepting ≤ 5 s", secs(rr.SMTP)+" s", rr.SMTPErr == "" && rr.SMTP <= targetRestartSMTP, true)
			if r.Continuity {
				add("after kill -9: continuity serving ≤ 30 s", secs(rr.IMAP)+" s", rr.IMAPErr == "" && rr.IMAP <= targetRestartSlow, true)
			}
		}
	}
	if rc := r.Recovery; rc != nil {
		add("after kill -9: drain at full speed (≥ 0.9 × before) ≤ 30 s", secs(rc.AtSpeed)+" s", rc.Err == "" && rc.AtSpeed <= targetRestartSlow, rc.Err != "the queue emptied first")
	}
	if h := r.Hold; h != nil {
		add(fmt.Sprintf("holding %s messages by one filter ≤ 60 s", num(h.Done)), secs(h.Time)+" s", h.Err == "" && h.Time <= targetHold, true)
		add(fmt.Sprintf("… in bounded memory (peak ≤ %.0f MiB)", limit), fmt.Sprintf("%.0f MiB", h.PeakRSS), h.PeakRSS <= limit, h.PeakRSS > 0)
	}
	add("mxq never crashed", fmt.Sprint(len(r.Crashes)), len(r.Crashes) == 0, true)
	add("no accepted message lost", fmt.Sprint(max(r.Lost(), 0)), r.Lost() <= 0, r.Err == "" && r.LeftKnown)
	// At least once: a kill -9 during the drain delivers again at most what
	// was delivered and not yet recorded, which mxq bounds by twice the
	// concurrency ceiling (at least 32); each crash may add as many.
	kills := 1 + len(r.Crashes)
	bound := kills * max(2*sinkConcurrency, 32)
	add(fmt.Sprintf("duplicates ≤ %d (%d per kill -9 or crash during a drain)", bound, bound/kills), fmt.Sprint(r.Dups), r.Dups <= bound, true)
	return out
}

func fmtSeries(xs []float64) string {
	parts := make([]string, len(xs))
	for i, x := range xs {
		parts[i] = fmt.Sprintf("%.0f", x)
	}
	return strings.Join(parts, " ")
}
