// Command scale is the one-node scale benchmark of issue 16: it shows
// whether every cost of one mxq node stays flat as the backlog grows.
//
//	go run ./bench/scale                     # N = 1 000 000, continuity on and off
//	go run ./bench/scale -n 200000 -continuity on -out /tmp/scale.md
//
// For each continuity setting it runs one `mxq serve` (built once from
// this tree) on a fresh data directory and loopback ports, in front of a
// recording LMTP store (sink.go) that is down while the queue fills. It
// fills the queue in steps (10 k, 50 k, 100 k, 250 k, … up to N) with
// 2 KiB messages over SMTP, and at each step measures the accept rate, the
// node's memory, the operator's queries and a user's IMAP look at held
// mail, and the restart after kill -9. At the first step it drains the
// backlog (the reference drain rate) and fills it again; at N it holds a
// fifth of the queue by one filter, drains the rest with a kill -9 in the
// middle, and drains 10 k new messages beside the held ones. It prints a
// Markdown report (and writes it to -out) with the machine, the date, the
// mxq commit, one table per setting and the targets, PASS or FAIL.
//
// It touches mxq only from outside — the binary, its YAML configuration,
// SMTP, the admin HTTP API (the requests the `mxq` CLI makes) and IMAP —
// so it measures whatever the tree's mxq is, whatever its internals.
//
// Everything is in this one package main: the program (main.go), the
// harness (run.go: the phases; node.go: the mxq process; load.go: the SMTP
// load; sink.go: the store; probe.go: the queries; report.go: the
// report), and scale_test.go, the small run CI makes (N = 50 000), which
// calls Run like main does and asserts only ratios against the same run's
// first step.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

func main() {
	var o Options
	var steps, cont, out, jsonOut string
	flag.IntVar(&o.N, "n", 1_000_000, "the backlog of the last step")
	flag.StringVar(&steps, "steps", "", "backlogs to measure at, comma-separated, ascending, the last = n (default: 10000,50000,100000,250000,500000,1000000,2000000,5000000 below n, and n)")
	flag.StringVar(&cont, "continuity", "both", "continuity view: on, off or both")
	flag.StringVar(&out, "out", "", "write the Markdown report here too (default bench/results/scale.md)")
	flag.StringVar(&jsonOut, "json", "", "write the raw results here as JSON")
	flag.BoolVar(&o.Keep, "keep", false, "keep the work directory (mxq's logs and data)")
	flag.StringVar(&o.Work, "work", "", "make the work directory (data directories, logs, the binary) in this directory (its file system is the one measured); default $TMPDIR")
	flag.IntVar(&o.Sessions, "sessions", 32, "concurrent SMTP sessions of the load")
	flag.IntVar(&o.Size, "size", 2048, "message size in bytes")
	flag.IntVar(&o.PerUser, "per-user", 40, "messages per recipient by the end (recipients = n / per-user)")
	flag.IntVar(&o.Tries, "tries", 5, "tries of each query per step (the median is reported)")
	flag.DurationVar(&o.Timeout, "timeout", 60*time.Second, "timeout of each query")
	flag.BoolVar(&o.RestartEveryStep, "restart-every-step", true, "kill -9 and restart at every step (else only at the last)")
	flag.BoolVar(&o.HeldDue, "held-due", true, "at the end, drain 10 k new messages beside the held ones")
	flag.IntVar(&o.BaselineRounds, "baseline-rounds", 3, "drains of the first step's backlog (the median is the reference rate)")
	flag.DurationVar(&o.DrainWindow, "drain-window", 60*time.Second, "longest window the drain rate at n is measured over")
	flag.Parse()

	if steps != "" {
		for _, f := range strings.Split(steps, ",") {
			v, err := strconv.Atoi(strings.TrimSpace(strings.ReplaceAll(f, "_", "")))
			if err != nil {
				fatalf("-steps: %v", err)
			}
			o.Steps = append(o.Steps, v)
		}
	}
	switch cont {
	case "on":
		o.Continuity = []bool{true}
	case "off":
		o.Continuity = []bool{false}
	case "both":
		o.Continuity = []bool{true, false}
	default:
		fatalf("-continuity: want on, off or both")
	}
	repo, err := repoRoot()
	if err != nil {
		fatalf("%v", err)
	}
	o.Repo = repo
	if out == "" {
		out = filepath.Join(repo, "bench", "results", "scale.md")
	}
	o.Log = os.Stderr

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	rep, err := Run(ctx, o)
	if err != nil {
		fatalf("%v", err)
	}
	md := rep.Markdown()
	fmt.Print(md)
	if err := os.MkdirAll(filepath.Dir(out), 0o755); err == nil {
		err = os.WriteFile(out, []byte(md), 0o644)
	}
	if err != nil {
		fatalf("writing %s: %v", out, err)
	}
	fmt.Fprintf(os.Stderr, "report written to %s\n", out)
	if jsonOut != "" {
		b, _ := json.MarshalIndent(rep, "", "  ")
		if err := os.WriteFile(jsonOut, b, 0o644); err != nil {
			fatalf("writing %s: %v", jsonOut, err)
		}
	}
}

func fatalf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "scale: "+format+"\n", args...)
	os.Exit(2)
}

// repoRoot finds mxq's source tree: the directory above the working
// directory whose go.mod declares the module.
func repoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if b, err := os.ReadFile(filepath.Join(dir, "go.mod")); err == nil && strings.Contains(string(b), "module github.com/mxq-dev/mxq\n") {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", fmt.Errorf("not inside mxq's source tree (no go.mod of github.com/mxq-dev/mxq above %s)", dir)
		}
		dir = parent
	}
}
