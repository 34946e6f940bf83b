// Package clustercred gives the nodes of a cluster mutual TLS for their
// NATS routes and their raft transport, from a shared secret alone or from
// certificate files, and lets the material change on disk while they run.
//
// Why a secret: the cluster ports carry the queue (every message) and the
// control state. Left open, any process that reaches them can join as a
// NATS route and read the stream, or speak raft. A PKI stops that but is
// one more thing to run; a secret of 32 bytes or more, the same on every
// node, is enough. From it every node derives the same certificate
// authority: an ed25519 key from HKDF-SHA256(secret, "mxq cluster CA v1")
// and a self-signed certificate whose every field is fixed (serial from the
// public key, fixed validity), so the CA certificate is byte for byte the
// same everywhere and never leaves memory. At each start a node makes a
// fresh ed25519 key and a certificate for its cluster.advertise name,
// signed by that CA. Peers without the secret cannot sign a certificate
// the others accept, nor check the others' certificates: the handshake
// fails both ways, and what passes is encrypted.
//
// Rotation: a secret file's first line is the secret in use, further lines
// earlier secrets still accepted. Put the new secret first with the old
// below it on every node, then drop the old line. Meanwhile a node that has
// the new secret presents its certificate with the new CA cross-signed by
// the old one, so peers not yet rotated accept it. Every new handshake reads
// the current material (Source), so no restart is needed; connections
// already up keep their keys.
package clustercred

import (
	"crypto/ed25519"
	"crypto/hkdf"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"errors"
	"fmt"
	"math/big"
	"net"
	"strings"
	"time"
)

// MinSecretLen is the shortest secret accepted, in bytes: 256 bits, so
// that the secret cannot be guessed however fast a stranger tries.
const MinSecretLen = 32

// hkdfInfo separates this use of the secret from any other; the version
// lets a later derivation coexist during an upgrade.
const hkdfInfo = "mxq cluster CA v1"

// The CA's validity is fixed, not taken from the clock, so that every
// node makes the same certificate.
var (
	caNotBefore = time.Date(2020, 1, 1, 0, 0, 0, 0, time.UTC)
	caNotAfter  = time.Date(9999, 12, 31, 23, 59, 59, 0, time.UTC)
)

// CA is the certificate authority derived from one secret.
type CA struct {
	Cert *x509.Certificate
	key  ed25519.PrivateKey
	// Fingerprint is short and names the secret in logs without
	// revealing it: the first 8 hex digits of SHA-256 of the CA's key.
	Fingerprint string
}

// DeriveCA derives the CA of secret. The same secret gives the same CA,
// byte for byte, on every node.
func DeriveCA(secret []byte) (*CA, error) {
	if len(secret) < MinSecretLen {
		return nil, fmt.Errorf("clustercred: a secret has at least %d bytes, got %d", MinSecretLen, len(secret))
	}
	seed, err := hkdf.Key(sha256.New, secret, nil, hkdfInfo, ed25519.SeedSize)
	if err != nil {
		return nil, fmt.Errorf("clustercred: %w", err)
	}
	key := ed25519.NewKeyFromSeed(seed)
	pub := key.Public().(ed25519.PublicKey)
	sum := sha256.Sum256(pub)
	fp := hex.EncodeToString(sum[:4])
	tmpl := &x509.Certificate{
		// 127 bits of the key's hash: positive, unique per secret.
		SerialNumber:          new(big.Int).SetBytes(append([]byte{sum[0] & 0x7f}, sum[1:16]...)),
		Subject:               pkix.Name{Organization: []string{"mxq"}, CommonName: "mxq cluster CA " + fp},
		NotBefore:             caNotBefore,
		NotAfter:              caNotAfter,
		IsCA:                  true,
		BasicConstraintsValid: true,
		// One level below: the cross-certificate of a newer secret's CA
		// during a rotation (see CrossSign).
		MaxPathLen:   1,
		KeyUsage:     x509.KeyUsageCertSign,
		SubjectKeyId: sum[:20],
	}
	// ed25519 signatures are deterministic: rand is not used.
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, pub, key)
	if err != nil {
		return nil, fmt.Errorf("clustercred: CA certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("clustercred: CA certificate: %w", err)
	}
	return &CA{Cert: cert, key: key, Fingerprint: fp}, nil
}

// Issue makes a certificate for host (a DNS name or an IP), for servers
// and clients alike, with a fresh key. Its key lives only in this
// process's memory, so it is valid as long as the CA: ending a leaked
// key's validity is rotating the secret.
func (ca *CA) Issue(host string, now time.Time) (*tls.Certificate, error) {
	pub, key, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("clustercred: %w", err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, fmt.Errorf("clustercred: %w", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{Organization: []string{"mxq"}, CommonName: host},
		// An hour back: a peer whose clock is a little behind still
		// accepts the certificate.
		NotBefore:   now.Add(-time.Hour),
		NotAfter:    caNotAfter,
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	if ip := net.ParseIP(host); ip != nil {
		tmpl.IPAddresses = []net.IP{ip}
	} else {
		tmpl.DNSNames = []string{host}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, pub, ca.key)
	if err != nil {
		return nil, fmt.Errorf("clustercred: certificate for %s: %w", host, err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("clustercred: certificate for %s: %w", host, err)
	}
	return &tls.Certificate{Certificate: [][]byte{der, ca.Cert.Raw}, PrivateKey: key, Leaf: leaf}, nil
}

// CrossSign certifies newer's key with ca: a node that presents it with
// its leaf (signed by newer) is accepted by peers that know only ca, the
// earlier secret. That is what lets a rotation go one node at a time.
func (ca *CA) CrossSign(newer *CA) (*x509.Certificate, error) {
	tmpl := &x509.Certificate{
		SerialNumber:          newer.Cert.SerialNumber,
		Subject:               newer.Cert.Subject,
		NotBefore:             caNotBefore,
		NotAfter:              caNotAfter,
		IsCA:                  true,
		BasicConstraintsValid: true,
		MaxPathLenZero:        true,
		KeyUsage:              x509.KeyUsageCertSign,
		SubjectKeyId:          newer.Cert.SubjectKeyId,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, newer.key.Public(), ca.key)
	if err != nil {
		return nil, fmt.Errorf("clustercred: cross-certificate: %w", err)
	}
	return x509.ParseCertificate(der)
}

// ParseSecrets reads a secret file: the first line is the secret in use,
// further non-empty lines earlier secrets still accepted. Surrounding
// white space (a trailing newline, CRLF) is not part of a secret.
func ParseSecrets(data []byte) ([][]byte, error) {
	lines := strings.Split(string(data), "\n")
	first := strings.TrimSpace(lines[0])
	if first == "" {
		if strings.TrimSpace(string(data)) == "" {
			return nil, errors.New("is empty")
		}
		return nil, errors.New("line 1 (the secret in use) is empty")
	}
	var out [][]byte
	for i, l := range lines {
		l = strings.TrimSpace(l)
		if l == "" {
			continue
		}
		if len(l) < MinSecretLen {
			return nil, fmt.Errorf("line %d: a secret has at least %d bytes, got %d", i+1, MinSecretLen, len(l))
		}
		out = append(out, []byte(l))
	}
	return out, nil
}

// Material is what one handshake uses: this node's certificate and the
// authorities it accepts.
type Material struct {
	Cert *tls.Certificate
	Pool *x509.CertPool
	// Describe names the material in logs (fingerprints, file names).
	Describe string
}

// FromSecrets makes the material of a node reached at host: a
// certificate from the CA of secrets[0], presented with that CA
// cross-signed by each earlier secret's (so peers that have not rotated
// yet accept it), and the CAs of all of them to accept.
func FromSecrets(secrets [][]byte, host string, now time.Time) (*Material, error) {
	if len(secrets) == 0 {
		return nil, errors.New("clustercred: no secret")
	}
	pool := x509.NewCertPool()
	var fps []string
	var cert *tls.Certificate
	var current *CA
	for i, s := range secrets {
		ca, err := DeriveCA(s)
		if err != nil {
			return nil, err
		}
		pool.AddCert(ca.Cert)
		fps = append(fps, ca.Fingerprint)
		if i == 0 {
			current = ca
			if cert, err = ca.Issue(host, now); err != nil {
				return nil, err
			}
			continue
		}
		cross, err := ca.CrossSign(current)
		if err != nil {
			return nil, err
		}
		cert.Certificate = append(cert.Certificate, cross.Raw)
	}
	return &Material{Cert: cert, Pool: pool, Describe: "secret " + strings.Join(fps, ", accepting ")}, nil
}

// FromPEM makes the material of a private PKI: this node's certificate
// and key, and the CA certificates to accept.
func FromPEM(certPEM, keyPEM, caPEM []byte) (*Material, error) {
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, errors.New("no CA certificate in ca_file")
	}
	return &Material{Cert: &cert, Pool: pool, Describe: "certificate " + cert.Leaf.Subject.String()}, nil
}
