package envelope

import (
	"errors"
	"reflect"
	"sort"
	"testing"
	"time"
)

func TestRoundTrip(t *testing.T) {
	arrived := time.Date(2026, 11, 22, 10, 0, 0, 123456789, time.UTC)
	cases := []struct {
		name string
		env  Envelope
	}{
		{"plain", Envelope{ID: "0000000000000000000A", From: "a@example.org", To: []string{"b@example.test"}, Arrived: arrived, Route: "store", Size: 10}},
		{"null sender", Envelope{ID: "0000000000000000000B", From: "", To: []string{"b@example.test", "c@example.test"}, Arrived: arrived, Route: "store"}},
		{"non-ascii", Envelope{ID: "0000000000000000000C", From: "josé@exämple.org", To: []string{"用户@例子.测试", "zoë@example.test"}, Arrived: arrived, Route: "store", UTF8: true, Helo: "mx.exämple.org", ClientAddr: "2001:db8::1"}},
		{"retry state", Envelope{ID: "0000000000000000000D", Part: 2, Gen: 3, Rev: "1234.1", Kind: KindDSN, From: "x@y.z", To: []string{"a@example.test", "b@example.test"}, Arrived: arrived, Route: "r",
			Attempts: 4, NextAttempt: arrived.Add(time.Hour), Errors: []string{"452 4.2.2 mailbox full", ""}, Size: 1 << 30, Chunks: 12, BodyToken: "0000000000000000000D.2"}},
		{"quoted local part", Envelope{ID: "0000000000000000000E", From: `"john doe"@example.org`, To: []string{`"a b"@example.test`}, Arrived: arrived, Route: "store"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			h := Header{}
			if err := tc.env.Encode(h); err != nil {
				t.Fatal(err)
			}
			got, err := Decode(h)
			if err != nil {
				t.Fatal(err)
			}
			want := tc.env
			if !reflect.DeepEqual(*got, want) {
				t.Fatalf("round trip:\n got %+v\nwant %+v", *got, want)
			}
		})
	}
}

func TestMsgID(t *testing.T) {
	cases := []struct {
		part int
		rev  string
		want string
	}{
		{0, "", "Q"}, {1, "", "Q.1"}, {0, "17.0", "Q#17.0"}, {3, "9.1", "Q.3#9.1"},
	}
	for _, tc := range cases {
		e := Envelope{ID: "Q", Part: tc.part, Rev: tc.rev, Gen: 5}
		if got := e.MsgID(); got != tc.want {
			t.Errorf("part %d rev %q: %q, want %q", tc.part, tc.rev, got, tc.want)
		}
	}
}

func TestEncodeRefusesLineBreaks(t *testing.T) {
	for _, e := range []Envelope{
		{ID: "Q", From: "a\r\nX-Evil: 1@x", To: []string{"b@c"}},
		{ID: "Q", From: "a@b", To: []string{"b@c"}, Helo: "evil\nhelo"},
		{ID: "Q", From: "a@b", To: []string{"b\x00@c"}},
		{ID: "", From: "a@b", To: []string{"b@c"}},
		{ID: "Q", From: "a@b"},
		{ID: "Q", From: "a@b", To: []string{"b@c"}, Errors: []string{"x", "y"}},
	} {
		if err := e.Encode(Header{}); !errors.Is(err, ErrBadHeader) {
			t.Errorf("%+v: err %v, want ErrBadHeader", e, err)
		}
	}
}

func TestDecodeReportsDamage(t *testing.T) {
	good := Header{}
	e := Envelope{ID: "Q", From: "a@b", To: []string{"b@c"}, Arrived: time.Unix(1, 0), Route: "r"}
	if err := e.Encode(good); err != nil {
		t.Fatal(err)
	}
	cases := map[string]func(h Header){
		"no id":          func(h Header) { delete(h, HdrID) },
		"no from":        func(h Header) { delete(h, HdrFrom) },
		"no to":          func(h Header) { delete(h, HdrTo) },
		"bad brackets":   func(h Header) { h[HdrTo] = []string{"b@c"} },
		"bad time":       func(h Header) { h[HdrArrived] = []string{"yesterday"} },
		"no time":        func(h Header) { delete(h, HdrArrived) },
		"bad attempts":   func(h Header) { h[HdrAttempts] = []string{"-1"} },
		"bad size":       func(h Header) { h[HdrSize] = []string{"big"} },
		"errors vs rcpt": func(h Header) { h[HdrError] = []string{"a", "b"} },
	}
	for name, damage := range cases {
		t.Run(name, func(t *testing.T) {
			h := Header{}
			for k, v := range good {
				h[k] = append([]string(nil), v...)
			}
			damage(h)
			if _, err := Decode(h); !errors.Is(err, ErrBadHeader) {
				t.Fatalf("err %v, want ErrBadHeader", err)
			}
		})
	}
}

func TestIDsSortByTime(t *testing.T) {
	now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	clock := func() time.Time { return now }
	a := NewIDGen(clock, 0xffffffff)
	b := NewIDGen(clock, 0)
	var ids []string
	for i := 0; i < 70000; i++ { // crosses the 16-bit counter
		ids = append(ids, a.New())
	}
	if !sort.StringsAreSorted(ids) {
		t.Fatal("IDs from one generator are not increasing")
	}
	seen := map[string]bool{}
	for _, id := range ids {
		if seen[id] {
			t.Fatalf("duplicate %s", id)
		}
		seen[id] = true
		if !ValidID(id) {
			t.Fatalf("invalid %q", id)
		}
	}
	// A later millisecond on another node sorts after.
	now = now.Add(time.Second)
	later := b.New()
	if later <= ids[len(ids)-1] {
		t.Fatalf("%s (later, other node) <= %s", later, ids[len(ids)-1])
	}
	got, err := IDTime(later)
	if err != nil || !got.Equal(now) {
		t.Fatalf("IDTime = %v, %v; want %v", got, err, now)
	}
	// The clock stepping back keeps IDs increasing.
	now = now.Add(-time.Hour)
	if back := b.New(); back <= later {
		t.Fatalf("after clock step back %s <= %s", back, later)
	}
	if _, err := IDTime("short"); !errors.Is(err, ErrBadID) {
		t.Fatalf("IDTime(short) err = %v", err)
	}
}
