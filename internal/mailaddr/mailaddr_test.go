package mailaddr

import (
	"errors"
	"strings"
	"testing"
	"unicode/utf8"
)

func TestParse(t *testing.T) {
	cases := []struct {
		in            string
		local, domain string
		str, key      string
		err           error
	}{
		{in: "bob@example.test", local: "bob", domain: "example.test", str: "bob@example.test", key: "bob@example.test"},
		{in: "Bob@EXAMPLE.Test.", local: "Bob", domain: "example.test", str: "Bob@example.test", key: "bob@example.test"},
		{in: "zoë@Bücher.example", local: "zoë", domain: "xn--bcher-kva.example", str: "zoë@xn--bcher-kva.example", key: "zoë@xn--bcher-kva.example"},
		{in: "john doe@example.test", local: "john doe", domain: "example.test", str: `"john doe"@example.test`, key: "john doe@example.test"},
		{in: `a"b\c@example.test`, local: `a"b\c`, domain: "example.test", str: `"a\"b\\c"@example.test`},
		{in: ".bob@example.test", local: ".bob", domain: "example.test", str: `".bob"@example.test`},
		{in: "bob%foreign.test@example.test", err: ErrRelayTrick},
		{in: "foreign.test!bob@example.test", err: ErrRelayTrick},
		{in: "bob@foreign.test@example.test", err: ErrRelayTrick},
		{in: "bob@[192.0.2.1]", err: ErrRelayTrick},
		{in: "bob@localhost", err: ErrSyntax},
		{in: "bob@", err: ErrSyntax},
		{in: "@example.test", err: ErrSyntax},
		{in: "bob\x00@example.test", err: ErrSyntax},
		{in: "bob@exam\u200dple.test", err: ErrSyntax},
		{in: "bob@-bad.example.test", err: ErrSyntax},
		{in: "\xff@example.test", err: ErrSyntax},
		{in: strings.Repeat("a", 65) + "@example.test", err: ErrSyntax},
	}
	for _, tc := range cases {
		a, err := Parse(tc.in)
		if tc.err != nil {
			if !errors.Is(err, tc.err) {
				t.Errorf("Parse(%q): %v, want %v", tc.in, err, tc.err)
			}
			continue
		}
		if err != nil {
			t.Errorf("Parse(%q): %v", tc.in, err)
			continue
		}
		if a.Local != tc.local || a.Domain != tc.domain || a.String() != tc.str {
			t.Errorf("Parse(%q) = %+v %q", tc.in, a, a.String())
		}
		if tc.key != "" && a.Key() != tc.key {
			t.Errorf("Parse(%q).Key() = %q, want %q", tc.in, a.Key(), tc.key)
		}
	}
}

// FuzzParse checks the properties the relay's no-open-relay promise rests
// on, for any input: an accepted address has a local part free of
// relaying characters, a domain in canonical form (lower case, A-labels,
// normalizing it again changes nothing), and String gives back an address
// that parses to the same mailbox.
func FuzzParse(f *testing.F) {
	for _, s := range []string{"bob@example.test", "Zoë@Bücher.Example.", "john doe@example.test", `a"b\c@x.test`,
		"bob%x@example.test", "x!y@example.test", "a@b@c.test", "bob@[1.2.3.4]", "bob@xn--exmple-4nf.test", "ｂｏｂ@ｅｘａｍｐｌｅ.test"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		a, err := Parse(s)
		if err != nil {
			if !errors.Is(err, ErrSyntax) && !errors.Is(err, ErrRelayTrick) {
				t.Fatalf("Parse(%q): error %v is neither ErrSyntax nor ErrRelayTrick", s, err)
			}
			return
		}
		if strings.ContainsAny(a.Local, "@%!\x00\r\n") || !utf8.ValidString(a.Local) {
			t.Fatalf("Parse(%q): local part %q", s, a.Local)
		}
		if a.Domain != strings.ToLower(a.Domain) || strings.ContainsAny(a.Domain, "@[]% ") || !isASCII(a.Domain) {
			t.Fatalf("Parse(%q): domain %q not canonical", s, a.Domain)
		}
		if d, err := NormalizeDomain(a.Domain); err != nil || d != a.Domain {
			t.Fatalf("Parse(%q): normalizing domain %q again gives %q, %v", s, a.Domain, d, err)
		}
		// String quotes; go-smtp would unquote it before Parse.
		back, err := Parse(unquoteForTest(a.String()))
		if err != nil || back != a {
			t.Fatalf("Parse(%q) = %+v, String %q parses to %+v, %v", s, a, a.String(), back, err)
		}
	})
}

func isASCII(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] >= 0x80 {
			return false
		}
	}
	return true
}

// unquoteForTest undoes String's quoting the way go-smtp's path parser
// does: a backslash takes the next byte literally.
func unquoteForTest(s string) string {
	if !strings.HasPrefix(s, `"`) {
		return s
	}
	at := strings.LastIndexByte(s, '@')
	q := s[1 : at-1]
	var b strings.Builder
	for i := 0; i < len(q); i++ {
		if q[i] == '\\' {
			i++
		}
		b.WriteByte(q[i])
	}
	return b.String() + s[at:]
}
