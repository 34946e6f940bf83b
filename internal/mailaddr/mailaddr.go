// Package mailaddr parses and normalizes SMTP mailbox addresses.
//
// The relay, the configuration and the continuity view must agree on when
// two addresses are the same mailbox, so they all go through Parse: the
// domain is lower-cased and converted to its IDNA A-label form (so that
// "Exämple.TEST." and "xn--exmple-cua.test" are one domain), and the local
// part is kept as the sender wrote it, re-quoted when it needs quotes.
// Addresses that smell of relaying tricks (%-hack, bang paths, an @ inside
// a quoted local part, address literals) are refused outright.
package mailaddr

import (
	"errors"
	"fmt"
	"strings"
	"unicode/utf8"

	"golang.org/x/net/idna"
)

// Address is a parsed mailbox.
type Address struct {
	Local  string // unquoted local part, as written
	Domain string // normalized: lower case, A-labels, no trailing dot
}

// Errors returned by Parse; all wrap ErrSyntax or ErrRelayTrick.
var (
	ErrSyntax     = errors.New("bad address syntax")
	ErrRelayTrick = errors.New("address looks like a relaying trick")
)

// profile is strict IDNA 2008 lookup, as a resolver would apply: it refuses
// labels with disallowed code points, bad hyphens and mixed-direction tricks.
var profile = idna.New(
	idna.MapForLookup(),
	idna.BidiRule(),
	idna.ValidateLabels(true),
	idna.StrictDomainName(true),
	idna.VerifyDNSLength(true),
	idna.Transitional(false),
)

// NormalizeDomain returns the canonical A-label form of a domain.
func NormalizeDomain(d string) (string, error) {
	d = strings.TrimSuffix(strings.TrimSpace(d), ".")
	if d == "" {
		return "", fmt.Errorf("%w: empty domain", ErrSyntax)
	}
	if strings.HasPrefix(d, "[") {
		return "", fmt.Errorf("%w: address literals are not accepted", ErrRelayTrick)
	}
	a, err := profile.ToASCII(d)
	if err != nil {
		return "", fmt.Errorf("%w: domain %q: %v", ErrSyntax, d, err)
	}
	// IDNA lets an empty root label through ("a.b." after the one
	// trailing dot trimmed above): the canonical form has none.
	if strings.HasSuffix(a, ".") || strings.Contains(a, "..") {
		return "", fmt.Errorf("%w: domain %q has an empty label", ErrSyntax, d)
	}
	if !strings.Contains(a, ".") {
		return "", fmt.Errorf("%w: domain %q has no dot", ErrSyntax, d)
	}
	return strings.ToLower(a), nil
}

// Parse parses an address as go-smtp hands it over: without angle brackets,
// with a quoted local part already unquoted. The domain is the part after
// the last @.
func Parse(s string) (Address, error) {
	if !utf8.ValidString(s) {
		return Address{}, fmt.Errorf("%w: not UTF-8", ErrSyntax)
	}
	at := strings.LastIndexByte(s, '@')
	if at <= 0 || at == len(s)-1 {
		return Address{}, fmt.Errorf("%w: want local@domain", ErrSyntax)
	}
	local, domain := s[:at], s[at+1:]
	if len(local) > 64 {
		return Address{}, fmt.Errorf("%w: local part longer than 64 octets", ErrSyntax)
	}
	for _, r := range local {
		switch {
		case r == '@' || r == '%' || r == '!':
			return Address{}, fmt.Errorf("%w: %q in local part", ErrRelayTrick, r)
		case r < 0x20 || r == 0x7f:
			return Address{}, fmt.Errorf("%w: control character in local part", ErrSyntax)
		}
	}
	d, err := NormalizeDomain(domain)
	if err != nil {
		return Address{}, err
	}
	return Address{Local: local, Domain: d}, nil
}

// String formats the address for an SMTP path (without brackets), quoting
// the local part when it is not a dot-atom.
func (a Address) String() string {
	if isDotAtom(a.Local) {
		return a.Local + "@" + a.Domain
	}
	var b strings.Builder
	b.WriteByte('"')
	for i := 0; i < len(a.Local); i++ {
		c := a.Local[i]
		if c == '"' || c == '\\' {
			b.WriteByte('\\')
		}
		b.WriteByte(c)
	}
	b.WriteString(`"@`)
	b.WriteString(a.Domain)
	return b.String()
}

// Key is the address in the form used to compare mailboxes: the local part
// lower-cased (every mailbox store we deliver to treats it so) and the
// normalized domain.
func (a Address) Key() string { return strings.ToLower(a.Local) + "@" + a.Domain }

// isDotAtom reports whether s is an RFC 5321 Dot-string (UTF-8 allowed,
// RFC 6531).
func isDotAtom(s string) bool {
	if s == "" || s[0] == '.' || s[len(s)-1] == '.' || strings.Contains(s, "..") {
		return false
	}
	for _, r := range s {
		if r >= 0x80 {
			continue
		}
		if r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' {
			continue
		}
		if !strings.ContainsRune("!#$%&'*+-/=?^_`{|}~.", r) {
			return false
		}
	}
	return true
}
