// Package tlsreload serves a TLS certificate from files that are replaced
// while the server runs (cert-manager renews them into a Kubernetes
// Secret).
//
// The certificate in use sits behind an atomic pointer that every new
// handshake reads (tls.Config.GetCertificate). Reloading swaps the pointer
// only once the new certificate and key parse and match, so a rotation
// caught half-way (certificate written, key not yet) keeps the old pair and
// is retried on the next poll. Sessions already encrypted are not touched:
// their keys were derived at their handshake.
package tlsreload

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/mxq-dev/mxq/internal/filewatch"
)

// Reloader holds the current certificate.
type Reloader struct {
	certFile, keyFile string
	log               *slog.Logger

	mu    sync.Mutex // serializes Reload
	files *filewatch.Files
	cur   atomic.Pointer[tls.Certificate]
}

// New loads the pair; it fails if it cannot, so a bad configuration is
// found at start-up. log may be nil.
func New(certFile, keyFile string, log *slog.Logger) (*Reloader, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	r := &Reloader{certFile: certFile, keyFile: keyFile, log: log, files: filewatch.New(certFile, keyFile)}
	if _, err := r.Reload(); err != nil {
		return nil, err
	}
	return r, nil
}

// Reload reads the files and, if they changed and hold a valid pair,
// serves the new certificate from the next handshake on. It reports
// whether the certificate changed. On error the previous one stays.
func (r *Reloader) Reload() (bool, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	changed, data, err := r.files.Changed()
	if err != nil || !changed {
		return false, err
	}
	cert, err := tls.X509KeyPair(data[0], data[1])
	if err != nil {
		return false, fmt.Errorf("tls: %s and %s: %w", r.certFile, r.keyFile, err)
	}
	r.files.Accept(data)
	r.cur.Store(&cert)
	leaf := cert.Leaf
	r.log.Info("TLS certificate loaded", "file", r.certFile, "subject", leaf.Subject.String(),
		"dns_names", leaf.DNSNames, "not_after", leaf.NotAfter.UTC().Format(time.RFC3339))
	if until := time.Until(leaf.NotAfter); until < 14*24*time.Hour {
		r.log.Warn("TLS certificate expires soon", "file", r.certFile, "not_after", leaf.NotAfter.UTC().Format(time.RFC3339))
	}
	return true, nil
}

// Run polls the files every interval until ctx ends.
func (r *Reloader) Run(ctx context.Context, interval time.Duration) {
	filewatch.Poll(ctx, interval, func() {
		if _, err := r.Reload(); err != nil {
			r.log.Warn("TLS certificate not reloaded, keeping the current one", "err", err)
		}
	})
}

// Leaf is the certificate served now.
func (r *Reloader) Leaf() *x509.Certificate { return r.cur.Load().Leaf }

// GetCertificate implements tls.Config.GetCertificate.
func (r *Reloader) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	return r.cur.Load(), nil
}

// Config returns a server configuration that serves the current
// certificate, with TLS 1.2 as the oldest version: 1.0 and 1.1 are broken
// and deprecated (RFC 8996), and every MTA of the last decade speaks 1.2.
func (r *Reloader) Config() *tls.Config {
	return &tls.Config{MinVersion: tls.VersionTLS12, GetCertificate: r.GetCertificate}
}
