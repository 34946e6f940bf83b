package queue

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
)

// EmbeddedOptions configures the nats-server that runs inside mxq.
type EmbeddedOptions struct {
	ServerName string
	// StoreDir is where JetStream keeps its files.
	StoreDir string
	// Listen is the client port (host:port); empty opens none and mxq
	// connects in-process.
	Listen string
	// MaxPayload is the largest record a client may publish.
	MaxPayload int32
	// SyncAlways makes the file store fsync every write before it acks.
	// Without it the server syncs every two minutes and an acknowledged
	// message can be lost on power failure.
	SyncAlways bool
	// Cluster, when ClusterListen is set, joins the routes in Peers
	// (host:port of the other nodes' cluster ports).
	ClusterName   string
	ClusterListen string
	// ClusterAdvertise is host:port the other nodes use for this one.
	ClusterAdvertise string
	Peers            []string
	// ClusterTLS, if set, secures the routes with mutual TLS. The server
	// asks every route for a certificate; a configuration that checks
	// certificates itself (clustercred: InsecureSkipVerify with
	// VerifyConnection) is used as it is.
	ClusterTLS *tls.Config
	Logger     *slog.Logger
}

// Embedded is a running embedded nats-server.
type Embedded struct {
	srv *server.Server
}

// StartEmbedded starts a nats-server with JetStream and waits until it takes
// connections (and, in a cluster, until JetStream is ready).
func StartEmbedded(ctx context.Context, o EmbeddedOptions) (*Embedded, error) {
	opts := &server.Options{
		ServerName:         o.ServerName,
		JetStream:          true,
		StoreDir:           filepath.Clean(o.StoreDir),
		SyncAlways:         o.SyncAlways,
		MaxPayload:         o.MaxPayload,
		NoSigs:             true,
		JetStreamMaxMemory: 64 << 20,
		// Large messages stream in as atomic batches of chunks while the
		// SMTP client sends them; the default 10 s between two chunks is
		// too short for a slow client, and 50 concurrent batches too few
		// for many concurrent sessions plus the group committer.
		JetStreamLimits: server.JSLimitOpts{
			MaxBatchTimeout:           5 * time.Minute,
			MaxBatchInflightPerStream: 1000,
			MaxBatchInflightTotal:     4000,
		},
	}
	switch {
	case o.Listen == "" && o.ClusterListen != "":
		// Routing starts only once the client listener is up: give it a
		// random loopback port that nothing else uses.
		opts.Host, opts.Port = "127.0.0.1", server.RANDOM_PORT
	case o.Listen == "":
		opts.DontListen = true
	default:
		host, port, err := splitHostPort(o.Listen)
		if err != nil {
			return nil, fmt.Errorf("nats listen %q: %w", o.Listen, err)
		}
		opts.Host, opts.Port = host, port
	}
	if o.ClusterListen != "" {
		host, port, err := splitHostPort(o.ClusterListen)
		if err != nil {
			return nil, fmt.Errorf("nats cluster listen %q: %w", o.ClusterListen, err)
		}
		opts.Cluster.Name = o.ClusterName
		opts.Cluster.Host, opts.Cluster.Port = host, port
		opts.Cluster.Advertise = o.ClusterAdvertise
		if o.ClusterTLS != nil {
			t := o.ClusterTLS.Clone()
			t.ClientAuth = tls.RequireAndVerifyClientCert
			opts.Cluster.TLSConfig = t
			opts.Cluster.TLSTimeout = 5
		}
		for _, p := range o.Peers {
			u, err := url.Parse("nats://" + p)
			if err != nil {
				return nil, fmt.Errorf("nats peer %q: %w", p, err)
			}
			opts.Routes = append(opts.Routes, u)
		}
	}
	srv, err := server.NewServer(opts)
	if err != nil {
		return nil, fmt.Errorf("nats-server: %w", err)
	}
	lg := o.Logger
	if lg == nil {
		lg = slog.New(slog.DiscardHandler)
	}
	adapter := &slogAdapter{l: lg.With("component", "nats"), fatal: make(chan error, 1)}
	// nats-server warns that solicited routes are not verified whenever
	// InsecureSkipVerify is set; with VerifyConnection they are, by it.
	adapter.verifiedRoutes = o.ClusterTLS != nil && o.ClusterTLS.InsecureSkipVerify && o.ClusterTLS.VerifyConnection != nil
	srv.SetLoggerV2(adapter, false, false, false)
	srv.Start()
	// Recovering a large store can take a while; keep waiting while ctx
	// allows, but stop at once on a fatal start-up error (a port in use):
	// nats-server reports those through its logger and keeps going.
	for !srv.ReadyForConnections(time.Second) {
		select {
		case err := <-adapter.fatal:
			boundedShutdown(srv, lg)
			return nil, fmt.Errorf("nats-server: %w", err)
		default:
		}
		if err := ctx.Err(); err != nil {
			boundedShutdown(srv, lg)
			return nil, fmt.Errorf("nats-server did not become ready: %w", err)
		}
	}
	return &Embedded{srv: srv}, nil
}

// boundedShutdown stops a server that failed to start. nats-server's
// Shutdown can wait for start-up goroutines that never finish (routing
// waits for a client listener that a failed start never opened); a process
// that cannot start must still exit, and nothing was acknowledged yet.
func boundedShutdown(srv *server.Server, lg *slog.Logger) {
	done := make(chan struct{})
	go func() { srv.Shutdown(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		lg.Warn("nats-server did not shut down within 10s; leaving it")
	}
}

// Connect returns a client connection to the embedded server, in-process.
func (e *Embedded) Connect(name string) (*nats.Conn, error) {
	return nats.Connect("", nats.InProcessServer(e.srv), nats.Name(name),
		nats.MaxReconnects(-1), nats.ReconnectBufSize(-1))
}

// Server exposes the underlying server (tests, health checks).
func (e *Embedded) Server() *server.Server { return e.srv }

// Shutdown stops the server and waits until its stores are closed.
func (e *Embedded) Shutdown() {
	e.srv.Shutdown()
	e.srv.WaitForShutdown()
}

func splitHostPort(hp string) (string, int, error) {
	host, p, err := net.SplitHostPort(hp)
	if err != nil {
		return "", 0, err
	}
	port, err := strconv.Atoi(p)
	if err != nil {
		return "", 0, errors.New("bad port")
	}
	return host, port, nil
}

// slogAdapter sends nats-server's log lines to slog.
type slogAdapter struct {
	l *slog.Logger
	// fatal receives the first Fatalf: nats-server expects its logger to
	// end the process there, mxq decides instead.
	fatal chan error
	// verifiedRoutes: the route TLS config checks peers itself.
	verifiedRoutes bool
}

// routesUnverified is nats-server's warning for a route TLS config with
// InsecureSkipVerify.
const routesUnverified = "TLS certificate chain and hostname of solicited routes will not be verified"

// Noticef is mostly the start-up banner; Debug keeps mxq's log readable.
func (a *slogAdapter) Noticef(f string, v ...any) { a.l.Debug(fmt.Sprintf(f, v...)) }
func (a *slogAdapter) Warnf(f string, v ...any) {
	msg := fmt.Sprintf(f, v...)
	if a.verifiedRoutes && strings.HasPrefix(msg, routesUnverified) {
		a.l.Debug("route certificates are checked by mxq's own verification (InsecureSkipVerify only hands it over)")
		return
	}
	a.l.Warn(msg)
}
func (a *slogAdapter) Fatalf(f string, v ...any) {
	msg := fmt.Sprintf(f, v...)
	a.l.Error(msg)
	select {
	case a.fatal <- errors.New(msg):
	default:
	}
}
func (a *slogAdapter) Errorf(f string, v ...any) { a.l.Error(fmt.Sprintf(f, v...)) }
func (a *slogAdapter) Debugf(f string, v ...any) { a.l.Debug(fmt.Sprintf(f, v...)) }
func (a *slogAdapter) Tracef(f string, v ...any) {}

// StageBatches moves the stream's atomic-batch staging area into dir,
// which should be a tmpfs.
//
// Why: a single-replica stream stages every atomic batch in a file store of
// its own, created and deleted per batch under the stream's directory. On a
// disk that is some 25 file-system metadata operations and 4 fsyncs: about
// 3 ms per batch whatever its size, which would make group commit slower
// than one fsync per message unless batches are large. In a tmpfs the same
// work takes microseconds, and a batch of 8 messages commits in about
// 0.8 ms.
//
// What it costs: nothing for acknowledged mail. The commit writes the batch
// into the stream and fsyncs it before the acknowledgement, exactly as
// before; the staging copy only lets the server finish a batch whose commit
// a crash interrupted. A kill -9 keeps the tmpfs, so that still works; after
// a power loss an interrupted batch (never acknowledged, so the sender still
// has those messages) may be left partly stored, which means duplicates,
// not loss.
//
// The staging path is nats-server's layout (v2.12+); the server removes the
// link at start-up, so call this after every start, once the stream exists.
//
// The batches live in a subdirectory of dir that mxq owns and empties here:
// the server has finished, at start-up, every batch a crash interrupted
// mid-commit, and anything else there belonged to batches that were never
// committed (group commits a kill -9 caught while they were being staged).
// Without this, every crash would leave its batches in memory until reboot.
func (e *Embedded) StageBatches(storeDir, stream, dir string) error {
	dir = filepath.Join(dir, stream+"-batches")
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("batch staging: %w", err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("batch staging: %w", err)
	}
	link := filepath.Join(storeDir, "jetstream", server.DEFAULT_GLOBAL_ACCOUNT, "streams", stream, "batches")
	if fi, err := os.Lstat(link); err == nil {
		if fi.Mode()&os.ModeSymlink != 0 {
			if err := os.Remove(link); err != nil {
				return fmt.Errorf("batch staging: %w", err)
			}
		} else if err := os.RemoveAll(link); err != nil {
			// A plain directory: batches staged on disk before; the server
			// has recovered what it needed from it at start-up.
			return fmt.Errorf("batch staging: %w", err)
		}
	}
	if err := os.Symlink(dir, link); err != nil {
		return fmt.Errorf("batch staging: %w", err)
	}
	return nil
}

// TmpfsStagingDir returns a private directory for batch staging on
// /dev/shm, named after dataDir so that a restarted node finds its own, or
// "" if /dev/shm is not a tmpfs with at least minFree bytes free.
func TmpfsStagingDir(dataDir string, minFree uint64) string {
	const tmpfsMagic = 0x01021994
	var st syscall.Statfs_t
	if err := syscall.Statfs("/dev/shm", &st); err != nil || st.Type != tmpfsMagic {
		return ""
	}
	if uint64(st.Bavail)*uint64(st.Bsize) < minFree {
		return ""
	}
	abs, err := filepath.Abs(dataDir)
	if err != nil {
		return ""
	}
	sum := sha256.Sum256([]byte(abs))
	return filepath.Join("/dev/shm", "mxq-staging-"+hex.EncodeToString(sum[:6]))
}
