package catalog

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/mxq-dev/mxq/internal/mailaddr"
	"github.com/mxq-dev/mxq/queue"
	"github.com/mxq-dev/mxq/queue/envelope"
)

// Hold event ops (see HoldEvent).
const (
	OpHold     = "hold"
	OpRelease  = "release"
	OpRestored = "restored" // the control state was replaced whole: reconcile
	opForget   = "forget"
)

// event is a change that does not come from the stream.
type event struct {
	op   string
	ids  []string
	seqs []uint64
	at   time.Time
}

// HoldEvent tells the catalog that the control plane held or released
// these IDs (OpHold, OpRelease), or replaced its whole state (OpRestored).
// It never blocks: the event is queued for the apply loop. ids must not be
// changed afterwards.
func (c *Catalog) HoldEvent(op string, ids []string) {
	c.push(event{op: op, ids: ids, at: c.o.Now()})
}

// Forget tells the catalog that these records are gone from the stream
// (found missing by a reader): their keys are removed.
func (c *Catalog) Forget(seqs ...uint64) {
	if len(seqs) > 0 {
		c.push(event{op: opForget, seqs: slices.Clone(seqs)})
	}
}

func (c *Catalog) push(ev event) {
	c.mu.Lock()
	c.events = append(c.events, ev)
	c.mu.Unlock()
	select {
	case c.eventsCh <- struct{}{}:
	default:
	}
}

// applyBatch is how many stream records one database batch covers at most.
const applyBatch = 512

// Run follows the stream and applies hold events until ctx ends. It
// reconciles the held keys with the control state first. When the database
// fails a write (a full disk), it starts over a moment later from what was
// committed: the catalog lags meanwhile, and no reader trusts it blindly.
func (c *Catalog) Run(ctx context.Context) error {
	for {
		err := c.run(ctx)
		if ctx.Err() != nil {
			return nil
		}
		c.log.Error("catalog of the queue: starting over from what was committed", "err", err)
		sleep(ctx, 5*time.Second)
		if err := c.reload(); err != nil {
			return err
		}
	}
}

// reload sets the in-memory state back to what the database holds.
func (c *Catalog) reload() error {
	pos, ok, err := c.metaU64("pos")
	if err != nil || !ok {
		return fmt.Errorf("catalog: reading its position: %v", err)
	}
	v, ok, err := c.get(keyMeta("stats"))
	if err != nil {
		return err
	}
	if ok {
		d := dec{b: v}
		c.stats = Stats{Records: d.uv(), Mailboxes: d.uv(), Messages: d.uv(), Bytes: d.uv(), Dead: d.uv()}
	}
	c.pos = pos
	c.mu.Lock()
	c.applied, c.statsCommitted = pos, c.stats
	c.mu.Unlock()
	return nil
}

func (c *Catalog) run(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	msgs := make(chan jetstream.Msg, 4*applyBatch)
	ferr := make(chan error, 1)
	follow := c.followFn
	if follow == nil {
		follow = c.follow
	}
	go func() { ferr <- follow(ctx, c.pos, msgs) }()
	stallAfter := c.o.StallAfter
	if stallAfter <= 0 {
		stallAfter = 15 * time.Second
	}
	stallCheck := time.NewTicker(stallAfter / 3)
	defer stallCheck.Stop()
	lastPos, lastMove := c.pos, c.o.Now()
	c.push(event{op: OpRestored, at: c.o.Now()})
	probe := time.NewTicker(200 * time.Millisecond)
	defer probe.Stop()
	gc := time.NewTicker(time.Minute)
	defer gc.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case err := <-ferr:
			if err == nil {
				err = errors.New("following the stream stopped")
			}
			return err
		case m := <-msgs:
			if err := c.applyMsgs(m, msgs); err != nil {
				return err
			}
		case <-c.eventsCh:
			if err := c.applyEvents(); err != nil {
				return err
			}
		case <-probe.C:
			if !c.IsReady() {
				c.checkCaughtUp(ctx)
			}
		case <-stallCheck.C:
			if c.pos != lastPos {
				lastPos, lastMove = c.pos, c.o.Now()
				break
			}
			if c.o.Now().Sub(lastMove) < stallAfter {
				break
			}
			if ok, err := c.caughtUp(ctx); err == nil && !ok {
				c.stalls.Add(1)
				return fmt.Errorf("%w: nothing from the stream for %v while it holds records from %d on", errStalled, stallAfter, c.pos)
			}
			lastMove = c.o.Now()
		case <-gc.C:
			if err := c.collectBelowFirst(ctx); err != nil {
				c.log.Warn("catalog: dropping records below the stream's first", "err", err)
			}
			// Note that the catalog is current even when nothing changes,
			// so that a restart after a quiet spell does not rebuild it.
			if ok, err := c.caughtUp(ctx); err == nil && ok {
				b := c.db.NewIndexedBatch()
				err := c.commit(b, &pending{})
				b.Close()
				if err != nil {
					return err
				}
			}
			if c.o.Now().After(c.purgeAt) {
				if err := c.store.PurgeTombstones(ctx, c.o.Now()); err != nil {
					c.log.Warn("catalog: purging old tombstones", "err", err)
				}
				c.purgeAt = c.o.Now().Add(time.Hour)
			}
		}
	}
}

// follow feeds msgs with the stream's records from seq from on, forever: the
// ordered consumer recreates itself when it misses a record; when it fails
// for good, follow makes a new one from the record after the last it sent.
func (c *Catalog) follow(ctx context.Context, from uint64, msgs chan<- jetstream.Msg) error {
	js := c.store.JetStream()
	for ctx.Err() == nil {
		cons, err := js.OrderedConsumer(ctx, c.store.StreamName(), c.consumerConfig(from))
		if err != nil {
			c.log.Warn("catalog: following the stream, will retry", "err", err)
			sleep(ctx, time.Second)
			continue
		}
		it, err := cons.Messages(jetstream.PullMaxMessages(applyBatch))
		if err != nil {
			c.log.Warn("catalog: following the stream, will retry", "err", err)
			sleep(ctx, time.Second)
			continue
		}
		stop := context.AfterFunc(ctx, it.Stop)
		for {
			m, err := it.Next()
			if err != nil {
				if ctx.Err() == nil && !errors.Is(err, jetstream.ErrMsgIteratorClosed) {
					c.log.Warn("catalog: following the stream, starting over", "from", from, "err", err)
				}
				break
			}
			md, err := m.Metadata()
			if err != nil {
				continue
			}
			from = md.Sequence.Stream + 1
			select {
			case msgs <- m:
			case <-ctx.Done():
			}
		}
		stop()
		it.Stop()
		sleep(ctx, 100*time.Millisecond)
	}
	return nil
}

// errStalled: the follower brought nothing while the stream had more.
var errStalled = errors.New("catalog: the stream's follower stalled")

func sleep(ctx context.Context, d time.Duration) {
	select {
	case <-ctx.Done():
	case <-time.After(d):
	}
}

// pending collects what one batch changed, to tell the waiting readers
// after the commit.
type pending struct {
	routes map[string]Pos
	boxes  map[string]bool
}

func (p *pending) route(route string, at Pos) {
	if p.routes == nil {
		p.routes = map[string]Pos{}
	}
	if old, ok := p.routes[route]; !ok || at.less(old) {
		p.routes[route] = at
	}
}

func (p *pending) box(mbox string) {
	if p.boxes == nil {
		p.boxes = map[string]bool{}
	}
	p.boxes[mbox] = true
}

// applyMsgs applies first and whatever else is waiting, up to a batch.
func (c *Catalog) applyMsgs(first jetstream.Msg, more <-chan jetstream.Msg) error {
	b := c.db.NewIndexedBatch()
	defer b.Close()
	var p pending
	caughtUp := false
	m := first
	for n := 0; ; n++ {
		md, err := m.Metadata()
		if err == nil {
			if err := c.applyMsg(b, &p, m, md); err != nil {
				return err
			}
			c.pos = max(c.pos, md.Sequence.Stream+1)
			caughtUp = md.NumPending == 0
		}
		if n+1 >= applyBatch {
			break
		}
		var ok bool
		select {
		case m, ok = <-more:
		default:
		}
		if !ok || m == nil {
			break
		}
	}
	if err := c.commit(b, &p); err != nil {
		return err
	}
	if caughtUp {
		c.setReady()
	}
	return nil
}

func (c *Catalog) applyMsg(b *pebble.Batch, p *pending, m jetstream.Msg, md *jetstream.MsgMetadata) error {
	subject, seq := m.Subject(), md.Sequence.Stream
	switch {
	case c.store.IsTombstone(subject):
		seqs, err := queue.ParseTombstone(m.Headers())
		if err != nil {
			c.log.Warn("catalog: damaged tombstone", "seq", seq, "err", err)
		}
		for _, s := range seqs {
			if err := c.remove(b, p, s); err != nil {
				return err
			}
		}
	default:
		dead := c.store.IsDead(subject)
		if !dead && !c.store.IsQueued(subject) {
			return nil // not a record of mxq's
		}
		env, err := envelope.Decode(envelope.Header(m.Headers()))
		if err != nil {
			// Damaged: listed by the queue's tools, never delivered.
			c.log.Warn("catalog: record with a damaged envelope not indexed", "seq", seq, "err", err)
			return nil
		}
		return c.add(b, p, seq, md.Timestamp, dead, env)
	}
	return nil
}

// add indexes a record.
func (c *Catalog) add(b *pebble.Batch, p *pending, seq uint64, stored time.Time, dead bool, env *envelope.Envelope) error {
	rk := keyRecord(seq)
	if seq < c.fresh {
		// The stream delivers in order: only a sequence below the highest
		// one this run applied can be one seen before.
		if _, ok, err := getBatch(b, rk); err != nil || ok {
			return err // already indexed
		}
	}
	c.fresh = max(c.fresh, seq+1)
	r := record{dead: dead, route: env.Route, id: env.ID, token: env.BodyToken}
	if !env.NextAttempt.IsZero() {
		r.next = env.NextAttempt.UnixNano()
	}
	b.Set(keyID(env.ID, seq), nil, nil)
	if !dead {
		r.due = max(r.next, stored.UnixNano())
		if c.o.Held != nil && c.o.Held(env.ID) {
			r.held = true
			b.Set(keyHeld(env.ID, seq), nil, nil)
		} else {
			b.Set(keyDue(r.route, r.due, seq), []byte(env.ID), nil)
			p.route(r.route, Pos{r.due, seq})
		}
		for _, box := range mailboxes(env) {
			if err := c.list(b, p, box, seq, env); err != nil {
				return err
			}
			r.boxes = append(r.boxes, box)
		}
	}
	b.Set(rk, r.encode(), nil)
	c.stats.Records++
	if dead {
		c.stats.Dead++
	}
	return nil
}

// mailboxes returns the mailbox keys of a record's recipients, once each.
func mailboxes(env *envelope.Envelope) []string {
	keys := make([]string, 0, len(env.To))
	for _, to := range env.To {
		a, err := mailaddr.Parse(to)
		if err != nil {
			continue
		}
		if k := a.Key(); !slices.Contains(keys, k) {
			keys = append(keys, k)
		}
	}
	return keys
}

// list adds record seq to the entry of its message in mailbox box, making
// the entry (with the mailbox's next UID) if it is the message's first.
func (c *Catalog) list(b *pebble.Batch, p *pending, box string, seq uint64, env *envelope.Envelope) error {
	uk := keyUID(box, env.ID)
	v, ok, err := getBatch(b, uk)
	if err != nil {
		return err
	}
	var uid uint32
	var e entry
	if ok {
		if len(v) != 4 {
			return fmt.Errorf("catalog: uid of %s: %w", env.ID, errCorrupt)
		}
		uid = uint32FromBytes(v)
		ev, ok, err := getBatch(b, keyMailbox(box, uid))
		if err != nil {
			return err
		}
		if ok {
			if e, err = decodeEntry(ev); err != nil {
				return err
			}
		}
	}
	if !ok || e.id == "" {
		ck := keyCounter(box)
		cv, cok, err := getBatch(b, ck)
		if err != nil {
			return err
		}
		cnt := counter{next: 1}
		if cok {
			if cnt, err = decodeCounter(cv); err != nil {
				return err
			}
		}
		uid = cnt.next
		cnt.next++
		if cnt.count == 0 {
			c.stats.Mailboxes++
		}
		cnt.count++
		b.Set(ck, cnt.encode(), nil)
		b.Set(uk, u32(nil, uid), nil)
		e = entry{id: env.ID, size: env.Size, arrived: env.Arrived.UnixNano(), from: env.From}
		c.stats.Messages++
		c.stats.Bytes += uint64(max(env.Size, 0))
	}
	if !slices.Contains(e.seqs, seq) {
		e.seqs = append(e.seqs, seq)
	}
	b.Set(keyMailbox(box, uid), e.encode(), nil)
	p.box(box)
	return nil
}

// remove drops a record's keys; a message whose last record it was leaves
// its mailboxes.
func (c *Catalog) remove(b *pebble.Batch, p *pending, seq uint64) error {
	rk := keyRecord(seq)
	v, ok, err := getBatch(b, rk)
	if err != nil || !ok {
		return err
	}
	r, err := decodeRecord(v)
	if err != nil {
		// Still drop what can be dropped: the record key itself.
		b.Delete(rk, nil)
		return nil
	}
	b.Delete(rk, nil)
	b.Delete(keyID(r.id, seq), nil)
	c.stats.Records--
	if r.dead {
		c.stats.Dead--
		return nil
	}
	if r.held {
		b.Delete(keyHeld(r.id, seq), nil)
	} else {
		b.Delete(keyDue(r.route, r.due, seq), nil)
	}
	for _, box := range r.boxes {
		if err := c.unlist(b, p, box, r.id, seq); err != nil {
			return err
		}
	}
	return nil
}

func (c *Catalog) unlist(b *pebble.Batch, p *pending, box, id string, seq uint64) error {
	uk := keyUID(box, id)
	v, ok, err := getBatch(b, uk)
	if err != nil || !ok || len(v) != 4 {
		return err
	}
	uid := uint32FromBytes(v)
	mk := keyMailbox(box, uid)
	ev, ok, err := getBatch(b, mk)
	if err != nil || !ok {
		return err
	}
	e, err := decodeEntry(ev)
	if err != nil {
		return err
	}
	e.seqs = slices.DeleteFunc(e.seqs, func(s uint64) bool { return s == seq })
	p.box(box)
	if len(e.seqs) > 0 {
		b.Set(mk, e.encode(), nil)
		return nil
	}
	b.Delete(mk, nil)
	b.Delete(uk, nil)
	c.stats.Messages--
	c.stats.Bytes -= uint64(max(e.size, 0))
	ck := keyCounter(box)
	cv, ok, err := getBatch(b, ck)
	if err != nil || !ok {
		return err
	}
	cnt, err := decodeCounter(cv)
	if err != nil {
		return err
	}
	if cnt.count > 0 {
		cnt.count--
		if cnt.count == 0 {
			c.stats.Mailboxes--
		}
	}
	// The counter stays when the mailbox empties, so that its UIDs are
	// never given twice.
	b.Set(ck, cnt.encode(), nil)
	return nil
}

// hold moves id's due keys to held keys.
func (c *Catalog) hold(b *pebble.Batch, id string) error {
	return c.eachRecord(b, prefixID(id), func(seq uint64, r record) {
		if r.dead || r.held {
			return
		}
		b.Delete(keyDue(r.route, r.due, seq), nil)
		b.Set(keyHeld(r.id, seq), nil, nil)
		r.held = true
		b.Set(keyRecord(seq), r.encode(), nil)
	})
}

// release moves id's held keys back to due keys, due at now or at the
// record's next attempt if that is later: a release is not a "retry now".
func (c *Catalog) release(b *pebble.Batch, p *pending, id string, now time.Time) error {
	return c.eachRecord(b, prefixHeld(id), func(seq uint64, r record) {
		if !r.held {
			return
		}
		b.Delete(keyHeld(r.id, seq), nil)
		r.held = false
		r.due = max(r.next, now.UnixNano())
		b.Set(keyDue(r.route, r.due, seq), []byte(r.id), nil)
		b.Set(keyRecord(seq), r.encode(), nil)
		p.route(r.route, Pos{r.due, seq})
	})
}

// eachRecord calls fn for the record of every key with prefix pre (i or h
// keys of one ID), as the batch sees them.
func (c *Catalog) eachRecord(b *pebble.Batch, pre []byte, fn func(seq uint64, r record)) error {
	it, err := b.NewIter(&pebble.IterOptions{LowerBound: pre, UpperBound: upper(pre)})
	if err != nil {
		return fmt.Errorf("catalog: %w", err)
	}
	var seqs []uint64
	for ok := it.First(); ok; ok = it.Next() {
		seqs = append(seqs, tailSeq(it.Key()))
	}
	if err := it.Close(); err != nil {
		return fmt.Errorf("catalog: %w", err)
	}
	for _, seq := range seqs {
		v, ok, err := getBatch(b, keyRecord(seq))
		if err != nil {
			return err
		}
		if !ok {
			continue
		}
		r, err := decodeRecord(v)
		if err != nil {
			continue
		}
		fn(seq, r)
	}
	return nil
}

// applyEvents applies the queued hold events and forgets.
func (c *Catalog) applyEvents() error {
	c.mu.Lock()
	evs := c.events
	c.events = nil
	c.mu.Unlock()
	if len(evs) == 0 {
		return nil
	}
	b := c.db.NewIndexedBatch()
	defer func() { b.Close() }()
	var p pending
	for _, ev := range evs {
		var err error
		switch ev.op {
		case OpHold:
			for _, id := range ev.ids {
				if err = c.hold(b, id); err != nil {
					break
				}
			}
		case OpRelease:
			for _, id := range ev.ids {
				if err = c.release(b, &p, id, ev.at); err != nil {
					break
				}
			}
		case OpRestored:
			err = c.reconcile(&b, &p, ev.at)
		case opForget:
			for _, seq := range ev.seqs {
				if err = c.remove(b, &p, seq); err != nil {
					break
				}
			}
		}
		if err != nil {
			return err
		}
	}
	return c.commit(b, &p)
}

// reconcile makes the held keys agree with the control state as it is now:
// held keys of IDs no longer held are released, due keys of held IDs held.
// It costs a look at every held key and every held ID: once at start, and
// after the control state was replaced whole. It commits every
// reconcileBatch IDs, so that a million holds do not make one batch of a
// million changes in memory.
func (c *Catalog) reconcile(bp **pebble.Batch, p *pending, now time.Time) error {
	n := 0
	step := func() error {
		if n++; n%reconcileBatch != 0 {
			return nil
		}
		if err := c.commit(*bp, p); err != nil {
			return err
		}
		(*bp).Close()
		*bp = c.db.NewIndexedBatch()
		*p = pending{}
		return nil
	}
	var free []string
	var last string
	it, err := c.db.NewIter(&pebble.IterOptions{LowerBound: []byte{spHeld}, UpperBound: []byte{spHeld + 1}})
	if err != nil {
		return fmt.Errorf("catalog: %w", err)
	}
	for ok := it.First(); ok; ok = it.Next() {
		k := it.Key()
		id := string(k[1 : len(k)-9])
		if id != last && (c.o.Held == nil || !c.o.Held(id)) {
			free = append(free, id)
		}
		last = id
	}
	if err := it.Close(); err != nil {
		return fmt.Errorf("catalog: %w", err)
	}
	for _, id := range free {
		if err := c.release(*bp, p, id, now); err != nil {
			return err
		}
		if err := step(); err != nil {
			return err
		}
	}
	if c.o.RangeHolds == nil {
		return nil
	}
	var herr error
	c.o.RangeHolds(func(id string) bool {
		if herr = c.hold(*bp, id); herr == nil {
			herr = step()
		}
		return herr == nil
	})
	return herr
}

// reconcileBatch is how many IDs reconcile handles per commit.
const reconcileBatch = 10000

// commit writes the batch with the catalog's state and tells the readers.
func (c *Catalog) commit(b *pebble.Batch, p *pending) error {
	c.setMeta(b)
	if err := b.Commit(pebble.NoSync); err != nil {
		return fmt.Errorf("catalog: %w", err)
	}
	c.mu.Lock()
	c.applied = c.pos
	c.statsCommitted = c.stats
	c.lastSync = c.o.Now()
	for route, at := range p.routes {
		if old, ok := c.added[route]; !ok || at.less(old) {
			c.added[route] = at
		}
		if ch := c.wake[route]; ch != nil {
			select {
			case ch <- struct{}{}:
			default:
			}
		}
	}
	for box := range p.boxes {
		if ch := c.watch[box]; ch != nil {
			close(ch)
			delete(c.watch, box)
		}
	}
	close(c.progress)
	c.progress = make(chan struct{})
	c.mu.Unlock()
	return nil
}

func (c *Catalog) setReady() {
	select {
	case <-c.ready:
	default:
		close(c.ready)
		c.log.Info("catalog of the queue ready", "records", c.stats.Records, "mailboxes", c.stats.Mailboxes, "position", c.pos)
	}
}

// checkCaughtUp makes the catalog ready when nothing is left to read: a
// stream whose last records were deleted never delivers a record that says
// it was the last.
func (c *Catalog) checkCaughtUp(ctx context.Context) {
	if ok, err := c.caughtUp(ctx); err == nil && ok {
		c.setReady()
	}
}

// caughtUp asks the stream whether any record remains between what was
// applied and the stream's end.
func (c *Catalog) caughtUp(ctx context.Context) (bool, error) {
	st, err := c.store.State(ctx)
	if err != nil {
		return false, err
	}
	c.mu.Lock()
	applied := c.applied
	c.mu.Unlock()
	if applied > st.LastSeq {
		return true, nil
	}
	more, err := c.store.Remains(ctx, c.store.AllSubjects(), applied, st.LastSeq)
	return !more, err
}

// CatchUp returns once the catalog has applied every record the stream
// held when it was called (or ctx ends).
func (c *Catalog) CatchUp(ctx context.Context) error {
	st, err := c.store.State(ctx)
	if err != nil {
		return err
	}
	for {
		c.mu.Lock()
		applied, progress := c.applied, c.progress
		c.mu.Unlock()
		if applied > st.LastSeq {
			return nil
		}
		more, err := c.store.Remains(ctx, c.store.AllSubjects(), applied, st.LastSeq)
		if err != nil {
			return err
		}
		if !more {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-progress:
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// collectBelowFirst drops records below the stream's first sequence: they
// are gone for sure (purged, or deleted with a tombstone that was lost).
func (c *Catalog) collectBelowFirst(ctx context.Context) error {
	st, err := c.store.State(ctx)
	if err != nil {
		return err
	}
	it, err := c.db.NewIter(&pebble.IterOptions{LowerBound: keyRecord(0), UpperBound: keyRecord(st.FirstSeq)})
	if err != nil {
		return err
	}
	var gone []uint64
	for ok := it.First(); ok && len(gone) < 100000; ok = it.Next() {
		gone = append(gone, tailSeq(it.Key()))
	}
	if err := it.Close(); err != nil {
		return err
	}
	if len(gone) == 0 {
		return nil
	}
	b := c.db.NewIndexedBatch()
	defer b.Close()
	var p pending
	for _, seq := range gone {
		if err := c.remove(b, &p, seq); err != nil {
			return err
		}
	}
	return c.commit(b, &p)
}

func getBatch(b *pebble.Batch, k []byte) ([]byte, bool, error) {
	v, closer, err := b.Get(k)
	if errors.Is(err, pebble.ErrNotFound) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, fmt.Errorf("catalog: %w", err)
	}
	out := append([]byte(nil), v...)
	closer.Close()
	return out, true, nil
}

func uint32FromBytes(b []byte) uint32 {
	return uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
}

// Stalls counts the followers made anew because they brought nothing while
// the stream held more (see Options.StallAfter).
func (c *Catalog) Stalls() uint64 { return c.stalls.Load() }
