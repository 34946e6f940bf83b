package relay

import (
	"testing"
	"time"

	"github.com/mxq-dev/mxq/queue/envelope"
)

func TestReceived(t *testing.T) {
	now := time.Date(2026, 11, 22, 23, 5, 9, 0, time.FixedZone("", 3600))
	cases := []struct {
		name string
		env  envelope.Envelope
		tls  bool
		want string
	}{
		{"one recipient", envelope.Envelope{ID: "00D20NNGHW800XM1C9KQ", Helo: "client.example.org", ClientAddr: "192.0.2.7", To: []string{"bob@example.test"}}, false,
			"Received: from client.example.org ([192.0.2.7])\r\n\tby mx.example.test (mxq) with ESMTP id 00D20NNGHW800XM1C9KQ\r\n\tfor <bob@example.test>;\r\n\tSun, 22 Nov 2026 23:05:09 +0100\r\n"},
		{"two recipients, TLS", envelope.Envelope{ID: "00D20NNGHW800XM1C9KR", Helo: "c", ClientAddr: "2001:db8::1", To: []string{"a@example.test", "b@example.test"}}, true,
			"Received: from c ([2001:db8::1])\r\n\tby mx.example.test (mxq) with ESMTPS id 00D20NNGHW800XM1C9KR;\r\n\tSun, 22 Nov 2026 23:05:09 +0100\r\n"},
		{"SMTPUTF8 over TLS", envelope.Envelope{ID: "X", Helo: "h", ClientAddr: "127.0.0.1", To: []string{"jörg@example.test"}, UTF8: true}, true,
			"Received: from h ([127.0.0.1])\r\n\tby mx.example.test (mxq) with UTF8SMTPS id X\r\n\tfor <jörg@example.test>;\r\n\tSun, 22 Nov 2026 23:05:09 +0100\r\n"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if got := received(&tc.env, "mx.example.test", tc.tls, now); got != tc.want {
				t.Fatalf("got  %q\nwant %q", got, tc.want)
			}
		})
	}
}
