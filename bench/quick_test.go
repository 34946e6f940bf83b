// Package bench holds mxq's benchmark (run.sh and its Go tools) and this
// smoke test of it. The benchmark's numbers are measured by hand on a
// quiet machine; the test only checks that the one command still runs and
// produces every table, so that it does not rot between measurements.
package bench

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestQuick runs `run.sh --quick` and checks the report's shape: every
// table and row, every message accepted by every server, the drain
// complete, the memory series whole. Timings are not checked: the machine
// is shared, and the numbers of a smoke run mean nothing.
func TestQuick(t *testing.T) {
	if testing.Short() {
		t.Skip("the benchmark's smoke run takes about a minute")
	}
	if os.Getenv("MXQ_E2E") != "require" {
		// Without the requirement, run only where the script would not
		// have to install anything or ask for a password.
		os.Setenv("PATH", os.Getenv("PATH")+":/usr/sbin:/sbin")
		for _, tool := range []string{"postfix", "strace", "jq", "curl"} {
			if _, err := exec.LookPath(tool); err != nil {
				t.Skipf("%s is not installed (MXQ_E2E=require makes run.sh install it)", tool)
			}
		}
		if os.Geteuid() != 0 && exec.Command("sudo", "-n", "true").Run() != nil {
			t.Skip("run.sh needs root or password-less sudo (Postfix, strace)")
		}
	}

	out := filepath.Join(t.TempDir(), "report.md")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "./run.sh", "--quick", "--out", out)
	// On timeout, SIGTERM the whole process group (the script and the load
	// it is waiting for), so that its trap stops Postfix and mxq.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM) }
	cmd.WaitDelay = 30 * time.Second
	var log bytes.Buffer
	cmd.Stdout, cmd.Stderr = &log, &log
	start := time.Now()
	err := cmd.Run()
	t.Logf("run.sh --quick took %v", time.Since(start).Round(time.Second))
	if err != nil {
		t.Fatalf("run.sh --quick: %v\n%s", err, log.String())
	}
	data, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	report := string(data)
	defer func() {
		if t.Failed() {
			t.Logf("report:\n%s\nrun.sh's output:\n%s", report, log.String())
		}
	}()

	servers := []string{"nullsmtp", "mxq", "postfix"}

	acc := table(t, report, "## Acceptance rate")
	wantCells := [][3]string{
		{"10 KiB", "1", "1"}, {"10 KiB", "32", "1"}, {"10 KiB", "128", "1"}, {"10 KiB", "32", "100"},
		{"100 KiB", "1", "1"}, {"100 KiB", "32", "1"}, {"100 KiB", "128", "1"},
	}
	if len(acc) != len(wantCells) {
		t.Errorf("acceptance table has %d rows, want %d", len(acc), len(wantCells))
	}
	for i, want := range wantCells {
		if i >= len(acc) {
			break
		}
		row := acc[i]
		if len(row) != 8 || row[0] != want[0] || row[1] != want[1] || row[2] != want[2] {
			t.Errorf("acceptance row %d = %q, want it to start with %q", i, row, want)
			continue
		}
		for _, cell := range row[3:] {
			if number(cell) <= 0 {
				t.Errorf("acceptance row %q: %q is not a positive number", row, cell)
			}
		}
	}

	src := table(t, report, "## Acceptance rate with smtp-source")
	if len(src) != 1 || len(src[0]) != 8 || src[0][0] != "10 KiB" || src[0][1] != "32" {
		t.Errorf("smtp-source table = %q, want one row for 10 KiB at 32 sessions", src)
	} else {
		for _, cell := range src[0][2:7] {
			if number(cell) <= 0 {
				t.Errorf("smtp-source row %q: %q is not a positive number", src[0], cell)
			}
		}
	}

	lat := table(t, report, "## Latency")
	for i, s := range servers {
		if i >= len(lat) || lat[i][0] != s || number(lat[i][1]) <= 0 || number(lat[i][3]) <= 0 {
			t.Errorf("latency table: want a row for %s with p50 and p99, got %q", s, lat)
		}
	}

	cpu := table(t, report, "## CPU per accepted message")
	for i, s := range servers {
		if i >= len(cpu) || len(cpu[i]) != 5 || cpu[i][0] != s {
			t.Errorf("CPU table: want a row for %s, got %q", s, cpu)
			continue
		}
		for _, cell := range cpu[i][1:] {
			if number(cell) <= 0 {
				t.Errorf("CPU row %q: %q is not a positive number", cpu[i], cell)
			}
		}
	}

	fs := table(t, report, "## fsyncs per accepted message")
	for _, want := range []string{"mxq 1", "postfix 1", "mxq 32", "postfix 32"} {
		found := false
		for _, row := range fs {
			if len(row) == 5 && row[0]+" "+row[1] == want {
				found = true
				// Both must have synced something, or strace saw nothing.
				if number(row[2]) <= 0 || number(row[3]) <= 0 {
					t.Errorf("fsync row %q: no messages or no fsyncs counted", row)
				}
			}
		}
		if !found {
			t.Errorf("fsync table has no row for %s sessions: %q", want, fs)
		}
	}

	drain := table(t, report, "## Drain")
	for i, s := range []string{"mxq", "postfix"} {
		if i >= len(drain) || len(drain[i]) != 7 || drain[i][0] != s {
			t.Errorf("drain table: want a row for %s, got %q", s, drain)
			continue
		}
		row := drain[i]
		if row[1] != row[2] || row[1] != row[3] || number(row[1]) <= 0 {
			t.Errorf("drain %s: messages, delivered, distinct = %s, %s, %s; want all equal", s, row[1], row[2], row[3])
		}
	}
	if !strings.Contains(report, "Drain ratio mxq/postfix:") {
		t.Error("report has no drain ratio")
	}

	mem := table(t, report, "## mxq memory while the backlog grows")
	if len(mem) != 11 {
		t.Errorf("memory series has %d rows, want 11 (0 and each tenth)", len(mem))
	}
	for i, row := range mem {
		if want := strconv.Itoa(i * 1000); row[0] != want || number(row[1]) <= 0 {
			t.Errorf("memory row %d = %q, want backlog %s and a VmRSS", i, row, want)
		}
	}

	replies := table(t, report, "## Replies")
	for _, s := range servers {
		found := false
		for _, row := range replies {
			if len(row) != 7 || row[0] != s {
				continue
			}
			found = true
			sent, ok := number(row[2]), number(row[3])
			if sent <= 0 || ok != sent || row[4] != "0" || row[5] != "0" || row[6] != "0" {
				t.Errorf("%s: sent %s, 2xx %s, 4xx %s, 5xx %s, errors %s; want every message accepted",
					s, row[2], row[3], row[4], row[5], row[6])
			}
		}
		if !found {
			t.Errorf("replies table has no row for %s", s)
		}
	}
}

// table returns the cells of the first Markdown table after heading,
// without its header and separator rows.
func table(t *testing.T, report, heading string) [][]string {
	t.Helper()
	_, rest, ok := strings.Cut(report, "\n"+heading+"\n")
	if !ok {
		t.Errorf("report has no section %q", heading)
		return nil
	}
	var rows [][]string
	inTable := false
	for _, line := range strings.Split(rest, "\n") {
		if strings.HasPrefix(line, "## ") {
			break
		}
		if !strings.HasPrefix(line, "|") {
			if inTable {
				break
			}
			continue
		}
		inTable = true
		cells := strings.Split(strings.Trim(line, "|"), "|")
		for i := range cells {
			cells[i] = strings.TrimSpace(cells[i])
		}
		rows = append(rows, cells)
	}
	if len(rows) < 2 {
		t.Errorf("section %q has no table", heading)
		return nil
	}
	return rows[2:]
}

// number parses a table cell, or returns -1.
func number(s string) float64 {
	var f float64
	if _, err := fmt.Sscan(s, &f); err != nil {
		return -1
	}
	return f
}
