package queue

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/synadia-io/orbit.go/jetstreamext"

	"github.com/mxq-dev/mxq/queue/envelope"
)

// Kinds of records Walk visits.
type Kind int

const (
	Queued Kind = iota // mail waiting for delivery
	Dead               // dead letters
)

func (s *Store) subjectOf(k Kind) string {
	if k == Dead {
		return s.prefix + ".dlq.>"
	}
	return s.prefix + ".q.>"
}

// ErrStop ends a Walk early without an error.
var ErrStop = errors.New("stop walking")

// ErrIncomplete reports a Walk that could not reach the end of the records
// it was asked for: the server stopped answering, or answered too slowly.
// It is never returned as a silent short walk, because callers delete or
// purge on the strength of what a walk did not find.
var ErrIncomplete = errors.New("walk of the queue incomplete")

// Walk calls fn for each record of kind k from sequence from on, in
// sequence order, reading headers only: the envelopes travel, the message
// bodies stay on disk. That is what makes listing and filtering a queue of
// millions cheap, and bulk actions run in constant memory: fn sees one
// record at a time. A Record from Walk has no Data; use Get for the body.
// Walk stops at the end of the stream as it was when it started, or when fn
// returns an error (ErrStop for a clean stop). It returns the sequence to
// start from to continue.
//
// The end is known, never guessed: a wait that brings nothing is not taken
// for the end of the records (a slow server looks exactly like that); the
// stream leader is asked whether any matching record remains up to the
// end, and only its "none" ends the walk. While it says there are more,
// the walk waits longer; if it makes no progress for walkStallLimit × the
// store's timeout, it fails with ErrIncomplete.
func (s *Store) Walk(ctx context.Context, k Kind, from uint64, fn func(Record) error) (next uint64, err error) {
	if from == 0 {
		from = 1
	}
	next = from
	last, err := s.LastSeq(ctx)
	if err != nil {
		return next, err
	}
	if from > last {
		return next, nil
	}
	subject := s.subjectOf(k)
	cons, err := s.js.OrderedConsumer(ctx, s.o.Stream, jetstream.OrderedConsumerConfig{
		FilterSubjects:    []string{subject},
		DeliverPolicy:     jetstream.DeliverByStartSequencePolicy,
		OptStartSeq:       from,
		HeadersOnly:       true,
		InactiveThreshold: 30 * time.Second,
	})
	if err != nil {
		return next, fmt.Errorf("walking the queue: %w", err)
	}
	// One consumer streams the records with flow control; the ordered
	// consumer starts over by itself after the last record it delivered
	// when it misses one, so nothing is skipped.
	it, err := cons.Messages(jetstream.PullMaxMessages(1024))
	if err != nil {
		return next, fmt.Errorf("walking the queue: %w", err)
	}
	defer it.Stop()
	wait := walkFirstWait
	progress := time.Now()
	for {
		if err := ctx.Err(); err != nil {
			return next, err
		}
		m, err := it.Next(jetstream.NextMaxWait(wait))
		if err == nil {
			progress = time.Now()
			md, err := m.Metadata()
			if err != nil {
				return next, err
			}
			r := Record{Seq: md.Sequence.Stream, Subject: m.Subject(), Stored: md.Timestamp}
			env, derr := envelope.Decode(envelope.Header(m.Headers()))
			if derr != nil {
				r.Err = derr
			} else {
				r.Env = env
			}
			next = r.Seq + 1
			if err := fn(r); err != nil {
				if errors.Is(err, ErrStop) {
					return next, nil
				}
				return next, err
			}
			if md.NumPending == 0 || r.Seq >= last {
				return next, nil
			}
			continue
		}
		if !errors.Is(err, nats.ErrTimeout) && !errors.Is(err, context.DeadlineExceeded) {
			return next, fmt.Errorf("walking the queue: %w", err)
		}
		// Nothing came. The end, or a server slower than the wait?
		more, err := s.remains(ctx, subject, next, last)
		if err != nil {
			return next, fmt.Errorf("walking the queue: %w", err)
		}
		if !more {
			return next, nil
		}
		if time.Since(progress) > walkStallLimit*s.o.Timeout {
			return next, fmt.Errorf("%w: no record arrived for %s at sequence %d, though the stream holds more up to %d",
				ErrIncomplete, time.Since(progress).Round(time.Second), next, last)
		}
		wait = min(2*wait, s.o.Timeout)
	}
}

// How long Walk first waits for a record, and how many store timeouts
// without one it tolerates while the leader says more remain.
const (
	walkFirstWait  = 500 * time.Millisecond
	walkStallLimit = 3
)

// Remains asks the stream leader whether a record on subject (a filter,
// wildcards allowed) is stored at a sequence in [from, last]: the
// authoritative answer to "have I read everything up to last?".
func (s *Store) Remains(ctx context.Context, subject string, from, last uint64) (bool, error) {
	return s.remains(ctx, subject, from, last)
}

func (s *Store) remains(ctx context.Context, subject string, from, last uint64) (bool, error) {
	ctx, cancel := context.WithTimeout(ctx, s.o.Timeout)
	defer cancel()
	m, err := s.leaderNext(ctx, subject, from)
	if err != nil {
		return false, err
	}
	return m != nil && m.Sequence <= last, nil
}

// Filter selects records for listing and bulk actions. Empty fields match
// everything.
type Filter struct {
	IDs       []string      // these queue IDs only
	From      string        // sender, exact (case-insensitive domain)
	To        string        // a recipient, exact
	Domain    string        // a recipient domain
	Route     string        // backend
	OlderThan time.Duration // arrived more than this long ago
	// Held, if set, must return true for a record to match (the control
	// plane's holds are not in the queue).
	Held func(id string) bool
}

// Match reports whether a record's envelope matches f at time now.
func (f *Filter) Match(env *envelope.Envelope, now time.Time) bool {
	if env == nil {
		return false
	}
	if len(f.IDs) > 0 {
		ok := false
		for _, id := range f.IDs {
			ok = ok || id == env.ID
		}
		if !ok {
			return false
		}
	}
	if f.From != "" && !equalAddr(env.From, f.From) {
		return false
	}
	if f.Route != "" && env.Route != f.Route {
		return false
	}
	if f.To != "" || f.Domain != "" {
		ok := false
		for _, r := range env.To {
			if f.To != "" && equalAddr(r, f.To) || f.Domain != "" && equalFold(domainOf(r), f.Domain) {
				ok = true
			}
		}
		if !ok {
			return false
		}
	}
	if f.OlderThan > 0 && now.Sub(env.Arrived) < f.OlderThan {
		return false
	}
	if f.Held != nil && !f.Held(env.ID) {
		return false
	}
	return true
}

func domainOf(addr string) string {
	for i := len(addr) - 1; i >= 0; i-- {
		if addr[i] == '@' {
			return addr[i+1:]
		}
	}
	return ""
}

// equalAddr compares mailboxes the way stores do: the local part
// case-insensitively too.
func equalAddr(a, b string) bool { return equalFold(a, b) }

func equalFold(a, b string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := 0; i < len(a); i++ {
		x, y := a[i], b[i]
		if 'A' <= x && x <= 'Z' {
			x += 'a' - 'A'
		}
		if 'A' <= y && y <= 'Z' {
			y += 'a' - 'A'
		}
		if x != y {
			return false
		}
	}
	return true
}

// Find returns the records of a queue ID, queued and dead: several when the
// message was split across backends or partly dead-lettered. The ID's
// timestamp says where in the stream to start: a record is stored when its
// message arrives, or later when it is rewritten.
func (s *Store) Find(ctx context.Context, id string) ([]Record, error) {
	at, err := envelope.IDTime(id)
	if err != nil {
		return nil, err
	}
	from, err := s.SeqAt(ctx, at.Add(-time.Second))
	if err != nil {
		return nil, err
	}
	var out []Record
	for _, k := range []Kind{Queued, Dead} {
		_, err := s.Walk(ctx, k, from, func(r Record) error {
			if r.Env != nil && r.Env.ID == id {
				out = append(out, r)
			}
			return nil
		})
		if err != nil {
			return nil, err
		}
	}
	return out, nil
}

// SeqAt is the first sequence stored at or after t (past the end if none
// is): where to start walking for records of messages that arrived then.
func (s *Store) SeqAt(ctx context.Context, t time.Time) (uint64, error) {
	ctx, cancel := context.WithTimeout(ctx, s.o.Timeout)
	defer cancel()
	it, err := jetstreamext.GetBatch(ctx, s.js, s.o.Stream, 1, jetstreamext.GetBatchStartTime(t), jetstreamext.GetBatchSubject(s.prefix+".>"))
	if err != nil {
		return 1, nil // scan from the start: slower, never wrong
	}
	for m, err := range it {
		if err != nil {
			if errors.Is(err, jetstreamext.ErrNoMessages) {
				last, err := s.LastSeq(ctx)
				return last + 1, err
			}
			return 1, nil
		}
		return m.Sequence, nil
	}
	return 1, nil
}

// Requeue rewrites a record to be tried now: a dead letter goes back to the
// queue with its attempts reset, a deferred record loses its wait.
func (s *Store) Requeue(ctx context.Context, r Record) error {
	if r.Env == nil {
		return fmt.Errorf("requeue of damaged record %d", r.Seq)
	}
	n := r.Env.Clone()
	n.Gen++
	n.NextAttempt = time.Time{}
	if r.Dead() {
		n.Attempts = 0
	}
	return s.Rewrite(ctx, r, []Output{{Env: n}})
}

// Delete removes a record and its body for good.
func (s *Store) Delete(ctx context.Context, r Record) error {
	return s.Complete(ctx, r)
}

// OldestArrival returns the arrival time of the oldest record queued for a
// route, zero when none.
func (s *Store) OldestArrival(ctx context.Context, route string) (time.Time, error) {
	recs, _, err := s.ReadFrom(ctx, s.QueueSubject(route), 1, 1, 1)
	if err != nil || len(recs) == 0 || recs[0].Env == nil {
		return time.Time{}, err
	}
	// Retries are rewritten at the end of the stream, so the first record
	// is the oldest but for them; good enough for an age gauge, and exact
	// for a backlog that has not been retried.
	return recs[0].Env.Arrived, nil
}
