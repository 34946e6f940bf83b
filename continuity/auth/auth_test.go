package auth

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/crypto/argon2"
	"golang.org/x/crypto/bcrypt"
)

// hashOf returns "{SCHEME}hash" for password: made by Dovecot's own
// doveadm pw when it is installed (the format is Dovecot's), else built
// here the way doveadm does.
func hashOf(t *testing.T, scheme, password string) string {
	t.Helper()
	if _, err := exec.LookPath("doveadm"); err == nil {
		out, err := exec.Command("doveadm", "pw", "-s", scheme, "-p", password).Output()
		if err == nil {
			return strings.TrimSpace(string(out))
		}
		t.Logf("doveadm pw -s %s: %v; hashing here", scheme, err)
	}
	switch scheme {
	case "BLF-CRYPT":
		h, err := bcrypt.GenerateFromPassword([]byte(password), 5)
		if err != nil {
			t.Fatal(err)
		}
		return "{BLF-CRYPT}" + string(h)
	case "ARGON2ID":
		salt := make([]byte, 16)
		rand.Read(salt)
		key := argon2.IDKey([]byte(password), salt, 3, 65536, 1, 32)
		return fmt.Sprintf("{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$%s$%s",
			base64.RawStdEncoding.EncodeToString(salt), base64.RawStdEncoding.EncodeToString(key))
	}
	t.Fatalf("no hash for %s", scheme)
	return ""
}

func writePasswd(t *testing.T, lines ...string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "passwd")
	if err := os.WriteFile(p, []byte(strings.Join(lines, "\n")+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestPasswdFile(t *testing.T) {
	bcryptHash := hashOf(t, "BLF-CRYPT", "alice-secret")
	argonHash := hashOf(t, "ARGON2ID", "bob-secret")
	bare := strings.TrimPrefix(hashOf(t, "BLF-CRYPT", "carol-secret"), "{BLF-CRYPT}")
	path := writePasswd(t,
		"# users who may read held mail",
		"alice@example.test:"+bcryptHash+"::::::",
		"Bob@Example.TEST:"+argonHash,
		"carol:"+bare+":1000:1000::/home/carol::userdb_quota_rule=*:storage=1G",
		"dave@example.test:{SHA512-CRYPT}$6$abc$def",
		"eve@example.test:{PLAIN}eve-secret",
		"broken line without colon",
		"frank@example.test:{BCRYPT}"+strings.TrimPrefix(hashOf(t, "BLF-CRYPT", "frank-secret"), "{BLF-CRYPT}"),
	)
	p, err := OpenPasswdFile(path, "example.test", nil)
	if err != nil {
		t.Fatal(err)
	}
	if p.Users() != 4 {
		t.Fatalf("loaded %d users, want 4 (alice, bob, carol, frank)", p.Users())
	}
	tests := []struct {
		name, login, password string
		user                  string
		err                   error
	}{
		{"bcrypt", "alice@example.test", "alice-secret", "alice@example.test", nil},
		{"bcrypt wrong password", "alice@example.test", "alice-secreT", "", ErrBadPassword},
		{"login case-insensitive", "ALICE@example.TEST", "alice-secret", "alice@example.test", nil},
		{"argon2id", "bob@example.test", "bob-secret", "bob@example.test", nil},
		{"argon2id wrong password", "bob@example.test", "alice-secret", "", ErrBadPassword},
		{"bare name, bare hash", "carol", "carol-secret", "carol@example.test", nil},
		{"bare name as address", "carol@example.test", "carol-secret", "carol@example.test", nil},
		{"{BCRYPT} alias", "frank@example.test", "frank-secret", "frank@example.test", nil},
		{"unsupported scheme", "dave@example.test", "anything", "", ErrUnknownUser},
		{"plain text refused", "eve@example.test", "eve-secret", "", ErrUnknownUser},
		{"unknown user", "mallory@example.test", "x", "", ErrUnknownUser},
		{"not an address", "a@b@c", "x", "", ErrUnknownUser},
		{"empty password", "alice@example.test", "", "", ErrBadPassword},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			id, err := p.Authenticate(context.Background(), tt.login, tt.password)
			if !errors.Is(err, tt.err) {
				t.Fatalf("err %v, want %v", err, tt.err)
			}
			if id.User != tt.user {
				t.Fatalf("user %q, want %q", id.User, tt.user)
			}
		})
	}

	// A change of the file is picked up; a file that cannot be read keeps
	// the users loaded before.
	if err := os.WriteFile(path, []byte("alice@example.test:"+argonHash+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if changed, err := p.Reload(); !changed || err != nil {
		t.Fatalf("reload: %v %v", changed, err)
	}
	if _, err := p.Authenticate(context.Background(), "alice@example.test", "bob-secret"); err != nil {
		t.Fatalf("after reload: %v", err)
	}
	os.Remove(path)
	if _, err := p.Reload(); err == nil {
		t.Fatal("reload of a missing file: no error")
	}
	if _, err := p.Authenticate(context.Background(), "alice@example.test", "bob-secret"); err != nil {
		t.Fatalf("users lost with the file: %v", err)
	}
}

func TestChain(t *testing.T) {
	one, _ := OpenPasswdFile(writePasswd(t, "alice@example.test:"+hashOf(t, "BLF-CRYPT", "a")), "", nil)
	two, _ := OpenPasswdFile(writePasswd(t, "alice@example.test:"+hashOf(t, "BLF-CRYPT", "b"), "bob@example.test:"+hashOf(t, "BLF-CRYPT", "b")), "", nil)
	c := Chain{one, two}
	tests := []struct {
		login, pw string
		err       error
	}{
		{"alice@example.test", "a", nil},
		{"alice@example.test", "b", ErrBadPassword}, // the first that knows alice decides
		{"bob@example.test", "b", nil},
		{"carol@example.test", "c", ErrUnknownUser},
	}
	for _, tt := range tests {
		if _, err := c.Authenticate(context.Background(), tt.login, tt.pw); !errors.Is(err, tt.err) {
			t.Errorf("%s/%s: %v, want %v", tt.login, tt.pw, err, tt.err)
		}
	}
}

// clock is a settable time for the limits.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) now() time.Time      { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) add(d time.Duration) { c.mu.Lock(); c.t = c.t.Add(d); c.mu.Unlock() }

type recorder struct {
	mu      sync.Mutex
	results []string
}

func (r *recorder) Login(proto, user, result string) {
	r.mu.Lock()
	r.results = append(r.results, proto+" "+user+" "+result)
	r.mu.Unlock()
}

func TestGuardLimits(t *testing.T) {
	p, err := OpenPasswdFile(writePasswd(t,
		"alice@example.test:"+hashOf(t, "BLF-CRYPT", "alice-pw"),
		"bob@example.test:"+hashOf(t, "BLF-CRYPT", "bob-pw")), "", nil)
	if err != nil {
		t.Fatal(err)
	}
	clk := &clock{t: time.Date(2026, 11, 2, 10, 0, 0, 0, time.UTC)}
	rec := &recorder{}
	g := NewGuard(p, Limits{PerUser: 3, PerIP: 5, Window: 10 * time.Minute}, "", clk.now, nil, rec)
	ip := func(s string) netip.Addr { return netip.MustParseAddr(s) }
	login := func(user, pw, addr string) error {
		_, err := g.Login(context.Background(), Attempt{Login: user, Password: pw, Addr: ip(addr), Proto: "imap"})
		return err
	}

	// Per user: three failures from three addresses, then even the right
	// password is refused, from anywhere, until the window moves on.
	for i, addr := range []string{"192.0.2.1", "192.0.2.2", "192.0.2.3"} {
		if err := login("alice@example.test", "guess", addr); !errors.Is(err, ErrBadPassword) {
			t.Fatalf("failure %d: %v", i, err)
		}
	}
	if err := login("ALICE@example.test", "alice-pw", "198.51.100.7"); !errors.Is(err, ErrRateLimited) {
		t.Fatalf("4th attempt: %v, want rate limited", err)
	}
	if err := login("bob@example.test", "bob-pw", "198.51.100.7"); err != nil {
		t.Fatalf("bob is not limited by alice's failures: %v", err)
	}
	clk.add(10 * time.Minute)
	if err := login("alice@example.test", "alice-pw", "198.51.100.7"); err != nil {
		t.Fatalf("after the window: %v", err)
	}

	// A success clears the user's failures.
	login("alice@example.test", "guess", "192.0.2.9")
	login("alice@example.test", "guess", "192.0.2.9")
	if err := login("alice@example.test", "alice-pw", "192.0.2.9"); err != nil {
		t.Fatal(err)
	}
	login("alice@example.test", "guess", "192.0.2.9")
	if err := login("alice@example.test", "alice-pw", "192.0.2.9"); err != nil {
		t.Fatalf("the count was not reset by the success: %v", err)
	}

	// Per address: one /64 spraying many users.
	clk.add(time.Hour)
	for i := 0; i < 5; i++ {
		if err := login(fmt.Sprintf("user%d@example.test", i), "x", fmt.Sprintf("2001:db8:1:2::%d", i+1)); !errors.Is(err, ErrBadPassword) {
			t.Fatalf("spray %d: %v", i, err)
		}
	}
	if err := login("bob@example.test", "bob-pw", "2001:db8:1:2::ffff"); !errors.Is(err, ErrRateLimited) {
		t.Fatalf("same /64: %v, want rate limited", err)
	}
	if err := login("bob@example.test", "bob-pw", "2001:db8:1:3::1"); err != nil {
		t.Fatalf("another /64: %v", err)
	}

	rec.mu.Lock()
	defer rec.mu.Unlock()
	counts := map[string]int{}
	for _, r := range rec.results {
		counts[r[strings.LastIndexByte(r, ' ')+1:]]++
	}
	if counts["ok"] != 5 || counts["rate_limited"] != 2 || counts["failed"] != 11 {
		t.Fatalf("observed %v\n%s", counts, strings.Join(rec.results, "\n"))
	}
}
