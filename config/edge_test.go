package config

import (
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/mxq-dev/mxq/internal/testpki"
)

func TestEdgeDefaults(t *testing.T) {
	c, err := Load("", nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	s := c.SMTP
	if s.MaxConnections != 500 || s.MaxConnectionsPerIP != 20 || s.ConnectionRatePerIP != 120 ||
		s.MaxCommands != 200 || s.MaxErrors != 20 || s.MinDataRate != 1<<10 || s.MinFreeDisk != 1<<30 ||
		s.MemoryBudget != 128<<20 || s.MemoryWait != 3*time.Second {
		t.Errorf("limits: %+v", s)
	}
	// No certificate: no STARTTLS, no HTTPS, and that is valid.
	if s.TLS.CertFile != "" || c.Admin.TLS.CertFile != "" || len(s.ProxyProtocol.TrustedNetworks) != 0 {
		t.Errorf("TLS or PROXY on by default: %+v %+v", s.TLS, s.ProxyProtocol)
	}
	if strings.Join(s.LimitExemptNetworks, " ") != "127.0.0.0/8 ::1 10.0.0.0/8 172.16.0.0/12 192.168.0.0/16 fc00::/7" {
		t.Errorf("limit_exempt_networks %v", s.LimitExemptNetworks)
	}
	if s.StressReadTimeout != 10*time.Second || s.ProxyProtocol.HeaderTimeout != 10*time.Second || s.Recipients.Verify || s.Recipients.CacheTTL != time.Hour {
		t.Errorf("edge defaults: %+v %+v", s.ProxyProtocol, s.Recipients)
	}
}

func TestEdgeValidation(t *testing.T) {
	ca, err := testpki.NewCA("test")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	leaf, _ := ca.Issue("mx.example.test")
	cert, key, _, err := leaf.Write(dir, ca)
	if err != nil {
		t.Fatal(err)
	}
	other, _ := ca.Issue("other.example.test")
	otherKey := filepath.Join(dir, "other.key")
	os.WriteFile(otherKey, other.KeyPEM, 0o600)

	cases := []struct {
		name, yaml string
		key        string // "" for valid
	}{
		{"tls pair", "smtp:\n  tls:\n    cert_file: " + cert + "\n    key_file: " + key + "\n    required_for: [10.0.0.0/8, 192.0.2.7]\n", ""},
		{"admin tls", "admin:\n  tls:\n    cert_file: " + cert + "\n    key_file: " + key + "\n", ""},
		{"half a pair", "smtp:\n  tls:\n    cert_file: " + cert + "\n", "smtp.tls"},
		{"mismatched pair", "smtp:\n  tls:\n    cert_file: " + cert + "\n    key_file: " + otherKey + "\n", "smtp.tls"},
		{"admin missing file", "admin:\n  tls:\n    cert_file: /nonexistent.pem\n    key_file: " + key + "\n", "admin.tls"},
		{"required without a certificate", "smtp:\n  tls:\n    required_for: [10.0.0.0/8]\n", "smtp.tls.required_for"},
		{"bad network", "smtp:\n  proxy_protocol:\n    trusted_networks: [10.0.0.0/33]\n", "smtp.proxy_protocol.trusted_networks"},
		{"proxy networks", "smtp:\n  proxy_protocol:\n    trusted_networks: [10.0.0.0/8, '2001:db8::/32', 192.0.2.1]\n", ""},
		{"negative limit", "smtp:\n  max_connections: -1\n", "smtp.max_connections"},
		{"per ip above total", "smtp:\n  max_connections: 10\n  max_connections_per_ip: 11\n", "smtp.max_connections_per_ip"},
		{"commands below a message", "smtp:\n  max_commands: 50\n", "smtp.max_commands"},
		{"limits off", "smtp:\n  max_connections: 0\n  max_connections_per_ip: 0\n  connection_rate_per_ip: 0\n  max_commands: 0\n  max_errors: 0\n  min_data_rate: 0\n  min_free_disk: 0\n", ""},
		{"missing recipient list", "smtp:\n  recipients:\n    file: /nonexistent\n", "smtp.recipients.file"},
		{"bad ttl", "smtp:\n  recipients:\n    negative_ttl: 0s\n", "smtp.recipients.negative_ttl"},
		{"memory budget", "smtp:\n  memory_budget: 64MiB\n  memory_wait: 0s\n", ""},
		{"no memory budget", "smtp:\n  memory_budget: 0\n", "smtp.memory_budget"},
		{"negative memory budget", "smtp:\n  memory_budget: -64MiB\n", "smtp.memory_budget"},
		{"memory budget below a message", "smtp:\n  memory_budget: 100KiB\n", "smtp.memory_budget"},
		{"negative memory wait", "smtp:\n  memory_wait: -1s\n", "smtp.memory_wait"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Load(writeConfig(t, tc.yaml), nil, nil)
			if tc.key == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			var es Errors
			if !errors.As(err, &es) {
				t.Fatalf("want a problem with %s, got %v", tc.key, err)
			}
			for _, e := range es {
				if e.Key == tc.key {
					return
				}
			}
			t.Fatalf("want a problem with %s, got %v", tc.key, err)
		})
	}
}

// The Helm chart sets the certificate through the environment.
func TestEdgeEnvironment(t *testing.T) {
	ca, _ := testpki.NewCA("test")
	leaf, _ := ca.Issue("mx.example.test")
	cert, key, _, err := leaf.Write(t.TempDir(), ca)
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv("MXQ_SMTP_TLS_CERT_FILE", cert)
	t.Setenv("MXQ_SMTP_TLS_KEY_FILE", key)
	t.Setenv("MXQ_SMTP_PROXY_PROTOCOL_TRUSTED_NETWORKS", "10.0.0.0/8,192.168.0.0/16")
	c, err := Load("", nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if c.SMTP.TLS.CertFile != cert || c.SMTP.TLS.KeyFile != key {
		t.Fatalf("TLS from the environment: %+v", c.SMTP.TLS)
	}
	if strings.Join(c.SMTP.ProxyProtocol.TrustedNetworks, " ") != "10.0.0.0/8 192.168.0.0/16" {
		t.Fatalf("networks from the environment: %v", c.SMTP.ProxyProtocol.TrustedNetworks)
	}
}

func TestNetworks(t *testing.T) {
	got, err := Networks([]string{"10.1.2.3/8", "192.0.2.1", "2001:db8::1", "::ffff:192.0.2.9"})
	if err != nil {
		t.Fatal(err)
	}
	want := []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("192.0.2.1/32"),
		netip.MustParsePrefix("2001:db8::1/128"), netip.MustParsePrefix("192.0.2.9/32")}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("Networks: %v, want %v", got, want)
		}
	}
	if _, err := Networks([]string{"example.test"}); err == nil {
		t.Fatal("a host name accepted as a network")
	}
}
