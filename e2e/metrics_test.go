package e2e

import (
	"bufio"
	"io"
	"net/http"
	"strconv"
	"strings"
	"testing"

	"github.com/mxq-dev/mxq/internal/testbackend"
)

// scrape reads the node's /metrics into "name{labels}" -> value.
func (n *cliNode) scrape() map[string]float64 {
	n.t.Helper()
	resp, err := http.Get(n.admin + "/metrics")
	if err != nil {
		n.t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		n.t.Fatalf("/metrics: %s %s", resp.Status, b)
	}
	m := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			n.t.Fatalf("metrics line %q: %v", line, err)
		}
		m[line[:i]] = v
	}
	return m
}

// What an operator's dashboard reads follows the mail: accepted, queued
// while paused, group-committed, delivered after resume.
func TestMetricsFollowTheMail(t *testing.T) {
	be, err := testbackend.Start("127.0.0.1:0", testbackend.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer be.Close()
	n := startCLINode(t, be, "")
	n.ok("pause")
	for _, to := range []string{"a@example.test", "b@example.test", "c@example.test"} {
		n.send(to)
	}
	want := map[string]float64{
		`mxq_smtp_messages_total{result="queued"}`:                 3,
		`mxq_smtp_recipients_total{result="accepted"}`:             3,
		`mxq_queue_messages{backend="store"}`:                      3,
		`mxq_drain_paused{backend="store"}`:                        1,
		`mxq_queue_commit_messages_total`:                          3,
		`mxq_node_ready`:                                           1,
		`mxq_node_draining`:                                        1,
		`mxq_deliveries_total{backend="store",result="delivered"}`: 0,
	}
	m := n.scrape()
	for k, v := range want {
		if m[k] != v {
			t.Errorf("%s = %v, want %v", k, m[k], v)
		}
	}
	if b := m["mxq_queue_commit_batches_total"]; b < 1 || b > 3 {
		t.Errorf("mxq_queue_commit_batches_total = %v for 3 messages", b)
	}
	n.ok("resume")
	eventually(t, "metrics show the three delivered", func() bool {
		m := n.scrape()
		return m[`mxq_deliveries_total{backend="store",result="delivered"}`] == 3 &&
			m[`mxq_queue_messages{backend="store"}`] == 0
	})
	if be.Count() != 3 {
		t.Fatalf("backend has %d deliveries", be.Count())
	}
}
