package queue

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mxq-dev/mxq/internal/clustercred"
)

type lockedWriter struct {
	w  io.Writer
	mu *sync.Mutex
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

// A server that cannot start must say why, promptly, instead of waiting
// for readiness that never comes (nats-server reports these failures
// through its logger and carries on).
func TestStartEmbeddedFailsFast(t *testing.T) {
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()

	notADir := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(notADir, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}

	cases := []struct {
		name string
		opts EmbeddedOptions
		want string
	}{
		{
			name: "route port in use",
			opts: EmbeddedOptions{
				ServerName: "n1", StoreDir: t.TempDir(), MaxPayload: 1 << 20,
				ClusterName: "mxq", ClusterListen: busy.Addr().String(),
				Peers: []string{"127.0.0.2:1"},
			},
			want: "router port",
		},
		{
			name: "store is a file",
			opts: EmbeddedOptions{ServerName: "n1", StoreDir: notADir, MaxPayload: 1 << 20},
			want: "JetStream",
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			start := time.Now()
			emb, err := StartEmbedded(ctx, tc.opts)
			if err == nil {
				emb.Shutdown()
				t.Fatal("started")
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %q does not mention %q", err, tc.want)
			}
			if d := time.Since(start); d > 20*time.Second {
				t.Fatalf("took %v to fail", d)
			}
		})
	}
}

// A crash leaves the batches it was staging behind (chunks of a large
// message cut off mid-DATA): the next start clears them, and what shares
// the configured directory is left alone.
func TestStageBatchesClearsWhatACrashLeft(t *testing.T) {
	ctx := context.Background()
	storeDir, stage := t.TempDir(), t.TempDir()
	stale := filepath.Join(stage, "MXQ-batches", "Xy12AbCd", "msgs", "1.blk")
	if err := os.MkdirAll(filepath.Dir(stale), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(stale, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	neighbour := filepath.Join(stage, "not-ours")
	if err := os.WriteFile(neighbour, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}

	emb, err := StartEmbedded(ctx, EmbeddedOptions{ServerName: "t", StoreDir: storeDir, MaxPayload: 8 << 20, SyncAlways: true})
	if err != nil {
		t.Fatal(err)
	}
	defer emb.Shutdown()
	nc, err := emb.Connect("test")
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	s, err := Open(ctx, nc, Options{Stream: "MXQ", Replicas: 1, Durability: DurabilityGroup, Committers: 1,
		GroupMaxMessages: 64, GroupMaxBytes: 8 << 20, ChunkSize: 64 << 10, Timeout: 5 * time.Second,
		Route: func(string) string { return "store" }})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := emb.StageBatches(storeDir, "MXQ", stage); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(stale); !os.IsNotExist(err) {
		t.Fatalf("stale batch still staged: %v", err)
	}
	if _, err := os.Stat(neighbour); err != nil {
		t.Fatalf("a file beside the staging area was touched: %v", err)
	}

	// Staging still works: a message in several chunks is one batch.
	big := strings.Repeat("0123456789abcdef", 20<<10) // 320 KiB: 5 chunks
	if err := s.Enqueue(ctx, testEnv("u@example.test"), strings.NewReader(big)); err != nil {
		t.Fatal(err)
	}
	if got := readAll(t, s, "store"); len(got) != 1 || string(body(t, s, got[0])) != big {
		t.Fatalf("queued %d records, want the one message intact", len(got))
	}
	left, err := os.ReadDir(filepath.Join(stage, "MXQ-batches"))
	if err != nil {
		t.Fatal(err)
	}
	if len(left) != 0 {
		t.Fatalf("a committed batch left %d entries in staging", len(left))
	}
}

// In a cluster the embedded server opens the route port and nothing else
// that a stranger could reach: the client port (needed for routing to
// start) is on loopback, and there is no monitoring, profiling, leafnode,
// gateway, websocket or MQTT listener, none of which would ask for
// credentials.
func TestEmbeddedClusterListeners(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	m, err := clustercred.FromSecrets([][]byte{[]byte(strings.Repeat("s", 32))}, "127.0.0.1", time.Now())
	if err != nil {
		t.Fatal(err)
	}
	var logs bytes.Buffer
	var mu sync.Mutex
	e, err := StartEmbedded(ctx, EmbeddedOptions{
		ServerName: "n1", StoreDir: t.TempDir(), MaxPayload: 1 << 20,
		ClusterName: "mxq", ClusterListen: "127.0.0.1:-1", Peers: []string{"127.0.0.2:1"},
		ClusterTLS: clustercred.Static(m).Config(),
		Logger:     slog.New(slog.NewTextHandler(&lockedWriter{w: &logs, mu: &mu}, &slog.HandlerOptions{Level: slog.LevelWarn})),
	})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Shutdown()
	srv := e.Server()
	ports := srv.PortsInfo(10 * time.Second)
	if ports == nil {
		t.Fatal("no ports")
	}
	if len(ports.Nats) == 0 {
		t.Fatal("no client port: routing would not start")
	}
	for _, u := range ports.Nats {
		host := u[strings.Index(u, "://")+3 : strings.LastIndex(u, ":")]
		if ip := net.ParseIP(host); ip == nil || !ip.IsLoopback() {
			t.Errorf("client port %s is not on loopback", u)
		}
	}
	if len(ports.Cluster) != 1 || !strings.HasPrefix(ports.Cluster[0], "tls://") || ports.Monitoring != nil || ports.Profile != nil || ports.WebSocket != nil {
		t.Errorf("listeners: %+v", ports)
	}
	// mxq checks the routes' certificates itself: nats-server's warning
	// that they are not checked would be false.
	mu.Lock()
	if strings.Contains(logs.String(), "will not be verified") {
		t.Errorf("misleading warning in the log:\n%s", logs.String())
	}
	mu.Unlock()
	v, err := srv.Varz(nil)
	if err != nil {
		t.Fatal(err)
	}
	if v.HTTPPort != 0 || v.HTTPSPort != 0 || v.LeafNode.Port != 0 || v.Gateway.Port != 0 || v.MQTT.Port != 0 || v.Websocket.Port != 0 {
		t.Errorf("a listener without authentication: http %d https %d leafnode %d gateway %d mqtt %d websocket %d",
			v.HTTPPort, v.HTTPSPort, v.LeafNode.Port, v.Gateway.Port, v.MQTT.Port, v.Websocket.Port)
	}
}
