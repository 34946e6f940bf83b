package mail

import (
	"bytes"
	"context"
	"errors"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/mxq-dev/mxq/continuity/index"
	"github.com/mxq-dev/mxq/continuity/internal/teststore"
)

type counter struct{ n int }

func (c *counter) Read(string) { c.n++ }

func TestOpenOnlyOwnMail(t *testing.T) {
	s := teststore.New(t, 0)
	a := teststore.Enqueue(t, s, teststore.Message("for alice", "a"), "alice@example.test")
	teststore.Enqueue(t, s, teststore.Message("for bob", "b"), "bob@example.test")
	x := index.New(teststore.Catalog(t, s), s, index.Options{})
	if err := x.Sync(context.Background()); err != nil {
		t.Fatal(err)
	}
	obs := &counter{}
	r := New(s, x, nil, obs)
	alice := Who{User: "alice@example.test", Proto: "test"}

	m, body, err := r.Open(context.Background(), alice, 1, "test")
	if err != nil || m.ID != a.ID {
		t.Fatalf("alice UID 1: %v %+v", err, m)
	}
	got, _ := io.ReadAll(body)
	want, _ := io.ReadAll(s.Body(context.Background(), teststore.Records(t, s, a.ID)[0]))
	if !bytes.Equal(got, want) || obs.n != 1 {
		t.Fatalf("body %q, reads %d", got, obs.n)
	}
	for _, uid := range []uint32{0, 2, 3, 1 << 31} {
		if _, _, err := r.Open(context.Background(), alice, uid, "test"); !errors.Is(err, ErrNotFound) {
			t.Errorf("alice UID %d: %v", uid, err)
		}
	}
	if _, _, err := r.Open(context.Background(), Who{User: "nobody@example.test"}, 1, "test"); !errors.Is(err, ErrNotFound) {
		t.Errorf("nobody: %v", err)
	}
	// Delivered meanwhile (the index has not looked yet): not found, not
	// an error, and not someone else's record.
	if err := s.Complete(context.Background(), teststore.Records(t, s, a.ID)[0]); err != nil {
		t.Fatal(err)
	}
	if _, _, err := r.Open(context.Background(), alice, 1, "test"); !errors.Is(err, ErrNotFound) {
		t.Errorf("delivered: %v", err)
	}
}

func TestSummaryAndHeaders(t *testing.T) {
	arrived := time.Date(2026, 11, 2, 10, 0, 0, 0, time.UTC)
	tests := []struct {
		name, msg     string
		subject, from string
		date          time.Time
	}{
		{"plain", "From: Carol <carol@example.org>\r\nSubject: hello\r\nDate: Tue, 03 Nov 2026 08:00:00 +0000\r\n\r\nbody",
			"hello", "Carol <carol@example.org>", time.Date(2026, 11, 3, 8, 0, 0, 0, time.UTC)},
		{"encoded words", "From: =?UTF-8?Q?Ren=C3=A9?= <rene@example.org>\r\nSubject: =?ISO-8859-1?Q?caf=E9?=\r\n\r\n",
			"café", "René <rene@example.org>", arrived},
		{"no header", "just text, no header\r\nmore\r\n", "", "", arrived},
		{"broken line", "Subject: kept\r\nthis line is not a header\r\nFrom: x@example.org\r\n\r\nbody", "kept", "x@example.org", arrived},
		{"bad date and address", "From: <<<\r\nDate: yesterday\r\nSubject: s\r\n\r\n", "s", "<<<", arrived},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			raw, h, err := ReadHeader(strings.NewReader(tt.msg))
			if err != nil {
				t.Fatal(err)
			}
			s := Summarize(h, arrived)
			if s.Subject != tt.subject || s.From != tt.from || !s.Date.Equal(tt.date) {
				t.Fatalf("summary %+v", s)
			}
			if !strings.HasPrefix(tt.msg, string(raw)) {
				t.Fatalf("raw header %q", raw)
			}
		})
	}
}
