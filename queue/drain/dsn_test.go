package drain

import (
	"bufio"
	"bytes"
	"context"
	"io"
	"mime"
	"mime/multipart"
	"net/mail"
	"net/textproto"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/mxq-dev/mxq/internal/testbackend"
	"github.com/mxq-dev/mxq/queue/delivery"
	"github.com/mxq-dev/mxq/queue/envelope"
)

// parseDSN checks the RFC 6522 structure and returns the parts by type.
func parseDSN(t *testing.T, msg []byte) (hdr mail.Header, parts map[string][]byte) {
	t.Helper()
	m, err := mail.ReadMessage(bytes.NewReader(msg))
	if err != nil {
		t.Fatalf("not a message: %v\n%s", err, msg)
	}
	mt, params, err := mime.ParseMediaType(m.Header.Get("Content-Type"))
	if err != nil || mt != "multipart/report" || params["report-type"] != "delivery-status" {
		t.Fatalf("Content-Type %q (%v)", m.Header.Get("Content-Type"), err)
	}
	parts = map[string][]byte{}
	var order []string
	mr := multipart.NewReader(m.Body, params["boundary"])
	for {
		p, err := mr.NextPart()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		ct, _, _ := mime.ParseMediaType(p.Header.Get("Content-Type"))
		b, _ := io.ReadAll(p)
		parts[ct] = b
		order = append(order, ct)
	}
	if len(order) != 3 || order[0] != "text/plain" || !strings.HasSuffix(order[1], "delivery-status") || order[2] != "text/rfc822-headers" {
		t.Fatalf("parts %v, want text/plain, delivery-status, text/rfc822-headers", order)
	}
	return m.Header, parts
}

func TestBuildDSN(t *testing.T) {
	env := &envelope.Envelope{ID: "00D20ABCDEF000000001", From: "alice@example.org", To: []string{"gone@example.test", "ok@example.test"},
		Arrived: time.Date(2026, 11, 20, 8, 0, 0, 0, time.UTC)}
	failed := []delivery.Result{{Rcpt: "gone@example.test", Code: 550, Enhanced: "5.1.1", Text: "no such user"}}
	orig := "Subject: hello\r\nFrom: alice@example.org\r\n\r\nsecret body\r\n"
	r := &DSNReporter{Hostname: "mx.example.test", NewID: func() string { return "00D20ABCDEF000000002" }}
	out := r.Report(env, failed, strings.NewReader(orig), time.Date(2026, 11, 22, 8, 0, 0, 0, time.UTC))
	if out == nil {
		t.Fatal("no report")
	}
	if out.Env.From != "" || out.Env.To[0] != "alice@example.org" || out.Env.Kind != envelope.KindDSN || out.Env.Route != DSNRoute {
		t.Fatalf("report envelope %+v", out.Env)
	}
	hdr, parts := parseDSN(t, out.Data)
	if hdr.Get("Auto-Submitted") != "auto-replied" || hdr.Get("To") != "<alice@example.org>" {
		t.Fatalf("headers %v", hdr)
	}
	// The delivery-status part is a header block per recipient.
	status := parts["message/delivery-status"]
	blocks := strings.Split(strings.TrimSpace(string(status)), "\r\n\r\n")
	if len(blocks) != 2 {
		t.Fatalf("%d blocks in delivery-status:\n%s", len(blocks), status)
	}
	per, err := textproto.NewReader(bufioReader(blocks[0] + "\r\n\r\n")).ReadMIMEHeader()
	if err != nil || per.Get("Reporting-Mta") != "dns; mx.example.test" || per.Get("X-Mxq-Queue-Id") != env.ID {
		t.Fatalf("per-message fields %v (%v)", per, err)
	}
	rc, err := textproto.NewReader(bufioReader(blocks[1] + "\r\n\r\n")).ReadMIMEHeader()
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range map[string]string{"Final-Recipient": "rfc822; gone@example.test", "Action": "failed", "Status": "5.1.1", "Diagnostic-Code": "smtp; 550 5.1.1 no such user"} {
		if rc.Get(k) != v {
			t.Errorf("%s: %q, want %q", k, rc.Get(k), v)
		}
	}
	if got := string(parts["text/rfc822-headers"]); !strings.Contains(got, "Subject: hello") || strings.Contains(got, "secret body") {
		t.Fatalf("returned headers %q: want the header, not the body", got)
	}
	if !strings.Contains(string(parts["text/plain"]), "gone@example.test") {
		t.Fatalf("human part does not name the recipient")
	}
}

func TestNoDSNForNullSenderOrReport(t *testing.T) {
	r := &DSNReporter{Hostname: "h", NewID: func() string { return "X" }}
	failed := []delivery.Result{{Rcpt: "x@example.test", Code: 550}}
	for _, env := range []*envelope.Envelope{
		{ID: "A", From: "", To: []string{"x@example.test"}},
		{ID: "B", From: "a@b.c", To: []string{"x@example.test"}, Kind: envelope.KindDSN},
	} {
		if out := r.Report(env, failed, strings.NewReader(""), time.Now()); out != nil {
			t.Errorf("report for %+v", env)
		}
	}
}

// End to end in the drain: a 5xx recipient yields a report delivered to the
// smarthost (a real SMTP server), a dead letter, and nothing for <>.
func TestDSNDelivered(t *testing.T) {
	st := testStore(t)
	store, err := testbackend.Start("127.0.0.1:0", testbackend.Options{
		RcptReply: func(rcpt string) *smtp.SMTPError {
			if strings.HasPrefix(rcpt, "gone@") {
				return testbackend.Reply(550, "5.1.1", "no such user")
			}
			return nil
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	smarthost, err := testbackend.Start("127.0.0.1:0", testbackend.Options{SMTP: true, KeepData: true})
	if err != nil {
		t.Fatal(err)
	}
	defer smarthost.Close()
	ids := envelope.NewIDGen(time.Now, 11)
	startDrain(t, st, store, func(o *Options) {
		sh := delivery.New(delivery.Options{Protocol: "smtp", Address: smarthost.Addr()})
		o.Routes = append(o.Routes, Route{Name: DSNRoute, Deliverer: sh, Ramp: flatRamp(100, 2), DSN: true})
		o.Reporter = &DSNReporter{Hostname: "mx.example.test", NewID: ids.New}
	})
	for _, from := range []string{"alice@example.org", ""} {
		env := &envelope.Envelope{ID: ids.New(), From: from, To: []string{"gone@example.test", "ok@example.test"}, Arrived: time.Now().UTC()}
		if err := st.Enqueue(context.Background(), env, strings.NewReader("Subject: to be bounced\r\n\r\nbody\r\n")); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "report delivered", 15*time.Second, func() bool { return smarthost.Count() >= 1 })
	waitFor(t, "both dead-lettered", 15*time.Second, func() bool { _, d := queued(t, st); return d == 2 })
	time.Sleep(300 * time.Millisecond)
	dl := smarthost.Deliveries()
	if len(dl) != 1 {
		t.Fatalf("%d reports, want 1 (none for the null sender)", len(dl))
	}
	if dl[0].Rcpt != "alice@example.org" || dl[0].From != "" {
		t.Fatalf("report sent from <%s> to <%s>", dl[0].From, dl[0].Rcpt)
	}
	_, parts := parseDSN(t, dl[0].Data)
	if !strings.Contains(string(parts["message/delivery-status"]), "Status: 5.1.1") {
		t.Fatalf("status part:\n%s", parts["message/delivery-status"])
	}
	if n := store.Count(); n != 2 {
		t.Fatalf("%d deliveries to ok@, want 2", n)
	}
}

func bufioReader(s string) *bufio.Reader { return bufio.NewReader(strings.NewReader(s)) }
