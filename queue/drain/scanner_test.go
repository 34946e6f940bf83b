package drain

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/mxq-dev/mxq/internal/teststore"
	"github.com/mxq-dev/mxq/queue"
	"github.com/mxq-dev/mxq/queue/envelope"
)

// A read that stops at the byte limit covers only the records it returned:
// the rest of the range must come in the next windows, not wait for a
// rescan a minute later.
func TestScannerByteLimitedWindows(t *testing.T) {
	st, _ := teststore.Start(t, func(o *queue.Options) { o.ChunkSize = 1 << 20 })
	const n = 7
	want := map[string]bool{}
	for i := 0; i < n; i++ {
		env := &envelope.Envelope{ID: ids.New(), From: "a@example.org", To: []string{"u@example.test"}, Arrived: time.Now().UTC()}
		// 600 KiB: one record each, five of them over the 3 MiB limit.
		msg := fmt.Sprintf("Subject: %d\r\n\r\n%s\r\n", i, strings.Repeat("x", 600<<10))
		if err := st.Enqueue(context.Background(), env, strings.NewReader(msg)); err != nil {
			t.Fatal(err)
		}
		want[env.ID] = true
	}
	last, err := st.LastSeq(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, newest := range []bool{false, true} {
		t.Run(fmt.Sprintf("newest=%v", newest), func(t *testing.T) {
			sc := &scanner{src: st, subject: st.QueueSubject("store"), newest: newest, window: 64, bytes: 3 << 20}
			sc.extend(last)
			got := map[string]bool{}
			reads := 0
			for !sc.empty() && reads < 20 {
				recs, err := sc.next(context.Background())
				if err != nil {
					t.Fatal(err)
				}
				reads++
				for _, r := range recs {
					got[r.Env.ID] = true
				}
			}
			if len(got) != n || reads < 2 {
				t.Fatalf("scanned %d of %d records in %d reads", len(got), n, reads)
			}
		})
	}
}
