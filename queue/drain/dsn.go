package drain

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/mxq-dev/mxq/queue"
	"github.com/mxq-dev/mxq/queue/delivery"
	"github.com/mxq-dev/mxq/queue/envelope"
)

// DSNRoute is the route that carries delivery status notifications to the
// outbound smarthost.
const DSNRoute = "dsn"

// DSNReporter writes delivery status notifications (RFC 3464, in an RFC
// 6522 multipart/report) for recipients that failed for good, and queues
// them on the DSN route, in the same atomic write that dead-letters the
// recipients. A report goes to the envelope sender only: never to the null
// sender <> (a bounce of a bounce would loop), never about a report.
type DSNReporter struct {
	// Hostname names the reporting MTA.
	Hostname string
	// NewID gives the report its queue ID.
	NewID  func() string
	Logger *slog.Logger
}

// maxHeaderBytes bounds how much of the original message is returned in
// the report: its header, as RFC 3462's text/rfc822-headers.
const maxHeaderBytes = 64 << 10

// Report implements Reporter.
func (r *DSNReporter) Report(env *envelope.Envelope, failed []delivery.Result, original io.Reader, now time.Time) *queue.Output {
	if env.From == "" || env.Kind == envelope.KindDSN {
		return nil
	}
	hdr := readHeader(original, maxHeaderBytes)
	id := r.NewID()
	msg := BuildDSN(r.Hostname, id, env, failed, hdr, now)
	out := &envelope.Envelope{
		ID: id, Kind: envelope.KindDSN, From: "", To: []string{env.From},
		Arrived: now.UTC(), Route: DSNRoute, UTF8: !isASCII(env.From),
	}
	return &queue.Output{Env: out, Data: msg}
}

// readHeader returns the header section of a message: up to the first
// empty line, at most max bytes, cut at a line boundary.
func readHeader(r io.Reader, max int) []byte {
	br := bufio.NewReader(io.LimitReader(r, int64(max)))
	var out bytes.Buffer
	for {
		line, err := br.ReadBytes('\n')
		if len(bytes.TrimRight(line, "\r\n")) == 0 && (len(line) > 0 || err != nil) {
			break
		}
		if err != nil {
			break // truncated: keep only complete lines
		}
		out.Write(line)
	}
	return out.Bytes()
}

// BuildDSN renders the report.
func BuildDSN(host, id string, env *envelope.Envelope, failed []delivery.Result, header []byte, now time.Time) []byte {
	boundary := id + "/" + host
	utf8Addrs := !isASCII(env.From)
	for _, f := range failed {
		utf8Addrs = utf8Addrs || !isASCII(f.Rcpt)
	}
	statusType := "message/delivery-status"
	if utf8Addrs {
		statusType = "message/global-delivery-status" // RFC 6533
	}
	var b bytes.Buffer
	w := func(format string, a ...any) { fmt.Fprintf(&b, format, a...) }
	w("Received: from localhost by %s (mxq) with local id %s;\r\n\t%s\r\n", host, id, now.Format(time.RFC1123Z))
	w("From: Mail Delivery System <MAILER-DAEMON@%s>\r\n", host)
	w("To: <%s>\r\n", env.From)
	w("Subject: Undelivered Mail Returned to Sender\r\n")
	w("Date: %s\r\n", now.Format(time.RFC1123Z))
	w("Message-ID: <%s@%s>\r\n", id, host)
	w("Auto-Submitted: auto-replied\r\n")
	w("MIME-Version: 1.0\r\n")
	w("Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"%s\"\r\n", boundary)
	w("\r\n")
	w("This is a MIME-encapsulated message.\r\n\r\n")

	w("--%s\r\n", boundary)
	w("Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n")
	w("This is the mail system at %s.\r\n\r\n", host)
	w("Your message (queue ID %s, received %s) could not be delivered\r\n", env.ID, env.Arrived.UTC().Format(time.RFC1123Z))
	w("to the following recipients. It has been kept as a dead letter; the\r\n")
	w("postmaster can retry it once the problem is fixed.\r\n\r\n")
	for _, f := range failed {
		w("<%s>: %s\r\n", f.Rcpt, oneLine(f.String()))
	}
	w("\r\n")

	w("--%s\r\n", boundary)
	w("Content-Type: %s\r\n\r\n", statusType)
	w("Reporting-MTA: dns; %s\r\n", host)
	w("X-Mxq-Queue-ID: %s\r\n", env.ID)
	w("Arrival-Date: %s\r\n", env.Arrived.UTC().Format(time.RFC1123Z))
	for _, f := range failed {
		addrType := "rfc822"
		if !isASCII(f.Rcpt) {
			addrType = "utf-8"
		}
		w("\r\n")
		w("Final-Recipient: %s; %s\r\n", addrType, f.Rcpt)
		w("Action: failed\r\n")
		w("Status: %s\r\n", dsnStatus(f))
		if f.Code != 0 {
			w("Diagnostic-Code: smtp; %s\r\n", oneLine(f.String()))
		}
		w("Last-Attempt-Date: %s\r\n", now.UTC().Format(time.RFC1123Z))
	}
	w("\r\n")

	w("--%s\r\n", boundary)
	w("Content-Type: text/rfc822-headers\r\n\r\n")
	b.Write(header)
	w("\r\n--%s--\r\n", boundary)
	return b.Bytes()
}

// dsnStatus is the RFC 3463 status for the report: the store's enhanced
// code when it gave one, else its class with generic detail.
func dsnStatus(r delivery.Result) string {
	if r.Enhanced != "" {
		return r.Enhanced
	}
	if r.Code >= 400 && r.Code < 600 {
		return fmt.Sprintf("%d.0.0", r.Code/100)
	}
	return "5.0.0"
}

func oneLine(s string) string {
	return strings.Join(strings.Fields(s), " ")
}

func isASCII(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] >= utf8.RuneSelf {
			return false
		}
	}
	return true
}
