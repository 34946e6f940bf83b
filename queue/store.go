// Package queue is mxq's durable mail queue on a NATS JetStream stream.
//
// One stream holds everything, under the subject prefix p (the stream name
// in lower case):
//
//	p.q.<route>    a queued record: envelope in headers, message as payload
//	p.dlq.<route>  a dead letter: same shape, kept until an operator acts
//	p.c.<token>    the chunks of a message too large for one record
//	p.x            tombstones: which records were deleted (tombstone.go)
//
// The stream is the only state: a record present in p.q is mail not yet
// delivered, and delivering it deletes it. There is no consumer state to
// lose or replicate; the drainer scans the stream by sequence, which also
// lets it go newest-first. Retention is "limits" with no limits but MaxBytes
// and DiscardNew, so a full stream refuses new mail (the relay answers 452)
// and never drops queued mail.
//
// Writes that must appear together are one atomic batch: the chunks of a
// large message and its envelope, the records of a message split across
// routes, and the messages of many SMTP sessions gathered by the group
// committer so that one fsync covers them all.
package queue

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/mxq-dev/mxq/queue/envelope"
)

// Errors callers map to SMTP replies. Every error Enqueue returns for a
// storage problem wraps one of them; errors from reading the message
// (too large, client timeout) are returned as the reader gave them.
var (
	// ErrFull: the stream or the disk is full (452 4.3.1).
	ErrFull = envelope.ErrStorageFull
	// ErrUnavailable: the store did not confirm the write (451 4.3.0).
	ErrUnavailable = envelope.ErrStorageUnavailable
)

// Durability modes; see config.Queue.Durability.
const (
	DurabilityGroup  = "group"
	DurabilitySingle = "single"
	DurabilityUnsafe = "unsafe"
)

// Options configures a Store.
type Options struct {
	Stream   string
	Replicas int
	MaxBytes int64 // 0: unlimited
	// Durability selects the write path: "group" gathers concurrent
	// messages into atomic batches, "single" and "unsafe" publish each
	// message on its own (unsafe differs only in the server's fsync
	// setting, which is not the Store's business).
	Durability       string
	GroupMaxMessages int
	GroupMaxBytes    int
	// GroupLinger is the longest a batch waits for more messages when the
	// committer is busy; 0: never.
	GroupLinger time.Duration
	Committers  int
	// ChunkSize is the largest message stored as a single record and the
	// size of each chunk of larger ones.
	ChunkSize int
	// Timeout bounds one store operation.
	Timeout time.Duration
	// Origin names this node on the chunk records it writes (see
	// CollectOrphans).
	Origin string
	// Route names the route (backend) for a normalized recipient domain.
	Route func(domain string) string
	// Connect, if set, opens extra connections: each committer gets its
	// own, because the server handles one connection's messages in order,
	// and one batch's fsync would otherwise hold up the next batch.
	Connect func(name string) (*nats.Conn, error)
	// TombstoneTTL is how long a tombstone stays in the stream, and
	// TombstoneInterval how long deletions are gathered into one (see
	// tombstone.go); zero: the defaults.
	TombstoneTTL      time.Duration
	TombstoneInterval time.Duration
	// Memory is the budget message buffers are reserved from (see
	// intake.go); nil: no bound.
	Memory Memory
	Logger *slog.Logger
}

// Store is the queue.
type Store struct {
	o       Options
	nc      *nats.Conn
	js      jetstream.JetStream
	w       *writer // on nc
	extra   []*nats.Conn
	stream  jetstream.Stream
	prefix  string
	log     *slog.Logger
	commit  *committer
	tombs   *tombstones
	bufPool sync.Pool // of *[]byte, bufStep bytes each
	spills  atomic.Uint64

	notifyMu sync.Mutex
	notify   []chan struct{}
}

// Open creates or updates the stream and starts the group committer.
func Open(ctx context.Context, nc *nats.Conn, o Options) (*Store, error) {
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.Timeout <= 0 {
		o.Timeout = 10 * time.Second
	}
	if o.ChunkSize <= 0 {
		o.ChunkSize = 4 << 20
	}
	if max := int(nc.MaxPayload()) - 64<<10; o.ChunkSize > max {
		// An external server may allow less than we were configured for.
		o.ChunkSize = max
	}
	js, err := jetstream.New(nc, jetstream.WithDefaultTimeout(o.Timeout))
	if err != nil {
		return nil, fmt.Errorf("jetstream: %w", err)
	}
	s := &Store{o: o, nc: nc, js: js, prefix: strings.ToLower(o.Stream), log: o.Logger}
	s.w = &writer{nc: nc, js: js, timeout: o.Timeout}
	maxBytes := o.MaxBytes
	if maxBytes <= 0 {
		maxBytes = -1
	}
	cfg := jetstream.StreamConfig{
		Name:        o.Stream,
		Description: "mxq mail queue",
		Subjects:    []string{s.prefix + ".>"},
		Storage:     jetstream.FileStorage,
		Replicas:    o.Replicas,
		Retention:   jetstream.LimitsPolicy,
		// DiscardNew: a full stream refuses writes; the default DiscardOld
		// would silently delete the oldest queued mail.
		Discard:            jetstream.DiscardNew,
		MaxBytes:           maxBytes,
		MaxMsgs:            -1,
		MaxMsgsPerSubject:  -1,
		Duplicates:         2 * time.Minute,
		AllowDirect:        true,
		AllowAtomicPublish: true,
	}
	var st jetstream.Stream
	for {
		cctx, cancel := context.WithTimeout(ctx, o.Timeout)
		st, err = ensureStream(cctx, js, cfg)
		cancel()
		if err == nil {
			break
		}
		// In a cluster the meta leader may not be elected yet.
		s.log.Warn("creating stream, will retry", "stream", o.Stream, "err", err)
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("creating stream %s: %w", o.Stream, err)
		case <-time.After(time.Second):
		}
	}
	s.stream = st
	s.tombs = newTombstones(s, o.TombstoneTTL, o.TombstoneInterval)
	if o.Durability == DurabilityGroup {
		n := max(o.Committers, 1)
		writers := make([]*writer, n)
		for i := range writers {
			writers[i] = s.w
			if o.Connect == nil {
				continue
			}
			nc, err := o.Connect(fmt.Sprintf("mxq-commit-%d", i))
			if err != nil {
				s.Close()
				return nil, fmt.Errorf("committer connection: %w", err)
			}
			s.extra = append(s.extra, nc)
			cjs, err := jetstream.New(nc, jetstream.WithDefaultTimeout(o.Timeout))
			if err != nil {
				s.Close()
				return nil, err
			}
			writers[i] = &writer{nc: nc, js: cjs, timeout: o.Timeout}
		}
		s.commit = newCommitter(writers, o.GroupMaxMessages, o.GroupMaxBytes, o.GroupLinger)
	}
	return s, nil
}

// ensureStream creates the stream, or updates it if its configuration
// differs in what mxq sets. An unchanged stream is left alone: an update
// rewrites the stream's metadata, one more write that a crash could catch
// half-done.
func ensureStream(ctx context.Context, js jetstream.JetStream, cfg jetstream.StreamConfig) (jetstream.Stream, error) {
	st, err := js.Stream(ctx, cfg.Name)
	if err == nil {
		have := st.CachedInfo().Config
		if have.Replicas == cfg.Replicas && have.MaxBytes == cfg.MaxBytes && have.Discard == cfg.Discard &&
			have.AllowAtomicPublish == cfg.AllowAtomicPublish && have.AllowDirect == cfg.AllowDirect &&
			have.Duplicates == cfg.Duplicates && have.Retention == cfg.Retention &&
			len(have.Subjects) == 1 && have.Subjects[0] == cfg.Subjects[0] {
			return st, nil
		}
		// Per-message TTLs cannot be switched off once on (a build of mxq
		// used them for tombstones): keep what the stream has.
		cfg.AllowMsgTTL = have.AllowMsgTTL
		return js.UpdateStream(ctx, cfg)
	}
	if !errors.Is(err, jetstream.ErrStreamNotFound) {
		return nil, err
	}
	return js.CreateStream(ctx, cfg)
}

// CommitStats counts the group commit's batches and the messages they
// carried since the start; both stay 0 with durability "single" or
// "unsafe", where there is no group commit.
func (s *Store) CommitStats() (batches, messages uint64) {
	if s.commit == nil {
		return 0, 0
	}
	return s.commit.batches.Load(), s.commit.messages.Load()
}

// Close stops the committer after the writes already handed to it. Call it
// after the relay has finished its sessions.
func (s *Store) Close() {
	if s.commit != nil {
		s.commit.close()
	}
	if s.tombs != nil {
		s.tombs.close()
	}
	for _, nc := range s.extra {
		nc.Close()
	}
}

// JetStream exposes the client for tools and tests.
func (s *Store) JetStream() jetstream.JetStream { return s.js }

// StreamName is the stream's name.
func (s *Store) StreamName() string { return s.o.Stream }

// QueueSubject is the subject of queued records for a route.
func (s *Store) QueueSubject(route string) string { return s.prefix + ".q." + route }

// DeadSubject is the subject of dead letters for a route.
func (s *Store) DeadSubject(route string) string { return s.prefix + ".dlq." + route }

func (s *Store) chunkSubject(token string) string { return s.prefix + ".c." + token }

// Notify returns a channel that receives a value (without blocking the
// writer) after each local write to the queue, so a drainer on this node
// need not poll to learn about new mail.
func (s *Store) Notify() <-chan struct{} {
	ch := make(chan struct{}, 1)
	s.notifyMu.Lock()
	s.notify = append(s.notify, ch)
	s.notifyMu.Unlock()
	return ch
}

func (s *Store) wake() {
	s.notifyMu.Lock()
	for _, ch := range s.notify {
		select {
		case ch <- struct{}{}:
		default:
		}
	}
	s.notifyMu.Unlock()
}

// split divides env by route; a message for one route stays one record.
func (s *Store) split(env *envelope.Envelope) ([]*envelope.Envelope, error) {
	// The common case, one route for all recipients, allocates nothing.
	first := ""
	single := true
	for _, rcpt := range env.To {
		route := s.o.Route(rcpt[strings.LastIndexByte(rcpt, '@')+1:])
		if route == "" {
			return nil, fmt.Errorf("queue: no route for recipient %s", rcpt)
		}
		if first == "" {
			first = route
		} else if route != first {
			single = false
			break
		}
	}
	if single {
		env.Route, env.Part = first, 0
		return []*envelope.Envelope{env}, nil
	}
	var order []string
	byRoute := map[string][]string{}
	for _, rcpt := range env.To {
		at := strings.LastIndexByte(rcpt, '@')
		route := s.o.Route(rcpt[at+1:])
		if route == "" {
			return nil, fmt.Errorf("queue: no route for recipient %s", rcpt)
		}
		if _, ok := byRoute[route]; !ok {
			order = append(order, route)
		}
		byRoute[route] = append(byRoute[route], rcpt)
	}
	parts := make([]*envelope.Envelope, len(order))
	for i, route := range order {
		p := env.Clone()
		p.To, p.Route = byRoute[route], route
		if len(order) > 1 {
			p.Part = i + 1
		}
		parts[i] = p
	}
	return parts, nil
}

func (s *Store) storeSmall(ctx context.Context, parts []*envelope.Envelope, data []byte) error {
	msgs := make([]*nats.Msg, len(parts))
	for i, p := range parts {
		m, err := s.record(s.QueueSubject(p.Route), p, data)
		if err != nil {
			return err
		}
		msgs[i] = m
	}
	var err error
	if s.commit != nil {
		err = s.commit.submit(ctx, msgs, len(data)*len(msgs))
	} else {
		err = s.w.publishAll(ctx, msgs)
	}
	if err == nil {
		s.wake()
	}
	return err
}

// record builds the NATS message for a record.
func (s *Store) record(subject string, env *envelope.Envelope, data []byte) (*nats.Msg, error) {
	m := &nats.Msg{Subject: subject, Header: nats.Header{}, Data: data}
	if err := env.Encode(m.Header); err != nil {
		return nil, err
	}
	return m, nil
}

// writer publishes records on one connection.
type writer struct {
	nc      *nats.Conn
	js      jetstream.JetStream
	timeout time.Duration
}

// publishAll stores msgs together: one publish for one message, an atomic
// batch for more. Each attempt has its own deadline (the store's timeout):
// an attempt whose reply did not come in time may still have been stored,
// and only another attempt, deduplicated by the server, can tell the
// caller it was, instead of a 451 for mail that is safe.
func (w *writer) publishAll(ctx context.Context, msgs []*nats.Msg) error {
	if len(msgs) == 1 {
		return w.publishOne(ctx, msgs[0])
	}
	return w.publishBatch(ctx, msgs)
}

// publishAttempts is how often a write is tried when its outcome is
// unknown or the condition passing.
const publishAttempts = 3

func (w *writer) publishOne(ctx context.Context, m *nats.Msg) error {
	var lastErr error
	for attempt := 0; attempt < publishAttempts; attempt++ {
		actx, cancel := context.WithTimeout(ctx, w.timeout)
		_, err := w.js.PublishMsg(actx, m)
		cancel()
		if err == nil {
			// A duplicate ack means an earlier attempt was stored.
			return nil
		}
		lastErr = err
		if !retryable(err) || ctx.Err() != nil {
			break
		}
	}
	return classify(lastErr)
}

// batchAck is the reply to a batch commit.
type batchAck struct {
	Stream string              `json:"stream"`
	Seq    uint64              `json:"seq"`
	Batch  string              `json:"batch"`
	Count  int                 `json:"count"`
	Error  *jetstream.APIError `json:"error,omitempty"`
}

// publishBatch stores msgs as one atomic batch. A reply that never came
// leaves the outcome unknown; the batch is then sent again under a new
// batch ID with the same message IDs: if the first one was stored, the
// server refuses the second as containing duplicates, which tells us the
// messages are safe.
//
// That holds for a first attempt too: the caller may itself be retrying a
// write whose reply it never got (the drain records a delivery's outcome
// until it sticks). Every batch mxq writes consists of messages whose IDs
// are unique to that write (a queue ID and part for mail, the replaced
// record's sequence for a rewrite), so a duplicate means this very batch
// was stored before, whole: batches are atomic.
func (w *writer) publishBatch(ctx context.Context, msgs []*nats.Msg) error {
	var lastErr error
	for attempt := 0; attempt < publishAttempts; attempt++ {
		actx, cancel := context.WithTimeout(ctx, w.timeout)
		err := w.sendBatch(actx, msgs)
		cancel()
		if err == nil {
			return nil
		}
		var apiErr *jetstream.APIError
		if errors.As(err, &apiErr) && apiErr.ErrorCode == errCodeBatchDuplicate {
			return nil
		}
		lastErr = err
		if !retryable(err) || ctx.Err() != nil {
			break
		}
	}
	return classify(lastErr)
}

func (w *writer) sendBatch(ctx context.Context, msgs []*nats.Msg) error {
	id := nats.NewInbox()[len(nats.InboxPrefix):] // a NUID: unique, ≤ 64 characters
	last := len(msgs) - 1
	for i, m := range msgs {
		m.Header.Set("Nats-Batch-Id", id)
		m.Header.Set("Nats-Batch-Sequence", strconv.Itoa(i+1))
		if i < last {
			m.Header.Del("Nats-Batch-Commit")
			m.Reply = ""
			if err := w.nc.PublishMsg(m); err != nil {
				return fmt.Errorf("publishing batch: %w", err)
			}
		}
	}
	msgs[last].Header.Set("Nats-Batch-Commit", "1")
	resp, err := w.nc.RequestMsgWithContext(ctx, msgs[last])
	if err != nil {
		return fmt.Errorf("committing batch: %w", err)
	}
	return parseBatchAck(resp.Data, len(msgs))
}

// JetStream API error codes mxq reacts to (nats-server errors.json).
const (
	errCodeAccountResources   = 10002
	errCodeInsufficientRes    = 10023
	errCodeStreamStoreFailed  = 10077
	errCodeMsgDeleteFailed    = 10057
	errCodeBatchDuplicate     = 10201
	errCodeBatchTooManyFlight = 10210
)

func parseBatchAck(data []byte, count int) error {
	var ack batchAck
	if err := json.Unmarshal(data, &ack); err != nil {
		return fmt.Errorf("batch ack %q: %w", data, err)
	}
	if ack.Error != nil {
		return ack.Error
	}
	if ack.Count != count || ack.Stream == "" {
		return fmt.Errorf("batch ack for %d messages, sent %d", ack.Count, count)
	}
	return nil
}

// retryable reports errors after which the outcome of a write is unknown
// or the condition is passing, so trying again may succeed.
func retryable(err error) bool {
	var apiErr *jetstream.APIError
	if errors.As(err, &apiErr) {
		return apiErr.ErrorCode == errCodeBatchTooManyFlight || apiErr.Code == 503 && apiErr.ErrorCode != errCodeInsufficientRes
	}
	return errors.Is(err, context.DeadlineExceeded) || errors.Is(err, nats.ErrTimeout) ||
		errors.Is(err, nats.ErrNoResponders) || errors.Is(err, jetstream.ErrNoStreamResponse)
}

// classify wraps a write error in ErrFull or ErrUnavailable.
func classify(err error) error {
	if err == nil {
		return nil
	}
	var apiErr *jetstream.APIError
	if errors.As(err, &apiErr) {
		switch {
		case apiErr.ErrorCode == errCodeAccountResources, apiErr.ErrorCode == errCodeInsufficientRes,
			apiErr.ErrorCode == errCodeStreamStoreFailed && strings.Contains(apiErr.Description, "maximum"):
			return fmt.Errorf("%w: %w", ErrFull, err)
		}
	}
	if strings.Contains(err.Error(), "maximum bytes exceeded") || strings.Contains(err.Error(), "no space left") {
		return fmt.Errorf("%w: %w", ErrFull, err)
	}
	return fmt.Errorf("%w: %w", ErrUnavailable, err)
}

// storeChunk stores chunk n of p's message.
func (s *Store) storeChunk(ctx context.Context, p *envelope.Envelope, n int, data []byte) error {
	m := &nats.Msg{Subject: s.chunkSubject(p.BodyToken), Header: nats.Header{}, Data: data}
	m.Header.Set(envelope.HdrID, p.ID)
	m.Header.Set(hdrChunk, strconv.Itoa(n))
	if s.o.Origin != "" {
		m.Header.Set(hdrOrigin, s.o.Origin)
	}
	// Deduplicates a chunk whose first publish timed out but was stored.
	m.Header.Set(envelope.HdrMsgID, p.BodyToken+"/"+strconv.Itoa(n))
	return s.w.publishAll(ctx, []*nats.Msg{m})
}

// hdrChunk numbers a chunk record within its message.
const hdrChunk = "Mxq-Chunk"
