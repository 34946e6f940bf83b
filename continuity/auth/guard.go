package auth

import (
	"context"
	"errors"
	"log/slog"
	"net/netip"
	"runtime"
	"strings"
	"sync"
	"time"

	"github.com/mxq-dev/mxq/internal/connlimit"
)

// Limits bound failed logins. A user (whatever the address) or a client
// address (an IPv4 address or an IPv6 /64, whatever the user) with
// PerUser or PerIP failures within Window is refused — without the
// password being checked — until the oldest failure leaves the window.
type Limits struct {
	PerUser int
	PerIP   int
	Window  time.Duration
	// Hashing caps the password checks running at once (default: the
	// number of CPUs), so a flood of logins cannot take the CPU from the
	// SMTP side.
	Hashing int
}

// Observer is told of every login attempt (metrics, users seen).
type Observer interface {
	// Login reports an attempt's result: ok, failed, rate_limited or
	// unavailable. user is the mailbox key, or the login as typed when it
	// names no mailbox.
	Login(proto, user, result string)
}

// Attempt is one login.
type Attempt struct {
	Login    string
	Password string
	// Addr is the client's address.
	Addr  netip.Addr
	Proto string // imap, web
}

// Guard applies Limits to an Authenticator, and logs every attempt.
type Guard struct {
	auth          Authenticator
	lim           Limits
	defaultDomain string
	now           func() time.Time
	audit         *slog.Logger
	obs           Observer
	hashing       chan struct{}

	mu        sync.Mutex
	users     map[string]*failures
	ips       map[netip.Prefix]*failures
	lastSweep time.Time
}

// failures are the times of recent failed logins, oldest first.
type failures struct{ at []time.Time }

// count drops failures older than the window and returns how many are
// left.
func (f *failures) count(now time.Time, window time.Duration) int {
	i := 0
	for i < len(f.at) && now.Sub(f.at[i]) >= window {
		i++
	}
	f.at = f.at[i:]
	return len(f.at)
}

// NewGuard wraps a. audit receives one line per attempt; obs and now may
// be nil.
func NewGuard(a Authenticator, lim Limits, defaultDomain string, now func() time.Time, audit *slog.Logger, obs Observer) *Guard {
	if now == nil {
		now = time.Now
	}
	if audit == nil {
		audit = slog.New(slog.DiscardHandler)
	}
	if lim.Hashing <= 0 {
		lim.Hashing = runtime.NumCPU()
	}
	return &Guard{auth: a, lim: lim, defaultDomain: defaultDomain, now: now, audit: audit, obs: obs,
		hashing: make(chan struct{}, lim.Hashing), users: map[string]*failures{}, ips: map[netip.Prefix]*failures{}}
}

// userKey is what the per-user limit counts on: the mailbox key when the
// login names one, so Alice and alice share a budget.
func (g *Guard) userKey(login string) string {
	if k, err := MailboxKey(login, g.defaultDomain); err == nil {
		return k
	}
	return strings.ToLower(strings.TrimSpace(login))
}

// Login checks an attempt.
func (g *Guard) Login(ctx context.Context, a Attempt) (Identity, error) {
	user := g.userKey(a.Login)
	ipKey := connlimit.Key(a.Addr)
	if g.limited(user, ipKey) {
		g.report(a, user, "rate_limited", nil)
		return Identity{}, ErrRateLimited
	}
	select {
	case g.hashing <- struct{}{}:
	case <-ctx.Done():
		return Identity{}, ctx.Err()
	}
	id, err := g.auth.Authenticate(ctx, a.Login, a.Password)
	<-g.hashing
	switch {
	case err == nil:
		g.mu.Lock()
		delete(g.users, user) // the real user is back: forget the failures
		g.mu.Unlock()
		g.report(a, id.User, "ok", &id)
		return id, nil
	case errors.Is(err, ErrUnavailable):
		g.report(a, user, "unavailable", nil)
		return Identity{}, err
	default:
		g.fail(user, ipKey)
		g.report(a, user, "failed", nil)
		return Identity{}, ErrBadPassword
	}
}

func (g *Guard) limited(user string, ip netip.Prefix) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	now := g.now()
	g.sweepLocked(now)
	if f := g.users[user]; f != nil && f.count(now, g.lim.Window) >= g.lim.PerUser {
		return true
	}
	if f := g.ips[ip]; f != nil && f.count(now, g.lim.Window) >= g.lim.PerIP {
		return true
	}
	return false
}

func (g *Guard) fail(user string, ip netip.Prefix) {
	g.mu.Lock()
	defer g.mu.Unlock()
	now := g.now()
	uf := g.users[user]
	if uf == nil {
		uf = &failures{}
		g.users[user] = uf
	}
	uf.at = append(uf.at, now)
	ipf := g.ips[ip]
	if ipf == nil {
		ipf = &failures{}
		g.ips[ip] = ipf
	}
	ipf.at = append(ipf.at, now)
}

// sweepLocked forgets users and addresses whose failures all left the
// window, once a window, so the maps do not grow with every guess.
func (g *Guard) sweepLocked(now time.Time) {
	if now.Sub(g.lastSweep) < g.lim.Window {
		return
	}
	g.lastSweep = now
	for k, f := range g.users {
		if f.count(now, g.lim.Window) == 0 {
			delete(g.users, k)
		}
	}
	for k, f := range g.ips {
		if f.count(now, g.lim.Window) == 0 {
			delete(g.ips, k)
		}
	}
}

func (g *Guard) report(a Attempt, user, result string, id *Identity) {
	attrs := []any{"proto", a.Proto, "user", user, "addr", a.Addr.String(), "result", result}
	if id != nil {
		attrs = append(attrs, "backend", id.Backend)
	}
	if result == "ok" {
		g.audit.Info("continuity login", attrs...)
	} else {
		g.audit.Warn("continuity login refused", attrs...)
	}
	if g.obs != nil {
		g.obs.Login(a.Proto, user, result)
	}
}
