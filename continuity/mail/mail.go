// Package mail is the one door through which the continuity views (IMAP
// and web) reach a held message: by the user's own mailbox and a UID in
// it, never by queue ID or sequence, so a user can name nothing but their
// own mail.
//
// Every open checks again, on the record read from the stream, that the
// user is one of its recipients: the index decides what is listed, the
// record decides what is served. The bytes served are the record's body
// exactly as queued (Store.Body), mxq's Received header included.
//
// Opens that show a message's content to the user are audit-logged (one
// line: who, which message, how) and counted; the views' own reads for
// listing (headers, structure, search) are not, or every listing would
// flood the log.
package mail

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"time"

	gomessage "github.com/emersion/go-message"
	"github.com/emersion/go-message/mail"
	"github.com/emersion/go-message/textproto"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/mxq-dev/mxq/continuity/index"
	"github.com/mxq-dev/mxq/internal/mailaddr"
	"github.com/mxq-dev/mxq/queue"
)

// ErrNotFound: no such message in the user's mailbox (never was, or
// delivered meanwhile).
var ErrNotFound = errors.New("no such message")

// Who is the reader.
type Who struct {
	User  string // mailbox key
	Proto string // imap, web
	Addr  string // client address
}

// Observer counts reads (metrics).
type Observer interface {
	Read(proto string)
}

// Reader opens held messages for their recipients.
type Reader struct {
	store *queue.Store
	idx   *index.Index
	audit *slog.Logger
	obs   Observer
}

// New returns a Reader. audit receives one line per read; obs may be nil.
func New(store *queue.Store, idx *index.Index, audit *slog.Logger, obs Observer) *Reader {
	if audit == nil {
		audit = slog.New(slog.DiscardHandler)
	}
	return &Reader{store: store, idx: idx, audit: audit, obs: obs}
}

// Index is the index the reader serves from.
func (r *Reader) Index() *index.Index { return r.idx }

// Open returns a message of the user's mailbox for the user to read, and
// records the read: what says what was read (the view's words: "BODY[]",
// "message", "attachment 2").
func (r *Reader) Open(ctx context.Context, who Who, uid uint32, what string) (index.Message, io.Reader, error) {
	m, body, err := r.open(ctx, who.User, uid)
	if err != nil {
		return m, nil, err
	}
	r.audit.Info("continuity read", "proto", who.Proto, "user", who.User, "addr", who.Addr,
		"uid", uid, "id", m.ID, "size", m.Size, "what", what)
	if r.obs != nil {
		r.obs.Read(who.Proto)
	}
	return m, body, nil
}

// OpenQuiet returns a message for the view's own use (structure, search),
// without an audit line.
func (r *Reader) OpenQuiet(ctx context.Context, user string, uid uint32) (index.Message, io.Reader, error) {
	return r.open(ctx, user, uid)
}

func (r *Reader) open(ctx context.Context, user string, uid uint32) (index.Message, io.Reader, error) {
	m, ok := r.idx.Get(user, uid)
	if !ok {
		return m, nil, ErrNotFound
	}
	for _, seq := range r.idx.Records(user, uid) {
		rec, err := r.store.Get(ctx, seq)
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			r.idx.Gone(seq) // delivered or rewritten since the index last looked
			continue
		}
		if err != nil {
			return m, nil, fmt.Errorf("reading held message %s: %w", m.ID, err)
		}
		if rec.Env == nil || rec.Dead() || rec.Env.ID != m.ID || !addressedTo(rec, user) {
			// Not what the index said: never serve it.
			continue
		}
		m.Seq, m.Size = rec.Seq, rec.Env.Size
		return m, r.store.Body(ctx, rec), nil
	}
	return m, nil, ErrNotFound
}

// addressedTo reports whether user is one of the record's recipients.
func addressedTo(rec queue.Record, user string) bool {
	for _, to := range rec.Env.To {
		if a, err := mailaddr.Parse(to); err == nil && a.Key() == user {
			return true
		}
	}
	return false
}

// Header sizes: a header up to keepHeader bytes is cached with the
// summary; one up to maxHeader is parsed; beyond, the rest is ignored.
const (
	keepHeader = 64 << 10
	maxHeader  = 1 << 20
)

// Summary returns a message's subject, sender and date, parsed once and
// then cached in the index.
func (r *Reader) Summary(ctx context.Context, user string, m index.Message) (*index.Summary, error) {
	if m.Summary != nil {
		return m.Summary, nil
	}
	_, body, err := r.open(ctx, user, m.UID)
	if err != nil {
		return nil, err
	}
	raw, h, err := ReadHeader(body)
	if err != nil {
		return nil, err
	}
	s := Summarize(h, m.Arrived)
	if len(raw) <= keepHeader {
		s.Header = raw
	}
	r.idx.SetSummary(user, m.UID, s)
	return s, nil
}

// Header returns a message's header section, from the cache when it is
// there.
func (r *Reader) Header(ctx context.Context, user string, m index.Message) (textproto.Header, error) {
	s, err := r.Summary(ctx, user, m)
	if err != nil {
		return textproto.Header{}, err
	}
	if s.Header != nil {
		_, h, err := ReadHeader(bytes.NewReader(s.Header))
		return h, err
	}
	_, body, err := r.open(ctx, user, m.UID)
	if err != nil {
		return textproto.Header{}, err
	}
	_, h, err := ReadHeader(body)
	return h, err
}

// ReadHeader reads a header section (at most 1 MiB of it) and returns its
// bytes and its fields. A message with a broken header yields what could
// be read, never an error for the content: only a failed read is one.
func ReadHeader(r io.Reader) ([]byte, textproto.Header, error) {
	var raw bytes.Buffer
	er := &errReader{r: io.LimitReader(r, maxHeader)}
	br := bufio.NewReader(io.TeeReader(er, &raw))
	h, err := textproto.ReadHeader(br)
	if er.err != nil {
		return nil, textproto.Header{}, er.err
	}
	if err != nil {
		// Malformed: keep the lines that are well formed.
		h = lenientHeader(raw.Bytes())
	}
	// raw holds what bufio read ahead too; cut at the end of the header.
	b := raw.Bytes()
	if i := bytes.Index(b, []byte("\r\n\r\n")); i >= 0 {
		b = b[:i+4]
	} else if i := bytes.Index(b, []byte("\n\n")); i >= 0 {
		b = b[:i+2]
	}
	return b, h, nil
}

// errReader remembers a read error, so that a failed read is told apart
// from a malformed header.
type errReader struct {
	r   io.Reader
	err error
}

func (e *errReader) Read(p []byte) (int, error) {
	n, err := e.r.Read(p)
	if err != nil && err != io.EOF && e.err == nil {
		e.err = err
	}
	return n, err
}

// lenientHeader keeps the "Name: value" lines of a broken header.
func lenientHeader(b []byte) textproto.Header {
	var h textproto.Header
	for _, line := range strings.Split(string(b), "\n") {
		line = strings.TrimRight(line, "\r")
		if line == "" {
			break
		}
		k, v, ok := strings.Cut(line, ":")
		if !ok || k == "" || strings.ContainsAny(k, " \t") {
			continue
		}
		h.Add(k, strings.TrimSpace(v))
	}
	return h
}

// Summarize extracts what a listing shows, with fallbacks for anything
// missing or undecodable.
func Summarize(h textproto.Header, arrived time.Time) *index.Summary {
	mh := mail.Header{Header: gomessage.Header{Header: h}}
	s := &index.Summary{Date: arrived}
	if subj, err := mh.Subject(); err == nil {
		s.Subject = subj
	} else {
		s.Subject = h.Get("Subject")
	}
	if from, err := mh.AddressList("From"); err == nil && len(from) > 0 {
		names := make([]string, len(from))
		for i, a := range from {
			names[i] = a.Address
			if a.Name != "" {
				names[i] = a.Name + " <" + a.Address + ">"
			}
		}
		s.From = strings.Join(names, ", ")
	} else {
		s.From = h.Get("From")
	}
	if d, err := mh.Date(); err == nil && !d.IsZero() {
		s.Date = d
	}
	s.Subject, s.From = clip(s.Subject, 998), clip(s.From, 998)
	return s
}

func clip(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n]
}
