package imapview

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-imap/v2"
	"github.com/emersion/go-imap/v2/imapclient"
	"golang.org/x/crypto/bcrypt"

	"github.com/mxq-dev/mxq/continuity/auth"
	"github.com/mxq-dev/mxq/continuity/index"
	"github.com/mxq-dev/mxq/continuity/internal/teststore"
	"github.com/mxq-dev/mxq/continuity/mail"
	"github.com/mxq-dev/mxq/internal/testpki"
	"github.com/mxq-dev/mxq/queue"
)

// fixture is a running IMAP view over a real queue.
type fixture struct {
	t         *testing.T
	store     *queue.Store
	idx       *index.Index
	ca        *testpki.CA
	addr      string // implicit TLS
	startAddr string // STARTTLS
	srv       *Server
}

const multipart = "From: Carol <carol@example.org>\r\nTo: alice@example.test\r\nSubject: alice two\r\n" +
	"Date: Tue, 03 Jan 2006 10:00:00 +0000\r\nMIME-Version: 1.0\r\n" +
	"Content-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n" +
	"--b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nthe report is attached\r\n" +
	"--b1\r\nContent-Type: application/pdf\r\nContent-Disposition: attachment; filename=\"report.pdf\"\r\n" +
	"Content-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQK\r\n--b1--\r\n"

func newFixture(t *testing.T) *fixture {
	t.Helper()
	f := &fixture{t: t, store: teststore.New(t, 64<<10)}
	f.idx = index.New(teststore.Catalog(t, f.store), f.store, index.Options{})

	var lines []string
	for _, u := range []string{"alice", "bob"} {
		h, _ := bcrypt.GenerateFromPassword([]byte(u+"-pw"), 4)
		lines = append(lines, u+"@example.test:{BLF-CRYPT}"+string(h))
	}
	pw := filepath.Join(t.TempDir(), "passwd")
	os.WriteFile(pw, []byte(strings.Join(lines, "\n")+"\n"), 0o600)
	pf, err := auth.OpenPasswdFile(pw, "", nil)
	if err != nil {
		t.Fatal(err)
	}
	guard := auth.NewGuard(pf, auth.Limits{PerUser: 3, PerIP: 100, Window: time.Minute}, "", nil, nil, nil)
	f.ca, _ = testpki.NewCA("imapview test")
	leaf, _ := f.ca.Issue("127.0.0.1")
	tlsCfg := &tls.Config{Certificates: []tls.Certificate{leaf.Cert}, MinVersion: tls.VersionTLS12}
	f.srv = New(Options{Folder: "INBOX", Reader: mail.New(f.store, f.idx, nil, nil), Guard: guard, TLS: tlsCfg,
		Logger: slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn}))})
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	ln2, _ := net.Listen("tcp", "127.0.0.1:0")
	f.addr, f.startAddr = ln.Addr().String(), ln2.Addr().String()
	go f.srv.ServeTLS(ln)
	go f.srv.ServeSTARTTLS(ln2)
	t.Cleanup(func() { f.srv.Close() })
	return f
}

// testWriter sends the server's warnings to the test log.
type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

func (f *fixture) enqueue(msg string, to ...string) string {
	f.t.Helper()
	env := teststore.Enqueue(f.t, f.store, []byte(msg), to...)
	if err := f.idx.Sync(context.Background()); err != nil {
		f.t.Fatal(err)
	}
	return env.ID
}

// body is what the queue holds for a queue ID: what IMAP must serve.
func (f *fixture) body(id string) []byte {
	f.t.Helper()
	recs := teststore.Records(f.t, f.store, id)
	b, err := io.ReadAll(f.store.Body(context.Background(), recs[0]))
	if err != nil {
		f.t.Fatal(err)
	}
	return b
}

func (f *fixture) login(user string, h *imapclient.UnilateralDataHandler) *imapclient.Client {
	f.t.Helper()
	c, err := imapclient.DialTLS(f.addr, &imapclient.Options{TLSConfig: &tls.Config{RootCAs: f.ca.Pool}, UnilateralDataHandler: h})
	if err != nil {
		f.t.Fatal(err)
	}
	f.t.Cleanup(func() { c.Close() })
	if err := c.Login(user, strings.TrimSuffix(user, "@example.test")+"-pw").Wait(); err != nil {
		f.t.Fatalf("login %s: %v", user, err)
	}
	return c
}

func code(err error) imap.ResponseCode {
	var ie *imap.Error
	if errors.As(err, &ie) {
		return ie.Code
	}
	return ""
}

func TestReadOnlyView(t *testing.T) {
	f := newFixture(t)
	one := f.enqueue(string(teststore.Message("alice one", "hello alice")), "alice@example.test")
	two := f.enqueue(multipart, "Alice@Example.Test")
	c := f.login("alice@example.test", nil)

	sel, err := c.Select("INBOX", nil).Wait()
	if err != nil {
		t.Fatal(err)
	}
	if sel.NumMessages != 2 || sel.UIDValidity != f.idx.UIDValidity() || sel.UIDNext != 3 || len(sel.PermanentFlags) != 0 {
		t.Fatalf("select: %+v", sel)
	}
	whole := &imap.FetchItemBodySection{Peek: true}
	text := &imap.FetchItemBodySection{Part: []int{1}, Peek: true}
	msgs, err := c.Fetch(imap.UIDSetNum(1, 2), &imap.FetchOptions{
		UID: true, Flags: true, Envelope: true, RFC822Size: true, InternalDate: true,
		BodyStructure: &imap.FetchItemBodyStructure{Extended: true}, BodySection: []*imap.FetchItemBodySection{whole, text},
	}).Collect()
	if err != nil {
		t.Fatal(err)
	}
	if len(msgs) != 2 {
		t.Fatalf("fetched %d messages", len(msgs))
	}
	for i, id := range []string{one, two} {
		m := msgs[i]
		want := f.body(id)
		if got := m.FindBodySection(whole); !bytes.Equal(got, want) {
			t.Errorf("UID %d: BODY[] differs from the queued message:\n%q\n%q", m.UID, got, want)
		}
		if !bytes.HasPrefix(want, []byte("From:")) {
			t.Errorf("fixture: %q", want[:20])
		}
		if m.RFC822Size != int64(len(want)) {
			t.Errorf("RFC822.SIZE %d, want %d", m.RFC822Size, len(want))
		}
		if m.InternalDate.IsZero() {
			t.Error("no INTERNALDATE")
		}
	}
	if s := msgs[0].Envelope.Subject; s != "alice one" {
		t.Errorf("envelope subject %q", s)
	}
	if from := msgs[1].Envelope.From; len(from) != 1 || from[0].Name != "Carol" {
		t.Errorf("envelope from %+v", from)
	}
	mp, ok := msgs[1].BodyStructure.(*imap.BodyStructureMultiPart)
	if !ok || mp.Subtype != "mixed" || len(mp.Children) != 2 {
		t.Fatalf("bodystructure %#v", msgs[1].BodyStructure)
	}
	if got := string(msgs[1].FindBodySection(text)); got != "the report is attached" {
		t.Errorf("BODY[1] = %q", got)
	}

	// SEARCH by the usual keys.
	searches := []struct {
		name string
		c    imap.SearchCriteria
		want []imap.UID
	}{
		{"all", imap.SearchCriteria{}, []imap.UID{1, 2}},
		{"subject", imap.SearchCriteria{Header: []imap.SearchCriteriaHeaderField{{Key: "Subject", Value: "TWO"}}}, []imap.UID{2}},
		{"from", imap.SearchCriteria{Header: []imap.SearchCriteriaHeaderField{{Key: "From", Value: "carol"}}}, []imap.UID{2}},
		{"body", imap.SearchCriteria{Body: []string{"hello alice"}}, []imap.UID{1}},
		{"text in header", imap.SearchCriteria{Text: []string{"alice two"}}, []imap.UID{2}},
		{"larger", imap.SearchCriteria{Larger: 300}, []imap.UID{2}},
		{"since", imap.SearchCriteria{Since: time.Now().Add(-48 * time.Hour)}, []imap.UID{1, 2}},
		{"sent before", imap.SearchCriteria{SentBefore: time.Date(2006, 1, 3, 0, 0, 0, 0, time.UTC)}, []imap.UID{1}},
		{"not", imap.SearchCriteria{Not: []imap.SearchCriteria{{Body: []string{"hello"}}}}, []imap.UID{2}},
		{"uid", imap.SearchCriteria{UID: []imap.UIDSet{imap.UIDSetNum(2)}}, []imap.UID{2}},
		{"unseen", imap.SearchCriteria{NotFlag: []imap.Flag{imap.FlagSeen}}, []imap.UID{1, 2}},
	}
	for _, s := range searches {
		t.Run("search "+s.name, func(t *testing.T) {
			data, err := c.UIDSearch(&s.c, nil).Wait()
			if err != nil {
				t.Fatal(err)
			}
			if got := data.AllUIDs(); !equalUIDs(got, s.want) {
				t.Fatalf("got %v, want %v", got, s.want)
			}
		})
	}

	// Writes are refused with a reason; nothing changes in the queue.
	var refused []error
	refused = append(refused, c.Store(imap.UIDSetNum(1), &imap.StoreFlags{Op: imap.StoreFlagsAdd, Flags: []imap.Flag{imap.FlagDeleted}}, nil).Close())
	_, err = c.Copy(imap.UIDSetNum(1), "Archive").Wait()
	refused = append(refused, err)
	refused = append(refused, c.Create("Archive", nil).Wait(), c.Delete("INBOX").Wait(), c.Rename("INBOX", "Old", nil).Wait())
	app := c.Append("INBOX", 5, nil)
	app.Write([]byte("hello"))
	app.Close()
	_, err = app.Wait()
	refused = append(refused, err)
	for i, err := range refused {
		if code(err) != imap.ResponseCodeCannot {
			t.Errorf("refusal %d: %v, want NO [CANNOT]", i, err)
		}
	}
	if err := c.Expunge().Close(); err != nil {
		t.Errorf("expunge: %v", err)
	}
	if got := f.body(one); len(got) == 0 {
		t.Fatal("queued message gone")
	}

	// Flags live in the session: \Seen when read, \Flagged by STORE, and
	// gone in the next session.
	if _, err := c.Fetch(imap.UIDSetNum(1), &imap.FetchOptions{BodySection: []*imap.FetchItemBodySection{{}}}).Collect(); err != nil {
		t.Fatal(err)
	}
	if err := c.Store(imap.UIDSetNum(2), &imap.StoreFlags{Op: imap.StoreFlagsAdd, Flags: []imap.Flag{imap.FlagFlagged}, Silent: true}, nil).Close(); err != nil {
		t.Fatal(err)
	}
	flags := func(c *imapclient.Client) [][]imap.Flag {
		msgs, err := c.Fetch(imap.UIDSetNum(1, 2), &imap.FetchOptions{Flags: true}).Collect()
		if err != nil {
			t.Fatal(err)
		}
		return [][]imap.Flag{msgs[0].Flags, msgs[1].Flags}
	}
	if got := flags(c); len(got[0]) != 1 || got[0][0] != imap.FlagSeen || len(got[1]) != 1 || got[1][0] != imap.FlagFlagged {
		t.Fatalf("session flags %v", got)
	}
	c2 := f.login("alice@example.test", nil)
	if _, err := c2.Select("INBOX", nil).Wait(); err != nil {
		t.Fatal(err)
	}
	if got := flags(c2); len(got[0])+len(got[1]) != 0 {
		t.Fatalf("flags leaked into another session: %v", got)
	}

	// LIST shows the one folder; another is not there.
	list, err := c.List("", "*", nil).Collect()
	if err != nil || len(list) != 1 || list[0].Mailbox != "INBOX" {
		t.Fatalf("list: %v %+v", err, list)
	}
	if _, err := c.Select("Sent", nil).Wait(); code(err) != imap.ResponseCodeNonExistent {
		t.Fatalf("select Sent: %v", err)
	}
}

func equalUIDs(a, b []imap.UID) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// TestIsolation: a user lists, fetches and searches only their own mail,
// whatever UIDs they try.
func TestIsolation(t *testing.T) {
	f := newFixture(t)
	f.enqueue(string(teststore.Message("for alice", "alice text")), "alice@example.test")
	bobID := f.enqueue(string(teststore.Message("bob secret", "bob's private words")), "bob@example.test")
	f.enqueue(string(teststore.Message("bob secret two", "more of bob")), "bob@example.test")
	bobBody := f.body(bobID)

	c := f.login("alice@example.test", nil)
	sel, err := c.Select("INBOX", nil).Wait()
	if err != nil || sel.NumMessages != 1 {
		t.Fatalf("alice select: %v %+v", err, sel)
	}
	// Guess UIDs: everything from 1 to 1000, by UID and by sequence.
	for _, set := range []imap.NumSet{imap.UIDSet{imap.UIDRange{Start: 1, Stop: 1000}}, imap.SeqSet{imap.SeqRange{Start: 1, Stop: 1000}}} {
		msgs, err := c.Fetch(set, &imap.FetchOptions{UID: true, BodySection: []*imap.FetchItemBodySection{{Peek: true}}}).Collect()
		if err != nil {
			t.Fatal(err)
		}
		if len(msgs) != 1 || msgs[0].UID != 1 {
			t.Fatalf("alice fetched %d messages", len(msgs))
		}
		for _, m := range msgs {
			for _, b := range m.BodySection {
				if bytes.Contains(b.Bytes, []byte("bob")) || bytes.Equal(b.Bytes, bobBody) {
					t.Fatalf("alice read bob's mail: %q", b.Bytes)
				}
			}
		}
	}
	for _, crit := range []imap.SearchCriteria{{Text: []string{"bob"}}, {Header: []imap.SearchCriteriaHeaderField{{Key: "Subject", Value: "secret"}}}} {
		data, err := c.UIDSearch(&crit, nil).Wait()
		if err != nil || len(data.AllUIDs()) != 0 {
			t.Fatalf("alice's search found %v (%v)", data.AllUIDs(), err)
		}
	}
	st, err := c.Status("INBOX", &imap.StatusOptions{NumMessages: true}).Wait()
	if err != nil || *st.NumMessages != 1 {
		t.Fatalf("status: %v %+v", err, st)
	}
	b := f.login("bob@example.test", nil)
	if sel, err := b.Select("INBOX", nil).Wait(); err != nil || sel.NumMessages != 2 {
		t.Fatalf("bob select: %v %+v", err, sel)
	}
}

// TestIdleSeesArrivalsAndDeliveries: a client in IDLE sees new mail as
// EXISTS and a message delivered to the store as EXPUNGE.
func TestIdleSeesArrivalsAndDeliveries(t *testing.T) {
	f := newFixture(t)
	first := f.enqueue(string(teststore.Message("first", "1")), "alice@example.test")
	var mu sync.Mutex
	var expunged []uint32
	var exists []uint32
	changed := make(chan struct{}, 16)
	h := &imapclient.UnilateralDataHandler{
		Expunge: func(seq uint32) { mu.Lock(); expunged = append(expunged, seq); mu.Unlock(); changed <- struct{}{} },
		Mailbox: func(d *imapclient.UnilateralDataMailbox) {
			if d.NumMessages != nil {
				mu.Lock()
				exists = append(exists, *d.NumMessages)
				mu.Unlock()
				changed <- struct{}{}
			}
		},
	}
	c := f.login("alice@example.test", h)
	if _, err := c.Select("INBOX", nil).Wait(); err != nil {
		t.Fatal(err)
	}
	idle, err := c.Idle()
	if err != nil {
		t.Fatal(err)
	}
	wait := func(what string) {
		t.Helper()
		select {
		case <-changed:
		case <-time.After(10 * time.Second):
			t.Fatalf("IDLE: no %s", what)
		}
	}
	// Arrival (Run follows the stream; no explicit Sync here).
	teststore.Enqueue(t, f.store, teststore.Message("second", "2"), "alice@example.test")
	wait("EXISTS")
	// Delivery of the first message: the drain deletes its record.
	if err := f.store.Complete(context.Background(), teststore.Records(t, f.store, first)[0]); err != nil {
		t.Fatal(err)
	}
	wait("EXPUNGE")
	if err := idle.Close(); err != nil {
		t.Fatal(err)
	}
	if err := idle.Wait(); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(exists) != 1 || exists[0] != 2 || len(expunged) != 1 || expunged[0] != 1 {
		t.Fatalf("EXISTS %v, EXPUNGE %v", exists, expunged)
	}
	msgs, err := c.Fetch(imap.SeqSetNum(1), &imap.FetchOptions{UID: true, Envelope: true}).Collect()
	if err != nil || len(msgs) != 1 || msgs[0].UID != 2 || msgs[0].Envelope.Subject != "second" {
		t.Fatalf("after the delivery: %v %+v", err, msgs)
	}
}

// TestLoginNeedsTLS: on the STARTTLS port a password is never taken in
// clear; after STARTTLS it is.
func TestLoginNeedsTLS(t *testing.T) {
	f := newFixture(t)
	c, err := imapclient.DialInsecure(f.startAddr, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Login("alice@example.test", "alice-pw").Wait(); code(err) != imap.ResponseCodePrivacyRequired {
		t.Fatalf("login in clear: %v", err)
	}
	s, err := imapclient.DialStartTLS(f.startAddr, &imapclient.Options{TLSConfig: &tls.Config{RootCAs: f.ca.Pool, ServerName: "127.0.0.1"}})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := s.Login("alice@example.test", "alice-pw").Wait(); err != nil {
		t.Fatalf("login after STARTTLS: %v", err)
	}
}

func TestFailedLoginsLimited(t *testing.T) {
	f := newFixture(t)
	try := func(pw string) error {
		c, err := imapclient.DialTLS(f.addr, &imapclient.Options{TLSConfig: &tls.Config{RootCAs: f.ca.Pool}})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		return c.Login("alice@example.test", pw).Wait()
	}
	for i := 0; i < 3; i++ {
		if err := try("wrong"); code(err) != imap.ResponseCodeAuthenticationFailed {
			t.Fatalf("attempt %d: %v", i, err)
		}
	}
	if err := try("alice-pw"); code(err) != imap.ResponseCodeUnavailable {
		t.Fatalf("after 3 failures: %v, want NO [UNAVAILABLE]", err)
	}
}

// TestBrokenMIME: a message whose MIME structure is broken still gets an
// ENVELOPE, a BODYSTRUCTURE and its bytes, and the connection survives.
func TestBrokenMIME(t *testing.T) {
	f := newFixture(t)
	broken := "From: x@example.org\r\nSubject: broken\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"a\"\r\n\r\n" +
		"--a\r\nContent-Type: multipart/alternative\r\n\r\nno boundary\r\n"
	id := f.enqueue(broken, "alice@example.test")
	f.enqueue("no header at all\x00\xff", "alice@example.test")
	c := f.login("alice@example.test", nil)
	if _, err := c.Select("INBOX", nil).Wait(); err != nil {
		t.Fatal(err)
	}
	whole := &imap.FetchItemBodySection{Peek: true}
	msgs, err := c.Fetch(imap.UIDSetNum(1, 2), &imap.FetchOptions{Envelope: true, BodyStructure: &imap.FetchItemBodyStructure{Extended: true},
		BodySection: []*imap.FetchItemBodySection{whole, {Part: []int{1, 1}, Peek: true}}}).Collect()
	if err != nil || len(msgs) != 2 {
		t.Fatalf("fetch: %v (%d)", err, len(msgs))
	}
	if !bytes.Equal(msgs[0].FindBodySection(whole), f.body(id)) || msgs[0].BodyStructure == nil {
		t.Fatalf("broken message: %+v", msgs[0])
	}
	if err := c.Noop().Wait(); err != nil {
		t.Fatalf("connection after the fetch: %v", err)
	}
}

func TestInRange(t *testing.T) {
	cases := []struct {
		start, stop, x, max uint32
		want                bool
	}{
		{1, 3, 2, 10, true},
		{1, 3, 4, 10, false},
		{3, 1, 2, 10, true},  // 3:1 is 1:3
		{5, 0, 10, 10, true}, // 5:*
		{5, 0, 4, 10, false},
		{0, 0, 10, 10, true}, // *
		{0, 0, 9, 10, false},
		{0, 5, 7, 10, true}, // *:5 is 5:*
		{1, 1, 1, 0, true},
	}
	for _, c := range cases {
		if got := inRange(c.start, c.stop, c.x, c.max); got != c.want {
			t.Errorf("inRange(%d, %d, %d, max %d) = %v", c.start, c.stop, c.x, c.max, got)
		}
	}
}
