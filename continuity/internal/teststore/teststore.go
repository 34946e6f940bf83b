// Package teststore gives the continuity tests a real queue (the same
// Store mxq serve uses) and messages to put in it.
package teststore

import (
	"bytes"
	"context"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	store "github.com/mxq-dev/mxq/internal/teststore"
	"github.com/mxq-dev/mxq/queue"
	"github.com/mxq-dev/mxq/queue/catalog"
	"github.com/mxq-dev/mxq/queue/envelope"
)

// New opens a real queue (internal/teststore) whose messages up to chunk
// bytes are stored as one record (0: 256 KiB).
func New(t testing.TB, chunk int) *queue.Store {
	t.Helper()
	if chunk == 0 {
		chunk = 256 << 10
	}
	s, _ := store.Start(t, func(o *queue.Options) {
		o.ChunkSize, o.GroupMaxMessages, o.Timeout = chunk, 256, 10*time.Second
	})
	return s
}

var ids = envelope.NewIDGen(time.Now, 11)

// seq makes arrival times distinct and increasing within a test run.
var seq atomic.Int64

// Env returns an envelope for a new message.
func Env(from string, to ...string) *envelope.Envelope {
	at := time.Now().UTC().Truncate(time.Millisecond).Add(time.Duration(seq.Add(1)) * time.Millisecond)
	return &envelope.Envelope{ID: ids.New(), From: from, To: to, Arrived: at}
}

// Enqueue stores msg for to and returns its envelope.
func Enqueue(t testing.TB, s *queue.Store, msg []byte, to ...string) *envelope.Envelope {
	t.Helper()
	env := Env("sender@example.org", to...)
	if err := s.Enqueue(context.Background(), env, bytes.NewReader(msg)); err != nil {
		t.Fatal(err)
	}
	return env
}

// Message is a small RFC 5322 message.
func Message(subject, body string) []byte {
	return []byte(fmt.Sprintf("From: Sender <sender@example.org>\r\nTo: someone@example.test\r\nSubject: %s\r\nDate: Mon, 02 Jan 2006 15:04:05 +0000\r\nMessage-ID: <%d@example.org>\r\n\r\n%s\r\n", subject, seq.Add(1), body))
}

// Records returns the queued records of a queue ID, with their bodies.
func Records(t testing.TB, s *queue.Store, id string) []queue.Record {
	t.Helper()
	ctx := context.Background()
	found, err := s.Find(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	var out []queue.Record
	for _, r := range found {
		if r.Dead() {
			continue
		}
		full, err := s.Get(ctx, r.Seq)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, full)
	}
	return out
}

// Catalog runs the node's catalog of s (queue/catalog) for the test and
// returns it once it has caught up with s.
func Catalog(t testing.TB, s *queue.Store) *catalog.Catalog {
	t.Helper()
	return store.Catalog(t, s, nil)
}
