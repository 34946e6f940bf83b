package clustercred

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/mxq-dev/mxq/internal/filewatch"
)

// Source holds the material in use and hands it to every new handshake,
// so that a rotation on disk takes effect without a restart. A reload that
// fails (a file caught half-written) keeps the previous material and is
// tried again on the next poll.
type Source struct {
	cur   atomic.Pointer[Material]
	log   *slog.Logger
	mu    sync.Mutex // serializes Reload
	files *filewatch.Files
	build func(data [][]byte) (*Material, error)
	what  string
}

// Static serves material that never changes (a secret given inline).
func Static(m *Material) *Source {
	s := &Source{log: slog.New(slog.DiscardHandler)}
	s.cur.Store(m)
	return s
}

// WatchSecretFile serves the material of the secret file at path for a
// node reached at host (see ParseSecrets), reloaded by Run. It fails if
// the file cannot be used now, so that a bad file stops the start.
func WatchSecretFile(path, host string, log *slog.Logger) (*Source, error) {
	return watch(log, "cluster.secret_file", func(data [][]byte) (*Material, error) {
		secrets, err := ParseSecrets(data[0])
		if err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		return FromSecrets(secrets, host, time.Now())
	}, path)
}

// WatchPEMFiles serves a private PKI's certificate, key and CA, reloaded
// by Run (cert-manager renewing them into a Secret).
func WatchPEMFiles(caFile, certFile, keyFile string, log *slog.Logger) (*Source, error) {
	return watch(log, "cluster.tls", func(data [][]byte) (*Material, error) {
		m, err := FromPEM(data[1], data[2], data[0])
		if err != nil {
			return nil, fmt.Errorf("%s, %s, %s: %w", caFile, certFile, keyFile, err)
		}
		return m, nil
	}, caFile, certFile, keyFile)
}

func watch(log *slog.Logger, what string, build func([][]byte) (*Material, error), paths ...string) (*Source, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s := &Source{log: log, files: filewatch.New(paths...), build: build, what: what}
	if _, err := s.Reload(); err != nil {
		return nil, err
	}
	return s, nil
}

// Reload reads the files and, if they changed and make valid material,
// uses it from the next handshake on. It reports whether it changed.
func (s *Source) Reload() (bool, error) {
	if s.files == nil {
		return false, nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	changed, data, err := s.files.Changed()
	if err != nil || !changed {
		return false, err
	}
	m, err := s.build(data)
	if err != nil {
		return false, fmt.Errorf("%s: %w", s.what, err)
	}
	s.files.Accept(data)
	s.cur.Store(m)
	s.log.Info("cluster credentials loaded", "from", s.what, "material", m.Describe)
	return true, nil
}

// Run polls the files every interval until ctx ends.
func (s *Source) Run(ctx context.Context, interval time.Duration) {
	if s.files == nil {
		return
	}
	filewatch.Poll(ctx, interval, func() {
		if _, err := s.Reload(); err != nil {
			s.log.Warn("cluster credentials not reloaded, keeping the current ones", "err", err)
		}
	})
}

// Current is the material in use.
func (s *Source) Current() *Material { return s.cur.Load() }

// Config is the TLS configuration of both ends of a cluster connection.
// As a server it asks for and checks the client's certificate against the
// current pool (GetConfigForClient). As a client it checks the server's
// chain against the current pool in VerifyConnection: crypto/tls has no
// per-dial hook for the roots, so its own check is switched off
// (InsecureSkipVerify) and done there instead, never skipped.
//
// The server's name is checked when the connection state carries it: a
// DNS name always (it is sent as SNI); an IP only through Dial's config
// (SNI carries no IPs). nats-server's routes to IP addresses are checked
// for the chain alone. With a shared secret that loses nothing: whoever
// holds it can sign any name, so the chain is the authentication.
func (s *Source) Config() *tls.Config {
	return &tls.Config{
		MinVersion:           tls.VersionTLS13,
		GetCertificate:       func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return s.cur.Load().Cert, nil },
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return s.cur.Load().Cert, nil },
		GetConfigForClient:   s.serverConfig,
		InsecureSkipVerify:   true,
		VerifyConnection:     s.verifyServer,
	}
}

// ForServer returns a copy of cfg for dialing the server host (a DNS name
// or an IP), checking that name even when it is an IP: a config whose
// chain check is its own (Config's) does not see an IP in the connection
// state, so it is handed in here.
func ForServer(cfg *tls.Config, host string) *tls.Config {
	c := cfg.Clone()
	if c.ServerName == "" {
		c.ServerName = host
	}
	if verify := c.VerifyConnection; verify != nil && c.InsecureSkipVerify {
		name := c.ServerName
		c.VerifyConnection = func(cs tls.ConnectionState) error {
			if cs.ServerName == "" {
				cs.ServerName = name
			}
			return verify(cs)
		}
	}
	return c
}

func (s *Source) serverConfig(*tls.ClientHelloInfo) (*tls.Config, error) {
	m := s.cur.Load()
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{*m.Cert},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    m.Pool,
	}, nil
}

func (s *Source) verifyServer(cs tls.ConnectionState) error {
	if len(cs.PeerCertificates) == 0 {
		return errors.New("clustercred: the peer sent no certificate")
	}
	m := s.cur.Load()
	inter := x509.NewCertPool()
	for _, c := range cs.PeerCertificates[1:] {
		inter.AddCert(c)
	}
	_, err := cs.PeerCertificates[0].Verify(x509.VerifyOptions{
		Roots:         m.Pool,
		Intermediates: inter,
		DNSName:       cs.ServerName,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	})
	if err != nil {
		return fmt.Errorf("clustercred: peer %q: %w", cs.ServerName, err)
	}
	return nil
}
