package queue

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/nats-io/nats.go/jetstream"
)

// gone must recognise "that record is not there" in every form the client
// library hands it over, and nothing else: a delete that failed for another
// reason has to be retried.
func TestGone(t *testing.T) {
	noMsg := &jetstream.APIError{Code: 500, ErrorCode: errCodeMsgDeleteFailed, Description: "no message found"}
	other := &jetstream.APIError{Code: 500, ErrorCode: errCodeMsgDeleteFailed, Description: "stream store failed"}
	cases := []struct {
		name string
		err  error
		want bool
	}{
		{"not found", jetstream.ErrMsgNotFound, true},
		{"API error 10037", &jetstream.APIError{Code: 404, ErrorCode: jetstream.JSErrCodeMessageNotFound, Description: "no message found"}, true},
		{"10057 wrapped", fmt.Errorf("deleting: %w", noMsg), true},
		// nats.go's DeleteMsg, as of v1.55: the API error becomes text.
		{"10057 flattened", fmt.Errorf("%w: %s", jetstream.ErrMsgDeleteUnsuccessful, noMsg.Error()), true},
		{"other delete failure", fmt.Errorf("%w: %s", jetstream.ErrMsgDeleteUnsuccessful, other.Error()), false},
		{"timeout", context.DeadlineExceeded, false},
		{"no responders", jetstream.ErrNoStreamResponse, false},
		{"plain", errors.New("write error"), false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if got := gone(tc.err); got != tc.want {
				t.Fatalf("gone(%v) = %v, want %v", tc.err, got, tc.want)
			}
		})
	}
}

// A follower that lags answers a batch read short; the leader fills in.
// Simulated by handing completeFromLeader the first records only, as such
// a follower would have returned them.
func TestCompleteFromLeader(t *testing.T) {
	s := newTestStore(t, nil)
	ctx := context.Background()
	for i := 0; i < 5; i++ {
		if err := s.Enqueue(ctx, testEnv(fmt.Sprintf("u%d@example.test", i)), strings.NewReader("Subject: x\r\n\r\nhi\r\n")); err != nil {
			t.Fatal(err)
		}
	}
	// A record on another route in between must not be picked up.
	if err := s.Enqueue(ctx, testEnv("v@other.test"), strings.NewReader("Subject: y\r\n\r\nhi\r\n")); err != nil {
		t.Fatal(err)
	}
	subj := s.QueueSubject("store")
	all := readAll(t, s, "store")
	if len(all) != 5 {
		t.Fatalf("%d records queued", len(all))
	}
	cases := []struct {
		name                string
		have, max, maxBytes int
		want                int
	}{
		{"follower had two", 2, 64, 0, 5},
		{"follower had none", 0, 64, 0, 5},
		{"window smaller than what is missing", 1, 3, 0, 3},
		// The byte bound holds for what the leader adds, as for the rest.
		{"byte limit reached by the first added", 0, 64, 1, 1},
		{"nothing missing", 5, 64, 0, 5},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got, _, err := s.completeFromLeader(ctx, subj, 1, tc.max, tc.maxBytes, append([]Record(nil), all[:tc.have]...))
			if err != nil {
				t.Fatal(err)
			}
			if len(got) != tc.want {
				t.Fatalf("%d records, want %d", len(got), tc.want)
			}
			for i, r := range got {
				if r.Seq != all[i].Seq || r.Env == nil || r.Env.ID != all[i].Env.ID || string(r.Data) != string(all[i].Data) {
					t.Fatalf("record %d: seq %d id %v, want seq %d id %s", i, r.Seq, r.Env, all[i].Seq, all[i].Env.ID)
				}
			}
		})
	}
}
