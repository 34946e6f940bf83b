// Package auth decides who may read held mail, in a way that keeps
// working while the mailbox store — and often its user database — is down.
//
// An Authenticator checks a login and a password and names the mailbox the
// user may read (its mailaddr key). Backends are pluggable; Chain tries
// several in order. The first one here is a Dovecot passwd-file
// (PasswdFile): a plain file the operator exports from the user database
// ahead of an outage, or the very file Dovecot already uses. Planned next,
// behind the same interface: an LDAP bind, and a cache of credentials that
// last succeeded against the store's own IMAP while it was up.
//
// Guard wraps an Authenticator with what every login needs whatever the
// backend: limits on failed logins per user and per client address, a cap
// on concurrent password hashing (bcrypt and Argon2 are made to be slow),
// an audit log line per attempt, and metrics.
package auth

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/mxq-dev/mxq/internal/mailaddr"
)

// Errors of Authenticate. The views show the user one message for all of
// them but ErrRateLimited and ErrUnavailable, so that a guesser cannot
// tell an unknown user from a wrong password.
var (
	ErrUnknownUser = errors.New("unknown user")
	ErrBadPassword = errors.New("wrong password")
	// ErrUnavailable: the backend cannot answer now (an LDAP server down).
	ErrUnavailable = errors.New("authentication backend unavailable")
	// ErrRateLimited: too many failed logins for this user or address.
	ErrRateLimited = errors.New("too many failed logins, try again later")
)

// Identity is who logged in.
type Identity struct {
	// User is the mailbox key (mailaddr.Address.Key) whose held mail the
	// user sees.
	User string
	// Backend names the authenticator that accepted the login.
	Backend string
}

// Authenticator checks a login (as the user typed it) and a password.
type Authenticator interface {
	Name() string
	Authenticate(ctx context.Context, login, password string) (Identity, error)
}

// Chain tries authenticators in order. One that does not know the user
// (ErrUnknownUser) or cannot answer (ErrUnavailable) passes the login to
// the next; the first that knows the user decides.
type Chain []Authenticator

// Name implements Authenticator.
func (c Chain) Name() string {
	names := make([]string, len(c))
	for i, a := range c {
		names[i] = a.Name()
	}
	return strings.Join(names, ",")
}

// Authenticate implements Authenticator.
func (c Chain) Authenticate(ctx context.Context, login, password string) (Identity, error) {
	err := ErrUnknownUser
	for _, a := range c {
		id, aerr := a.Authenticate(ctx, login, password)
		if aerr == nil {
			return id, nil
		}
		if !errors.Is(aerr, ErrUnknownUser) && !errors.Is(aerr, ErrUnavailable) {
			return Identity{}, aerr
		}
		if errors.Is(aerr, ErrUnavailable) || !errors.Is(err, ErrUnavailable) {
			err = aerr
		}
	}
	return Identity{}, err
}

// MailboxKey turns a login into the mailbox key it names: an address as
// is (the local part compared case-insensitively, the domain normalized),
// a bare name completed with defaultDomain.
func MailboxKey(login, defaultDomain string) (string, error) {
	login = strings.TrimSpace(login)
	if !strings.Contains(login, "@") {
		if defaultDomain == "" {
			return "", fmt.Errorf("%q: a user name without a domain, and no default domain", login)
		}
		login += "@" + defaultDomain
	}
	a, err := mailaddr.Parse(login)
	if err != nil {
		return "", fmt.Errorf("%q: %w", login, err)
	}
	return a.Key(), nil
}
