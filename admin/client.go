package admin

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"
)

// Client talks to a node's admin API; the CLI is built on it.
type Client struct {
	Base string // http://127.0.0.1:8025
	// Token is the node's admin token, or its read-only token (reads
	// only); empty: the open endpoints only.
	Token    string
	Operator string // sent for the audit log
	// HTTP is the client to use; nil: HTTPClient(nil).
	HTTP *http.Client
}

// HTTPClient is an HTTP client for the admin API: a timeout long enough
// for a bulk action over millions of messages and, when caPEM holds
// certificates, HTTPS that trusts those CAs alone, for an API whose
// certificate (admin.tls) comes from a private CA. Without caPEM the
// system's roots are trusted (SSL_CERT_FILE and SSL_CERT_DIR change them).
func HTTPClient(caPEM []byte) (*http.Client, error) {
	c := &http.Client{Timeout: 5 * time.Minute}
	if caPEM == nil {
		return c, nil
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, errors.New("no PEM certificate in it")
	}
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.TLSClientConfig = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	c.Transport = tr
	return c, nil
}

// APIError is an error reply from the server.
type APIError struct {
	Status  int
	Message string
}

func (e *APIError) Error() string { return fmt.Sprintf("%s (HTTP %d)", e.Message, e.Status) }

// ErrUnauthorized is wrapped by replies 401 and 403.
var ErrUnauthorized = errors.New("not authorized")

func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, strings.TrimRight(c.Base, "/")+path, body)
	if err != nil {
		return err
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	c.auth(req)
	resp, err := c.httpClient().Do(req)
	if err != nil {
		return fmt.Errorf("cannot reach the mxq admin API at %s: %w", c.Base, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		return decodeError(resp)
	}
	if out == nil {
		return nil
	}
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		return fmt.Errorf("reading the reply: %w", err)
	}
	return nil
}

func (c *Client) httpClient() *http.Client {
	if c.HTTP != nil {
		return c.HTTP
	}
	hc, _ := HTTPClient(nil) // cannot fail without a CA
	return hc
}

func (c *Client) auth(req *http.Request) {
	if c.Token != "" {
		req.Header.Set("Authorization", "Bearer "+c.Token)
	}
	if c.Operator != "" {
		req.Header.Set("X-Mxq-Operator", c.Operator)
	}
}

func decodeError(resp *http.Response) error {
	var e Error
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if json.Unmarshal(b, &e) != nil || e.Error == "" {
		e.Error = strings.TrimSpace(string(b))
	}
	err := &APIError{Status: resp.StatusCode, Message: e.Error}
	if resp.StatusCode == http.StatusUnauthorized || resp.StatusCode == http.StatusForbidden {
		return fmt.Errorf("%w: %w", ErrUnauthorized, err)
	}
	return err
}

// Status fetches the node's status.
func (c *Client) Status(ctx context.Context) (*Status, error) {
	var st Status
	return &st, c.do(ctx, http.MethodGet, "/api/v1/status", nil, &st)
}

// Pause pauses the drain (of one backend, or all with "").
func (c *Client) Pause(ctx context.Context, backend string) error {
	return c.do(ctx, http.MethodPost, "/api/v1/pause", PauseRequest{Backend: backend}, nil)
}

// Resume resumes it.
func (c *Client) Resume(ctx context.Context, backend string) error {
	return c.do(ctx, http.MethodPost, "/api/v1/resume", PauseRequest{Backend: backend}, nil)
}

// SetRate sets a backend's ceilings (0 restores the configured value).
func (c *Client) SetRate(ctx context.Context, backend string, max float64, concurrency int) error {
	return c.do(ctx, http.MethodPost, "/api/v1/rate", RateRequest{Backend: backend, Max: max, Concurrency: concurrency}, nil)
}

// ResetRate restarts a backend's ramp from its start values.
func (c *Client) ResetRate(ctx context.Context, backend string) error {
	return c.do(ctx, http.MethodPost, "/api/v1/rate/reset", PauseRequest{Backend: backend}, nil)
}

// List returns a page of the queue (dead: of the dead letters).
func (c *Client) List(ctx context.Context, dead bool, f Filter, limit int, cursor uint64) (*List, error) {
	q := url.Values{}
	set := func(k, v string) {
		if v != "" {
			q.Set(k, v)
		}
	}
	set("from", f.From)
	set("to", f.To)
	set("domain", f.Domain)
	set("backend", f.Backend)
	set("older_than", f.OlderThan)
	if f.Held != nil {
		q.Set("held", strconv.FormatBool(*f.Held))
	}
	if limit > 0 {
		q.Set("limit", strconv.Itoa(limit))
	}
	if cursor > 0 {
		q.Set("cursor", strconv.FormatUint(cursor, 10))
	}
	var l List
	return &l, c.do(ctx, http.MethodGet, base(dead)+"?"+q.Encode(), nil, &l)
}

func base(dead bool) string {
	if dead {
		return "/api/v1/dlq"
	}
	return "/api/v1/queue"
}

// Show returns a message's records and header.
func (c *Client) Show(ctx context.Context, dead bool, id string) (*Message, error) {
	var m Message
	return &m, c.do(ctx, http.MethodGet, base(dead)+"/"+url.PathEscape(id), nil, &m)
}

// Export copies a message's raw bytes to w.
func (c *Client) Export(ctx context.Context, dead bool, id string, w io.Writer) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, strings.TrimRight(c.Base, "/")+base(dead)+"/"+url.PathEscape(id)+"/raw", nil)
	if err != nil {
		return err
	}
	c.auth(req)
	resp, err := c.httpClient().Do(req)
	if err != nil {
		return fmt.Errorf("cannot reach the mxq admin API at %s: %w", c.Base, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return decodeError(resp)
	}
	_, err = io.Copy(w, resp.Body)
	return err
}

// Act runs a bulk action: hold, release, delete, requeue, bounce on the
// queue; requeue, purge on the dead letters.
func (c *Client) Act(ctx context.Context, dead bool, action string, sel Selection) (*Result, error) {
	var r Result
	err := c.do(ctx, http.MethodPost, base(dead)+"/"+action, sel, &r)
	return &r, err
}
