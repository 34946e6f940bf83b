package queue

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/synadia-io/orbit.go/jetstreamext"

	"github.com/mxq-dev/mxq/queue/envelope"
)

// Record is a stored envelope record.
type Record struct {
	Seq     uint64
	Subject string
	Stored  time.Time
	Env     *envelope.Envelope
	// Data is the message when it is stored inline (Env.Chunks == 0).
	Data []byte
	// Err is set, and Env nil, when the record's headers cannot be
	// decoded: the record is kept and reported, never guessed at.
	Err error
}

// Dead reports whether the record is a dead letter.
func (r *Record) Dead() bool { return strings.Contains(r.Subject, ".dlq.") }

// ReadFrom returns up to max records on subject with sequence >= seq, in
// sequence order, reading at most about maxBytes of payload. pending is how
// many records on subject remain after the last one returned.
func (s *Store) ReadFrom(ctx context.Context, subject string, seq uint64, max, maxBytes int) (recs []Record, pending uint64, err error) {
	if seq == 0 {
		seq = 1
	}
	ctx, cancel := context.WithTimeout(ctx, s.o.Timeout)
	defer cancel()
	opts := []jetstreamext.GetBatchOpt{jetstreamext.GetBatchSeq(seq), jetstreamext.GetBatchSubject(subject)}
	if maxBytes > 0 {
		opts = append(opts, jetstreamext.GetBatchMaxBytes(maxBytes))
	}
	it, err := jetstreamext.GetBatch(ctx, s.js, s.o.Stream, max, opts...)
	if err != nil {
		return nil, 0, fmt.Errorf("reading %s: %w", subject, err)
	}
	for m, err := range it {
		if err != nil {
			if errors.Is(err, jetstreamext.ErrNoMessages) {
				return recs, 0, nil
			}
			return recs, 0, fmt.Errorf("reading %s: %w", subject, err)
		}
		recs = append(recs, toRecord(m))
		if np, err := strconv.ParseUint(m.Header.Get("Nats-Num-Pending"), 10, 64); err == nil {
			pending = np
		}
	}
	if s.o.Replicas > 1 && len(recs) < max && pending == 0 {
		// Short, and the replica that answered knew of nothing more (not
		// cut by maxBytes): it may have been behind.
		return s.completeFromLeader(ctx, subject, seq, max, maxBytes, recs)
	}
	return recs, pending, nil
}

// completeFromLeader makes a short read from a replicated stream whole.
//
// Direct gets, which batch reads are, may be answered by any replica, and a
// follower can be a few milliseconds behind the leader: it answers "that is
// all" while the leader already holds more. A reader that takes the end of
// a read for the end of the subject (the drain marks the range as read)
// would then miss those records until its next rescan. So a short read
// asks the leader for the next record after it and, while the leader has
// one, adds it: usually nothing (one round trip), after a fresh write the
// few records the follower had not applied yet.
//
// What it adds counts against max and maxBytes like the rest of the read;
// pending is 1 when it stopped at a bound (there may be more), else 0.
func (s *Store) completeFromLeader(ctx context.Context, subject string, seq uint64, max, maxBytes int, recs []Record) ([]Record, uint64, error) {
	from, size := seq, 0
	for _, r := range recs {
		from, size = r.Seq+1, size+len(r.Data)
	}
	for len(recs) < max && (maxBytes <= 0 || size < maxBytes) {
		m, err := s.leaderNext(ctx, subject, from)
		if err != nil {
			return recs, 0, fmt.Errorf("reading %s: %w", subject, err)
		}
		if m == nil {
			return recs, 0, nil
		}
		recs = append(recs, toRecord(m))
		from, size = m.Sequence+1, size+len(m.Data)
	}
	return recs, 1, nil
}

// leaderNext returns the first record on subject at or after seq, as the
// stream leader has it (the plain message-get API, which only the leader
// answers), or nil if there is none.
func (s *Store) leaderNext(ctx context.Context, subject string, seq uint64) (*jetstream.RawStreamMsg, error) {
	req, err := json.Marshal(struct {
		Seq  uint64 `json:"seq"`
		Next string `json:"next_by_subj"`
	}{seq, subject})
	if err != nil {
		return nil, err
	}
	resp, err := s.nc.RequestWithContext(ctx, "$JS.API.STREAM.MSG.GET."+s.o.Stream, req)
	if err != nil {
		return nil, err
	}
	var r struct {
		Error   *jetstream.APIError `json:"error"`
		Message *struct {
			Subject string    `json:"subject"`
			Seq     uint64    `json:"seq"`
			Header  []byte    `json:"hdrs"`
			Data    []byte    `json:"data"`
			Time    time.Time `json:"time"`
		} `json:"message"`
	}
	if err := json.Unmarshal(resp.Data, &r); err != nil {
		return nil, fmt.Errorf("message get: %w", err)
	}
	if r.Error != nil {
		if r.Error.ErrorCode == jetstream.JSErrCodeMessageNotFound {
			return nil, nil
		}
		return nil, r.Error
	}
	if r.Message == nil {
		return nil, errors.New("message get: empty answer")
	}
	m := &jetstream.RawStreamMsg{Subject: r.Message.Subject, Sequence: r.Message.Seq, Data: r.Message.Data, Time: r.Message.Time}
	if len(r.Message.Header) > 0 {
		if m.Header, err = nats.DecodeHeadersMsg(r.Message.Header); err != nil {
			return nil, fmt.Errorf("message get: %w", err)
		}
	}
	return m, nil
}

// Get returns the record at seq, or an error wrapping jetstream.ErrMsgNotFound.
func (s *Store) Get(ctx context.Context, seq uint64) (Record, error) {
	ctx, cancel := context.WithTimeout(ctx, s.o.Timeout)
	defer cancel()
	m, err := s.stream.GetMsg(ctx, seq)
	if err != nil {
		return Record{}, fmt.Errorf("record %d: %w", seq, err)
	}
	return toRecord(m), nil
}

func toRecord(m *jetstream.RawStreamMsg) Record {
	r := Record{Seq: m.Sequence, Subject: m.Subject, Stored: m.Time, Data: m.Data}
	env, err := envelope.Decode(envelope.Header(m.Header))
	if err != nil {
		r.Err = err
		return r
	}
	r.Env = env
	if env.Chunks > 0 {
		r.Data = nil
	}
	return r
}

// Body returns the stored message of a record, streaming the chunks of a
// large one.
func (s *Store) Body(ctx context.Context, r Record) io.Reader {
	if r.Env.Chunks == 0 {
		return bytes.NewReader(r.Data)
	}
	return &chunkReader{ctx: ctx, s: s, subject: s.chunkSubject(r.Env.BodyToken), id: r.Env.ID, left: r.Env.Chunks}
}

// ErrDamaged reports a record whose body cannot be read back complete.
var ErrDamaged = errors.New("queue record damaged")

type chunkReader struct {
	ctx     context.Context
	s       *Store
	subject string
	id      string
	seq     uint64 // next sequence to look from
	n       int    // next chunk index
	left    int
	cur     []byte
}

func (c *chunkReader) Read(p []byte) (int, error) {
	for len(c.cur) == 0 {
		if c.left == 0 {
			return 0, io.EOF
		}
		recs, err := c.s.readChunk(c.ctx, c.subject, c.seq)
		if err != nil {
			return 0, err
		}
		if recs.Header.Get(envelope.HdrID) != c.id || recs.Header.Get(hdrChunk) != strconv.Itoa(c.n) {
			return 0, fmt.Errorf("%w: chunk %d of %s missing", ErrDamaged, c.n, c.id)
		}
		c.cur, c.seq = recs.Data, recs.Sequence+1
		c.n++
		c.left--
	}
	n := copy(p, c.cur)
	c.cur = c.cur[n:]
	return n, nil
}

func (s *Store) readChunk(ctx context.Context, subject string, seq uint64) (*jetstream.RawStreamMsg, error) {
	if seq == 0 {
		seq = 1
	}
	ctx, cancel := context.WithTimeout(ctx, s.o.Timeout)
	defer cancel()
	it, err := jetstreamext.GetBatch(ctx, s.js, s.o.Stream, 1, jetstreamext.GetBatchSeq(seq), jetstreamext.GetBatchSubject(subject))
	if err != nil {
		return nil, err
	}
	for m, err := range it {
		if errors.Is(err, jetstreamext.ErrNoMessages) {
			return nil, fmt.Errorf("%w: chunk missing on %s", ErrDamaged, subject)
		}
		return m, err
	}
	return nil, fmt.Errorf("%w: chunk missing on %s", ErrDamaged, subject)
}

// Complete removes a delivered record and, for a large message, its chunks.
// The envelope goes first: a crash in between leaves orphan chunks, never
// an envelope without its body.
func (s *Store) Complete(ctx context.Context, r Record) error {
	if err := s.deleteSeq(ctx, r.Seq); err != nil {
		return err
	}
	if r.Env != nil && r.Env.Chunks > 0 {
		return s.purgeChunks(ctx, r.Env.BodyToken)
	}
	return nil
}

func (s *Store) deleteSeq(ctx context.Context, seq uint64) error {
	ctx, cancel := context.WithTimeout(ctx, s.o.Timeout)
	defer cancel()
	err := s.stream.DeleteMsg(ctx, seq)
	if err != nil && gone(err) {
		// Seen after JetStream restarted from a full disk: the record read
		// a moment ago, the server says it holds no such message.
		s.log.Warn("deleting a record the store no longer holds; taken as deleted", "seq", seq, "err", err)
		err = nil
	}
	if err != nil {
		return fmt.Errorf("deleting record %d: %w", seq, err)
	}
	s.tombs.add(seq)
	return nil
}

// gone reports a delete of a record that is not there (any more): the goal
// is reached. The server says so as "message not found" (10037), or, for a
// sequence it forgot after a restart, as a failed delete (10057) whose text
// is "no message found".
func gone(err error) bool {
	var apiErr *jetstream.APIError
	if errors.As(err, &apiErr) && (apiErr.ErrorCode == jetstream.JSErrCodeMessageNotFound ||
		apiErr.ErrorCode == errCodeMsgDeleteFailed && strings.Contains(apiErr.Description, "no message found")) {
		return true
	}
	if errors.Is(err, jetstream.ErrMsgDeleteUnsuccessful) && strings.Contains(err.Error(), "no message found") {
		// nats.go (v1.55) flattens the server's API error into the text of
		// ErrMsgDeleteUnsuccessful, so errors.As above does not see it.
		return true
	}
	return errors.Is(err, jetstream.ErrMsgNotFound) || strings.Contains(err.Error(), "not found")
}

func (s *Store) purgeChunks(ctx context.Context, token string) error {
	ctx, cancel := context.WithTimeout(ctx, s.o.Timeout)
	defer cancel()
	if err := s.stream.Purge(ctx, jetstream.WithPurgeSubject(s.chunkSubject(token))); err != nil {
		return fmt.Errorf("purging chunks %s: %w", token, err)
	}
	return nil
}

// Output is one record that replaces another (see Rewrite).
type Output struct {
	Env *envelope.Envelope
	// Dead files the record as a dead letter instead of queueing it.
	Dead bool
	// Data, when not nil, is a new message (a DSN); otherwise the record
	// keeps the replaced record's message.
	Data []byte
}

// Rewrite replaces r by outs in one atomic batch: the recipients still to
// try, the dead letters, the reports. Then r is deleted. A crash between
// the two leaves r and its replacements: some recipients may get the
// message twice, none loses it.
func (s *Store) Rewrite(ctx context.Context, r Record, outs []Output) error {
	if r.Env == nil {
		return fmt.Errorf("rewrite of damaged record %d", r.Seq)
	}
	var msgs []*nats.Msg
	bodyUsers := 0
	for i, o := range outs {
		env := o.Env
		// Unique per rewrite, identical when this rewrite is retried.
		env.Rev = fmt.Sprintf("%d.%d", r.Seq, i)
		subject := s.QueueSubject(env.Route)
		if o.Dead {
			subject = s.DeadSubject(env.Route)
		}
		data := o.Data
		if data == nil {
			data = r.Data
			env.Size, env.Chunks, env.BodyToken = r.Env.Size, r.Env.Chunks, r.Env.BodyToken
			if r.Env.Chunks > 0 {
				bodyUsers++
				if bodyUsers > 1 {
					// Every record owns its chunks: the second user of the
					// body gets a copy, so deleting one never breaks another.
					env.BodyToken = fmt.Sprintf("%s.%d.%d-%d", env.ID, env.Part, r.Seq, i)
					if err := s.copyChunks(ctx, r.Env, env); err != nil {
						return err
					}
				}
			}
		} else {
			env.Size, env.Chunks, env.BodyToken = int64(len(data)), 0, ""
		}
		m, err := s.record(subject, env, data)
		if err != nil {
			return err
		}
		msgs = append(msgs, m)
	}
	if len(msgs) > 0 {
		if err := s.w.publishAll(ctx, msgs); err != nil {
			return err
		}
		s.wake()
	}
	if err := s.deleteSeq(ctx, r.Seq); err != nil {
		return err
	}
	if r.Env.Chunks > 0 && bodyUsers == 0 {
		return s.purgeChunks(ctx, r.Env.BodyToken)
	}
	return nil
}

// copyChunks stores a copy of src's chunks under dst.BodyToken.
func (s *Store) copyChunks(ctx context.Context, src, dst *envelope.Envelope) error {
	from := s.chunkSubject(src.BodyToken)
	seq := uint64(1)
	for i := 0; i < src.Chunks; i++ {
		m, err := s.readChunk(ctx, from, seq)
		if err != nil {
			return err
		}
		if err := s.storeChunk(ctx, dst, i, m.Data); err != nil {
			return err
		}
		seq = m.Sequence + 1
	}
	return nil
}

// Info is the stream's state.
type Info struct {
	Messages uint64
	Bytes    uint64
	FirstSeq uint64
	LastSeq  uint64
	// Queued and Dead count records per route.
	Queued map[string]uint64
	Dead   map[string]uint64
}

// Info returns counts per route of queued records and dead letters.
func (s *Store) Info(ctx context.Context) (Info, error) {
	ctx, cancel := context.WithTimeout(ctx, s.o.Timeout)
	defer cancel()
	si, err := s.stream.Info(ctx, jetstream.WithSubjectFilter(s.prefix+".*.*"))
	if err != nil {
		return Info{}, fmt.Errorf("stream info: %w", err)
	}
	in := Info{
		Messages: si.State.Msgs, Bytes: si.State.Bytes,
		FirstSeq: si.State.FirstSeq, LastSeq: si.State.LastSeq,
		Queued: map[string]uint64{}, Dead: map[string]uint64{},
	}
	qp, dp := s.prefix+".q.", s.prefix+".dlq."
	for subj, n := range si.State.Subjects {
		switch {
		case strings.HasPrefix(subj, qp):
			in.Queued[subj[len(qp):]] = n
		case strings.HasPrefix(subj, dp):
			in.Dead[subj[len(dp):]] = n
		}
	}
	return in, nil
}

// LastSeq is the stream's last sequence number, cheap enough to poll.
func (s *Store) LastSeq(ctx context.Context) (uint64, error) {
	ctx, cancel := context.WithTimeout(ctx, s.o.Timeout)
	defer cancel()
	si, err := s.stream.Info(ctx)
	if err != nil {
		return 0, fmt.Errorf("stream info: %w", err)
	}
	return si.State.LastSeq, nil
}

// StreamState is what a reader following the stream needs to know of it.
type StreamState struct {
	// Created identifies the stream: a stream deleted and made again has
	// another creation time, and an index of the old one is worthless.
	Created  time.Time
	FirstSeq uint64
	LastSeq  uint64
}

// State returns the stream's identity and bounds.
func (s *Store) State(ctx context.Context) (StreamState, error) {
	ctx, cancel := context.WithTimeout(ctx, s.o.Timeout)
	defer cancel()
	si, err := s.stream.Info(ctx)
	if err != nil {
		return StreamState{}, fmt.Errorf("stream info: %w", err)
	}
	return StreamState{Created: si.Created, FirstSeq: si.State.FirstSeq, LastSeq: si.State.LastSeq}, nil
}
