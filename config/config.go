// Package config is mxq's configuration: one Config struct, loaded by viper
// from built-in defaults, an optional YAML file, MXQ_* environment variables
// and command-line flags, in increasing order of precedence.
//
// Load never stops at the first problem: unknown keys, values of the wrong
// type and values out of range are all collected and reported together, each
// with the key's dotted name, so an operator fixes a config in one round.
package config

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"net/url"
	"os"
	"reflect"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/go-viper/mapstructure/v2"
	"github.com/spf13/pflag"
	"github.com/spf13/viper"

	"github.com/mxq-dev/mxq/internal/clustercred"
)

// Config is the whole configuration of one mxq node.
type Config struct {
	// NodeName names this node in the cluster, in logs and in Received
	// headers. Default: the host name.
	NodeName string `mapstructure:"node_name"`
	// DataDir holds JetStream's store and the control plane's state.
	DataDir string `mapstructure:"data_dir"`
	// MemoryLimit is a soft limit on the Go heap (runtime/debug's
	// SetMemoryLimit): near it the garbage collector works harder, it
	// never fails an allocation. It keeps the memory of a node under a
	// steady heavy load (JetStream's caches of the blocks it writes, freed
	// memory not yet returned) near what is live. 0: no limit. The
	// GOMEMLIMIT environment variable, when set, wins.
	MemoryLimit ByteSize `mapstructure:"memory_limit"`

	Log     Log     `mapstructure:"log"`
	SMTP    SMTP    `mapstructure:"smtp"`
	Queue   Queue   `mapstructure:"queue"`
	NATS    NATS    `mapstructure:"nats"`
	Drain   Drain   `mapstructure:"drain"`
	Admin   Admin   `mapstructure:"admin"`
	Cluster Cluster `mapstructure:"cluster"`
	// Continuity lets users read the mail mxq holds for them.
	Continuity Continuity `mapstructure:"continuity"`

	// Backend is a shorthand for a single mailbox store, as a URL:
	// lmtp://host:port or smtp://host:port. It is used when Backends is
	// empty.
	Backend string `mapstructure:"backend"`
	// Backends are the mailbox stores, by name. Each serves the accepted
	// domains it lists ("*" for every domain no other backend lists).
	Backends map[string]Backend `mapstructure:"backends"`

	// routes maps each listed domain to its backend, and "*" to the
	// wildcard's: RouteFor is on the accept path.
	routes map[string]string
}

// Log configures log/slog output on stderr.
type Log struct {
	Level  string `mapstructure:"level"`  // debug, info, warn, error
	Format string `mapstructure:"format"` // text or json
}

// SMTP configures the edge relay.
type SMTP struct {
	Listen string `mapstructure:"listen"`
	// Hostname is announced in the greeting and in Received headers.
	Hostname string `mapstructure:"hostname"`
	// Domains are the recipient domains mxq accepts mail for. Everything
	// else is refused: mxq is never an open relay.
	Domains        []string      `mapstructure:"domains"`
	MaxMessageSize ByteSize      `mapstructure:"max_message_size"`
	MaxRecipients  int           `mapstructure:"max_recipients"`
	MaxLineLength  int           `mapstructure:"max_line_length"`
	ReadTimeout    time.Duration `mapstructure:"read_timeout"`  // waiting for a command
	DataTimeout    time.Duration `mapstructure:"data_timeout"`  // between two reads of DATA
	WriteTimeout   time.Duration `mapstructure:"write_timeout"` // writing a reply
	// ShutdownGrace bounds how long SIGTERM waits for sessions in flight.
	ShutdownGrace time.Duration `mapstructure:"shutdown_grace"`

	// Connection limits (0 disables one). A client is an IPv4 address or
	// an IPv6 /64; behind a load balancer, the one its PROXY header names.
	MaxConnections      int `mapstructure:"max_connections"`
	MaxConnectionsPerIP int `mapstructure:"max_connections_per_ip"`
	// ConnectionRatePerIP is new connections per client per minute.
	ConnectionRatePerIP int `mapstructure:"connection_rate_per_ip"`
	// LimitExemptNetworks are clients (CIDRs or IPs) the per-client limits
	// do not apply to. Default: loopback and private networks, where a
	// "client" is often many (Kubernetes or Docker SNAT, a balancer
	// without PROXY protocol) and attackers of a public MX never are.
	LimitExemptNetworks []string `mapstructure:"limit_exempt_networks"`
	// StressReadTimeout replaces read_timeout while three quarters of
	// max_connections are open (0: never).
	StressReadTimeout time.Duration `mapstructure:"stress_read_timeout"`
	// MaxCommands is commands a connection may send without a message.
	MaxCommands int `mapstructure:"max_commands"`
	// MaxErrors is refused commands (bad or unknown addresses, relaying)
	// before the connection is closed, between transactions.
	MaxErrors int `mapstructure:"max_errors"`
	// MinDataRate is the average rate, per second, a message must arrive
	// at once data_timeout has passed (0: none).
	MinDataRate ByteSize `mapstructure:"min_data_rate"`
	// MinFreeDisk is the free space data_dir's file system keeps: below
	// it mail is refused with 452 4.3.1. At most a tenth of the file
	// system is kept, whatever this says.
	MinFreeDisk ByteSize `mapstructure:"min_free_disk"`
	// MemoryBudget bounds the memory all sessions together hold in
	// message buffers (each counted twice: the buffer and the copy made
	// to store it). A message it has no room for waits MemoryWait, then
	// is refused with 451 4.3.1; one under way that cannot grow its
	// buffer stores it early as a chunk.
	MemoryBudget ByteSize      `mapstructure:"memory_budget"`
	MemoryWait   time.Duration `mapstructure:"memory_wait"`

	ProxyProtocol ProxyProtocol  `mapstructure:"proxy_protocol"`
	TLS           SMTPTLS        `mapstructure:"tls"`
	Recipients    RecipientCheck `mapstructure:"recipients"`
}

// ProxyProtocol configures PROXY protocol (v1 and v2) on the SMTP port.
type ProxyProtocol struct {
	// TrustedNetworks are the load balancers (CIDRs or IPs) whose
	// connections must start with a PROXY header; empty: nobody's.
	TrustedNetworks []string      `mapstructure:"trusted_networks"`
	HeaderTimeout   time.Duration `mapstructure:"header_timeout"`
}

// ServerTLS is a certificate and key in PEM files, reloaded when the files
// change (cert-manager renewing a Secret). Both empty: no TLS.
type ServerTLS struct {
	CertFile string `mapstructure:"cert_file"`
	KeyFile  string `mapstructure:"key_file"`
}

// SMTPTLS configures STARTTLS.
type SMTPTLS struct {
	CertFile string `mapstructure:"cert_file"`
	KeyFile  string `mapstructure:"key_file"`
	// RequiredFor lists client networks (CIDRs or IPs) that must use
	// STARTTLS before MAIL; others may send in clear, as MX traffic must.
	RequiredFor []string `mapstructure:"required_for"`
}

// RecipientCheck configures refusing unknown mailboxes at RCPT time.
type RecipientCheck struct {
	// File lists valid recipients, one per line, or @domain for a whole
	// domain; authoritative for the domains it mentions. Reloaded when
	// it changes. Empty: no list.
	File string `mapstructure:"file"`
	// Verify asks the backend (RCPT TO on an LMTP/SMTP conversation) about
	// recipients the list does not decide. A backend that is down or
	// answers 4xx costs nothing: the recipient is accepted.
	Verify        bool          `mapstructure:"verify"`
	VerifyTimeout time.Duration `mapstructure:"verify_timeout"`
	CacheTTL      time.Duration `mapstructure:"cache_ttl"`    // of "exists"
	NegativeTTL   time.Duration `mapstructure:"negative_ttl"` // of "no such user"
}

// Networks parses a list of CIDRs or IPs.
func Networks(list []string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, s := range list {
		if p, err := netip.ParsePrefix(s); err == nil {
			out = append(out, p.Masked())
			continue
		}
		a, err := netip.ParseAddr(s)
		if err != nil {
			return nil, fmt.Errorf("want a CIDR or an IP, got %q", s)
		}
		out = append(out, netip.PrefixFrom(a.Unmap(), a.Unmap().BitLen()))
	}
	return out, nil
}

// Queue configures the JetStream stream that holds the mail.
type Queue struct {
	Stream   string `mapstructure:"stream"`
	Replicas int    `mapstructure:"replicas"`
	// MaxBytes caps the stream; when it is full the relay answers 452 4.3.1.
	// 0 means limited only by the disk.
	MaxBytes ByteSize `mapstructure:"max_bytes"`
	// Durability is how a message becomes durable before the 250:
	//   group:  fsync per atomic batch gathering concurrent sessions (default)
	//   single: one publish and one fsync per message
	//   unsafe: no fsync before the 250 (NOT durable on power loss; tests and
	//           benchmarks only)
	Durability  string      `mapstructure:"durability"`
	GroupCommit GroupCommit `mapstructure:"group_commit"`
	// BatchStaging is where the embedded server stages atomic batches:
	// "auto" (a tmpfs under /dev/shm when there is one), "disk" (inside the
	// data directory, nats-server's default) or a directory path. Staging
	// on tmpfs makes a group commit about four times faster and changes
	// nothing for acknowledged mail (see README).
	BatchStaging string        `mapstructure:"batch_staging"`
	ChunkSize    ByteSize      `mapstructure:"chunk_size"`
	Timeout      time.Duration `mapstructure:"timeout"` // one store operation
}

// GroupCommit bounds the batches of the group committer.
type GroupCommit struct {
	MaxMessages int      `mapstructure:"max_messages"`
	MaxBytes    ByteSize `mapstructure:"max_bytes"`
	// Committers is the number of batches in flight at once.
	Committers int `mapstructure:"committers"`
	// MaxLinger is how long a batch may wait for more messages, only
	// while the committer is busy (a lone session never waits).
	MaxLinger time.Duration `mapstructure:"max_linger"`
}

// NATS configures the embedded nats-server, or the external NATS to use.
type NATS struct {
	// URL of an existing NATS cluster; empty runs the embedded server.
	URL string `mapstructure:"url"`
	// Credentials is a NATS .creds file (JWT and NKey) for URL.
	Credentials string `mapstructure:"credentials"`
	// TLS for the connection to URL: the CA that signed the servers, and
	// a client certificate if the servers ask for one.
	TLS TLSFiles `mapstructure:"tls"`
	// Listen is the embedded server's client port; empty opens none (mxq
	// talks to it in-process).
	Listen     string   `mapstructure:"listen"`
	MaxPayload ByteSize `mapstructure:"max_payload"`
}

// TLSFiles names PEM files.
type TLSFiles struct {
	CAFile   string `mapstructure:"ca_file"`
	CertFile string `mapstructure:"cert_file"`
	KeyFile  string `mapstructure:"key_file"`
}

// Backend is one mailbox store.
type Backend struct {
	Protocol string   `mapstructure:"protocol"` // lmtp or smtp
	Address  string   `mapstructure:"address"`  // host:port
	Domains  []string `mapstructure:"domains"`
	// Rate and Concurrency are ceilings the drain never exceeds.
	Rate        float64 `mapstructure:"rate"`
	Concurrency int     `mapstructure:"concurrency"`
	// StartRate and StartConcurrency are where the drain starts after an
	// outage (and at start-up), growing while the backend keeps up.
	StartRate        float64       `mapstructure:"start_rate"`
	StartConcurrency int           `mapstructure:"start_concurrency"`
	ConnectTimeout   time.Duration `mapstructure:"connect_timeout"`
	CommandTimeout   time.Duration `mapstructure:"command_timeout"`
}

// Drain configures delivery from the queue to the backends.
type Drain struct {
	// Order is oldest (first in, first out) or newest (today's mail first).
	Order       string        `mapstructure:"order"`
	RetryMin    time.Duration `mapstructure:"retry_min"`
	RetryMax    time.Duration `mapstructure:"retry_max"`
	MaxLifetime time.Duration `mapstructure:"max_lifetime"`
	// ProbeInterval is how often a backend with an open circuit is probed.
	ProbeInterval time.Duration `mapstructure:"probe_interval"`
	// DSNSmarthost is where delivery status notifications for permanent
	// failures go, as smtp://host:port; empty: failures are dead-lettered
	// and the sender is not told.
	DSNSmarthost string `mapstructure:"dsn_smarthost"`
}

// Admin configures the admin HTTP API and metrics.
type Admin struct {
	Listen string `mapstructure:"listen"` // empty disables
	// Token authorizes the CLI for everything; TokenFile reads it from a
	// file (a Kubernetes Secret). Without a token nothing can be changed.
	Token     string `mapstructure:"token"`
	TokenFile string `mapstructure:"token_file"`
	// ReadToken authorizes reading only: listings, messages, dead
	// letters, the continuity view, profiles (a dashboard, a support
	// desk); ReadTokenFile reads it from a file. Without either token only
	// the probes, the metrics and a status without free text answer.
	ReadToken     string `mapstructure:"read_token"`
	ReadTokenFile string `mapstructure:"read_token_file"`
	// TLS serves the API over HTTPS; empty: plain HTTP.
	TLS ServerTLS `mapstructure:"tls"`
}

// Cluster configures a multi-node deployment: the embedded nats-servers
// route to each other and replicate the stream, and the control plane runs
// raft among the nodes. With no peers, the node runs alone.
type Cluster struct {
	// Peers are the host names (or IPs) of all nodes, this one included,
	// the same list on every node: in Kubernetes the StatefulSet's stable
	// names (mxq-0.mxq-peers.mail.svc.cluster.local, ...).
	Peers []string `mapstructure:"peers"`
	// Advertise is this node's entry in Peers. Default: the entry whose
	// first DNS label is node_name (mxq-0 for mxq-0.mxq-peers...).
	Advertise string `mapstructure:"advertise"`
	// Bind is the address the cluster ports listen on.
	Bind     string `mapstructure:"bind"`
	RaftPort int    `mapstructure:"raft_port"`
	NATSPort int    `mapstructure:"nats_port"`
	// Name is the NATS cluster's name, the same on every node.
	Name string `mapstructure:"name"`
	// Secret secures the NATS routes and the raft transport with mutual
	// TLS derived from it (internal/clustercred): the same 32 bytes or
	// more on every node; peers without it cannot connect. SecretFile
	// reads it from a file instead: line 1 is the secret in use, further
	// lines earlier secrets still accepted (rotation), re-read on change.
	Secret     string `mapstructure:"secret"`
	SecretFile string `mapstructure:"secret_file"`
	// TLS, when set, secures the NATS routes and the raft transport with
	// mutual TLS: every node presents cert_file (valid for its entry in
	// peers) and accepts only peers whose certificate ca_file signed.
	// Re-read on change. Set this or a secret, not both.
	TLS TLSFiles `mapstructure:"tls"`
	// Insecure runs a cluster with neither: its ports accept anyone who
	// reaches them (loopback included: any local process). For tests on
	// a private network only.
	Insecure bool `mapstructure:"insecure"`
}

// HasSecret reports whether the cluster's credentials come from a secret.
func (c Cluster) HasSecret() bool { return c.Secret != "" || c.SecretFile != "" }

// HasTLS reports whether the cluster's credentials come from PEM files.
func (c Cluster) HasTLS() bool { return c.TLS != (TLSFiles{}) }

// Clustered reports whether the node has peers.
func (c *Config) Clustered() bool { return len(c.Cluster.Peers) > 1 }

// Durability modes.
const (
	DurabilityGroup  = "group"
	DurabilitySingle = "single"
	DurabilityUnsafe = "unsafe"
)

// Defaults are the values used when nothing else sets a key. With them
// alone, `mxq serve` runs a single node on loopback.
func Defaults() map[string]any {
	host, _ := os.Hostname()
	if host == "" {
		host = "mxq"
	}
	return map[string]any{
		"node_name":                       host,
		"data_dir":                        "./mxq-data",
		"memory_limit":                    "320MiB",
		"log.level":                       "info",
		"log.format":                      "text",
		"smtp.listen":                     "127.0.0.1:2525",
		"smtp.hostname":                   host,
		"smtp.domains":                    []string{"example.test"},
		"smtp.max_message_size":           "50MiB",
		"smtp.max_recipients":             100,
		"smtp.max_line_length":            2000,
		"smtp.read_timeout":               "5m",
		"smtp.data_timeout":               "3m",
		"smtp.write_timeout":              "1m",
		"smtp.shutdown_grace":             "30s",
		"queue.stream":                    "MXQ",
		"queue.replicas":                  1,
		"queue.max_bytes":                 "0",
		"queue.durability":                DurabilityGroup,
		"queue.group_commit.max_messages": 256,
		"queue.group_commit.max_bytes":    "8MiB",
		"queue.group_commit.committers":   1,
		"queue.group_commit.max_linger":   "500us",
		"queue.chunk_size":                "4MiB",
		"queue.batch_staging":             "auto",
		"queue.timeout":                   "10s",
		"nats.url":                        "",
		"nats.credentials":                "",
		"nats.tls.ca_file":                "",
		"nats.tls.cert_file":              "",
		"nats.tls.key_file":               "",
		"nats.listen":                     "",
		"nats.max_payload":                "8MiB",
		"backend":                         "lmtp://127.0.0.1:24",
		"drain.order":                     "oldest",
		"drain.retry_min":                 "5m",
		"drain.retry_max":                 "1h",
		"drain.max_lifetime":              "168h",
		"drain.probe_interval":            "10s",
		"drain.dsn_smarthost":             "",
		"admin.listen":                    "127.0.0.1:8025",
		"admin.token":                     "",
		"admin.token_file":                "",
		"admin.read_token":                "",
		"admin.read_token_file":           "",
		"cluster.peers":                   []string{},
		"cluster.advertise":               "",
		"cluster.bind":                    "0.0.0.0",
		"cluster.raft_port":               7947,
		"cluster.nats_port":               6222,
		"cluster.name":                    "mxq",
		"cluster.tls.ca_file":             "",
		"cluster.tls.cert_file":           "",
		"cluster.tls.key_file":            "",
		"cluster.secret":                  "",
		"cluster.secret_file":             "",
		"cluster.insecure":                false,

		// The SMTP edge: limits, PROXY protocol, TLS, recipient checks.
		"smtp.max_connections":                 500,
		"smtp.max_connections_per_ip":          20,
		"smtp.connection_rate_per_ip":          120,
		"smtp.limit_exempt_networks":           []string{"127.0.0.0/8", "::1", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"},
		"smtp.max_commands":                    200,
		"smtp.stress_read_timeout":             "10s",
		"smtp.max_errors":                      20,
		"smtp.min_data_rate":                   "1KiB",
		"smtp.min_free_disk":                   "1GiB",
		"smtp.memory_budget":                   "128MiB", // 500 first buffers (128 KiB) fit; with mxq's ~140 MiB, under memory_limit
		"smtp.memory_wait":                     "3s",
		"smtp.proxy_protocol.trusted_networks": []string{},
		"smtp.proxy_protocol.header_timeout":   "10s",
		"smtp.tls.cert_file":                   "",
		"smtp.tls.key_file":                    "",
		"smtp.tls.required_for":                []string{},
		"smtp.recipients.file":                 "",
		"smtp.recipients.verify":               false,
		"smtp.recipients.verify_timeout":       "5s",
		"smtp.recipients.cache_ttl":            "1h",
		"smtp.recipients.negative_ttl":         "5m",
		"admin.tls.cert_file":                  "",
		"admin.tls.key_file":                   "",

		// Continuity: users read their held mail (off by default).
		"continuity.enabled":                    false,
		"continuity.folder":                     "INBOX",
		"continuity.poll_interval":              "1s",
		"continuity.imap.listen":                "127.0.0.1:1993",
		"continuity.imap.starttls_listen":       "",
		"continuity.web.listen":                 "127.0.0.1:8443",
		"continuity.web.idle_timeout":           "30m",
		"continuity.web.max_session":            "12h",
		"continuity.tls.cert_file":              "",
		"continuity.tls.key_file":               "",
		"continuity.auth.passwd_file":           "",
		"continuity.auth.default_domain":        "",
		"continuity.auth.max_failures_per_user": 5,
		"continuity.auth.max_failures_per_ip":   20,
		"continuity.auth.failure_window":        "15m",
	}
}

// backendDefaults fill the unset fields of every backend.
var backendDefaults = Backend{
	Protocol:         "lmtp",
	Domains:          []string{"*"},
	Rate:             200,
	Concurrency:      8,
	StartRate:        5,
	StartConcurrency: 1,
	ConnectTimeout:   10 * time.Second,
	CommandTimeout:   60 * time.Second,
}

// Error is one problem with one key.
type Error struct {
	Key     string
	Problem string
}

func (e Error) Error() string { return e.Key + ": " + e.Problem }

// Errors is every problem found, sorted by key.
type Errors []Error

func (es Errors) Error() string {
	lines := make([]string, len(es))
	for i, e := range es {
		lines[i] = "  " + e.Error()
	}
	return fmt.Sprintf("%d configuration problem(s):\n%s", len(es), strings.Join(lines, "\n"))
}

// ErrInvalid is wrapped by every error Load returns: a configuration that
// cannot be read or does not validate.
var ErrInvalid = errors.New("invalid configuration")

// Load reads the configuration: defaults, then the file (if path is not
// empty), then MXQ_* environment variables, then the flags that were set.
// flags may be nil. The result is validated.
func Load(path string, flags *pflag.FlagSet, flagKeys map[string]string) (*Config, error) {
	v := viper.New()
	for k, val := range Defaults() {
		v.SetDefault(k, val)
	}
	v.SetEnvPrefix("MXQ")
	v.SetEnvKeyReplacer(strings.NewReplacer(".", "_"))
	v.AutomaticEnv()
	if path != "" {
		v.SetConfigFile(path)
		if err := v.ReadInConfig(); err != nil {
			return nil, fmt.Errorf("%w: reading %s: %v", ErrInvalid, path, err)
		}
	}
	if flags != nil {
		for key, name := range flagKeys {
			if f := flags.Lookup(name); f != nil {
				if err := v.BindPFlag(key, f); err != nil {
					return nil, fmt.Errorf("binding flag %s: %w", name, err)
				}
			}
		}
	}

	var cfg Config
	var errs Errors
	md := &mapstructure.Metadata{}
	err := v.Unmarshal(&cfg, func(dc *mapstructure.DecoderConfig) {
		dc.ErrorUnused = true
		dc.Metadata = md
		dc.DecodeHook = mapstructure.ComposeDecodeHookFunc(
			byteSizeHook,
			mapstructure.StringToTimeDurationHookFunc(),
			stringToSliceHook,
		)
	})
	if err != nil {
		errs = append(errs, decodeErrors(err)...)
	}
	errs = append(errs, cfg.validate()...)
	if len(errs) > 0 {
		sort.SliceStable(errs, func(i, j int) bool { return errs[i].Key < errs[j].Key })
		return nil, fmt.Errorf("%w: %w", ErrInvalid, errs)
	}
	return &cfg, nil
}

// decodeErrors turns mapstructure's tree of errors into one Error per key.
func decodeErrors(err error) Errors {
	var out Errors
	var walk func(error)
	walk = func(err error) {
		var de *mapstructure.DecodeError
		if d, ok := err.(*mapstructure.DecodeError); ok {
			de = d
		}
		switch {
		case de != nil:
			msg := de.Unwrap().Error()
			if keys, ok := strings.CutPrefix(msg, "has invalid keys: "); ok {
				for _, k := range strings.Split(keys, ", ") {
					if de.Name() != "" {
						k = de.Name() + "." + k
					}
					out = append(out, Error{Key: k, Problem: "unknown key"})
				}
				return
			}
			out = append(out, Error{Key: de.Name(), Problem: msg})
		default:
			if j, ok := err.(interface{ Unwrap() []error }); ok {
				for _, e := range j.Unwrap() {
					walk(e)
				}
				return
			}
			if u := errors.Unwrap(err); u != nil {
				walk(u)
				return
			}
			out = append(out, Error{Key: "(config)", Problem: err.Error()})
		}
	}
	walk(err)
	return out
}

// stringToSliceHook lets lists come from environment variables and flags as
// "a,b c".
func stringToSliceHook(from, to reflect.Type, data any) (any, error) {
	if from.Kind() != reflect.String || to.Kind() != reflect.Slice || to.Elem().Kind() != reflect.String {
		return data, nil
	}
	s := data.(string)
	if s == "" {
		return []string{}, nil
	}
	return strings.FieldsFunc(s, func(r rune) bool { return r == ',' || r == ' ' }), nil
}

// BackendURL parses the backend shorthand: lmtp://host:port or
// smtp://host:port, optionally with ceilings and start values as query
// parameters (lmtp://store:24?rate=500&concurrency=16&start_rate=10), so
// that a single environment variable can describe the whole backend.
func BackendURL(s string) (Backend, error) {
	u, err := url.Parse(s)
	if err != nil {
		return Backend{}, err
	}
	b := Backend{Protocol: u.Scheme, Address: u.Host}
	if u.Path != "" && u.Path != "/" {
		return Backend{}, fmt.Errorf("unexpected path %q", u.Path)
	}
	for k, vs := range u.Query() {
		v := vs[len(vs)-1]
		var err error
		switch k {
		case "rate":
			b.Rate, err = strconv.ParseFloat(v, 64)
		case "start_rate":
			b.StartRate, err = strconv.ParseFloat(v, 64)
		case "concurrency":
			b.Concurrency, err = strconv.Atoi(v)
		case "start_concurrency":
			b.StartConcurrency, err = strconv.Atoi(v)
		default:
			return Backend{}, fmt.Errorf("unknown parameter %q (rate, concurrency, start_rate, start_concurrency)", k)
		}
		if err != nil {
			return Backend{}, fmt.Errorf("parameter %s: %w", k, err)
		}
	}
	return b, nil
}

// validate checks values after decoding and fills the defaults that depend
// on other values. It returns every problem.
func (c *Config) validate() Errors {
	var errs Errors
	bad := func(key, format string, args ...any) {
		errs = append(errs, Error{Key: key, Problem: fmt.Sprintf(format, args...)})
	}
	addr := func(key, v string, optional bool) {
		if v == "" && optional {
			return
		}
		if _, port, err := net.SplitHostPort(v); err != nil {
			bad(key, "want host:port, got %q", v)
		} else if p, err := strconv.Atoi(port); err != nil || p < 0 || p > 65535 {
			bad(key, "bad port in %q", v)
		}
	}
	positive := func(key string, d time.Duration) {
		if d <= 0 {
			bad(key, "must be positive, got %v", d)
		}
	}

	if c.NodeName == "" {
		bad("node_name", "must not be empty")
	}
	if c.DataDir == "" {
		bad("data_dir", "must not be empty")
	}
	if c.MemoryLimit != 0 && c.MemoryLimit < 64<<20 {
		bad("memory_limit", "want 0 (none) or at least 64MiB, got %v", c.MemoryLimit)
	}
	switch c.Log.Level {
	case "debug", "info", "warn", "error":
	default:
		bad("log.level", "want debug, info, warn or error, got %q", c.Log.Level)
	}
	switch c.Log.Format {
	case "text", "json":
	default:
		bad("log.format", "want text or json, got %q", c.Log.Format)
	}

	addr("smtp.listen", c.SMTP.Listen, false)
	if len(c.SMTP.Domains) == 0 {
		bad("smtp.domains", "at least one accepted domain is required")
	}
	for i, d := range c.SMTP.Domains {
		nd, err := NormalizeDomain(d)
		if err != nil {
			bad(fmt.Sprintf("smtp.domains[%d]", i), "%v", err)
			continue
		}
		c.SMTP.Domains[i] = nd
	}
	if c.SMTP.MaxMessageSize <= 0 {
		bad("smtp.max_message_size", "must be positive")
	} else if c.SMTP.MaxMessageSize > 1<<30 {
		bad("smtp.max_message_size", "at most 1GiB, got %v", c.SMTP.MaxMessageSize)
	}
	if c.SMTP.MaxRecipients < 1 || c.SMTP.MaxRecipients > 10000 {
		bad("smtp.max_recipients", "want 1..10000, got %d", c.SMTP.MaxRecipients)
	}
	if c.SMTP.MaxLineLength < 1000 {
		bad("smtp.max_line_length", "at least 1000 (RFC 5321), got %d", c.SMTP.MaxLineLength)
	}
	positive("smtp.read_timeout", c.SMTP.ReadTimeout)
	positive("smtp.data_timeout", c.SMTP.DataTimeout)
	positive("smtp.write_timeout", c.SMTP.WriteTimeout)
	if c.SMTP.ShutdownGrace < 0 {
		bad("smtp.shutdown_grace", "must not be negative")
	}
	errs = append(errs, c.validateSMTPEdge()...)

	if c.Queue.Stream == "" || strings.ContainsAny(c.Queue.Stream, ". *>\t") {
		bad("queue.stream", "want a stream name without dots, spaces or wildcards, got %q", c.Queue.Stream)
	}
	if c.Queue.Replicas != 1 && c.Queue.Replicas != 3 && c.Queue.Replicas != 5 {
		bad("queue.replicas", "want 1, 3 or 5, got %d", c.Queue.Replicas)
	}
	if c.Queue.MaxBytes < 0 {
		bad("queue.max_bytes", "must not be negative")
	}
	switch c.Queue.Durability {
	case DurabilityGroup, DurabilitySingle, DurabilityUnsafe:
	default:
		bad("queue.durability", "want group, single or unsafe, got %q", c.Queue.Durability)
	}
	if n := c.Queue.GroupCommit.MaxMessages; n < 1 || n > 999 {
		// The server's atomic batch limit is 1000 records; keep one spare.
		bad("queue.group_commit.max_messages", "want 1..999, got %d", n)
	}
	if c.Queue.GroupCommit.MaxBytes < 64<<10 {
		bad("queue.group_commit.max_bytes", "at least 64KiB, got %v", c.Queue.GroupCommit.MaxBytes)
	}
	if l := c.Queue.GroupCommit.MaxLinger; l < 0 || l > 100*time.Millisecond {
		bad("queue.group_commit.max_linger", "want 0..100ms, got %v", l)
	}
	if n := c.Queue.GroupCommit.Committers; n < 1 || n > 16 {
		bad("queue.group_commit.committers", "want 1..16, got %d", n)
	}
	if c.Queue.ChunkSize < 64<<10 || c.Queue.ChunkSize > 16<<20 {
		bad("queue.chunk_size", "want 64KiB..16MiB, got %v", c.Queue.ChunkSize)
	}
	positive("queue.timeout", c.Queue.Timeout)
	if bs := c.Queue.BatchStaging; bs != "auto" && bs != "disk" && !strings.HasPrefix(bs, "/") {
		bad("queue.batch_staging", "want auto, disk or an absolute directory, got %q", bs)
	}

	if c.NATS.URL != "" {
		for _, one := range strings.Split(c.NATS.URL, ",") {
			if u, err := url.Parse(strings.TrimSpace(one)); err != nil || u.Host == "" {
				bad("nats.url", "want nats://host:port[,nats://...], got %q", c.NATS.URL)
				break
			}
		}
	}
	for key, f := range map[string]string{"nats.credentials": c.NATS.Credentials, "nats.tls.ca_file": c.NATS.TLS.CAFile,
		"nats.tls.cert_file": c.NATS.TLS.CertFile, "nats.tls.key_file": c.NATS.TLS.KeyFile} {
		if f == "" {
			continue
		}
		if c.NATS.URL == "" {
			bad(key, "only used with nats.url")
		} else if _, err := os.Stat(f); err != nil {
			bad(key, "%v", err)
		}
	}
	if (c.NATS.TLS.CertFile == "") != (c.NATS.TLS.KeyFile == "") {
		bad("nats.tls", "cert_file and key_file go together")
	}
	addr("nats.listen", c.NATS.Listen, true)
	if c.NATS.MaxPayload < 1<<20 || c.NATS.MaxPayload > 64<<20 {
		bad("nats.max_payload", "want 1MiB..64MiB, got %v", c.NATS.MaxPayload)
	} else if c.Queue.ChunkSize+64<<10 > c.NATS.MaxPayload {
		bad("queue.chunk_size", "must leave 64KiB of nats.max_payload (%v) for headers", c.NATS.MaxPayload)
	}

	if len(c.Backends) == 0 {
		if c.Backend == "" {
			bad("backends", "at least one backend is required")
		} else if b, err := BackendURL(c.Backend); err != nil {
			bad("backend", "want lmtp://host:port or smtp://host:port: %v", err)
		} else if _, _, err := net.SplitHostPort(b.Address); err != nil {
			bad("backend", "want lmtp://host:port or smtp://host:port, got %q", c.Backend)
		} else {
			c.Backends = map[string]Backend{"store": b}
		}
	}
	wildcard := ""
	owner := map[string]string{}
	for _, name := range sortedKeys(c.Backends) {
		b := c.Backends[name]
		key := "backends." + name
		if !validName(name) {
			bad(key, "backend names are lower-case letters, digits, - and _")
		}
		if name == "dsn" {
			bad(key, "the name dsn is reserved for the route to drain.dsn_smarthost")
		}
		fillBackend(&b)
		switch b.Protocol {
		case "lmtp", "smtp":
		default:
			bad(key+".protocol", "want lmtp or smtp, got %q", b.Protocol)
		}
		addr(key+".address", b.Address, false)
		if b.Rate <= 0 {
			bad(key+".rate", "must be positive, got %v", b.Rate)
		}
		if b.Concurrency < 1 || b.Concurrency > 1000 {
			bad(key+".concurrency", "want 1..1000, got %d", b.Concurrency)
		}
		if b.StartRate <= 0 || b.StartRate > b.Rate {
			bad(key+".start_rate", "want 0 < start_rate <= rate (%v), got %v", b.Rate, b.StartRate)
		}
		if b.StartConcurrency < 1 || b.StartConcurrency > b.Concurrency {
			bad(key+".start_concurrency", "want 1..concurrency (%d), got %d", b.Concurrency, b.StartConcurrency)
		}
		positive(key+".connect_timeout", b.ConnectTimeout)
		positive(key+".command_timeout", b.CommandTimeout)
		for i, d := range b.Domains {
			if d == "*" {
				if wildcard != "" {
					bad(key+".domains", "only one backend may serve \"*\"; %s does already", wildcard)
				}
				wildcard = name
				continue
			}
			nd, err := NormalizeDomain(d)
			if err != nil {
				bad(fmt.Sprintf("%s.domains[%d]", key, i), "%v", err)
				continue
			}
			b.Domains[i] = nd
			if o, ok := owner[nd]; ok {
				bad(key+".domains", "%s is served by %s already", nd, o)
			}
			owner[nd] = name
		}
		c.Backends[name] = b
	}
	if wildcard == "" {
		for _, d := range c.SMTP.Domains {
			if _, ok := owner[d]; !ok {
				bad("backends", "no backend serves accepted domain %s (list it, or \"*\")", d)
			}
		}
	}

	switch c.Drain.Order {
	case "oldest", "newest":
	default:
		bad("drain.order", "want oldest or newest, got %q", c.Drain.Order)
	}
	positive("drain.retry_min", c.Drain.RetryMin)
	positive("drain.retry_max", c.Drain.RetryMax)
	if c.Drain.RetryMax < c.Drain.RetryMin {
		bad("drain.retry_max", "must not be below drain.retry_min (%v)", c.Drain.RetryMin)
	}
	positive("drain.max_lifetime", c.Drain.MaxLifetime)
	positive("drain.probe_interval", c.Drain.ProbeInterval)
	if c.Drain.DSNSmarthost != "" {
		if b, err := BackendURL(c.Drain.DSNSmarthost); err != nil || b.Protocol != "smtp" {
			bad("drain.dsn_smarthost", "want smtp://host:port, got %q", c.Drain.DSNSmarthost)
		} else {
			addr("drain.dsn_smarthost", b.Address, false)
		}
	}

	addr("admin.listen", c.Admin.Listen, true)
	serverTLS("admin.tls", c.Admin.TLS.CertFile, c.Admin.TLS.KeyFile, bad)
	adminToken("admin.token", &c.Admin.Token, c.Admin.TokenFile, bad)
	adminToken("admin.read_token", &c.Admin.ReadToken, c.Admin.ReadTokenFile, bad)
	if c.Admin.ReadToken != "" && c.Admin.ReadToken == c.Admin.Token {
		bad("admin.read_token", "must differ from admin.token (the same token would allow changes)")
	}
	errs = append(errs, c.validateCluster()...)
	errs = append(errs, c.validateContinuity()...)
	c.buildRoutes()
	return errs
}

// adminToken checks one of the admin API's tokens, key (admin.token or
// admin.read_token): given in the file or in key_file, not both, and read
// from the file into *token; at least 16 characters, so that it cannot be
// guessed over the network.
func adminToken(key string, token *string, file string, bad func(key, format string, args ...any)) {
	if *token != "" && file != "" {
		bad(key+"_file", "set %s or %s_file, not both", key, key)
		return
	}
	if file != "" {
		b, err := os.ReadFile(file)
		if err != nil {
			bad(key+"_file", "%v", err)
			return
		}
		*token = strings.TrimSpace(string(b))
		if *token == "" {
			// An empty file is a mistake (a Secret not mounted yet), not
			// a wish for no token.
			bad(key+"_file", "%s is empty", file)
			return
		}
	}
	if *token != "" && len(*token) < 16 {
		bad(key, "at least 16 characters")
	}
}

// validateSMTPEdge checks the SMTP edge's limits, PROXY protocol, TLS and
// recipient checks.
func (c *Config) validateSMTPEdge() Errors {
	var errs Errors
	bad := func(key, format string, args ...any) {
		errs = append(errs, Error{Key: key, Problem: fmt.Sprintf(format, args...)})
	}
	sm := &c.SMTP
	for key, n := range map[string]int{"smtp.max_connections": sm.MaxConnections, "smtp.max_connections_per_ip": sm.MaxConnectionsPerIP,
		"smtp.connection_rate_per_ip": sm.ConnectionRatePerIP, "smtp.max_commands": sm.MaxCommands, "smtp.max_errors": sm.MaxErrors} {
		if n < 0 {
			bad(key, "must not be negative (0 disables the limit)")
		}
	}
	if sm.MaxConnections > 0 && sm.MaxConnectionsPerIP > sm.MaxConnections {
		bad("smtp.max_connections_per_ip", "more than smtp.max_connections (%d)", sm.MaxConnections)
	}
	// A message needs EHLO, MAIL, a RCPT per recipient and DATA.
	if sm.MaxCommands > 0 && sm.MaxCommands < sm.MaxRecipients+10 {
		bad("smtp.max_commands", "at least smtp.max_recipients+10 (%d), or a full message could not be sent", sm.MaxRecipients+10)
	}
	if sm.StressReadTimeout < 0 {
		bad("smtp.stress_read_timeout", "must not be negative (0: never)")
	}
	if sm.MinDataRate < 0 {
		bad("smtp.min_data_rate", "must not be negative")
	}
	if sm.MinFreeDisk < 0 {
		bad("smtp.min_free_disk", "must not be negative")
	}
	// A message's first buffer takes 128 KiB of the budget.
	if sm.MemoryBudget < 1<<20 {
		bad("smtp.memory_budget", "want at least 1MiB, got %v", sm.MemoryBudget)
	}
	if sm.MemoryWait < 0 {
		bad("smtp.memory_wait", "must not be negative (0: refuse at once)")
	}
	if _, err := Networks(sm.LimitExemptNetworks); err != nil {
		bad("smtp.limit_exempt_networks", "%v", err)
	}
	if _, err := Networks(sm.ProxyProtocol.TrustedNetworks); err != nil {
		bad("smtp.proxy_protocol.trusted_networks", "%v", err)
	}
	if sm.ProxyProtocol.HeaderTimeout <= 0 {
		bad("smtp.proxy_protocol.header_timeout", "must be positive, got %v", sm.ProxyProtocol.HeaderTimeout)
	}
	serverTLS("smtp.tls", sm.TLS.CertFile, sm.TLS.KeyFile, bad)
	if _, err := Networks(sm.TLS.RequiredFor); err != nil {
		bad("smtp.tls.required_for", "%v", err)
	} else if len(sm.TLS.RequiredFor) > 0 && sm.TLS.CertFile == "" {
		bad("smtp.tls.required_for", "needs smtp.tls.cert_file and key_file: STARTTLS cannot be required without a certificate")
	}
	rc := &sm.Recipients
	if rc.File != "" {
		if _, err := os.Stat(rc.File); err != nil {
			bad("smtp.recipients.file", "%v", err)
		}
	}
	for key, d := range map[string]time.Duration{"smtp.recipients.verify_timeout": rc.VerifyTimeout,
		"smtp.recipients.cache_ttl": rc.CacheTTL, "smtp.recipients.negative_ttl": rc.NegativeTTL} {
		if d <= 0 {
			bad(key, "must be positive, got %v", d)
		}
	}
	return errs
}

// serverTLS checks a certificate and key pair: both or neither, and
// loadable, so a bad pair is found at start-up and named by its key.
func serverTLS(key, certFile, keyFile string, bad func(key, format string, args ...any)) {
	switch {
	case certFile == "" && keyFile == "":
	case certFile == "" || keyFile == "":
		bad(key, "cert_file and key_file go together")
	default:
		if _, err := tls.LoadX509KeyPair(certFile, keyFile); err != nil {
			bad(key, "%v", err)
		}
	}
}

func fillBackend(b *Backend) {
	d := backendDefaults
	if b.Protocol == "" {
		b.Protocol = d.Protocol
	}
	if len(b.Domains) == 0 {
		b.Domains = append([]string(nil), d.Domains...)
	}
	if b.Rate == 0 {
		b.Rate = d.Rate
	}
	if b.Concurrency == 0 {
		b.Concurrency = d.Concurrency
	}
	if b.StartRate == 0 {
		b.StartRate = min(d.StartRate, b.Rate)
	}
	if b.StartConcurrency == 0 {
		b.StartConcurrency = min(d.StartConcurrency, b.Concurrency)
	}
	if b.ConnectTimeout == 0 {
		b.ConnectTimeout = d.ConnectTimeout
	}
	if b.CommandTimeout == 0 {
		b.CommandTimeout = d.CommandTimeout
	}
}

func validName(s string) bool {
	if s == "" || len(s) > 32 {
		return false
	}
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '-' || r == '_') {
			return false
		}
	}
	return true
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// BackendNames returns the backends' names in a stable order.
func (c *Config) BackendNames() []string { return sortedKeys(c.Backends) }

// RouteFor returns the backend serving domain (already normalized), or "".
func (c *Config) RouteFor(domain string) string {
	if c.routes == nil {
		c.buildRoutes()
	}
	if r, ok := c.routes[domain]; ok {
		return r
	}
	return c.routes["*"]
}

func (c *Config) buildRoutes() {
	c.routes = map[string]string{}
	for _, name := range c.BackendNames() {
		for _, d := range c.Backends[name].Domains {
			c.routes[d] = name
		}
	}
}

func (c *Config) validateCluster() Errors {
	var errs Errors
	bad := func(key, format string, args ...any) {
		errs = append(errs, Error{Key: key, Problem: fmt.Sprintf(format, args...)})
	}
	cl := &c.Cluster
	for _, p := range []struct {
		key  string
		port int
	}{{"cluster.raft_port", cl.RaftPort}, {"cluster.nats_port", cl.NATSPort}} {
		if p.port < 1 || p.port > 65535 {
			bad(p.key, "want 1..65535, got %d", p.port)
		}
	}
	if cl.RaftPort == cl.NATSPort {
		bad("cluster.nats_port", "must differ from cluster.raft_port")
	}
	if net.ParseIP(cl.Bind) == nil {
		bad("cluster.bind", "want an IP address to listen on, got %q", cl.Bind)
	}
	if t := cl.TLS; t != (TLSFiles{}) {
		if t.CAFile == "" || t.CertFile == "" || t.KeyFile == "" {
			bad("cluster.tls", "mutual TLS needs ca_file, cert_file and key_file")
		}
		for key, f := range map[string]string{"cluster.tls.ca_file": t.CAFile, "cluster.tls.cert_file": t.CertFile, "cluster.tls.key_file": t.KeyFile} {
			if _, err := os.Stat(f); f != "" && err != nil {
				bad(key, "%v", err)
			}
		}
	}
	c.validateClusterCredentials(bad)
	if len(cl.Peers) == 0 {
		return errs
	}
	if len(cl.Peers) == 1 {
		bad("cluster.peers", "a cluster has at least 3 nodes; leave peers empty for a single node")
		return errs
	}
	seen := map[string]bool{}
	for i, p := range cl.Peers {
		if p == "" || strings.ContainsAny(p, ":/ ") {
			bad(fmt.Sprintf("cluster.peers[%d]", i), "want a host name or IP without port, got %q", p)
		}
		if seen[p] {
			bad("cluster.peers", "%s is listed twice", p)
		}
		seen[p] = true
	}
	if len(cl.Peers)%2 == 0 {
		bad("cluster.peers", "want an odd number of nodes (3 or 5): with %d, losing half stops the cluster", len(cl.Peers))
	}
	if cl.Advertise == "" {
		for _, p := range cl.Peers {
			if p == c.NodeName || strings.HasPrefix(p, c.NodeName+".") {
				cl.Advertise = p
				break
			}
		}
		if cl.Advertise == "" {
			bad("cluster.advertise", "node_name %q matches no entry of cluster.peers; set cluster.advertise to this node's entry", c.NodeName)
		}
	} else if !seen[cl.Advertise] {
		bad("cluster.advertise", "%q is not one of cluster.peers", cl.Advertise)
	}
	if c.Queue.Replicas > len(cl.Peers) {
		bad("queue.replicas", "%d replicas need at least as many nodes, cluster.peers has %d", c.Queue.Replicas, len(cl.Peers))
	}
	if c.NATS.URL == "" && c.NATS.Listen != "" && !loopback(c.NATS.Listen) {
		// The embedded server's client port has no authentication: in a
		// cluster it would hand the replicated stream to anyone.
		bad("nats.listen", "in a cluster the embedded server's client port has no authentication: listen on loopback (127.0.0.1:4222) or leave it empty, got %q", c.NATS.Listen)
	}
	return errs
}

// validateClusterCredentials checks the cluster's credentials: one of a
// secret (inline or in a file), TLS files, or an explicit insecure, and
// for a cluster, at least one of them.
func (c *Config) validateClusterCredentials(bad func(key, format string, args ...any)) {
	cl := &c.Cluster
	if cl.Secret != "" && cl.SecretFile != "" {
		bad("cluster.secret_file", "set cluster.secret or cluster.secret_file, not both")
	}
	if cl.Secret != "" && len(cl.Secret) < clustercred.MinSecretLen {
		bad("cluster.secret", "at least %d bytes (a random string: openssl rand -base64 48), got %d", clustercred.MinSecretLen, len(cl.Secret))
	}
	if cl.SecretFile != "" {
		if b, err := os.ReadFile(cl.SecretFile); err != nil {
			bad("cluster.secret_file", "%v", err)
		} else if _, err := clustercred.ParseSecrets(b); err != nil {
			bad("cluster.secret_file", "%s: %v", cl.SecretFile, err)
		}
	}
	if cl.HasSecret() && cl.HasTLS() {
		bad("cluster.tls", "set one: cluster.tls (a private PKI) or cluster.secret/cluster.secret_file (TLS derived from the secret), not both")
	}
	if cl.Insecure && (cl.HasSecret() || cl.HasTLS()) {
		bad("cluster.insecure", "true, but credentials are set (cluster.secret, cluster.secret_file or cluster.tls): remove one")
	}
	if len(cl.Peers) > 1 && !cl.HasSecret() && !cl.HasTLS() && !cl.Insecure {
		bad("cluster.secret", "a cluster needs credentials, or its NATS route and raft ports accept anyone who reaches them (on loopback too: any local process): set cluster.secret or cluster.secret_file (at least %d bytes, the same on every node), or cluster.tls; or cluster.insecure: true to run open", clustercred.MinSecretLen)
	}
}

// loopback reports whether the listen address hostport binds to loopback
// only.
func loopback(hostport string) bool {
	host, _, err := net.SplitHostPort(hostport)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// Continuity configures the view of held mail: while the mailbox store is
// down, users read the mail mxq holds for them over IMAP (read-only) or on
// a web page. Off by default; the index it needs costs memory only when on.
type Continuity struct {
	Enabled bool `mapstructure:"enabled"`
	// Folder is the one IMAP folder the held mail appears in.
	Folder string `mapstructure:"folder"`
	// PollInterval is no longer used: the catalog of the queue follows
	// the stream by itself. Accepted so that older files still load.
	PollInterval time.Duration  `mapstructure:"poll_interval"`
	IMAP         ContinuityIMAP `mapstructure:"imap"`
	Web          ContinuityWeb  `mapstructure:"web"`
	TLS          ServerTLS      `mapstructure:"tls"`
	Auth         ContinuityAuth `mapstructure:"auth"`
}

// ContinuityIMAP configures the IMAP listeners; empty disables one.
type ContinuityIMAP struct {
	Listen         string `mapstructure:"listen"`          // implicit TLS (993-style)
	StartTLSListen string `mapstructure:"starttls_listen"` // STARTTLS required before LOGIN (143-style)
}

// ContinuityWeb configures the web page (HTTPS).
type ContinuityWeb struct {
	Listen      string        `mapstructure:"listen"` // empty disables
	IdleTimeout time.Duration `mapstructure:"idle_timeout"`
	MaxSession  time.Duration `mapstructure:"max_session"`
}

// ContinuityAuth configures how users log in while the store (and maybe
// its user database) is down.
type ContinuityAuth struct {
	// PasswdFile is a Dovecot passwd-file (user:{SCHEME}hash:...), with
	// {BLF-CRYPT}/{BCRYPT}, {ARGON2ID} or {ARGON2I} hashes.
	PasswdFile string `mapstructure:"passwd_file"`
	// DefaultDomain completes user names without a domain.
	DefaultDomain string `mapstructure:"default_domain"`
	// Failed logins allowed per user and per client IP (an IPv6 /64)
	// within FailureWindow; past them every login is refused until the
	// window has moved on.
	MaxFailuresPerUser int           `mapstructure:"max_failures_per_user"`
	MaxFailuresPerIP   int           `mapstructure:"max_failures_per_ip"`
	FailureWindow      time.Duration `mapstructure:"failure_window"`
}

// validateContinuity checks the continuity section; with continuity off
// only the shape of the values is checked, so a prepared section can wait
// in the file.
func (c *Config) validateContinuity() Errors {
	var errs Errors
	bad := func(key, format string, args ...any) {
		errs = append(errs, Error{Key: key, Problem: fmt.Sprintf(format, args...)})
	}
	ct := &c.Continuity
	for key, v := range map[string]string{"continuity.imap.listen": ct.IMAP.Listen,
		"continuity.imap.starttls_listen": ct.IMAP.StartTLSListen, "continuity.web.listen": ct.Web.Listen} {
		if v == "" {
			continue
		}
		if _, port, err := net.SplitHostPort(v); err != nil {
			bad(key, "want host:port, got %q", v)
		} else if p, err := strconv.Atoi(port); err != nil || p < 0 || p > 65535 {
			bad(key, "bad port in %q", v)
		}
	}
	if ct.Folder == "" || strings.ContainsAny(ct.Folder, "*%\r\n\"") {
		bad("continuity.folder", "want a folder name without wildcards or quotes, got %q", ct.Folder)
	}
	for key, d := range map[string]time.Duration{"continuity.poll_interval": ct.PollInterval,
		"continuity.web.idle_timeout": ct.Web.IdleTimeout, "continuity.web.max_session": ct.Web.MaxSession,
		"continuity.auth.failure_window": ct.Auth.FailureWindow} {
		if d <= 0 {
			bad(key, "must be positive, got %v", d)
		}
	}
	if ct.Auth.MaxFailuresPerUser < 1 {
		bad("continuity.auth.max_failures_per_user", "at least 1, got %d", ct.Auth.MaxFailuresPerUser)
	}
	if ct.Auth.MaxFailuresPerIP < 1 {
		bad("continuity.auth.max_failures_per_ip", "at least 1, got %d", ct.Auth.MaxFailuresPerIP)
	}
	if d := ct.Auth.DefaultDomain; d != "" {
		if nd, err := NormalizeDomain(d); err != nil {
			bad("continuity.auth.default_domain", "%v", err)
		} else {
			ct.Auth.DefaultDomain = nd
		}
	}
	serverTLS("continuity.tls", ct.TLS.CertFile, ct.TLS.KeyFile, bad)
	if !ct.Enabled {
		return errs
	}
	if ct.IMAP.Listen == "" && ct.IMAP.StartTLSListen == "" && ct.Web.Listen == "" {
		bad("continuity", "enabled with no listener: set continuity.imap.listen, continuity.imap.starttls_listen or continuity.web.listen")
	}
	if ct.TLS.CertFile == "" {
		bad("continuity.tls", "cert_file and key_file are required: users log in with passwords, only over TLS")
	}
	if ct.Auth.PasswdFile == "" {
		bad("continuity.auth.passwd_file", "required when continuity is enabled (the only authentication backend so far)")
	} else if _, err := os.Stat(ct.Auth.PasswdFile); err != nil {
		bad("continuity.auth.passwd_file", "%v", err)
	}
	return errs
}
