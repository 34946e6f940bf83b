package queue

import (
	"context"
	"errors"
	"fmt"
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
