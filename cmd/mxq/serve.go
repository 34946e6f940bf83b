package main

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"strconv"
	"syscall"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/spf13/cobra"

	"github.com/mxq-dev/mxq/admin"
	"github.com/mxq-dev/mxq/config"
	"github.com/mxq-dev/mxq/internal/membudget"
	"github.com/mxq-dev/mxq/queue"
	"github.com/mxq-dev/mxq/queue/catalog"
	"github.com/mxq-dev/mxq/queue/delivery"
	"github.com/mxq-dev/mxq/queue/drain"
	"github.com/mxq-dev/mxq/queue/envelope"
	"github.com/mxq-dev/mxq/raftstore"
	"github.com/mxq-dev/mxq/relay"
)

// serveFlags maps configuration keys to the serve command's flags.
var serveFlags = map[string]string{
	"smtp.listen":  "listen",
	"data_dir":     "data-dir",
	"smtp.domains": "domain",
	"backend":      "backend",
	"log.level":    "log-level",
	"admin.listen": "admin-listen",
	"node_name":    "node-name",
}

func serveCmd() *cobra.Command {
	var cfgPath string
	cmd := &cobra.Command{
		Use:   "serve",
		Short: "Run an mxq node: SMTP relay, queue and drain",
		Long: `Run an mxq node. With no configuration at all it listens for SMTP on
127.0.0.1:2525, accepts mail for example.test, keeps its queue in
./mxq-data and delivers over LMTP to 127.0.0.1:24.

Configuration comes from, in increasing precedence: built-in defaults, the
file given with --config, MXQ_* environment variables (MXQ_SMTP_LISTEN for
smtp.listen) and flags.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := config.Load(cfgPath, cmd.Flags(), serveFlags)
			if err != nil {
				return err
			}
			ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
			defer stop()
			return serve(ctx, cfg)
		},
	}
	f := cmd.Flags()
	f.StringVarP(&cfgPath, "config", "c", "", "configuration file (YAML)")
	f.String("listen", "", "SMTP listen address (smtp.listen)")
	f.String("data-dir", "", "data directory (data_dir)")
	f.StringSlice("domain", nil, "accepted domain, repeatable (smtp.domains)")
	f.String("backend", "", "mailbox store as lmtp://host:port or smtp://host:port (backend)")
	f.String("log-level", "", "debug, info, warn or error (log.level)")
	f.String("admin-listen", "", "admin API listen address (admin.listen)")
	f.String("node-name", "", "this node's name (node_name)")
	return cmd
}

func newLogger(cfg *config.Config) *slog.Logger {
	var level slog.Level
	_ = level.UnmarshalText([]byte(cfg.Log.Level))
	opts := &slog.HandlerOptions{Level: level}
	if cfg.Log.Format == "json" {
		return slog.New(slog.NewJSONHandler(os.Stderr, opts))
	}
	return slog.New(slog.NewTextHandler(os.Stderr, opts))
}

// serve runs a node until ctx ends, then shuts down in the order that keeps
// every promise: stop taking mail, finish the sessions in flight, stop the
// drain after its deliveries, and only then close the store.
func serve(ctx context.Context, cfg *config.Config) error {
	log := newLogger(cfg)
	if _, set := os.LookupEnv("GOMEMLIMIT"); !set && cfg.MemoryLimit > 0 {
		debug.SetMemoryLimit(int64(cfg.MemoryLimit))
	}

	if err := os.MkdirAll(cfg.DataDir, 0o750); err != nil {
		return fmt.Errorf("data directory: %w", err)
	}
	unlock, err := lockDataDir(cfg.DataDir)
	if err != nil {
		return err
	}
	defer unlock()

	// The cluster ports' credentials, re-read while the node runs.
	creds, err := clusterCredentials(cfg, log.With("component", "cluster"))
	if err != nil {
		return err
	}
	if creds != nil {
		credCtx, stopCreds := context.WithCancel(context.Background())
		defer stopCreds()
		go creds.Run(credCtx, 5*time.Second)
	}

	// Storage.
	var nc *nats.Conn
	var emb *queue.Embedded
	var connect func(name string) (*nats.Conn, error)
	if cfg.NATS.URL == "" {
		eo := queue.EmbeddedOptions{
			ServerName: cfg.NodeName,
			StoreDir:   cfg.DataDir, // the server adds "jetstream/"
			Listen:     cfg.NATS.Listen,
			MaxPayload: int32(cfg.NATS.MaxPayload),
			SyncAlways: cfg.Queue.Durability != config.DurabilityUnsafe,
			Logger:     log,
		}
		if cfg.Clustered() {
			eo.ClusterTLS = clusterTLS(creds)
			eo.ServerName = cfg.Cluster.Advertise
			eo.ClusterName = cfg.Cluster.Name
			eo.ClusterListen = net.JoinHostPort(cfg.Cluster.Bind, strconv.Itoa(cfg.Cluster.NATSPort))
			eo.ClusterAdvertise = net.JoinHostPort(cfg.Cluster.Advertise, strconv.Itoa(cfg.Cluster.NATSPort))
			eo.Peers = natsRoutes(cfg)
		}
		sctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
		emb, err = queue.StartEmbedded(sctx, eo)
		cancel()
		if err != nil {
			return err
		}
		defer emb.Shutdown()
		connect = emb.Connect
	} else {
		connect = func(name string) (*nats.Conn, error) {
			opts := []nats.Option{nats.Name(name), nats.MaxReconnects(-1), nats.ReconnectBufSize(-1)}
			if f := cfg.NATS.Credentials; f != "" {
				opts = append(opts, nats.UserCredentials(f))
			}
			if f := cfg.NATS.TLS.CAFile; f != "" {
				opts = append(opts, nats.RootCAs(f))
			}
			if cfg.NATS.TLS.CertFile != "" {
				opts = append(opts, nats.ClientCert(cfg.NATS.TLS.CertFile, cfg.NATS.TLS.KeyFile))
			}
			return nats.Connect(cfg.NATS.URL, opts...)
		}
	}
	nc, err = connect("mxq-" + cfg.NodeName)
	if err != nil {
		return fmt.Errorf("connecting to NATS: %w", err)
	}
	defer nc.Close()
	// Message buffers, bounded together (internal/membudget).
	memory := membudget.New(membudget.Options{
		Size: int64(cfg.SMTP.MemoryBudget), Wait: cfg.SMTP.MemoryWait, Logger: log.With("component", "smtp"),
	})
	store, err := queue.Open(ctx, nc, queue.Options{
		Stream:           cfg.Queue.Stream,
		Replicas:         cfg.Queue.Replicas,
		MaxBytes:         int64(cfg.Queue.MaxBytes),
		Durability:       cfg.Queue.Durability,
		GroupMaxMessages: cfg.Queue.GroupCommit.MaxMessages,
		GroupMaxBytes:    int(cfg.Queue.GroupCommit.MaxBytes),
		GroupLinger:      cfg.Queue.GroupCommit.MaxLinger,
		Committers:       cfg.Queue.GroupCommit.Committers,
		ChunkSize:        int(cfg.Queue.ChunkSize),
		Timeout:          cfg.Queue.Timeout,
		Route:            cfg.RouteFor,
		Connect:          connect,
		Origin:           cfg.NodeName,
		Memory:           memory,
		Logger:           log,
	})
	if err != nil {
		return err
	}
	// Chunks stored up to here were written by an earlier life of this
	// node (or others): the candidates for orphan collection.
	orphansBefore, err := store.LastSeq(ctx)
	if err != nil {
		store.Close()
		return err
	}
	if emb != nil && cfg.Queue.Replicas == 1 {
		if dir := stageBatches(log, cfg, emb); dir != "" && cfg.Queue.BatchStaging == "auto" {
			// After a clean stop no batch is in flight: leave no trace in
			// /dev/shm. (After a crash it stays, for the server's recovery.)
			// The directory is mxq's own (auto), so all of it may go.
			defer os.RemoveAll(dir)
		}
	}

	// Hold events reach the catalog once it is open; those before it are
	// covered by its reconciliation at start.
	holdSink := &holdEvents{}

	var salt [4]byte
	_, _ = rand.Read(salt[:])
	ids := envelope.NewIDGen(time.Now, binary.BigEndian.Uint32(salt[:]))

	// Control plane.
	ro := raftstore.Options{
		NodeID: cfg.NodeName,
		Dir:    filepath.Join(cfg.DataDir, "raft"),
		// A single node needs no fixed port: nobody else dials it; and
		// no long timeouts: it elects itself.
		Bind:             "127.0.0.1:0",
		HeartbeatTimeout: 150 * time.Millisecond,
		ElectionTimeout:  150 * time.Millisecond,
		Forward:          forwarder(nc),
		OnHolds:          holdSink.event,
		Logger:           log.With("component", "raft"),
	}
	if cfg.Clustered() {
		ro.NodeID = cfg.Cluster.Advertise
		ro.Bind = net.JoinHostPort(cfg.Cluster.Bind, strconv.Itoa(cfg.Cluster.RaftPort))
		ro.Peers = clusterPeers(cfg)
		ro.HeartbeatTimeout, ro.ElectionTimeout = 0, 0 // the defaults, for a network
		ro.TLS = clusterTLS(creds)
	}
	rctx, rcancel := context.WithTimeout(ctx, 5*time.Minute)
	rs, err := raftstore.Open(rctx, ro)
	if err == nil {
		defer rs.Close()
		var sub *nats.Subscription
		if sub, err = serveForwarded(nc, ro.NodeID, rs, log.With("component", "control")); err == nil {
			defer sub.Unsubscribe()
			err = rs.WaitLeader(rctx)
		}
	}
	rcancel()
	if err != nil {
		store.Close()
		return fmt.Errorf("control plane: %w", err)
	}
	ctl := newControlPlane(rs, cfg, log.With("component", "control"))

	// The catalog: this node's index of the queue, on its disk. It follows
	// the stream and the holds in the background; the drain, the admin
	// API and the view of held mail read it.
	cat, err := catalog.Open(ctx, store, catalog.Options{
		Dir: filepath.Join(cfg.DataDir, "catalog"), Held: ctl.Held, RangeHolds: ctl.rangeHolds,
		Logger: log.With("component", "catalog"),
	})
	if err != nil {
		store.Close()
		return err
	}
	holdSink.set(cat)
	catCtx, stopCatalog := context.WithCancel(context.Background())
	catDone := make(chan struct{})
	go func() {
		defer close(catDone)
		if err := cat.Run(catCtx); err != nil {
			log.Error("the catalog of the queue stopped; the drain and queries wait for it", "err", err)
		}
	}()
	defer func() {
		stopCatalog()
		<-catDone
		cat.Close()
	}()
	metrics := admin.NewMetrics()
	metrics.GroupCommit(store.CommitStats)
	metrics.MessageMemory(memory, store.Spills)
	cont := startContinuity(ctx, cfg, log, store, cat, metrics) // users read held mail during an outage (continuity.go)

	// Drain.
	var routes []drain.Route
	var clients []*delivery.Client
	for _, name := range cfg.BackendNames() {
		b := cfg.Backends[name]
		cl := delivery.New(delivery.Options{
			Protocol: b.Protocol, Address: b.Address, LocalName: cfg.SMTP.Hostname,
			ConnectTimeout: b.ConnectTimeout, CommandTimeout: b.CommandTimeout, MaxIdle: b.Concurrency,
		})
		clients = append(clients, cl)
		rp := drain.DefaultRamp(b.Rate, b.Concurrency)
		rp.StartRate, rp.StartConcurrency = b.StartRate, b.StartConcurrency
		routes = append(routes, drain.Route{Name: name, Deliverer: cl, Ramp: rp})
	}
	var reporter drain.Reporter
	if cfg.Drain.DSNSmarthost != "" {
		sh, _ := config.BackendURL(cfg.Drain.DSNSmarthost)
		cl := delivery.New(delivery.Options{Protocol: "smtp", Address: sh.Address, LocalName: cfg.SMTP.Hostname, MaxIdle: 2})
		clients = append(clients, cl)
		routes = append(routes, drain.Route{Name: drain.DSNRoute, Deliverer: cl, Ramp: drain.DefaultRamp(50, 2), DSN: true})
		reporter = &drain.DSNReporter{Hostname: cfg.SMTP.Hostname, NewID: ids.New}
	} else {
		log.Warn("no drain.dsn_smarthost: permanent failures are dead-lettered and their senders are NOT notified")
	}
	drainOpts := drain.Options{
		Routes:        routes,
		NewestFirst:   cfg.Drain.Order == "newest",
		RetryMin:      cfg.Drain.RetryMin,
		RetryMax:      cfg.Drain.RetryMax,
		MaxLifetime:   cfg.Drain.MaxLifetime,
		ProbeInterval: cfg.Drain.ProbeInterval,
		Reporter:      reporter,
		Control:       ctl,
		Metrics:       metrics,
		Logger:        log.With("component", "drain"),
	}
	drainCtx, stopDrain := context.WithCancel(context.Background())
	drainDone := make(chan struct{})
	runner := &drainRunner{rs: rs, ctl: ctl, log: log.With("component", "drain"),
		build: func() *drain.Drainer { return drain.New(store, cat, drainOpts) }}
	go ctl.persist(drainCtx, runner, 2*time.Second)
	if cfg.Clustered() {
		go reconcileMembership(drainCtx, rs, cfg, log.With("component", "raft"))
	}
	go func() {
		runner.run(drainCtx)
		close(drainDone)
	}()

	// Admin API and metrics.
	var adminSrv *http.Server
	if cfg.Admin.Listen != "" {
		routeNames := cfg.BackendNames()
		if reporter != nil {
			routeNames = append(routeNames, drain.DSNRoute)
		}
		api := admin.New(admin.Options{
			Node: cfg.NodeName, Token: cfg.Admin.Token, ReadToken: cfg.Admin.ReadToken, Routes: routeNames,
			Ready:  func(ctx context.Context) error { return ready(ctx, cfg, store, rs) },
			Logger: log.With("component", "admin"), Continuity: cont, Catalog: cat,
		}, store, ctl, runner, reporter, metrics)
		go api.Run(drainCtx)
		aln, err := net.Listen("tcp", cfg.Admin.Listen)
		if err == nil {
			aln, err = adminTLS(drainCtx, cfg, log, aln)
		}
		if err != nil {
			stopDrain()
			<-drainDone
			store.Close()
			return fmt.Errorf("admin listener: %w", err)
		}
		adminSrv = &http.Server{Handler: api, ReadHeaderTimeout: 10 * time.Second}
		go adminSrv.Serve(aln)
		switch {
		case cfg.Admin.Token == "" && cfg.Admin.ReadToken == "":
			log.Warn("no admin token: the admin API serves only probes, metrics and a status without free text (set admin.token or admin.read_token)")
		case cfg.Admin.Token == "":
			log.Warn("no admin token: nothing can be changed over the admin API (set admin.token or admin.token_file)")
		}
	}

	// Relay: TLS, limits, recipient checks and the disk guard come from
	// the edge (edge.go); it stops before the embedded server (defers run
	// last first).
	edge, err := startEdge(cfg, log, emb)
	if err != nil {
		stopDrain()
		<-drainDone
		store.Close()
		return err
	}
	defer edge.stop()
	relayOpts := relay.Options{
		Hostname:       cfg.SMTP.Hostname,
		Domains:        cfg.SMTP.Domains,
		MaxMessageSize: int64(cfg.SMTP.MaxMessageSize),
		MaxRecipients:  cfg.SMTP.MaxRecipients,
		MaxLineLength:  cfg.SMTP.MaxLineLength,
		ReadTimeout:    cfg.SMTP.ReadTimeout,
		DataTimeout:    cfg.SMTP.DataTimeout,
		WriteTimeout:   cfg.SMTP.WriteTimeout,
		NewID:          ids.New,
		Logger:         log.With("component", "smtp"),
		Metrics:        metrics,
	}
	edge.apply(&relayOpts)
	rl := relay.New(relayOpts, store)
	ln, err := net.Listen("tcp", cfg.SMTP.Listen)
	if err != nil {
		stopDrain()
		<-drainDone
		store.Close()
		return fmt.Errorf("SMTP listener: %w", err)
	}
	relayDone := make(chan error, 1)
	go func() { relayDone <- rl.Serve(ln) }()
	// Work that does not bound the first 250: after SMTP opens.
	go collectOrphans(drainCtx, log, store, emb != nil && !cfg.Clustered(), orphansBefore)
	log.Info("mxq ready", "smtp", ln.Addr().String(), "domains", cfg.SMTP.Domains,
		"backends", cfg.BackendNames(), "data_dir", cfg.DataDir, "durability", cfg.Queue.Durability, "gomaxprocs", runtime.GOMAXPROCS(0), "memory_limit", debug.SetMemoryLimit(-1), "memory_budget", cfg.SMTP.MemoryBudget.String())

	var runErr error
	select {
	case <-ctx.Done():
		log.Info("shutting down: no new SMTP connections, finishing sessions", "grace", cfg.SMTP.ShutdownGrace)
	case runErr = <-relayDone:
		log.Error("SMTP server stopped", "err", runErr)
	}
	sctx, cancel := context.WithTimeout(context.Background(), cfg.SMTP.ShutdownGrace)
	if err := rl.Shutdown(sctx); err != nil {
		log.Warn("sessions cut off at the end of the grace period", "err", err)
	}
	cancel()
	stopDrain()
	<-drainDone
	for _, cl := range clients {
		cl.Close()
	}
	if adminSrv != nil {
		actx, acancel := context.WithTimeout(context.Background(), 5*time.Second)
		adminSrv.Shutdown(actx)
		acancel()
	}
	store.Close()
	log.Info("mxq stopped")
	return runErr
}

// ready is the readiness probe: the queue's stream answers (in a cluster:
// it has a leader, so a quorum of its replicas is up) and the control plane
// has a leader.
func ready(ctx context.Context, cfg *config.Config, store *queue.Store, rs *raftstore.Store) error {
	if _, err := store.LastSeq(ctx); err != nil {
		return fmt.Errorf("queue storage: %w", err)
	}
	if id, _ := rs.Leader(); id == "" {
		return fmt.Errorf("control plane: no leader")
	}
	return nil
}

// stageBatches puts the atomic-batch staging area where
// queue.batch_staging says (see queue.Embedded.StageBatches) and returns the
// directory it chose, "" for the default on disk.
func stageBatches(log *slog.Logger, cfg *config.Config, emb *queue.Embedded) string {
	dir := cfg.Queue.BatchStaging
	switch dir {
	case "disk":
		return ""
	case "auto":
		// Room for the batches in flight: a few group commits of max_bytes.
		need := uint64(cfg.Queue.GroupCommit.MaxBytes) * uint64(cfg.Queue.GroupCommit.Committers+2)
		if dir = queue.TmpfsStagingDir(cfg.DataDir, need); dir == "" {
			log.Info("batch staging on disk: /dev/shm is not a tmpfs with room; group commit is slower", "need_bytes", need)
			return ""
		}
	}
	if err := emb.StageBatches(cfg.DataDir, cfg.Queue.Stream, dir); err != nil {
		log.Warn("batch staging stays on disk", "err", err)
		return ""
	}
	log.Debug("batch staging", "dir", dir)
	return dir
}

// collectOrphans frees the stream space held by chunks of large messages
// a crash cut off (see queue.Store.CollectOrphans), in the background once
// SMTP is open: it walks the queue, which must not delay the first 250. A
// node alone on its embedded stream owns every chunk in it; otherwise only
// those it wrote itself. Failing is not fatal: the space stays taken until
// the next start, no mail is at stake.
func collectOrphans(ctx context.Context, log *slog.Logger, store *queue.Store, alone bool, before uint64) {
	start := time.Now()
	got, err := store.CollectOrphans(ctx, alone, before)
	switch {
	case err != nil:
		log.Warn("orphan chunks left in the stream", "err", err)
	case got.Messages > 0:
		log.Info("removed the chunks of messages a crash cut off", "messages", got.Messages, "chunks", got.Chunks, "bytes", got.Bytes, "took", time.Since(start).Round(time.Millisecond))
	}
}

// lockDataDir makes sure no other mxq uses the same data directory.
func lockDataDir(dir string) (func(), error) {
	f, err := os.OpenFile(filepath.Join(dir, "LOCK"), os.O_CREATE|os.O_RDWR, 0o640)
	if err != nil {
		return nil, fmt.Errorf("data directory lock: %w", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		return nil, fmt.Errorf("data directory %s is in use by another mxq: %w", dir, err)
	}
	return func() { f.Close() }, nil
}
