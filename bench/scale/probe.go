package main

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/emersion/go-imap/v2"
	"github.com/emersion/go-imap/v2/imapclient"
)

// What the benchmark asks a node, through its external interfaces only:
// the admin HTTP API (the same requests the `mxq` CLI makes), SMTP, IMAP.

// statusDoc is the part of GET /api/v1/status the benchmark reads.
type statusDoc struct {
	Queue struct {
		Messages uint64 `json:"messages"`
		Bytes    uint64 `json:"bytes"`
	} `json:"queue"`
	Backends []struct {
		Name      string  `json:"name"`
		Circuit   string  `json:"circuit"`
		Rate      float64 `json:"rate"`
		Queued    uint64  `json:"queued"`
		Delivered uint64  `json:"delivered"`
	} `json:"backends"`
}

type listDoc struct {
	Items []struct {
		ID string   `json:"id"`
		To []string `json:"to"`
	} `json:"items"`
	Scanned int `json:"scanned"`
}

type showDoc struct {
	ID      string `json:"id"`
	Records []struct {
		ID string `json:"id"`
	} `json:"records"`
}

type resultDoc struct {
	Matched int      `json:"matched"`
	Done    int      `json:"done"`
	Errors  []string `json:"errors"`
}

// call makes one admin API request on a new connection (as a fresh CLI
// invocation would) and decodes the JSON reply into out.
func (n *node) call(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, _ := json.Marshal(in)
		body = strings.NewReader(string(b))
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://"+n.admin+path, body)
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+n.token)
	req.Header.Set("X-Mxq-Operator", "scale-bench")
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	if resp.StatusCode/100 != 2 {
		return fmt.Errorf("%s %s: HTTP %d: %s", method, path, resp.StatusCode, strings.TrimSpace(string(b)))
	}
	if out != nil {
		return json.Unmarshal(b, out)
	}
	return nil
}

func (n *node) status(ctx context.Context) (*statusDoc, error) {
	var st statusDoc
	return &st, n.call(ctx, http.MethodGet, "/api/v1/status", nil, &st)
}

// circuit is the store backend's circuit as the node reports it.
func (st *statusDoc) circuit() string {
	for _, b := range st.Backends {
		if b.Name == "store" {
			return b.Circuit
		}
	}
	return ""
}

// The five queries of each step. Each returns a note when the answer is
// not what the benchmark knows it must be (a wrong answer fast is no
// result).
func (n *node) qStatus(ctx context.Context, _ *stepState) (string, error) {
	_, err := n.status(ctx)
	return "", err
}

func (n *node) qList(ctx context.Context, s *stepState) (string, error) {
	var l listDoc
	if err := n.call(ctx, http.MethodGet, "/api/v1/queue?limit=100", nil, &l); err != nil {
		return "", err
	}
	if len(l.Items) != 100 {
		return fmt.Sprintf("first page had %d items, not 100", len(l.Items)), nil
	}
	return "", nil
}

func (n *node) qListTo(ctx context.Context, s *stepState) (string, error) {
	var l listDoc
	q := url.Values{"to": {knownUser}, "limit": {"100"}}
	if err := n.call(ctx, http.MethodGet, "/api/v1/queue?"+q.Encode(), nil, &l); err != nil {
		return "", err
	}
	if len(l.Items) != s.known {
		return fmt.Sprintf("listed %d of %s's %d messages", len(l.Items), knownUser, s.known), nil
	}
	return "", nil
}

func (n *node) qShow(ctx context.Context, s *stepState) (string, error) {
	var m showDoc
	if err := n.call(ctx, http.MethodGet, "/api/v1/queue/"+url.PathEscape(s.showID), nil, &m); err != nil {
		return "", err
	}
	if m.ID != s.showID || len(m.Records) == 0 {
		return fmt.Sprintf("show %s answered %q with %d records", s.showID, m.ID, len(m.Records)), nil
	}
	return "", nil
}

// qIMAP is a user's look at their held mail: TLS, LOGIN, SELECT INBOX and
// UID FETCH 1:* (UID RFC822.SIZE ENVELOPE), LOGOUT.
func (n *node) qIMAP(ctx context.Context, s *stepState) (string, error) {
	c, err := n.imapLogin(ctx)
	if err != nil {
		return "", err
	}
	defer c.Close()
	sel, err := c.Select("INBOX", nil).Wait()
	if err != nil {
		return "", fmt.Errorf("SELECT: %w", err)
	}
	msgs, err := c.Fetch(imap.UIDSet{{Start: 1, Stop: 0}}, &imap.FetchOptions{UID: true, RFC822Size: true, Envelope: true}).Collect()
	if err != nil {
		return "", fmt.Errorf("FETCH: %w", err)
	}
	c.Logout().Wait()
	if int(sel.NumMessages) != s.known || len(msgs) != s.known {
		return fmt.Sprintf("INBOX had %d messages (fetched %d), not %d", sel.NumMessages, len(msgs), s.known), nil
	}
	return "", nil
}

// imapLogin connects and logs in as the known user; the connection's
// deadline is the context's.
func (n *node) imapLogin(ctx context.Context) (*imapclient.Client, error) {
	d := net.Dialer{Timeout: 10 * time.Second}
	raw, err := d.DialContext(ctx, "tcp", n.imap)
	if err != nil {
		return nil, err
	}
	if dl, ok := ctx.Deadline(); ok {
		raw.SetDeadline(dl)
	}
	conn := tls.Client(raw, n.tls)
	c := imapclient.New(conn, nil)
	if err := c.Login(knownUser, n.password).Wait(); err != nil {
		c.Close()
		return nil, fmt.Errorf("LOGIN: %w", err)
	}
	return c, nil
}

// stepState is what the queries of a step check their answers against.
type stepState struct {
	known  int    // the known user's messages
	showID string // the oldest queue ID
}

// latency is a measurement: the median in ms over the tries that
// answered, or why there is none.
type latency struct {
	MS    float64 `json:"ms"`
	Tries int     `json:"tries"`          // answered
	Err   string  `json:"err,omitempty"`  // "timeout", "off", or the error
	Note  string  `json:"note,omitempty"` // a wrong answer
}

func (l latency) ok() bool { return l.Err == "" && l.Tries > 0 }

func (l latency) String() string {
	switch {
	case l.Err == "off":
		return "–"
	case l.Err == "timeout":
		return "timeout"
	case l.Err != "":
		return "error"
	}
	s := fmtMS(l.MS)
	if l.Note != "" {
		s += " (!)"
	}
	return s
}

func fmtMS(ms float64) string {
	switch {
	case ms < 10:
		return fmt.Sprintf("%.1f", ms)
	default:
		return fmt.Sprintf("%.0f", ms)
	}
}

type query struct {
	name string
	fn   func(context.Context, *stepState) (string, error)
}

func (n *node) queries() []query {
	q := []query{
		{"status", n.qStatus},
		{"ls", n.qList},
		{"ls_to", n.qListTo},
		{"show", n.qShow},
	}
	if n.imap != "" {
		q = append(q, query{"imap", n.qIMAP})
	}
	return q
}

var queryNames = []string{"status", "ls", "ls_to", "show", "imap"}

// measureQueries runs every query tries times, interleaved (status, ls,
// ls --to, show, imap, status, …: the machine's noise falls on all of
// them alike), each with its own timeout, and returns the medians. A
// query that timed out once is not tried again in this step.
func (n *node) measureQueries(s *stepState, tries int, timeout time.Duration) map[string]latency {
	qs := n.queries()
	times := map[string][]float64{}
	out := map[string]latency{}
	for _, name := range queryNames {
		out[name] = latency{Err: "off"}
	}
	for _, q := range qs {
		out[q.name] = latency{}
	}
	for try := 0; try < tries; try++ {
		for _, q := range qs {
			l := out[q.name]
			if l.Err == "timeout" {
				continue
			}
			ctx, cancel := context.WithTimeout(context.Background(), timeout)
			t0 := time.Now()
			note, err := q.fn(ctx, s)
			d := time.Since(t0)
			cancel()
			switch {
			case err != nil && (errors.Is(err, context.DeadlineExceeded) || errors.Is(err, os.ErrDeadlineExceeded) || d >= timeout):
				l.Err = "timeout"
			case err != nil:
				if l.Err == "" {
					l.Err = err.Error()
				}
			default:
				times[q.name] = append(times[q.name], float64(d.Microseconds())/1000)
				if note != "" {
					l.Note = note
				}
			}
			out[q.name] = l
		}
	}
	for _, q := range qs {
		l := out[q.name]
		if ts := times[q.name]; len(ts) > 0 {
			l.MS, l.Tries = median(ts), len(ts)
			if l.Err != "timeout" { // an occasional error beside answers
				l.Err = ""
			}
		}
		out[q.name] = l
	}
	return out
}

func median(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// untilSMTP tries a whole transaction (to probe@, not the known user)
// every 20 ms until one is answered 250; it returns when.
func (n *node) untilSMTP(ctx context.Context, g *mailGen) (time.Time, error) {
	msg := g.message(nil, -1, "probe@senders.example.org", probeRcpt, "probe")
	for {
		if _, err := transaction(n.smtp, "probe@senders.example.org", probeRcpt, msg); err == nil {
			return time.Now(), nil
		}
		select {
		case <-ctx.Done():
			return time.Time{}, ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// untilIMAP tries LOGIN and SELECT INBOX every 50 ms until the INBOX
// shows the known user's known messages; it returns when.
func (n *node) untilIMAP(ctx context.Context, want int) (time.Time, error) {
	for {
		try, cancel := context.WithTimeout(ctx, 10*time.Second)
		c, err := n.imapLogin(try)
		if err == nil {
			sel, err := c.Select("INBOX", nil).Wait()
			c.Close()
			if err == nil && int(sel.NumMessages) == want {
				cancel()
				return time.Now(), nil
			}
		}
		cancel()
		select {
		case <-ctx.Done():
			return time.Time{}, ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// collectGarbage has mxq's runtime collect twice (the heap profile's gc=1,
// the second to empty what sync.Pools keep for one cycle), so that RSS
// read next says what is live: an idle process would get there by itself,
// with the runtime's periodic collection, within minutes.
func (n *node) collectGarbage(ctx context.Context) error {
	for i := 0; i < 2; i++ {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+n.admin+"/debug/pprof/heap?gc=1", nil)
		if err != nil {
			return err
		}
		req.Header.Set("Authorization", "Bearer "+n.token)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return err
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("heap profile: HTTP %d", resp.StatusCode)
		}
	}
	return nil
}
