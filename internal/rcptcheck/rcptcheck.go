// Package rcptcheck tells whether a recipient is a real mailbox, so that
// mail for unknown users is refused at RCPT time (550 5.1.1) and the
// sending MTA tells its user, instead of mxq queueing it and bouncing it
// later (backscatter, to forged senders as often as not).
//
// Two sources, both optional, asked in order:
//
//   - a list file: one address per line, or "@domain" for every address
//     of a domain; it is authoritative for the domains it mentions (an
//     address of such a domain that is not listed is unknown) and says
//     nothing about other domains. It is reloaded when it changes.
//   - the backend itself: a RCPT TO on an LMTP/SMTP conversation that
//     stops before DATA, the way Postfix's address verification works.
//     Answers are cached (positive and negative separately, bounded in
//     number), concurrent questions for one address share one
//     conversation, and a backend that cannot be reached is not asked
//     again for a while.
//
// Anything short of a clear "no such user" means "accept": a backend that
// is down, slow, or answers 4xx must not cost mail. mxq exists to accept
// mail while the store is down; the drain delivers or bounces it later.
package rcptcheck

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/mxq-dev/mxq/internal/filewatch"
	"github.com/mxq-dev/mxq/internal/mailaddr"
)

// ErrUnknown is returned for a recipient known not to exist.
var ErrUnknown = errors.New("unknown recipient")

// Verdict is what a source knows about an address.
type Verdict int

const (
	// Unsure: the source cannot tell (domain not covered, backend down).
	Unsure Verdict = iota
	// Valid: the mailbox exists.
	Valid
	// Unknown: the mailbox does not exist.
	Unknown
)

func (v Verdict) String() string {
	return [...]string{"unsure", "valid", "unknown"}[v]
}

// Checker asks the list, then the verifier; either may be nil.
type Checker struct {
	List     *List
	Verifier *Verifier
}

// CheckRecipient returns an error wrapping ErrUnknown if a is known not to
// exist, nil otherwise.
func (c *Checker) CheckRecipient(ctx context.Context, a mailaddr.Address) error {
	if c.List != nil {
		switch c.List.Lookup(a) {
		case Valid:
			return nil
		case Unknown:
			return fmt.Errorf("%w: %s is not in the recipient list", ErrUnknown, a)
		}
	}
	if c.Verifier != nil && c.Verifier.Verify(ctx, a) == Unknown {
		return fmt.Errorf("%w: the mailbox store does not know %s", ErrUnknown, a)
	}
	return nil
}

// List is a recipient list file.
type List struct {
	path  string
	log   *slog.Logger
	mu    sync.Mutex
	files *filewatch.Files
	cur   atomic.Pointer[listData]
}

type listData struct {
	addrs    map[string]bool // Address.Key()
	domains  map[string]bool // every domain mentioned
	catchAll map[string]bool // "@domain"
}

// LoadList reads the list at path; it fails if it cannot, so a bad
// configuration is found at start-up. log may be nil.
func LoadList(path string, log *slog.Logger) (*List, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	l := &List{path: path, log: log, files: filewatch.New(path)}
	if _, err := l.Reload(); err != nil {
		return nil, err
	}
	return l, nil
}

// Reload reads the file again if it changed. A file that does not parse
// is refused as a whole (one bad line could otherwise turn a domain's
// valid users away) and the previous list stays.
func (l *List) Reload() (bool, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	changed, data, err := l.files.Changed()
	if err != nil || !changed {
		return false, err
	}
	d, err := parseList(data[0])
	if err != nil {
		return false, fmt.Errorf("recipient list %s: %w", l.path, err)
	}
	l.files.Accept(data)
	l.cur.Store(d)
	l.log.Info("recipient list loaded", "file", l.path, "addresses", len(d.addrs), "domains", len(d.domains))
	return true, nil
}

func parseList(b []byte) (*listData, error) {
	d := &listData{addrs: map[string]bool{}, domains: map[string]bool{}, catchAll: map[string]bool{}}
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(make([]byte, 4096), 1<<20)
	var errs []error
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if i := strings.IndexByte(line, '#'); i >= 0 && !strings.Contains(line[:i], `"`) {
			line = strings.TrimSpace(line[:i])
		}
		if line == "" {
			continue
		}
		if dom, ok := strings.CutPrefix(line, "@"); ok {
			nd, err := mailaddr.NormalizeDomain(dom)
			if err != nil {
				errs = append(errs, fmt.Errorf("line %d: %w", n, err))
				continue
			}
			d.domains[nd], d.catchAll[nd] = true, true
			continue
		}
		a, err := mailaddr.Parse(unquote(line))
		if err != nil {
			errs = append(errs, fmt.Errorf("line %d: %w", n, err))
			continue
		}
		d.addrs[a.Key()] = true
		d.domains[a.Domain] = true
	}
	if err := sc.Err(); err != nil {
		errs = append(errs, err)
	}
	return d, errors.Join(errs...)
}

// unquote turns `"a b"@example.test` into `a b@example.test`, the form
// mailaddr.Parse takes (go-smtp unquotes paths the same way).
func unquote(s string) string {
	at := strings.LastIndexByte(s, '@')
	if at < 2 || s[0] != '"' || s[at-1] != '"' {
		return s
	}
	local := s[1 : at-1]
	var b strings.Builder
	for i := 0; i < len(local); i++ {
		if local[i] == '\\' && i+1 < len(local) {
			i++
		}
		b.WriteByte(local[i])
	}
	return b.String() + s[at:]
}

// Lookup says what the list knows of a.
func (l *List) Lookup(a mailaddr.Address) Verdict {
	d := l.cur.Load()
	switch {
	case d.catchAll[a.Domain] || d.addrs[a.Key()]:
		return Valid
	case d.domains[a.Domain]:
		return Unknown
	default:
		return Unsure
	}
}

// Run polls the file every interval until ctx ends.
func (l *List) Run(ctx context.Context, interval time.Duration) {
	filewatch.Poll(ctx, interval, func() {
		if _, err := l.Reload(); err != nil {
			l.log.Warn("recipient list not reloaded, keeping the current one", "err", err)
		}
	})
}

// Backend is where a domain's mailboxes live.
type Backend struct {
	Protocol string // lmtp or smtp
	Address  string // host:port
}

// VerifierOptions configures a Verifier. Zero values take the defaults
// noted.
type VerifierOptions struct {
	// Backend returns the store serving a (normalized) domain.
	Backend func(domain string) (Backend, bool)
	// LocalName is sent in LHLO/EHLO.
	LocalName string
	// Timeout bounds one whole conversation (default 5s).
	Timeout time.Duration
	// TTL is how long a "valid" answer is kept (default 1h);
	// NegativeTTL how long an "unknown" one is (default 5m: a user just
	// created is refused at most that long).
	TTL, NegativeTTL time.Duration
	// DownFor is how long a backend that could not be reached is not
	// asked again (default 30s), so an outage adds no latency per RCPT.
	DownFor time.Duration
	// MaxEntries bounds the cache (default 100 000).
	MaxEntries int
	// MaxConcurrent bounds conversations in flight (default 8): the store
	// is what mxq protects, a flood of RCPTs must not reach it.
	MaxConcurrent int
	Now           func() time.Time
	Logger        *slog.Logger
}

// Verifier asks the backend whether a mailbox exists.
type Verifier struct {
	o   VerifierOptions
	sem chan struct{}

	mu       sync.Mutex
	cache    map[string]entry
	inflight map[string]*call
	down     map[string]time.Time // backend address → until
}

type entry struct {
	v   Verdict
	exp time.Time
}

type call struct {
	done chan struct{}
	v    Verdict
}

// NewVerifier returns a Verifier.
func NewVerifier(o VerifierOptions) *Verifier {
	if o.Timeout <= 0 {
		o.Timeout = 5 * time.Second
	}
	if o.TTL <= 0 {
		o.TTL = time.Hour
	}
	if o.NegativeTTL <= 0 {
		o.NegativeTTL = 5 * time.Minute
	}
	if o.DownFor <= 0 {
		o.DownFor = 30 * time.Second
	}
	if o.MaxEntries <= 0 {
		o.MaxEntries = 100_000
	}
	if o.MaxConcurrent <= 0 {
		o.MaxConcurrent = 8
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.LocalName == "" {
		o.LocalName = "localhost"
	}
	return &Verifier{o: o, sem: make(chan struct{}, o.MaxConcurrent),
		cache: map[string]entry{}, inflight: map[string]*call{}, down: map[string]time.Time{}}
}

// Verify asks the backend of a's domain about a, or the cache.
func (v *Verifier) Verify(ctx context.Context, a mailaddr.Address) Verdict {
	be, ok := v.o.Backend(a.Domain)
	if !ok {
		return Unsure
	}
	key := be.Address + " " + a.Key()
	now := v.o.Now()
	v.mu.Lock()
	if e, ok := v.cache[key]; ok && now.Before(e.exp) {
		v.mu.Unlock()
		return e.v
	}
	if until, ok := v.down[be.Address]; ok && now.Before(until) {
		v.mu.Unlock()
		return Unsure
	}
	c, joined := v.inflight[key]
	if !joined {
		c = &call{done: make(chan struct{})}
		v.inflight[key] = c
	}
	v.mu.Unlock()
	if joined {
		select {
		case <-c.done:
			return c.v
		case <-ctx.Done():
			return Unsure
		}
	}

	ctx, cancel := context.WithTimeout(ctx, v.o.Timeout)
	defer cancel()
	verdict, reachable := Unsure, true
	select {
	case v.sem <- struct{}{}:
		verdict, reachable = v.ask(ctx, be, a)
		<-v.sem
	case <-ctx.Done():
	}

	now = v.o.Now()
	v.mu.Lock()
	delete(v.inflight, key)
	switch verdict {
	case Valid:
		v.store(key, entry{Valid, now.Add(v.o.TTL)}, now)
	case Unknown:
		v.store(key, entry{Unknown, now.Add(v.o.NegativeTTL)}, now)
	}
	if !reachable {
		v.down[be.Address] = now.Add(v.o.DownFor)
	} else {
		delete(v.down, be.Address)
	}
	v.mu.Unlock()
	c.v = verdict
	close(c.done)
	return verdict
}

// store adds an entry, making room first: expired entries go, and if
// that is not enough, arbitrary ones (map order) until a tenth is free.
func (v *Verifier) store(key string, e entry, now time.Time) {
	if len(v.cache) >= v.o.MaxEntries {
		for k, old := range v.cache {
			if !now.Before(old.exp) {
				delete(v.cache, k)
			}
		}
		for k := range v.cache {
			if len(v.cache) < v.o.MaxEntries-v.o.MaxEntries/10 {
				break
			}
			delete(v.cache, k)
		}
	}
	v.cache[key] = e
}

// CacheLen is the number of cached answers.
func (v *Verifier) CacheLen() int {
	v.mu.Lock()
	defer v.mu.Unlock()
	return len(v.cache)
}

// ask holds one conversation. reachable is false when the backend could
// not be talked to at all.
func (v *Verifier) ask(ctx context.Context, be Backend, a mailaddr.Address) (verdict Verdict, reachable bool) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", be.Address)
	if err != nil {
		v.o.Logger.Info("recipient verification: backend unreachable, accepting recipients unverified",
			"backend", be.Address, "for", v.o.DownFor, "err", err)
		return Unsure, false
	}
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	var c *smtp.Client
	if be.Protocol == "lmtp" {
		c = smtp.NewClientLMTP(conn)
	} else {
		c = smtp.NewClient(conn)
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		c.CommandTimeout = time.Until(dl)
	}
	if err := c.Hello(v.o.LocalName); err != nil {
		return Unsure, isSMTPReply(err)
	}
	if err := c.Mail("", nil); err != nil {
		return Unsure, isSMTPReply(err)
	}
	err = c.Rcpt(a.String(), nil)
	_ = c.Quit()
	var se *smtp.SMTPError
	switch {
	case err == nil:
		return Valid, true
	case errors.As(err, &se) && unknownUser(se):
		return Unknown, true
	default:
		return Unsure, isSMTPReply(err)
	}
}

func isSMTPReply(err error) bool {
	var se *smtp.SMTPError
	return errors.As(err, &se)
}

// unknownUser reports whether a RCPT reply says "no such mailbox": 550,
// 551 or 553 (RFC 5321), or the enhanced code 5.1.1 whatever the basic
// code. Other permanent replies (a full mailbox, a policy) say nothing
// about existence, and the drain deals with them.
func unknownUser(se *smtp.SMTPError) bool {
	if se.EnhancedCode == (smtp.EnhancedCode{5, 1, 1}) {
		return true
	}
	switch se.Code {
	case 550, 551, 553:
		return se.EnhancedCode[0] != 5 || se.EnhancedCode[1] == 1
	}
	return false
}
