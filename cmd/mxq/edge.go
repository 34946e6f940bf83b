package main

import (
	"context"
	"crypto/tls"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/mxq-dev/mxq/config"
	"github.com/mxq-dev/mxq/internal/diskguard"
	"github.com/mxq-dev/mxq/internal/rcptcheck"
	"github.com/mxq-dev/mxq/internal/tlsreload"
	"github.com/mxq-dev/mxq/queue"
	"github.com/mxq-dev/mxq/relay"
)

// filePoll is how often certificate and recipient-list files are checked
// for changes.
const filePoll = 10 * time.Second

// edge is what the SMTP relay needs besides the queue: STARTTLS with a
// certificate that follows its files, the recipient checks, the disk guard
// and its JetStream watchdog. stop ends their goroutines; it must run
// before the embedded server shuts down, or the watchdog would restart
// JetStream under the shutdown.
type edge struct {
	o    relay.Options // the fields startEdge fills
	stop func()
}

func startEdge(cfg *config.Config, log *slog.Logger, emb *queue.Embedded) (*edge, error) {
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	run := func(f func(context.Context)) {
		wg.Add(1)
		go func() { defer wg.Done(); f(ctx) }()
	}
	e := &edge{stop: func() { cancel(); wg.Wait() }}
	fail := func(err error) (*edge, error) { e.stop(); return nil, err }
	sm := &cfg.SMTP
	o := &e.o

	if sm.TLS.CertFile != "" {
		r, err := tlsreload.New(sm.TLS.CertFile, sm.TLS.KeyFile, log.With("component", "smtp-tls"))
		if err != nil {
			return fail(fmt.Errorf("smtp.tls: %w", err))
		}
		o.TLS = r.Config()
		run(func(ctx context.Context) { r.Run(ctx, filePoll) })
	} else {
		log.Info("no smtp.tls.cert_file: STARTTLS is not offered")
	}
	// Validated by config.Load.
	o.RequireTLS, _ = config.Networks(sm.TLS.RequiredFor)
	o.ProxyNetworks, _ = config.Networks(sm.ProxyProtocol.TrustedNetworks)
	o.LimitExempt, _ = config.Networks(sm.LimitExemptNetworks)
	o.ProxyHeaderTimeout = sm.ProxyProtocol.HeaderTimeout
	o.MaxConnections, o.MaxConnectionsPerIP, o.ConnectionRatePerIP = sm.MaxConnections, sm.MaxConnectionsPerIP, sm.ConnectionRatePerIP
	o.MaxCommands, o.MaxErrors, o.MinDataRate = sm.MaxCommands, sm.MaxErrors, int64(sm.MinDataRate)
	o.StressReadTimeout = sm.StressReadTimeout

	var chk rcptcheck.Checker
	if f := sm.Recipients.File; f != "" {
		l, err := rcptcheck.LoadList(f, log.With("component", "recipients"))
		if err != nil {
			return fail(fmt.Errorf("smtp.recipients.file: %w", err))
		}
		chk.List = l
		run(func(ctx context.Context) { l.Run(ctx, filePoll) })
	}
	if sm.Recipients.Verify {
		chk.Verifier = rcptcheck.NewVerifier(rcptcheck.VerifierOptions{
			Backend: func(domain string) (rcptcheck.Backend, bool) {
				b, ok := cfg.Backends[cfg.RouteFor(domain)]
				return rcptcheck.Backend{Protocol: b.Protocol, Address: b.Address}, ok
			},
			LocalName:   sm.Hostname,
			Timeout:     sm.Recipients.VerifyTimeout,
			TTL:         sm.Recipients.CacheTTL,
			NegativeTTL: sm.Recipients.NegativeTTL,
			Logger:      log.With("component", "recipients"),
		})
	}
	if chk.List != nil || chk.Verifier != nil {
		o.Recipients = &chk
	}

	// The disk guard only makes sense where the queue's disk is: with an
	// external NATS, the servers guard their own.
	if emb != nil {
		g := diskguard.New(cfg.DataDir, uint64(sm.MinFreeDisk), log.With("component", "diskguard"))
		o.Space = g
		if free, size, err := g.Statfs(cfg.DataDir); err == nil {
			log.Info("disk guard", "dir", cfg.DataDir, "free_bytes", free, "reserve_bytes", g.Reserve(size))
		}
		if js, err := diskguard.NATS(emb.Server()); err == nil {
			wo := diskguard.WatchOptions{}
			if cfg.Queue.Replicas == 1 {
				// The restarted server takes the staging area back to
				// the disk; group commit would stay slow until a restart.
				wo.Restarted = func() { stageBatches(log, cfg, emb) }
			}
			run(func(ctx context.Context) { g.Watch(ctx, js, wo) })
		} else {
			log.Warn("JetStream watchdog not started", "err", err)
		}
	}
	return e, nil
}

// apply copies the edge's fields into o.
func (e *edge) apply(o *relay.Options) {
	x := e.o
	o.TLS, o.RequireTLS, o.ProxyNetworks, o.ProxyHeaderTimeout = x.TLS, x.RequireTLS, x.ProxyNetworks, x.ProxyHeaderTimeout
	o.LimitExempt = x.LimitExempt
	o.MaxConnections, o.MaxConnectionsPerIP, o.ConnectionRatePerIP = x.MaxConnections, x.MaxConnectionsPerIP, x.ConnectionRatePerIP
	o.MaxCommands, o.MaxErrors, o.MinDataRate = x.MaxCommands, x.MaxErrors, x.MinDataRate
	o.StressReadTimeout = x.StressReadTimeout
	o.Recipients, o.Space = x.Recipients, x.Space
}

// adminTLS wraps the admin listener in TLS when admin.tls is set, with the
// certificate reloaded from its files until ctx ends.
func adminTLS(ctx context.Context, cfg *config.Config, log *slog.Logger, ln net.Listener) (net.Listener, error) {
	if cfg.Admin.TLS.CertFile == "" {
		return ln, nil
	}
	r, err := tlsreload.New(cfg.Admin.TLS.CertFile, cfg.Admin.TLS.KeyFile, log.With("component", "admin-tls"))
	if err != nil {
		ln.Close()
		return nil, fmt.Errorf("admin.tls: %w", err)
	}
	go r.Run(ctx, filePoll)
	return tls.NewListener(ln, r.Config()), nil
}
