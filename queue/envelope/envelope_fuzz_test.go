package envelope

import (
	"bytes"
	"errors"
	"reflect"
	"strings"
	"testing"
	"time"
)

// parseHeaderBlock reads "Key: value" lines the way a record's headers
// reach Decode: names kept as written (NATS headers are case-preserving),
// a name repeated gives several values, the NATS/1.0 status line skipped.
func parseHeaderBlock(b []byte) Header {
	h := Header{}
	for _, line := range bytes.Split(b, []byte("\n")) {
		line = bytes.TrimSuffix(line, []byte("\r"))
		if bytes.HasPrefix(line, []byte("NATS/")) {
			continue
		}
		k, v, ok := bytes.Cut(line, []byte(":"))
		if !ok || len(k) == 0 {
			continue
		}
		h[string(k)] = append(h[string(k)], strings.TrimLeft(string(v), " \t"))
	}
	return h
}

// FuzzDecode feeds Decode arbitrary header blocks (a record damaged on
// disk, or written by a future version). Decode must not panic, must
// report problems as ErrBadHeader, and whatever it accepts must survive
// Encode and Decode again unchanged: the drain rewrites records it read.
func FuzzDecode(f *testing.F) {
	arrived := time.Date(2026, 11, 22, 10, 0, 0, 123456789, time.UTC)
	for _, e := range []Envelope{
		{ID: "00D20GXKE3R002B7DMY9", From: "a@example.org", To: []string{"b@example.test"}, Arrived: arrived, Route: "store", Size: 10},
		{ID: "00D20GXKE3R002B7DMYA", Part: 2, Gen: 3, Rev: "17.1", Kind: KindDSN, From: "", To: []string{`"a b"@example.test`, "zoë@xn--bcher-kva.example"},
			Arrived: arrived, ClientAddr: "2001:db8::1", Helo: "mx.example.org", UTF8: true, Route: "store", Attempts: 4,
			NextAttempt: arrived.Add(time.Hour), Errors: []string{"452 4.2.2 full", ""}, Size: 1 << 30, Chunks: 3, BodyToken: "00D20GXKE3R002B7DMYA.2"},
	} {
		h := Header{}
		if err := e.Encode(h); err != nil {
			f.Fatal(err)
		}
		var b bytes.Buffer
		b.WriteString("NATS/1.0\r\n")
		for k, vs := range h {
			for _, v := range vs {
				b.WriteString(k + ": " + v + "\r\n")
			}
		}
		f.Add(b.Bytes())
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		h := parseHeaderBlock(b)
		e, err := Decode(h)
		if err != nil {
			if !errors.Is(err, ErrBadHeader) {
				t.Fatalf("Decode error %v is not ErrBadHeader", err)
			}
			return
		}
		if e.ID == "" || len(e.To) == 0 || e.Size < 0 || e.Attempts < 0 || e.Chunks < 0 {
			t.Fatalf("Decode accepted an impossible envelope %+v", e)
		}
		h2 := Header{}
		if err := e.Encode(h2); err != nil {
			if !errors.Is(err, ErrBadHeader) {
				t.Fatalf("Encode error %v is not ErrBadHeader", err)
			}
			return // values with CR or NUL: Encode refuses them, as it should
		}
		e2, err := Decode(h2)
		if err != nil {
			t.Fatalf("re-decoding what Decode accepted: %v\nfirst: %+v", err, e)
		}
		// Decode keeps a Mxq-Body without Mxq-Chunks, Encode writes the body
		// token only for chunked messages (found by this fuzzer; harmless:
		// the token means nothing without chunks).
		if e.Chunks == 0 {
			e.BodyToken = ""
		}
		// Encode writes times in UTC.
		e.Arrived, e.NextAttempt = e.Arrived.UTC(), e.NextAttempt.UTC()
		e2.Arrived, e2.NextAttempt = e2.Arrived.UTC(), e2.NextAttempt.UTC()
		if !reflect.DeepEqual(e, e2) {
			t.Fatalf("round trip changed the envelope:\n got %+v\nwant %+v", e2, e)
		}
	})
}
