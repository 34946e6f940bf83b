package rcptcheck

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/mxq-dev/mxq/internal/mailaddr"
	"github.com/mxq-dev/mxq/internal/testbackend"
)

func addr(t *testing.T, s string) mailaddr.Address {
	t.Helper()
	a, err := mailaddr.Parse(s)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func TestList(t *testing.T) {
	path := filepath.Join(t.TempDir(), "recipients")
	os.WriteFile(path, []byte(`# users of example.test
bob@example.test
Carol@EXAMPLE.test   # case does not matter
"john doe"@example.test
zoë@bücher.example
@catchall.test
`), 0o644)
	l, err := LoadList(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		addr string
		want Verdict
	}{
		{"bob@example.test", Valid},
		{"BOB@example.TEST", Valid},
		{"carol@example.test", Valid},
		{"john doe@example.test", Valid}, // as go-smtp hands it over, unquoted
		{"zoë@xn--bcher-kva.example", Valid},
		{"ZOË@bücher.example", Valid},
		{"anyone@catchall.test", Valid},
		{"mallory@example.test", Unknown},
		{"zoe@bücher.example", Unknown},
		{"bob@other.test", Unsure}, // a domain the list does not mention
	}
	for _, tc := range cases {
		if got := l.Lookup(addr(t, tc.addr)); got != tc.want {
			t.Errorf("%s: %v, want %v", tc.addr, got, tc.want)
		}
	}

	// A change is picked up; a broken file is refused as a whole.
	os.WriteFile(path, []byte("mallory@example.test\n"), 0o644)
	if changed, err := l.Reload(); !changed || err != nil {
		t.Fatalf("reload: %v %v", changed, err)
	}
	if l.Lookup(addr(t, "bob@example.test")) != Unknown || l.Lookup(addr(t, "mallory@example.test")) != Valid {
		t.Fatal("reloaded list not in use")
	}
	os.WriteFile(path, []byte("alice@example.test\nbad@@line\n"), 0o644)
	if _, err := l.Reload(); err == nil || !strings.Contains(err.Error(), "line 2") {
		t.Fatalf("bad line: %v", err)
	}
	if l.Lookup(addr(t, "mallory@example.test")) != Valid {
		t.Fatal("a broken file replaced the list")
	}
}

// store is a real LMTP server that knows some users.
type store struct {
	*testbackend.Server
	rcpts atomic.Int32
	delay time.Duration
}

func startStore(t *testing.T, delay time.Duration) *store {
	t.Helper()
	s := &store{delay: delay}
	srv, err := testbackend.Start("127.0.0.1:0", testbackend.Options{RcptReply: func(rcpt string) *smtp.SMTPError {
		s.rcpts.Add(1)
		time.Sleep(s.delay)
		switch {
		case strings.HasPrefix(rcpt, "nobody@"):
			return &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "User doesn't exist"}
		case strings.HasPrefix(rcpt, "full@"):
			return &smtp.SMTPError{Code: 552, EnhancedCode: smtp.EnhancedCode{5, 2, 2}, Message: "Mailbox full"}
		case strings.HasPrefix(rcpt, "busy@"):
			return &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 3, 0}, Message: "Try later"}
		case strings.HasPrefix(rcpt, "policy@"):
			return &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 7, 1}, Message: "Not for you"}
		}
		return nil
	}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Close)
	s.Server = srv
	return s
}

type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) step(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

func newVerifier(s *store, clk *clock) *Verifier {
	return NewVerifier(VerifierOptions{
		Backend: func(domain string) (Backend, bool) {
			return Backend{Protocol: "lmtp", Address: s.Addr()}, domain == "example.test"
		},
		LocalName: "mxq.test", Timeout: 2 * time.Second,
		TTL: time.Hour, NegativeTTL: 5 * time.Minute, DownFor: 30 * time.Second,
		Now: clk.now,
	})
}

func TestVerify(t *testing.T) {
	s := startStore(t, 0)
	clk := &clock{t: time.Date(2026, 11, 1, 0, 0, 0, 0, time.UTC)}
	v := newVerifier(s, clk)
	ctx := context.Background()
	cases := []struct {
		addr string
		want Verdict
	}{
		{"bob@example.test", Valid},
		{"nobody@example.test", Unknown},
		{"full@example.test", Unsure},   // exists, cannot take mail now: not our call
		{"busy@example.test", Unsure},   // 4xx: no answer
		{"policy@example.test", Unsure}, // 550 5.7.1 is not "no such user"
		{"bob@elsewhere.test", Unsure},  // no backend
	}
	for _, tc := range cases {
		if got := v.Verify(ctx, addr(t, tc.addr)); got != tc.want {
			t.Errorf("%s: %v, want %v", tc.addr, got, tc.want)
		}
	}

	// Cached: asking again does not reach the store, until expiry.
	n := s.rcpts.Load()
	for i := 0; i < 5; i++ {
		v.Verify(ctx, addr(t, "BOB@example.test"))
		v.Verify(ctx, addr(t, "nobody@example.test"))
	}
	if got := s.rcpts.Load(); got != n {
		t.Fatalf("cached answers asked the store %d more times", got-n)
	}
	clk.step(6 * time.Minute) // past the negative TTL only
	v.Verify(ctx, addr(t, "bob@example.test"))
	v.Verify(ctx, addr(t, "nobody@example.test"))
	if got := s.rcpts.Load(); got != n+1 {
		t.Fatalf("after the negative TTL the store was asked %d times, want 1", got-n)
	}
	// Unsure answers are not cached.
	v.Verify(ctx, addr(t, "busy@example.test"))
	if got := s.rcpts.Load(); got != n+2 {
		t.Fatalf("4xx answer was cached")
	}
}

// Concurrent questions about one address make one conversation.
func TestVerifyShares(t *testing.T) {
	s := startStore(t, 200*time.Millisecond)
	v := newVerifier(s, &clock{t: time.Now()})
	var wg sync.WaitGroup
	var valid atomic.Int32
	for i := 0; i < 20; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if v.Verify(context.Background(), addr(t, "bob@example.test")) == Valid {
				valid.Add(1)
			}
		}()
	}
	wg.Wait()
	if valid.Load() != 20 || s.rcpts.Load() != 1 {
		t.Fatalf("%d valid answers, %d questions to the store; want 20 and 1", valid.Load(), s.rcpts.Load())
	}
}

// A store that is down costs one failed dial, then nothing until DownFor.
func TestVerifyBackendDown(t *testing.T) {
	s := startStore(t, 0)
	clk := &clock{t: time.Now()}
	v := newVerifier(s, clk)
	s.Down()
	ctx := context.Background()
	if got := v.Verify(ctx, addr(t, "nobody@example.test")); got != Unsure {
		t.Fatalf("store down: %v", got)
	}
	if err := s.Up(); err != nil {
		t.Fatal(err)
	}
	if got := v.Verify(ctx, addr(t, "nobody@example.test")); got != Unsure || s.rcpts.Load() != 0 {
		t.Fatalf("within DownFor: %v, %d questions", got, s.rcpts.Load())
	}
	clk.step(31 * time.Second)
	if got := v.Verify(ctx, addr(t, "nobody@example.test")); got != Unknown {
		t.Fatalf("store back: %v", got)
	}
}

// A store that accepts the connection and then says nothing is given up
// on after the timeout, and the recipient accepted.
func TestVerifyTimeout(t *testing.T) {
	s := startStore(t, 3*time.Second)
	v := newVerifier(s, &clock{t: time.Now()})
	start := time.Now()
	if got := v.Verify(context.Background(), addr(t, "nobody@example.test")); got != Unsure {
		t.Fatalf("slow store: %v", got)
	}
	if d := time.Since(start); d > 2500*time.Millisecond {
		t.Fatalf("took %v, timeout is 2s", d)
	}
}

func TestCacheBounded(t *testing.T) {
	s := startStore(t, 0)
	v := newVerifier(s, &clock{t: time.Now()})
	v.o.MaxEntries = 50
	for i := 0; i < 200; i++ {
		v.Verify(context.Background(), addr(t, "u"+strings.Repeat("x", i%7)+string(rune('a'+i%26))+"@example.test"))
	}
	if n := v.CacheLen(); n > 50 {
		t.Fatalf("cache holds %d entries, limit 50", n)
	}
}

func TestChecker(t *testing.T) {
	s := startStore(t, 0)
	path := filepath.Join(t.TempDir(), "recipients")
	os.WriteFile(path, []byte("listed@example.test\n"), 0o644)
	l, err := LoadList(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	v := newVerifier(s, &clock{t: time.Now()})
	ctx := context.Background()
	cases := []struct {
		name string
		c    *Checker
		addr string
		want error
	}{
		{"list says valid", &Checker{List: l, Verifier: v}, "listed@example.test", nil},
		{"list says unknown, store not asked", &Checker{List: l, Verifier: v}, "bob@example.test", ErrUnknown},
		{"verifier only", &Checker{Verifier: v}, "nobody@example.test", ErrUnknown},
		{"verifier only, valid", &Checker{Verifier: v}, "bob@example.test", nil},
		{"nothing configured", &Checker{}, "nobody@example.test", nil},
	}
	for _, tc := range cases {
		err := tc.c.CheckRecipient(ctx, addr(t, tc.addr))
		if tc.want == nil && err != nil || tc.want != nil && !errors.Is(err, tc.want) {
			t.Errorf("%s: %v, want %v", tc.name, err, tc.want)
		}
	}
}
