package config

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spf13/pflag"
)

func writeConfig(t *testing.T, yaml string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "mxq.yaml")
	if err := os.WriteFile(p, []byte(yaml), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestDefaults(t *testing.T) {
	c, err := Load("", nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	checks := []struct {
		name string
		ok   bool
	}{
		{"smtp.listen", c.SMTP.Listen == "127.0.0.1:2525"},
		{"data_dir", c.DataDir == "./mxq-data"},
		{"smtp.domains", len(c.SMTP.Domains) == 1 && c.SMTP.Domains[0] == "example.test"},
		{"max size", c.SMTP.MaxMessageSize == 50<<20},
		{"max recipients", c.SMTP.MaxRecipients == 100},
		{"durability", c.Queue.Durability == DurabilityGroup},
		{"backend", c.Backends["store"].Address == "127.0.0.1:24" && c.Backends["store"].Protocol == "lmtp"},
		{"rate", c.Backends["store"].Rate == 200 && c.Backends["store"].Concurrency == 8},
		{"route", c.RouteFor("example.test") == "store"},
		{"retry", c.Drain.RetryMin == 5*time.Minute && c.Drain.RetryMax == time.Hour},
		{"lifetime", c.Drain.MaxLifetime == 7*24*time.Hour},
	}
	for _, ch := range checks {
		if !ch.ok {
			t.Errorf("default %s wrong: %+v", ch.name, c)
		}
	}
}

func TestPrecedence(t *testing.T) {
	p := writeConfig(t, `
smtp:
  listen: 127.0.0.1:2600
  domains: [a.test, b.test]
  max_recipients: 50
data_dir: /from/file
`)
	t.Setenv("MXQ_SMTP_MAX_RECIPIENTS", "60")
	t.Setenv("MXQ_DATA_DIR", "/from/env")
	fs := pflag.NewFlagSet("t", pflag.ContinueOnError)
	fs.String("data-dir", "", "")
	if err := fs.Parse([]string{"--data-dir", "/from/flag"}); err != nil {
		t.Fatal(err)
	}
	c, err := Load(p, fs, map[string]string{"data_dir": "data-dir"})
	if err != nil {
		t.Fatal(err)
	}
	if c.SMTP.Listen != "127.0.0.1:2600" {
		t.Errorf("file did not override default: %s", c.SMTP.Listen)
	}
	if c.SMTP.MaxRecipients != 60 {
		t.Errorf("environment did not override file: %d", c.SMTP.MaxRecipients)
	}
	if c.DataDir != "/from/flag" {
		t.Errorf("flag did not override environment: %s", c.DataDir)
	}
	if strings.Join(c.SMTP.Domains, ",") != "a.test,b.test" {
		t.Errorf("domains %v", c.SMTP.Domains)
	}
}

func TestEnvironmentList(t *testing.T) {
	t.Setenv("MXQ_SMTP_DOMAINS", "a.test, B.TEST.")
	c, err := Load("", nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(c.SMTP.Domains, ",") != "a.test,b.test" {
		t.Fatalf("domains %v", c.SMTP.Domains)
	}
}

// Every problem is reported at once, each under its key.
func TestValidateReportsEveryKey(t *testing.T) {
	p := writeConfig(t, `
smtp:
  listen: nonsense
  max_recipients: 0
  max_message_size: lots
  domians: [typo.test]
queue:
  durability: sometimes
  replicas: 2
drain:
  order: random
  retry_min: 2h
  retry_max: 1h
backends:
  Bad Name:
    protocol: pop3
    address: nowhere
`)
	_, err := Load(p, nil, nil)
	if !errors.Is(err, ErrInvalid) {
		t.Fatalf("err %v, want ErrInvalid", err)
	}
	var es Errors
	if !errors.As(err, &es) {
		t.Fatalf("err %T does not carry the list", err)
	}
	got := map[string]bool{}
	for _, e := range es {
		got[e.Key] = true
	}
	for _, key := range []string{
		"smtp.listen", "smtp.max_recipients", "smtp.max_message_size", "smtp.domians",
		"queue.durability", "queue.replicas", "drain.order", "drain.retry_max",
		"backends.bad name", "backends.bad name.protocol", "backends.bad name.address",
	} {
		if !got[key] {
			t.Errorf("no error for %s; got:\n%v", key, err)
		}
	}
}

func TestValidateTable(t *testing.T) {
	cases := []struct {
		name, yaml, key string
	}{
		{"no domains", "smtp: {domains: []}", "smtp.domains"},
		{"bad domain", "smtp: {domains: ['bad..domain']}", "smtp.domains[0]"},
		{"address literal", "smtp: {domains: ['[192.0.2.1]']}", "smtp.domains[0]"},
		{"backend url", "backend: 'lmtp:/nohost'", "backend"},
		{"backend port", "backend: 'lmtp://host'", "backend"},
		{"two wildcards", "backends: {a: {address: '127.0.0.1:24'}, b: {address: '127.0.0.1:25'}}", "backends.b.domains"},
		{"unserved domain", "backends: {a: {address: '127.0.0.1:24', domains: [other.test]}}", "backends"},
		{"chunk vs payload", "queue: {chunk_size: 8MiB}", "queue.chunk_size"},
		{"group size", "queue: {group_commit: {max_messages: 5000}}", "queue.group_commit.max_messages"},
		{"nats url", "nats: {url: 'not a url'}", "nats.url"},
		{"negative timeout", "smtp: {read_timeout: -1s}", "smtp.read_timeout"},
		{"log level", "log: {level: loud}", "log.level"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Load(writeConfig(t, tc.yaml), nil, nil)
			var es Errors
			if !errors.As(err, &es) {
				t.Fatalf("err %v", err)
			}
			for _, e := range es {
				if e.Key == tc.key {
					return
				}
			}
			t.Fatalf("no error for %s in:\n%v", tc.key, err)
		})
	}
}

func TestBackendsAndRoutes(t *testing.T) {
	p := writeConfig(t, `
smtp:
  domains: [a.test, b.test, Bücher.example]
backends:
  main:
    address: 10.0.0.1:24
    domains: ["*"]
  books:
    protocol: smtp
    address: 10.0.0.2:25
    domains: [bücher.example]
    rate: 50
`)
	c, err := Load(p, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if got := c.RouteFor("xn--bcher-kva.example"); got != "books" {
		t.Errorf("IDN domain routed to %q", got)
	}
	if got := c.RouteFor("a.test"); got != "main" {
		t.Errorf("a.test routed to %q", got)
	}
	if b := c.Backends["books"]; b.Rate != 50 || b.Concurrency != 8 || b.Protocol != "smtp" {
		t.Errorf("books backend %+v", b)
	}
}

func TestExampleConfigLoads(t *testing.T) {
	if _, err := Load("../mxq.example.yaml", nil, nil); err != nil {
		t.Fatalf("mxq.example.yaml: %v", err)
	}
}

func TestByteSize(t *testing.T) {
	cases := map[string]ByteSize{"50MiB": 50 << 20, "1KiB": 1024, "10MB": 10_000_000, "123": 123, "1.5GiB": 3 << 29, "2k": 2048}
	for in, want := range cases {
		got, err := ParseByteSize(in)
		if err != nil || got != want {
			t.Errorf("%q: %v, %v; want %v", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "lots", "-1MiB", "MiB"} {
		if _, err := ParseByteSize(bad); err == nil {
			t.Errorf("%q parsed", bad)
		}
	}
}

func TestCluster(t *testing.T) {
	ok := `
node_name: mxq-1
queue: {replicas: 3}
cluster:
  peers: [mxq-0.mxq-peers.mail.svc, mxq-1.mxq-peers.mail.svc, mxq-2.mxq-peers.mail.svc]
  secret: 0123456789abcdef0123456789abcdef
`
	c, err := Load(writeConfig(t, ok), nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if !c.Clustered() || c.Cluster.Advertise != "mxq-1.mxq-peers.mail.svc" || c.Cluster.RaftPort != 7947 || c.Cluster.NATSPort != 6222 {
		t.Fatalf("cluster %+v", c.Cluster)
	}
	cases := []struct{ name, yaml, key string }{
		{"two nodes", "cluster: {peers: [a, b]}", "cluster.peers"},
		{"one node", "cluster: {peers: [a]}", "cluster.peers"},
		{"port in peer", "node_name: a\ncluster: {peers: ['a:7947', b, c]}", "cluster.peers[0]"},
		{"not a peer", "node_name: x\ncluster: {peers: [a, b, c]}", "cluster.advertise"},
		{"replicas", "node_name: a\nqueue: {replicas: 5}\ncluster: {peers: [a, b, c]}", "queue.replicas"},
		{"same ports", "cluster: {raft_port: 7000, nats_port: 7000}", "cluster.nats_port"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Load(writeConfig(t, strings.ReplaceAll(tc.yaml, `\n`, "\n")), nil, nil)
			var es Errors
			if !errors.As(err, &es) {
				t.Fatalf("err %v", err)
			}
			for _, e := range es {
				if e.Key == tc.key {
					return
				}
			}
			t.Fatalf("no error for %s in:\n%v", tc.key, err)
		})
	}
}

// The cluster's credentials: a secret (inline or in a file), TLS files, or
// an explicit insecure; a cluster without any is refused, on loopback too.
func TestClusterCredentials(t *testing.T) {
	dir := t.TempDir()
	file := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	secret := strings.Repeat("k", 32)
	rotating := file("rotating", secret+"\n"+strings.Repeat("o", 40)+"\n\n")
	empty := file("empty", "\n")
	shortLine := file("short", secret+"\nold\n")
	pem := file("x.pem", "not used before start")
	const three = "node_name: a\nqueue: {replicas: 3}\ncluster:\n  peers: [a, 127.0.0.2, 127.0.0.3]\n"
	cases := []struct {
		name, yaml string
		key        string // "" for a valid configuration
		says       string // part of the problem
	}{
		{"secret", three + "  secret: " + secret, "", ""},
		{"secret file with an earlier secret", three + "  secret_file: " + rotating, "", ""},
		{"tls", three + "  tls: {ca_file: " + pem + ", cert_file: " + pem + ", key_file: " + pem + "}", "", ""},
		{"insecure", three + "  insecure: true", "", ""},
		{"single node needs nothing", "cluster: {}", "", ""},
		{"nothing", three, "cluster.secret", "cluster.insecure"},
		{"nothing names tls", three, "cluster.secret", "cluster.tls"},
		{"nothing on loopback", "node_name: 127.0.0.1\nqueue: {replicas: 3}\ncluster: {peers: [127.0.0.1, 127.0.0.2, 127.0.0.3]}", "cluster.secret", "any local process"},
		{"short secret", three + "  secret: " + secret[:31], "cluster.secret", "at least 32 bytes"},
		{"short secret alone", "cluster: {secret: tooshort}", "cluster.secret", "at least 32 bytes"},
		{"both forms", three + "  secret: " + secret + "\n  secret_file: " + rotating, "cluster.secret_file", "not both"},
		{"empty file", three + "  secret_file: " + empty, "cluster.secret_file", "empty"},
		{"missing file", three + "  secret_file: " + filepath.Join(dir, "nope"), "cluster.secret_file", "no such file"},
		{"short earlier secret", three + "  secret_file: " + shortLine, "cluster.secret_file", "line 2"},
		{"secret and tls", three + "  secret: " + secret + "\n  tls: {ca_file: " + pem + ", cert_file: " + pem + ", key_file: " + pem + "}", "cluster.tls", "set one"},
		{"insecure with a secret", three + "  secret: " + secret + "\n  insecure: true", "cluster.insecure", "remove one"},
		{"open client port", three + "  secret: " + secret + "\nnats: {listen: '0.0.0.0:4222'}", "nats.listen", "no authentication"},
		{"client port on loopback", three + "  secret: " + secret + "\nnats: {listen: '127.0.0.1:4222'}", "", ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c, err := Load(writeConfig(t, strings.ReplaceAll(tc.yaml, `\n`, "\n")), nil, nil)
			if tc.key == "" {
				if err != nil {
					t.Fatal(err)
				}
				if c.Cluster.Secret != "" && !c.Cluster.HasSecret() {
					t.Fatal("HasSecret false with a secret")
				}
				return
			}
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("err %v, want ErrInvalid", err)
			}
			var es Errors
			if !errors.As(err, &es) {
				t.Fatalf("err %v", err)
			}
			for _, e := range es {
				if e.Key == tc.key && strings.Contains(e.Problem, tc.says) {
					return
				}
			}
			t.Fatalf("no error for %s saying %q in:\n%v", tc.key, tc.says, err)
		})
	}
}

// MXQ_CLUSTER_SECRET and MXQ_CLUSTER_INSECURE follow the environment
// mapping of every other key (the Docker test's containers use it).
func TestClusterSecretFromEnv(t *testing.T) {
	t.Setenv("MXQ_NODE_NAME", "mxq-0")
	t.Setenv("MXQ_CLUSTER_PEERS", "mxq-0 mxq-1 mxq-2")
	t.Setenv("MXQ_QUEUE_REPLICAS", "3")
	if _, err := Load("", nil, nil); err == nil || !strings.Contains(err.Error(), "cluster.secret") {
		t.Fatalf("without a secret: %v", err)
	}
	t.Setenv("MXQ_CLUSTER_SECRET", strings.Repeat("e", 40))
	c, err := Load("", nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if c.Cluster.Secret != strings.Repeat("e", 40) {
		t.Fatalf("secret %q", c.Cluster.Secret)
	}
	t.Setenv("MXQ_CLUSTER_SECRET", "")
	t.Setenv("MXQ_CLUSTER_INSECURE", "true")
	if c, err := Load("", nil, nil); err != nil || !c.Cluster.Insecure {
		t.Fatalf("insecure from the environment: %v", err)
	}
}

func TestBackendShorthandParameters(t *testing.T) {
	t.Setenv("MXQ_BACKEND", "lmtp://store.internal:24?rate=500&concurrency=16&start_rate=10")
	c, err := Load("", nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	b := c.Backends["store"]
	if b.Address != "store.internal:24" || b.Rate != 500 || b.Concurrency != 16 || b.StartRate != 10 || b.StartConcurrency != 1 {
		t.Fatalf("backend %+v", b)
	}
	t.Setenv("MXQ_BACKEND", "lmtp://store:24?speed=9")
	if _, err := Load("", nil, nil); err == nil || !strings.Contains(err.Error(), "speed") {
		t.Fatalf("unknown parameter: %v", err)
	}
}

// The admin API's two tokens, from the file, a token file or the
// environment: each at least 16 characters, given once, and different from
// each other.
func TestAdminTokens(t *testing.T) {
	const (
		adminTok = "admin-token-0123456789"
		readTok  = "read-token-0123456789"
	)
	dir := t.TempDir()
	file := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	readFile := file("read", readTok+"\n")
	shortFile := file("short", "short\n")
	cases := []struct {
		name      string
		yaml      string
		env       map[string]string
		wantAdmin string
		wantRead  string
		badKey    string // "" : loads
	}{
		{name: "none", yaml: "admin: {}"},
		{name: "both tokens", yaml: "admin: {token: " + adminTok + ", read_token: " + readTok + "}", wantAdmin: adminTok, wantRead: readTok},
		{name: "read token alone", yaml: "admin: {read_token: " + readTok + "}", wantRead: readTok},
		{name: "read token from a file, trimmed", yaml: "admin: {read_token_file: " + readFile + "}", wantRead: readTok},
		{name: "read token from the environment", yaml: "admin: {}", env: map[string]string{"MXQ_ADMIN_READ_TOKEN": readTok}, wantRead: readTok},
		{name: "read token file from the environment", yaml: "admin: {}", env: map[string]string{"MXQ_ADMIN_READ_TOKEN_FILE": readFile}, wantRead: readTok},
		{name: "short read token", yaml: "admin: {read_token: short}", badKey: "admin.read_token"},
		{name: "short read token in its file", yaml: "admin: {read_token_file: " + shortFile + "}", badKey: "admin.read_token"},
		{name: "read token and its file", yaml: "admin: {read_token: " + readTok + ", read_token_file: " + readFile + "}", badKey: "admin.read_token_file"},
		{name: "missing read token file", yaml: "admin: {read_token_file: " + filepath.Join(dir, "nosuch") + "}", badKey: "admin.read_token_file"},
		{name: "read token same as admin token", yaml: "admin: {token: " + adminTok + ", read_token: " + adminTok + "}", badKey: "admin.read_token"},
		{name: "short admin token", yaml: "admin: {token: short}", badKey: "admin.token"},
		{name: "admin token and its file", yaml: "admin: {token: " + adminTok + ", token_file: " + readFile + "}", badKey: "admin.token_file"},
		{name: "admin token file equal to the read token", yaml: "admin: {token_file: " + readFile + ", read_token: " + readTok + "}", badKey: "admin.read_token"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			for k, v := range tc.env {
				t.Setenv(k, v)
			}
			c, err := Load(writeConfig(t, tc.yaml), nil, nil)
			if tc.badKey == "" {
				if err != nil {
					t.Fatal(err)
				}
				if c.Admin.Token != tc.wantAdmin || c.Admin.ReadToken != tc.wantRead {
					t.Fatalf("token %q, read token %q; want %q, %q", c.Admin.Token, c.Admin.ReadToken, tc.wantAdmin, tc.wantRead)
				}
				return
			}
			var es Errors
			if !errors.As(err, &es) {
				t.Fatalf("err %v, want a problem with %s", err, tc.badKey)
			}
			for _, e := range es {
				if e.Key == tc.badKey {
					if strings.Contains(e.Problem, adminTok) || strings.Contains(e.Problem, readTok) {
						t.Fatalf("the problem shows the token: %s", e.Problem)
					}
					return
				}
			}
			t.Fatalf("no problem with %s in:\n%v", tc.badKey, err)
		})
	}
}

func TestEmptyTokenFileIsAnError(t *testing.T) {
	f := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(f, []byte("\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, key := range []string{"token_file", "read_token_file"} {
		_, err := Load(writeConfig(t, "admin:\n  "+key+": "+f+"\n"), nil, nil)
		if err == nil || !strings.Contains(err.Error(), "admin."+key) || !strings.Contains(err.Error(), "empty") {
			t.Errorf("admin.%s naming an empty file: %v, want an error naming the key", key, err)
		}
	}
}
