package auth

import (
	"bufio"
	"bytes"
	"context"
	"crypto/subtle"
	"encoding/base64"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/crypto/argon2"
	"golang.org/x/crypto/bcrypt"

	"github.com/mxq-dev/mxq/internal/filewatch"
)

// PasswdFile authenticates against a Dovecot passwd-file:
//
//	user:{SCHEME}hash:uid:gid:gecos:home:shell:extra_fields
//
// Only the first two fields are read. user is a mail address (or a bare
// name completed with the default domain); the schemes understood are
// {BLF-CRYPT} and {BCRYPT} (bcrypt, $2a$/$2b$/$2y$), {ARGON2ID} and
// {ARGON2I} (the PHC strings doveadm pw writes); a hash without a scheme
// is recognized by its $2?$ or $argon2 prefix. Lines of other schemes
// (SHA512-CRYPT, plain text...) are skipped with a warning: those users
// cannot log in here. Blank lines and lines starting with # are ignored.
//
// The file is read again when it changes (Run), so an operator can add a
// user during an outage without restarting mxq.
type PasswdFile struct {
	path          string
	defaultDomain string
	log           *slog.Logger

	mu    sync.Mutex // serializes Reload
	files *filewatch.Files
	users atomic.Pointer[map[string]string] // mailbox key -> hash with scheme
	dummy string                            // compared against for unknown users
}

// OpenPasswdFile reads the file; log may be nil.
func OpenPasswdFile(path, defaultDomain string, log *slog.Logger) (*PasswdFile, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	p := &PasswdFile{path: path, defaultDomain: defaultDomain, log: log, files: filewatch.New(path)}
	// A bcrypt hash at Dovecot's default cost, so that an unknown user
	// costs about what a known one does and timing does not tell them
	// apart.
	h, err := bcrypt.GenerateFromPassword([]byte("mxq-unknown-user"), 5)
	if err != nil {
		return nil, err
	}
	p.dummy = "{BLF-CRYPT}" + string(h)
	if _, err := p.Reload(); err != nil {
		return nil, err
	}
	return p, nil
}

// Name implements Authenticator.
func (p *PasswdFile) Name() string { return "passwd-file" }

// Users is the number of users loaded.
func (p *PasswdFile) Users() int { return len(*p.users.Load()) }

// Reload reads the file if it changed; on error the users loaded before
// stay.
func (p *PasswdFile) Reload() (bool, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	changed, data, err := p.files.Changed()
	if err != nil || !changed {
		if err != nil {
			err = fmt.Errorf("passwd-file: %w", err)
		}
		return false, err
	}
	users := map[string]string{}
	sc := bufio.NewScanner(bytes.NewReader(data[0]))
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || line[0] == '#' {
			continue
		}
		fields := strings.SplitN(line, ":", 3)
		if len(fields) < 2 || fields[0] == "" || fields[1] == "" {
			p.log.Warn("passwd-file: line skipped: want user:{SCHEME}hash", "file", p.path, "line", n)
			continue
		}
		key, err := MailboxKey(fields[0], p.defaultDomain)
		if err != nil {
			p.log.Warn("passwd-file: line skipped", "file", p.path, "line", n, "err", err)
			continue
		}
		if _, _, err := scheme(fields[1]); err != nil {
			p.log.Warn("passwd-file: user cannot log in here", "file", p.path, "line", n, "user", key, "err", err)
			continue
		}
		if _, dup := users[key]; dup {
			p.log.Warn("passwd-file: user listed twice, the first line counts", "file", p.path, "line", n, "user", key)
			continue
		}
		users[key] = fields[1]
	}
	if err := sc.Err(); err != nil {
		return false, fmt.Errorf("passwd-file %s: %w", p.path, err)
	}
	p.files.Accept(data)
	p.users.Store(&users)
	p.log.Info("passwd-file loaded", "file", p.path, "users", len(users))
	return true, nil
}

// Run reads the file again when it changes, every interval, until ctx
// ends.
func (p *PasswdFile) Run(ctx context.Context, interval time.Duration) {
	filewatch.Poll(ctx, interval, func() {
		if _, err := p.Reload(); err != nil {
			p.log.Warn("passwd-file not reloaded, keeping the users loaded before", "err", err)
		}
	})
}

// Authenticate implements Authenticator.
func (p *PasswdFile) Authenticate(_ context.Context, login, password string) (Identity, error) {
	key, err := MailboxKey(login, p.defaultDomain)
	if err != nil {
		_ = verify(p.dummy, password)
		return Identity{}, ErrUnknownUser
	}
	hash, ok := (*p.users.Load())[key]
	if !ok {
		_ = verify(p.dummy, password)
		return Identity{}, ErrUnknownUser
	}
	if err := verify(hash, password); err != nil {
		return Identity{}, err
	}
	return Identity{User: key, Backend: p.Name()}, nil
}

// Hash schemes.
const (
	schemeBcrypt   = "BLF-CRYPT"
	schemeArgon2ID = "ARGON2ID"
	schemeArgon2I  = "ARGON2I"
)

// scheme splits "{SCHEME}hash", recognizing bare bcrypt and Argon2 hashes.
func scheme(s string) (name, hash string, err error) {
	if strings.HasPrefix(s, "{") {
		end := strings.IndexByte(s, '}')
		if end < 0 {
			return "", "", errors.New("unterminated {SCHEME}")
		}
		name, hash = strings.ToUpper(s[1:end]), s[end+1:]
	} else {
		hash = s
		switch {
		case strings.HasPrefix(s, "$2"):
			name = schemeBcrypt
		case strings.HasPrefix(s, "$argon2id$"):
			name = schemeArgon2ID
		case strings.HasPrefix(s, "$argon2i$"):
			name = schemeArgon2I
		default:
			return "", "", errors.New("a hash without {SCHEME} that is neither bcrypt nor Argon2")
		}
	}
	switch name {
	case "BCRYPT":
		name = schemeBcrypt
	case schemeBcrypt, schemeArgon2ID, schemeArgon2I:
	default:
		return "", "", fmt.Errorf("scheme {%s} is not supported (use BLF-CRYPT or ARGON2ID)", name)
	}
	if name == schemeBcrypt {
		if _, err := bcrypt.Cost([]byte(hash)); err != nil {
			return "", "", fmt.Errorf("bad bcrypt hash: %w", err)
		}
	} else if _, err := parseArgon2(hash, name); err != nil {
		return "", "", err
	}
	return name, hash, nil
}

// verify checks a password against "{SCHEME}hash".
func verify(stored, password string) error {
	name, hash, err := scheme(stored)
	if err != nil {
		return fmt.Errorf("%w: %v", ErrBadPassword, err)
	}
	switch name {
	case schemeBcrypt:
		if bcrypt.CompareHashAndPassword([]byte(hash), []byte(password)) != nil {
			return ErrBadPassword
		}
		return nil
	default:
		a, err := parseArgon2(hash, name)
		if err != nil {
			return fmt.Errorf("%w: %v", ErrBadPassword, err)
		}
		var got []byte
		if a.variant == "argon2id" {
			got = argon2.IDKey([]byte(password), a.salt, a.t, a.m, a.p, uint32(len(a.key)))
		} else {
			got = argon2.Key([]byte(password), a.salt, a.t, a.m, a.p, uint32(len(a.key)))
		}
		if subtle.ConstantTimeCompare(got, a.key) != 1 {
			return ErrBadPassword
		}
		return nil
	}
}

type argon2Hash struct {
	variant   string
	m, t      uint32
	p         uint8
	salt, key []byte
}

// parseArgon2 reads a PHC string: $argon2id$v=19$m=65536,t=3,p=1$salt$key
// (base64 without padding), as libsodium and doveadm pw write it.
func parseArgon2(s, name string) (argon2Hash, error) {
	bad := func(why string) (argon2Hash, error) {
		return argon2Hash{}, fmt.Errorf("bad {%s} hash: %s", name, why)
	}
	parts := strings.Split(s, "$")
	if len(parts) != 6 || parts[0] != "" {
		return bad("want $argon2id$v=19$m=...,t=...,p=...$salt$hash")
	}
	a := argon2Hash{variant: parts[1]}
	if want := strings.ToLower(name); a.variant != want {
		return bad("variant " + a.variant)
	}
	if parts[2] != "v=19" {
		return bad("version " + parts[2] + " (want v=19)")
	}
	for _, kv := range strings.Split(parts[3], ",") {
		k, v, _ := strings.Cut(kv, "=")
		n, err := strconv.ParseUint(v, 10, 32)
		if err != nil {
			return bad("parameter " + kv)
		}
		switch k {
		case "m":
			a.m = uint32(n)
		case "t":
			a.t = uint32(n)
		case "p":
			if n > 255 {
				return bad("parallelism " + v)
			}
			a.p = uint8(n)
		default:
			return bad("parameter " + kv)
		}
	}
	// Bounds keep a hand-edited line from making one login allocate
	// gigabytes or run for minutes.
	if a.m < 8 || a.m > 4<<20 || a.t < 1 || a.t > 64 || a.p < 1 {
		return bad("parameters out of range")
	}
	var err error
	if a.salt, err = base64.RawStdEncoding.DecodeString(parts[4]); err != nil || len(a.salt) < 8 {
		return bad("salt")
	}
	if a.key, err = base64.RawStdEncoding.DecodeString(parts[5]); err != nil || len(a.key) < 16 {
		return bad("hash")
	}
	return a, nil
}
