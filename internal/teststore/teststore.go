// Package teststore starts a real queue for tests: an embedded JetStream
// with fsync on, in the test's temporary directory, and the queue's stream
// on it. Tests of the relay, the drain and the continuity view use the real
// store rather than a stand-in.
package teststore

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/mxq-dev/mxq/queue"
	"github.com/mxq-dev/mxq/queue/catalog"
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

// Catalog runs a catalog of st (queue/catalog) in the test's temporary
// directory until the test ends, and waits until it is ready. held, if set,
// says which queue IDs are held.
func Catalog(t testing.TB, st *queue.Store, held func(id string) bool) *catalog.Catalog {
	t.Helper()
	c, err := catalog.Open(context.Background(), st, catalog.Options{Dir: filepath.Join(t.TempDir(), "catalog"), Held: held})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("catalog: %v", err)
		}
		c.Close()
	})
	select {
	case <-c.Ready():
	case <-time.After(30 * time.Second):
		t.Fatal("catalog not ready after 30 s")
	}
	return c
}
