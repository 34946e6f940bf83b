package web

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/cookiejar"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode/utf8"

	"golang.org/x/crypto/bcrypt"

	"github.com/mxq-dev/mxq/continuity/auth"
	"github.com/mxq-dev/mxq/continuity/index"
	"github.com/mxq-dev/mxq/continuity/internal/teststore"
	"github.com/mxq-dev/mxq/continuity/mail"
	"github.com/mxq-dev/mxq/queue"
)

type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) now() time.Time      { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) add(d time.Duration) { c.mu.Lock(); c.t = c.t.Add(d); c.mu.Unlock() }

type fixture struct {
	t     *testing.T
	store *queue.Store
	idx   *index.Index
	clk   *clock
	web   *Server
	srv   *httptest.Server
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	f := &fixture{t: t, store: teststore.New(t, 64<<10), clk: &clock{t: time.Now()}}
	f.idx = index.New(teststore.Catalog(t, f.store), f.store, index.Options{})
	var lines []string
	for _, u := range []string{"alice", "bob"} {
		h, _ := bcrypt.GenerateFromPassword([]byte(u+"-pw"), 4)
		lines = append(lines, u+"@example.test:{BLF-CRYPT}"+string(h))
	}
	pw := filepath.Join(t.TempDir(), "passwd")
	os.WriteFile(pw, []byte(strings.Join(lines, "\n")+"\n"), 0o600)
	pf, err := auth.OpenPasswdFile(pw, "example.test", nil)
	if err != nil {
		t.Fatal(err)
	}
	guard := auth.NewGuard(pf, auth.Limits{PerUser: 3, PerIP: 50, Window: time.Minute}, "example.test", f.clk.now, nil, nil)
	s, err := New(Options{Reader: mail.New(f.store, f.idx, nil, nil), Guard: guard, Now: f.clk.now,
		IdleTimeout: 10 * time.Minute, MaxSession: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	f.web = s
	f.srv = httptest.NewTLSServer(s)
	t.Cleanup(f.srv.Close)
	return f
}

func (f *fixture) enqueue(msg string, to ...string) string {
	f.t.Helper()
	env := teststore.Enqueue(f.t, f.store, []byte(msg), to...)
	if err := f.idx.Sync(context.Background()); err != nil {
		f.t.Fatal(err)
	}
	return env.ID
}

// browser is a client with cookies that does not follow redirects.
type browser struct {
	f *fixture
	c *http.Client
}

func (f *fixture) browser() *browser {
	jar, _ := cookiejar.New(nil)
	c := f.srv.Client()
	c.Jar = jar
	c.CheckRedirect = func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }
	return &browser{f: f, c: c}
}

func (b *browser) get(path string) (*http.Response, string) {
	b.f.t.Helper()
	resp, err := b.c.Get(b.f.srv.URL + path)
	if err != nil {
		b.f.t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp, string(body)
}

func (b *browser) post(path string, form url.Values, hdr map[string]string) (*http.Response, string) {
	b.f.t.Helper()
	req, _ := http.NewRequest("POST", b.f.srv.URL+path, strings.NewReader(form.Encode()))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := b.c.Do(req)
	if err != nil {
		b.f.t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp, string(body)
}

var csrfField = regexp.MustCompile(`name="csrf" value="([^"]+)"`)

func token(t *testing.T, page string) string {
	t.Helper()
	m := csrfField.FindStringSubmatch(page)
	if m == nil {
		t.Fatalf("no CSRF token in %s", page)
	}
	return m[1]
}

// login signs in through the form, as a person would.
func (b *browser) login(user, pw string) *http.Response {
	b.f.t.Helper()
	_, page := b.get("/login")
	resp, _ := b.post("/login", url.Values{"csrf": {token(b.f.t, page)}, "user": {user}, "password": {pw}}, nil)
	return resp
}

func TestLoginAndSession(t *testing.T) {
	f := newFixture(t)
	b := f.browser()

	resp, page := b.get("/login")
	if resp.StatusCode != 200 || !strings.Contains(page, `type="password"`) {
		t.Fatalf("login page: %d", resp.StatusCode)
	}
	for _, h := range []string{"Content-Security-Policy", "X-Content-Type-Options", "X-Frame-Options", "Referrer-Policy"} {
		if resp.Header.Get(h) == "" {
			t.Errorf("no %s header", h)
		}
	}
	if csp := resp.Header.Get("Content-Security-Policy"); !strings.Contains(csp, "default-src 'none'") || strings.Contains(csp, "script-src") {
		t.Errorf("CSP %q", csp)
	}

	tests := []struct {
		name   string
		form   url.Values
		hdr    map[string]string
		status int
	}{
		{"no CSRF token", url.Values{"user": {"alice"}, "password": {"alice-pw"}}, nil, http.StatusForbidden},
		{"wrong CSRF token", url.Values{"csrf": {"forged"}, "user": {"alice"}, "password": {"alice-pw"}}, nil, http.StatusForbidden},
		{"cross-site post", url.Values{"csrf": {token(t, page)}, "user": {"alice"}, "password": {"alice-pw"}}, map[string]string{"Sec-Fetch-Site": "cross-site"}, http.StatusForbidden},
		{"wrong password", url.Values{"csrf": {token(t, page)}, "user": {"alice"}, "password": {"nope"}}, nil, http.StatusUnauthorized},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// Each attempt from a fresh form, except the token cases.
			form := tt.form
			if form.Get("csrf") != "" && form.Get("csrf") != "forged" {
				_, p := b.get("/login")
				form.Set("csrf", token(t, p))
			}
			resp, _ := b.post("/login", form, tt.hdr)
			if resp.StatusCode != tt.status {
				t.Fatalf("status %d, want %d", resp.StatusCode, tt.status)
			}
			if c := sessionCookie(resp); c != nil && c.MaxAge > 0 {
				t.Fatal("a session was opened")
			}
		})
	}

	resp = b.login("alice", "alice-pw")
	if resp.StatusCode != http.StatusSeeOther || resp.Header.Get("Location") != "/mail" {
		t.Fatalf("login: %d %s", resp.StatusCode, resp.Header.Get("Location"))
	}
	c := sessionCookie(resp)
	if c == nil || !c.HttpOnly || !c.Secure || c.SameSite != http.SameSiteStrictMode || c.Path != "/" {
		t.Fatalf("session cookie %+v", c)
	}
	if resp, _ := b.get("/mail"); resp.StatusCode != 200 {
		t.Fatalf("/mail: %d", resp.StatusCode)
	}

	// Idle timeout.
	f.clk.add(11 * time.Minute)
	if resp, _ := b.get("/mail"); resp.StatusCode != http.StatusSeeOther {
		t.Fatalf("after the idle timeout: %d", resp.StatusCode)
	}

	// Logout needs the session's token.
	b.login("alice", "alice-pw")
	_, listPage := b.get("/mail")
	b.post("/logout", url.Values{"csrf": {"forged"}}, nil)
	b.c.Jar.SetCookies(mustURL(f.srv.URL), []*http.Cookie{c}) // a stolen old cookie is dead too
	b2 := f.browser()
	b2.login("alice", "alice-pw")
	if resp, _ := b2.get("/mail"); resp.StatusCode != 200 {
		t.Fatalf("second browser: %d", resp.StatusCode)
	}
	b2.post("/logout", url.Values{"csrf": {token(t, listPage)}}, nil) // another session's token: no effect
	if resp, _ := b2.get("/mail"); resp.StatusCode != 200 {
		t.Fatal("logout with another session's token worked")
	}
	_, p2 := b2.get("/mail")
	b2.post("/logout", url.Values{"csrf": {token(t, p2)}}, nil)
	if resp, _ := b2.get("/mail"); resp.StatusCode != http.StatusSeeOther {
		t.Fatal("still signed in after logout")
	}

	// Signing in again and again keeps at most 10 sessions per user.
	for i := 0; i < 15; i++ {
		f.browser().login("bob", "bob-pw")
	}
	if n := f.web.Sessions(); n > maxSessionsPerUser+1 {
		t.Fatalf("%d sessions after 15 logins of bob (and alice's one)", n)
	}

	// Failed logins are limited like IMAP's.
	b3 := f.browser()
	for i := 0; i < 3; i++ {
		b3.login("bob", "guess")
	}
	if resp := b3.login("bob", "bob-pw"); resp.StatusCode != http.StatusTooManyRequests {
		t.Fatalf("after 3 failures: %d", resp.StatusCode)
	}
}

func mustURL(s string) *url.URL { u, _ := url.Parse(s); return u }

func sessionCookie(resp *http.Response) *http.Cookie {
	for _, c := range resp.Cookies() {
		if c.Name == cookieSession {
			return c
		}
	}
	return nil
}

// TestIsolation: neither user can list, open, download or guess the
// other's mail.
func TestIsolation(t *testing.T) {
	f := newFixture(t)
	f.enqueue(string(teststore.Message("alice private", "for alice only")), "alice@example.test")
	f.enqueue(string(teststore.Message("bob private 1", "for bob only")), "bob@example.test")
	f.enqueue(attachmentMsg("bob private 2", "bob-secret.txt", "Ym9iJ3Mgc2VjcmV0"), "bob@example.test")

	a := f.browser()
	a.login("alice@example.test", "alice-pw")
	_, list := a.get("/mail")
	if !strings.Contains(list, "alice private") || strings.Contains(list, "bob private") {
		t.Fatalf("alice's list:\n%s", list)
	}
	for uid := 0; uid <= 5; uid++ {
		for _, p := range []string{"/mail/%d", "/mail/%d/raw", "/mail/%d/part/0", "/mail/%d/part/1", "/mail/%d?view=text"} {
			resp, body := a.get(fmt.Sprintf(p, uid))
			if strings.Contains(body, "bob") {
				t.Fatalf("alice reached bob's mail at %s: %d %q", fmt.Sprintf(p, uid), resp.StatusCode, body[:min(len(body), 200)])
			}
			if uid != 1 && resp.StatusCode != http.StatusNotFound {
				t.Errorf("%s: %d, want 404", fmt.Sprintf(p, uid), resp.StatusCode)
			}
		}
	}
	b := f.browser()
	b.login("bob", "bob-pw")
	_, list = b.get("/mail")
	if !strings.Contains(list, "bob private 1") || !strings.Contains(list, "bob private 2") || strings.Contains(list, "alice") {
		t.Fatalf("bob's list:\n%s", list)
	}
}

func attachmentMsg(subject, name, b64 string) string {
	return "From: Carol <carol@example.org>\r\nTo: x@example.test\r\nSubject: " + subject + "\r\nMIME-Version: 1.0\r\n" +
		"Content-Type: multipart/mixed; boundary=\"zz\"\r\n\r\n--zz\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n" +
		"--zz\r\nContent-Type: text/html\r\nContent-Disposition: attachment; filename=\"" + name + "\"\r\n" +
		"Content-Transfer-Encoding: base64\r\n\r\n" + b64 + "\r\n--zz--\r\n"
}

// TestHostileMessages: scripts, frames, remote images, handlers and
// javascript: links never reach the page; broken MIME and non-MIME show
// as text; downloads are attachments.
func TestHostileMessages(t *testing.T) {
	f := newFixture(t)
	const hostile = "From: Mallory <m@evil.example>\r\nTo: alice@example.test\r\nSubject: Invoice\r\nMIME-Version: 1.0\r\n" +
		"Content-Type: multipart/alternative; boundary=\"alt\"\r\n\r\n" +
		"--alt\r\nContent-Type: text/plain\r\n\r\nplain version\r\n" +
		"--alt\r\nContent-Type: text/html; charset=utf-8\r\n\r\n" +
		"<html><head><script>alert(1)</script><style>body{background:url(http://evil.example/s.png)}</style>" +
		"<meta http-equiv=\"refresh\" content=\"0;url=http://evil.example/\"><base href=\"http://evil.example/\"></head>" +
		"<body onload=\"steal()\"><p style=\"background:url(http://evil.example/p.png)\">Pay <b>now</b></p>" +
		"<img src=\"http://evil.example/track.gif\" width=1><img src=x onerror=alert(2)>" +
		"<iframe src=\"http://evil.example/frame\"></iframe><object data=\"http://evil.example/o\"></object>" +
		"<form action=\"http://evil.example/phish\"><input name=pw></form>" +
		"<a href=\"javascript:alert(3)\">click</a> <a href=\"https://example.org/ok\">ok link</a>" +
		"<svg><script>alert(4)</script></svg><link rel=stylesheet href=\"http://evil.example/x.css\">" +
		"</body></html>\r\n--alt--\r\n"
	f.enqueue(hostile, "alice@example.test")
	f.enqueue("From: x@example.org\r\nSubject: broken\r\nContent-Type: multipart/mixed; boundary=\"never\"\r\n\r\n--never\r\nContent-Type: text/plain\r\n\r\nstart of a broken message\r\n", "alice@example.test")
	f.enqueue("this is not a mail message at all\x00\xff\r\n", "alice@example.test")
	f.enqueue(attachmentMsg("with attachment", "../../etc/evil.html", "PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg=="), "alice@example.test")

	b := f.browser()
	b.login("alice", "alice-pw")
	resp, page := b.get("/mail/1")
	if resp.StatusCode != 200 || !strings.Contains(page, "Pay <b>now</b>") || !strings.Contains(page, "Invoice") {
		t.Fatalf("hostile message page: %d\n%s", resp.StatusCode, page)
	}
	lower := strings.ToLower(page)
	for _, bad := range []string{"<script", "<iframe", "<object", "<img", "<form action=\"http", "<meta http-equiv", "<base",
		"<style", "<svg", "onload", "onerror", "javascript:", "http://evil.example", "style="} {
		if strings.Contains(lower, bad) {
			t.Errorf("page contains %q", bad)
		}
	}
	if n := strings.Count(lower, "<link"); n != 1 {
		t.Errorf("%d <link> elements, want only the page's stylesheet", n)
	}
	if !strings.Contains(page, `href="https://example.org/ok"`) || !strings.Contains(page, `rel="nofollow noreferrer`) {
		t.Errorf("the harmless link is gone or unprotected")
	}
	if !strings.Contains(page, "image(s) were not loaded") {
		t.Error("no note about removed images")
	}
	if _, text := b.get("/mail/1?view=text"); !strings.Contains(text, "plain version") {
		t.Error("plain-text view")
	}

	if resp, page := b.get("/mail/2"); resp.StatusCode != 200 || !strings.Contains(page, "start of a broken message") {
		t.Errorf("broken MIME: %d\n%s", resp.StatusCode, page)
	}
	if resp, page := b.get("/mail/3"); resp.StatusCode != 200 || !strings.Contains(page, "not a mail message") {
		t.Errorf("not MIME: %d\n%s", resp.StatusCode, page)
	}

	_, page = b.get("/mail/4")
	if !strings.Contains(page, ">evil.html</a>") {
		t.Errorf("attachment not listed with a safe name:\n%s", page)
	}
	resp, body := b.get("/mail/4/part/1")
	if ct := resp.Header.Get("Content-Type"); ct != "application/octet-stream" {
		t.Errorf("attachment served as %q", ct)
	}
	if cd := resp.Header.Get("Content-Disposition"); !strings.HasPrefix(cd, "attachment;") || strings.Contains(cd, "/") {
		t.Errorf("Content-Disposition %q", cd)
	}
	if body != "<script>alert(1)</script>" || resp.Header.Get("X-Content-Type-Options") != "nosniff" {
		t.Errorf("attachment body %q", body)
	}
}

// TestRawIsQueuedBytes: the original download is the queued message,
// byte for byte.
func TestRawIsQueuedBytes(t *testing.T) {
	f := newFixture(t)
	msg := attachmentMsg("raw", "a.txt", "aGVsbG8=")
	id := f.enqueue(msg, "alice@example.test")
	want, err := io.ReadAll(f.store.Body(context.Background(), teststore.Records(t, f.store, id)[0]))
	if err != nil {
		t.Fatal(err)
	}
	b := f.browser()
	b.login("alice", "alice-pw")
	resp, body := b.get("/mail/1/raw")
	if body != string(want) || resp.Header.Get("Content-Type") != "application/octet-stream" {
		t.Fatalf("raw download differs: %q", body)
	}
}

func TestSafeName(t *testing.T) {
	tests := []struct{ in, ct, want string }{
		{"report.pdf", "application/pdf", "report.pdf"},
		{"../../etc/passwd", "text/plain", "passwd"},
		{`C:\Users\x\evil.exe`, "application/octet-stream", "evil.exe"},
		{"a\x00b\r\nc\".txt", "text/plain", "abc.txt"},
		{"...", "text/plain", "part-3.txt"},
		{"", "message/rfc822", "part-3.eml"},
		{strings.Repeat("x", 300) + ".txt", "text/plain", strings.Repeat("x", 116) + ".txt"},
	}
	for _, tt := range tests {
		if got := safeName(tt.in, 2, tt.ct); got != tt.want {
			t.Errorf("safeName(%q) = %q, want %q", tt.in, got, tt.want)
		}
	}
}

// TestParseBounded: a huge text part is cut for the page, with a note.
func TestParseBounded(t *testing.T) {
	msg := "Subject: big\r\nContent-Type: text/plain\r\n\r\n" + strings.Repeat("0123456789abcdé\r\n", 200000)
	p := parse(strings.NewReader(msg))
	if len(p.text) > maxTextShown || len(p.text) < maxTextShown-4 || len(p.notes) != 1 {
		t.Fatalf("text %d bytes, notes %v", len(p.text), p.notes)
	}
	if !utf8.ValidString(p.text) {
		t.Fatal("cut inside a character")
	}
}
