package main

import (
	"context"
	"log/slog"

	"github.com/mxq-dev/mxq/admin"
	"github.com/mxq-dev/mxq/config"
	"github.com/mxq-dev/mxq/continuity"
	"github.com/mxq-dev/mxq/continuity/auth"
	"github.com/mxq-dev/mxq/internal/tlsreload"
	"github.com/mxq-dev/mxq/queue"
	"github.com/mxq-dev/mxq/queue/catalog"
)

// startContinuity starts the view of held mail (IMAP and web) when
// continuity.enabled is set, until ctx ends; it returns nil when it is
// not. The view never stands in the way of mail: if it cannot start (a
// port taken), mxq logs why, keeps taking and delivering mail, and
// `mxq continuity status` shows the error.
func startContinuity(ctx context.Context, cfg *config.Config, log *slog.Logger, store *queue.Store, cat *catalog.Catalog, metrics *admin.Metrics) admin.ContinuityReporter {
	ct := cfg.Continuity
	if !ct.Enabled {
		return nil
	}
	log = log.With("component", "continuity")
	failed := func(err error) admin.ContinuityReporter {
		log.Error("the view of held mail is NOT running; mail is still accepted and delivered", "err", err)
		return continuityError{err.Error()}
	}
	// Validated by config.Load: the pair loads and the file exists.
	certs, err := tlsreload.New(ct.TLS.CertFile, ct.TLS.KeyFile, log)
	if err != nil {
		return failed(err)
	}
	go certs.Run(ctx, filePoll)
	users, err := auth.OpenPasswdFile(ct.Auth.PasswdFile, ct.Auth.DefaultDomain, log)
	if err != nil {
		return failed(err)
	}
	go users.Run(ctx, filePoll)
	svc, err := continuity.Start(ctx, continuity.Options{
		Store:              store,
		Catalog:            cat,
		Folder:             ct.Folder,
		IMAPListen:         ct.IMAP.Listen,
		IMAPStartTLSListen: ct.IMAP.StartTLSListen,
		WebListen:          ct.Web.Listen,
		TLS:                certs.Config(),
		Auth:               users,
		DefaultDomain:      ct.Auth.DefaultDomain,
		Limits:             auth.Limits{PerUser: ct.Auth.MaxFailuresPerUser, PerIP: ct.Auth.MaxFailuresPerIP, Window: ct.Auth.FailureWindow},
		WebIdle:            ct.Web.IdleTimeout,
		WebMaxSession:      ct.Web.MaxSession,
		Registerer:         metrics.Registerer(),
		Logger:             log,
	})
	if err != nil {
		return failed(err)
	}
	return svc
}

// continuityError reports a view that is enabled but could not start.
type continuityError struct{ err string }

func (e continuityError) ContinuityStatus() any {
	return continuity.Status{Enabled: true, Error: e.err}
}
