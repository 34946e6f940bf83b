// Package teststore starts a real queue for tests: an embedded JetStream
// with fsync on, in the test's temporary directory, and the queue's stream
// on it. Tests of the relay, the drain and the continuity view use the real
// store rather than a stand-in.
package teststore

import (
	"context"
	"testing"
	"time"

	"github.com/mxq-dev/mxq/queue"
)

// Start opens a store routing every recipient to the backend "store". mod,
// if set, adjusts the options first (MaxBytes, Timeout, Route, ...).
func Start(t testing.TB, mod func(*queue.Options)) (*queue.Store, *queue.Embedded) {
	t.Helper()
	ctx := context.Background()
	emb, err := queue.StartEmbedded(ctx, queue.EmbeddedOptions{ServerName: "t", StoreDir: t.TempDir(), MaxPayload: 8 << 20, SyncAlways: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(emb.Shutdown)
	nc, err := emb.Connect("test")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	o := queue.Options{
		Stream: "MXQ", Replicas: 1, Durability: queue.DurabilityGroup, Committers: 2,
		GroupMaxMessages: 64, GroupMaxBytes: 8 << 20, ChunkSize: 256 << 10, Timeout: 5 * time.Second,
		Route: func(string) string { return "store" },
	}
	if mod != nil {
		mod(&o)
	}
	st, err := queue.Open(ctx, nc, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(st.Close)
	return st, emb
}
