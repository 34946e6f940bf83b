package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/mxq-dev/mxq/internal/testbackend"
)

const cliToken = "e2e-admin-token-0123456789"

// cliNode is mxq serve with an admin API, delivering to a real LMTP
// backend of the tests.
type cliNode struct {
	t     *testing.T
	m     *mxqProc
	admin string
	be    *testbackend.Server
}

func startCLINode(t *testing.T, be *testbackend.Server, extra string) *cliNode {
	t.Helper()
	adminAddr := freePort(t)
	cfg := fmt.Sprintf(`
node_name: cli
data_dir: {{dir}}/data
smtp: {listen: "{{smtp}}", domains: [example.test]}
admin: {listen: "%s", token: "%s"}
backends:
  store:
    address: %s
    rate: 500
    start_rate: 500
    concurrency: 4
drain:
  retry_min: 200ms
  retry_max: 1s
  probe_interval: 200ms
%s`, adminAddr, cliToken, be.Addr(), extra)
	m := startMxq(t, cfg)
	return &cliNode{t: t, m: m, admin: "http://" + adminAddr, be: be}
}

// mxq runs the CLI against the node; it returns stdout, stderr and the
// exit code.
func (n *cliNode) mxq(token string, args ...string) (string, string, int) {
	n.t.Helper()
	cmd := exec.Command(mxqBin, append([]string{"--server", n.admin}, args...)...)
	cmd.Env = append(os.Environ(), "MXQ_ADMIN_TOKEN="+token, "MXQ_SERVER=")
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	cmd.Stdin = strings.NewReader("")
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		n.t.Fatal(err)
	}
	return out.String(), errb.String(), code
}

// ok runs the CLI and fails the test unless it exits 0.
func (n *cliNode) ok(args ...string) string {
	n.t.Helper()
	out, errs, code := n.mxq(cliToken, args...)
	if code != 0 {
		n.t.Fatalf("mxq %s: exit %d\n%s%s", strings.Join(args, " "), code, out, errs)
	}
	return out
}

func (n *cliNode) send(to ...string) string {
	n.t.Helper()
	c, err := dial(n.m.smtp)
	if err != nil {
		n.t.Fatal(err)
	}
	defer c.Quit()
	id, err := sendOne(n.t.Context(), c, "sender@example.org", to, []byte("Subject: cli test\r\n\r\nhello\r\n"))
	if err != nil {
		n.t.Fatal(err)
	}
	return id
}

type listed struct {
	ID   string   `json:"id"`
	To   []string `json:"to"`
	Held bool     `json:"held"`
}

func (n *cliNode) ls(args ...string) []listed {
	n.t.Helper()
	var items []listed
	out := n.ok(append([]string{"--json"}, args...)...)
	if err := json.Unmarshal([]byte(out), &items); err != nil {
		n.t.Fatalf("%s: %v", out, err)
	}
	return items
}

func delivered(be *testbackend.Server, id string) int {
	n := 0
	for _, d := range be.Deliveries() {
		if d.QueueID == id {
			n++
		}
	}
	return n
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out: %s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func TestCLIHoldReleasePauseResume(t *testing.T) {
	be, err := testbackend.Start("127.0.0.1:0", testbackend.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer be.Close()
	n := startCLINode(t, be, "")

	// Pause: mail is accepted but not delivered.
	n.ok("pause")
	held := n.send("alice@example.test")
	free := n.send("bob@example.test")
	time.Sleep(500 * time.Millisecond)
	if be.Count() != 0 {
		t.Fatalf("%d deliveries while paused", be.Count())
	}
	if out := n.ok("status"); !strings.Contains(out, "PAUSED") {
		t.Fatalf("status does not say paused:\n%s", out)
	}
	// Hold one, resume: the other is delivered, the held one stays.
	if out := n.ok("queue", "hold", held, "--reason", "legal asked"); !strings.Contains(out, "1 done") {
		t.Fatalf("hold: %s", out)
	}
	n.ok("resume")
	eventually(t, "unheld message delivered", func() bool { return delivered(be, free) == 1 })
	time.Sleep(500 * time.Millisecond)
	if delivered(be, held) != 0 {
		t.Fatal("held message delivered")
	}
	items := n.ls("queue", "ls", "--held")
	if len(items) != 1 || items[0].ID != held || !items[0].Held {
		t.Fatalf("held listing: %+v", items)
	}
	// Release: delivered, once.
	n.ok("queue", "release", held)
	eventually(t, "released message delivered", func() bool { return delivered(be, held) == 1 })
	if items := n.ls("queue", "ls"); len(items) != 0 {
		t.Fatalf("queue not empty: %+v", items)
	}
	// Pause of one backend only, seen in status.
	n.ok("pause", "--backend", "store")
	var st struct {
		Backends []struct {
			Name   string `json:"name"`
			Paused bool   `json:"paused"`
		} `json:"backends"`
	}
	if err := json.Unmarshal([]byte(n.ok("status", "--json")), &st); err != nil || len(st.Backends) != 1 || !st.Backends[0].Paused {
		t.Fatalf("status after pausing store: %+v %v", st, err)
	}
	if _, errs, code := n.mxq(cliToken, "pause", "--backend", "nosuch"); code == 0 || !strings.Contains(errs, "no backend") {
		t.Fatalf("pausing an unknown backend: exit %d, %s", code, errs)
	}
}

func TestCLIDeleteByFilterAndWrongToken(t *testing.T) {
	be, err := testbackend.Start("127.0.0.1:0", testbackend.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer be.Close()
	n := startCLINode(t, be, "")
	n.ok("pause")
	var spam, keep []string
	for i := 0; i < 5; i++ {
		spam = append(spam, n.send(fmt.Sprintf("spamtrap%d@example.test", i)))
		keep = append(keep, n.send(fmt.Sprintf("user%d@example.test", i)))
	}
	// A wrong token: a clear error, exit code 3, nothing changes.
	for _, tok := range []string{"", "wrong-token-wrong-token"} {
		out, errs, code := n.mxq(tok, "queue", "delete", "--to", "spamtrap0@example.test", "--yes")
		if code != 3 || !strings.Contains(errs, "not authorized") {
			t.Fatalf("token %q: exit %d\n%s%s", tok, code, out, errs)
		}
	}
	if items := n.ls("queue", "ls"); len(items) != 10 {
		t.Fatalf("%d queued after refused deletes, want 10", len(items))
	}
	// Delete without --yes asks, and without an answer deletes nothing.
	if _, _, code := n.mxq(cliToken, "queue", "delete", "--domain", "example.test"); code == 0 {
		t.Fatal("delete without confirmation succeeded")
	}
	// Delete by filter: the spamtrap messages only.
	for i := range spam {
		n.ok("queue", "delete", "--to", fmt.Sprintf("spamtrap%d@example.test", i), "--yes")
	}
	items := n.ls("queue", "ls")
	if len(items) != 5 {
		t.Fatalf("%d left after deleting 5 of 10", len(items))
	}
	for _, it := range items {
		if strings.HasPrefix(it.To[0], "spamtrap") {
			t.Fatalf("spamtrap message survived: %+v", it)
		}
	}
	n.ok("resume")
	eventually(t, "the rest delivered", func() bool { return be.Count() == 5 })
	for _, id := range keep {
		if delivered(be, id) != 1 {
			t.Fatalf("%s delivered %d times", id, delivered(be, id))
		}
	}
}

func TestCLIRequeueFromDeadLetters(t *testing.T) {
	var reject atomic.Bool
	reject.Store(true)
	be, err := testbackend.Start("127.0.0.1:0", testbackend.Options{
		RcptReply: func(rcpt string) *smtp.SMTPError {
			if reject.Load() && strings.HasPrefix(rcpt, "moved@") {
				return testbackend.Reply(550, "5.1.1", "no such user (yet)")
			}
			return nil
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer be.Close()
	n := startCLINode(t, be, "")
	id := n.send("moved@example.test", "here@example.test")
	eventually(t, "dead letter", func() bool { return len(n.ls("dlq", "ls")) == 1 })
	out := n.ok("dlq", "show", id)
	if !strings.Contains(out, "550 5.1.1 no such user") || !strings.Contains(out, "moved@example.test") {
		t.Fatalf("dlq show:\n%s", out)
	}
	if delivered(be, id) != 1 {
		t.Fatalf("the good recipient got %d copies", delivered(be, id))
	}
	// The mailbox is created; requeue the dead letter.
	reject.Store(false)
	if out := n.ok("dlq", "requeue", id); !strings.Contains(out, "1 done") {
		t.Fatalf("requeue: %s", out)
	}
	eventually(t, "requeued message delivered", func() bool { return delivered(be, id) == 2 })
	if items := n.ls("dlq", "ls"); len(items) != 0 {
		t.Fatalf("dead letters left: %+v", items)
	}
	got := map[string]bool{}
	for _, d := range be.Deliveries() {
		got[d.Rcpt] = true
	}
	if !got["moved@example.test"] || !got["here@example.test"] {
		t.Fatalf("deliveries: %v", got)
	}
	// Export gives the raw message.
	n.ok("pause")
	id2 := n.send("x@example.test")
	raw := n.ok("queue", "export", id2)
	if !strings.HasPrefix(raw, "Received: from ") || !strings.HasSuffix(raw, "hello\r\n") {
		t.Fatalf("export: %q", raw)
	}
}

// mxq drain watch in a real terminal (tmux): the progress bar moves while
// the backlog drains, and the command ends by itself when the queue is
// empty.
// percentRE reads the progress figure of a drain watch frame: "] 27%".
var percentRE = regexp.MustCompile(`\]\s+(\d+)%`)

func TestDrainWatchInTmux(t *testing.T) {
	need(t, "tmux")
	be, err := testbackend.Start("127.0.0.1:0", testbackend.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer be.Close()
	n := startCLINode(t, be, "")
	// A backlog while paused, then a slow drain so that the view has
	// time to show progress.
	n.ok("pause")
	for i := 0; i < 60; i++ {
		n.send(fmt.Sprintf("u%d@example.test", i))
	}
	n.ok("rate", "set", "store", "--max", "20/s", "--concurrency", "1")

	session := fmt.Sprintf("mxq-watch-%d", time.Now().UnixNano())
	cmd := fmt.Sprintf("MXQ_ADMIN_TOKEN=%s %s drain watch --server %s --interval 300ms; echo WATCH-EXIT=$?; sleep 30", cliToken, mxqBin, n.admin)
	if out, err := exec.Command("tmux", "new-session", "-d", "-s", session, "-x", "160", "-y", "20", cmd).CombinedOutput(); err != nil {
		t.Fatalf("tmux: %v %s", err, out)
	}
	defer exec.Command("tmux", "kill-session", "-t", session).Run()
	capture := func() string {
		out, _ := exec.Command("tmux", "capture-pane", "-p", "-t", session).Output()
		return string(out)
	}
	eventually(t, "the view shows the backlog", func() bool { return strings.Contains(capture(), "60 of 60 left") })
	n.ok("resume")
	// The bar fills: find a frame in between, then the end.
	var mid string
	eventually(t, "progress between 10% and 90%", func() bool {
		// The percentage is whatever share has gone (60 messages: steps
		// of 1.7%), so read the number rather than look for round ones.
		s := capture()
		for _, m := range percentRE.FindAllStringSubmatch(s, -1) {
			if p, err := strconv.Atoi(m[1]); err == nil && p >= 10 && p <= 90 {
				mid = s
				return true
			}
		}
		return false
	})
	if !strings.Contains(mid, "#") || !strings.Contains(mid, "store") {
		t.Fatalf("mid-drain frame lacks the bar or the backend:\n%s", mid)
	}
	deadline := time.Now().Add(30 * time.Second)
	var last string
	for time.Now().Before(deadline) {
		last = capture()
		if strings.Contains(last, "WATCH-EXIT=") {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if !strings.Contains(last, "queue empty: drained.") || !strings.Contains(last, "WATCH-EXIT=0") || !strings.Contains(last, "100%") {
		t.Fatalf("drain watch did not end cleanly:\n%s", last)
	}
	t.Logf("mid-drain frame:\n%s\nlast frame:\n%s", mid, last)
}
