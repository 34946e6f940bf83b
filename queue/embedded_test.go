package queue

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

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
