package raftstore

import (
	"crypto/tls"
	"errors"
	"net"
	"time"

	"github.com/hashicorp/raft"

	"github.com/mxq-dev/mxq/internal/clustercred"
)

// tlsLayer is raft's stream layer over mutual TLS: the raft port carries
// the control state, and in a cluster across hosts it must not be open to
// anyone who can reach it. Both sides present a certificate from the
// cluster's CA (the Config's ClientCAs/RootCAs and Certificates, or
// clustercred's callbacks, which read the current material at each
// handshake).
type tlsLayer struct {
	ln        net.Listener
	advertise net.Addr
	cfg       *tls.Config
}

func newTLSLayer(bind string, advertise net.Addr, cfg *tls.Config) (*tlsLayer, error) {
	if cfg == nil || len(cfg.Certificates) == 0 && cfg.GetCertificate == nil {
		return nil, errors.New("raftstore: TLS needs a certificate")
	}
	srv := cfg.Clone()
	srv.ClientAuth = tls.RequireAndVerifyClientCert
	ln, err := tls.Listen("tcp", bind, srv)
	if err != nil {
		return nil, err
	}
	if advertise == nil {
		advertise = ln.Addr()
	}
	return &tlsLayer{ln: ln, advertise: advertise, cfg: cfg}, nil
}

func (l *tlsLayer) Accept() (net.Conn, error) { return l.ln.Accept() }
func (l *tlsLayer) Close() error              { return l.ln.Close() }
func (l *tlsLayer) Addr() net.Addr            { return l.advertise }

// Dial connects to a peer, checking its certificate against the CA and
// the peer's host name (an IP too, which a configuration that checks
// certificates itself would not see: clustercred.ForServer).
func (l *tlsLayer) Dial(address raft.ServerAddress, timeout time.Duration) (net.Conn, error) {
	host, _, err := net.SplitHostPort(string(address))
	if err != nil {
		return nil, err
	}
	cfg := clustercred.ForServer(l.cfg, host)
	d := &net.Dialer{Timeout: timeout}
	return tls.DialWithDialer(d, "tcp", string(address), cfg)
}
