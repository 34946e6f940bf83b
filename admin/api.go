package admin

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/textproto"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/mxq-dev/mxq/internal/mailaddr"
	"github.com/mxq-dev/mxq/queue"
	"github.com/mxq-dev/mxq/queue/delivery"
	"github.com/mxq-dev/mxq/queue/drain"
	"github.com/mxq-dev/mxq/queue/envelope"
)

// status answers GET /api/v1/status to anyone: in full to a token, without
// its free text (Status.Redact) to a caller without one. A token that is
// given but wrong is refused rather than quietly answered in part, so
// that a mistyped token shows at once.
func (s *Server) status(w http.ResponseWriter, r *http.Request) {
	a := s.accessFor(r)
	if a == invalid {
		msg := msgBadToken
		if !s.tokens() {
			msg = msgNoTokens
		}
		s.log.Warn("admin call refused: bad token", "call", r.URL.Path, "from", r.RemoteAddr, "token", a.String())
		unauthorized(w, msg)
		return
	}
	st, err := s.Status(r.Context())
	if err != nil {
		// The node's own health, as open as /readyz.
		writeErr(w, http.StatusServiceUnavailable, err.Error())
		return
	}
	if a == anonymous {
		st.Redact()
	}
	writeJSON(w, http.StatusOK, st)
}

// Status gathers the node's view of the cluster, the queue and the drain.
func (s *Server) Status(ctx context.Context) (*Status, error) {
	now := s.o.Now()
	info, err := s.store.Info(ctx)
	if err != nil {
		return nil, fmt.Errorf("queue: %w", err)
	}
	st := &Status{Time: now, Paused: s.ctl.Paused("")}
	st.Node = NodeStatus{Name: s.o.Node, Role: s.ctl.Role(), Ready: true, Draining: s.drain.Draining()}
	if s.o.Ready != nil {
		if err := s.o.Ready(ctx); err != nil {
			st.Node.Ready, st.Node.ReadyError = false, err.Error()
		}
	}
	st.Members = s.ctl.Members()
	live := map[string]drain.RouteState{}
	for _, rs := range s.drain.State() {
		live[rs.Route] = rs
	}
	routes := append([]string(nil), s.o.Routes...)
	for r := range info.Queued {
		if !contains(routes, r) {
			routes = append(routes, r)
		}
	}
	sort.Strings(routes)
	st.Queue = QueueStatus{Bytes: info.Bytes, DeliveriesPerSecond: s.deliveryRate()}
	for _, name := range routes {
		b := BackendStatus{Name: name, Paused: s.ctl.Paused(name), Queued: info.Queued[name], Dead: info.Dead[name]}
		if rs, ok := live[name]; ok {
			b.Circuit = rs.Circuit
			b.Phase = rs.Ramp.Phase
			b.Rate, b.Concurrency = rs.Ramp.Rate, rs.Ramp.Concurrency
			b.MaxRate, b.MaxConcurrency = rs.MaxRate, rs.MaxConc
			b.InFlight = rs.InFlight
			b.LatencyMS = float64(rs.Ramp.Latency.Microseconds()) / 1000
			b.BaselineMS = float64(rs.Ramp.Baseline.Microseconds()) / 1000
			b.Delivered, b.Deferrals, b.Bounces, b.Unreachable, b.Overloads = rs.Delivered, rs.Deferrals, rs.Bounces, rs.Unreachable, rs.Overloads
			b.LastError = rs.LastError
			b.Bottleneck = rs.Bottleneck
		}
		if b.Queued > 0 {
			if at, err := s.store.OldestArrival(ctx, name); err == nil && !at.IsZero() {
				b.OldestAgeSeconds = now.Sub(at).Seconds()
			}
		}
		st.Queue.Messages += b.Queued
		st.Queue.Dead += b.Dead
		st.Queue.OldestAgeSeconds = max(st.Queue.OldestAgeSeconds, b.OldestAgeSeconds)
		st.Backends = append(st.Backends, b)
	}
	st.ETASeconds = -1
	if st.Queue.Messages == 0 {
		st.ETASeconds = 0
	} else if rate := st.Queue.DeliveriesPerSecond; rate > 0 {
		st.ETASeconds = float64(st.Queue.Messages) / rate
	}
	return st, nil
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

func (s *Server) pause(pause bool) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		var req PauseRequest
		if err := decode(r, &req); err != nil {
			writeErr(w, http.StatusBadRequest, err.Error())
			return
		}
		if req.Backend != "" && !contains(s.o.Routes, req.Backend) {
			writeErr(w, http.StatusNotFound, fmt.Sprintf("no backend %q (backends: %s)", req.Backend, strings.Join(s.o.Routes, ", ")))
			return
		}
		op := "resume"
		if pause {
			op = "pause"
		}
		if err := s.ctl.Apply(r.Context(), Command{Op: op, Route: req.Backend, By: who(r)}); err != nil {
			writeErr(w, http.StatusServiceUnavailable, err.Error())
			return
		}
		if !pause {
			s.drain.Kick()
		}
		target := req.Backend
		if target == "" {
			target = "all backends"
		}
		s.audit(r, op, "backend", target)
		writeJSON(w, http.StatusOK, Result{Matched: 1, Done: 1})
	}
}

func (s *Server) rate(w http.ResponseWriter, r *http.Request) {
	var req RateRequest
	if err := decode(r, &req); err != nil {
		writeErr(w, http.StatusBadRequest, err.Error())
		return
	}
	if !contains(s.o.Routes, req.Backend) {
		writeErr(w, http.StatusNotFound, fmt.Sprintf("no backend %q (backends: %s)", req.Backend, strings.Join(s.o.Routes, ", ")))
		return
	}
	if req.Max < 0 || req.Concurrency < 0 || req.Max > 1e6 || req.Concurrency > 1000 {
		writeErr(w, http.StatusBadRequest, "want 0 <= max <= 1000000 and 0 <= concurrency <= 1000 (0 restores the configured ceiling)")
		return
	}
	if err := s.ctl.Apply(r.Context(), Command{Op: "set_rate", Route: req.Backend, MaxRate: req.Max, MaxConcurrency: req.Concurrency, By: who(r)}); err != nil {
		writeErr(w, http.StatusServiceUnavailable, err.Error())
		return
	}
	s.audit(r, "set rate ceiling", "backend", req.Backend, "max", req.Max, "concurrency", req.Concurrency)
	writeJSON(w, http.StatusOK, Result{Matched: 1, Done: 1})
}

func (s *Server) rateReset(w http.ResponseWriter, r *http.Request) {
	var req PauseRequest
	if err := decode(r, &req); err != nil {
		writeErr(w, http.StatusBadRequest, err.Error())
		return
	}
	if !contains(s.o.Routes, req.Backend) {
		writeErr(w, http.StatusNotFound, fmt.Sprintf("no backend %q", req.Backend))
		return
	}
	if err := s.ctl.Apply(r.Context(), Command{Op: "reset_ramp", Route: req.Backend, By: who(r)}); err != nil {
		writeErr(w, http.StatusServiceUnavailable, err.Error())
		return
	}
	s.audit(r, "reset ramp", "backend", req.Backend)
	writeJSON(w, http.StatusOK, Result{Matched: 1, Done: 1})
}

// toFilter converts the API's filter, checking it.
func (s *Server) toFilter(f *Filter) (queue.Filter, error) {
	var qf queue.Filter
	if f == nil {
		return qf, nil
	}
	qf.From, qf.To, qf.Domain, qf.Route = f.From, f.To, f.Domain, f.Backend
	if f.OlderThan != "" {
		d, err := time.ParseDuration(f.OlderThan)
		if err != nil || d < 0 {
			return qf, fmt.Errorf("older_than: want a duration like 2h or 30m, got %q", f.OlderThan)
		}
		qf.OlderThan = d
	}
	if f.Held != nil {
		want := *f.Held
		qf.Held = func(id string) bool { return s.ctl.Held(id) == want }
	}
	return qf, nil
}

func (s *Server) item(rec queue.Record) Item {
	it := Item{Seq: rec.Seq, Dead: rec.Dead()}
	if rec.Env == nil {
		it.Damaged = fmt.Sprint(rec.Err)
		return it
	}
	e := rec.Env
	it.ID, it.Part, it.Backend, it.From, it.To = e.ID, e.Part, e.Route, e.From, e.To
	it.Size, it.Arrived, it.Attempts, it.NextAttempt, it.Errors = e.Size, e.Arrived, e.Attempts, e.NextAttempt, e.Errors
	it.Held = s.ctl.Held(e.ID)
	it.Kind = string(e.Kind)
	return it
}

// list serves a page of the queue or of the dead letters.
func (s *Server) list(kind queue.Kind) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		f := &Filter{From: q.Get("from"), To: q.Get("to"), Domain: q.Get("domain"), Backend: q.Get("backend"), OlderThan: q.Get("older_than")}
		if h := q.Get("held"); h != "" {
			b := h == "true" || h == "1"
			f.Held = &b
		}
		qf, err := s.toFilter(f)
		if err != nil {
			writeErr(w, http.StatusBadRequest, err.Error())
			return
		}
		limit := 100
		if l := q.Get("limit"); l != "" {
			if limit, err = strconv.Atoi(l); err != nil || limit < 1 || limit > 10000 {
				writeErr(w, http.StatusBadRequest, "limit: want 1..10000")
				return
			}
		}
		var cursor uint64
		if c := q.Get("cursor"); c != "" {
			if cursor, err = strconv.ParseUint(c, 10, 64); err != nil {
				writeErr(w, http.StatusBadRequest, "cursor: want the number from the previous page")
				return
			}
		}
		now := s.o.Now()
		out := List{Items: []Item{}}
		if kind == queue.Queued && qf.To != "" && s.catalogReady() {
			if err := s.listMailbox(r.Context(), qf, cursor, limit, now, &out); err != nil {
				writeErr(w, http.StatusServiceUnavailable, err.Error())
				return
			}
			s.auditList(r, kind, f, cursor, out)
			writeJSON(w, http.StatusOK, out)
			return
		}
		next, err := s.store.Walk(r.Context(), kind, cursor, func(rec queue.Record) error {
			out.Scanned++
			if rec.Env != nil && !qf.Match(rec.Env, now) {
				return nil
			}
			out.Items = append(out.Items, s.item(rec))
			if len(out.Items) >= limit {
				return queue.ErrStop
			}
			return nil
		})
		if err != nil {
			writeErr(w, http.StatusServiceUnavailable, err.Error())
			return
		}
		if len(out.Items) >= limit {
			out.Next = next
		}
		s.auditList(r, kind, f, cursor, out)
		writeJSON(w, http.StatusOK, out)
	}
}

// auditList logs a page of a listing: envelopes are content (who wrote to
// whom), so a listing is logged like a read of a message, one line a page.
func (s *Server) auditList(r *http.Request, kind queue.Kind, f *Filter, cursor uint64, out List) {
	s.audit(r, "list", "kind", kindName(kind), "filter", f.String(), "cursor", cursor, "items", len(out.Items))
}

// find answers the records of the queue ID in the request's path, or
// writes the error reply and returns false.
func (s *Server) find(w http.ResponseWriter, r *http.Request) (string, []queue.Record, bool) {
	id := r.PathValue("id")
	if !envelope.ValidID(id) {
		writeErr(w, http.StatusBadRequest, fmt.Sprintf("%q is not a queue ID (20 characters like 00D20GXKE3R002B7DMY9)", id))
		return id, nil, false
	}
	recs, err := s.findRecords(r.Context(), id)
	if err != nil {
		writeErr(w, http.StatusServiceUnavailable, err.Error())
		return id, nil, false
	}
	if len(recs) == 0 {
		writeErr(w, http.StatusNotFound, fmt.Sprintf("no message %s in the queue or the dead letters (delivered, or deleted)", id))
		return id, nil, false
	}
	return id, recs, true
}

func (s *Server) show(w http.ResponseWriter, r *http.Request) {
	id, recs, ok := s.find(w, r)
	if !ok {
		return
	}
	s.audit(r, "show", "kind", kindOf(r), "id", id)
	m := Message{ID: id, Held: s.ctl.Held(id)}
	for _, rec := range recs {
		m.Records = append(m.Records, s.item(rec))
	}
	if full, err := s.store.Get(r.Context(), recs[0].Seq); err == nil && full.Env != nil {
		tp := textproto.NewReader(bufio.NewReader(io.LimitReader(s.store.Body(r.Context(), full), 256<<10)))
		if hdr, err := tp.ReadMIMEHeader(); err == nil || len(hdr) > 0 {
			keys := make([]string, 0, len(hdr))
			for k := range hdr {
				keys = append(keys, k)
			}
			sort.Strings(keys)
			for _, k := range keys {
				for _, v := range hdr[k] {
					m.Headers = append(m.Headers, [2]string{k, v})
				}
			}
		}
	}
	writeJSON(w, http.StatusOK, m)
}

func (s *Server) raw(w http.ResponseWriter, r *http.Request) {
	id, recs, ok := s.find(w, r)
	if !ok {
		return
	}
	full, err := s.store.Get(r.Context(), recs[0].Seq)
	if err != nil || full.Env == nil {
		writeErr(w, http.StatusServiceUnavailable, fmt.Sprintf("reading %s: %v", id, err))
		return
	}
	w.Header().Set("Content-Type", "message/rfc822")
	w.Header().Set("Content-Length", strconv.FormatInt(full.Env.Size, 10))
	s.audit(r, "export", "kind", kindOf(r), "id", id, "bytes", full.Env.Size)
	if _, err := io.Copy(w, s.store.Body(r.Context(), full)); err != nil {
		s.log.Warn("export cut short", "id", id, "err", err)
	}
}

// bulk runs an action over the selected records, streaming.
func (s *Server) bulk(kind queue.Kind, action string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		var sel Selection
		if err := decode(r, &sel); err != nil {
			writeErr(w, http.StatusBadRequest, err.Error())
			return
		}
		for _, id := range sel.IDs {
			if !envelope.ValidID(id) {
				writeErr(w, http.StatusBadRequest, fmt.Sprintf("%q is not a queue ID", id))
				return
			}
		}
		if len(sel.IDs) == 0 && sel.Filter == nil && !sel.All {
			writeErr(w, http.StatusBadRequest, errBadSelection.Error())
			return
		}
		qf, err := s.toFilter(sel.Filter)
		if err != nil {
			writeErr(w, http.StatusBadRequest, err.Error())
			return
		}
		if len(qf.IDs) == 0 {
			qf.IDs = sel.IDs
		}
		if sel.Filter != nil && !sel.All && *sel.Filter == (Filter{}) {
			writeErr(w, http.StatusBadRequest, errBadSelection.Error())
			return
		}
		res, err := s.run(r.Context(), kind, action, qf, sel, who(r))
		if err != nil {
			res.Errors = append(res.Errors, err.Error())
		}
		if !sel.DryRun {
			s.audit(r, action, "kind", kindName(kind), "matched", res.Matched, "done", res.Done, "errors", len(res.Errors))
		}
		if res.Done > 0 && (action == "release" || action == "requeue") {
			s.drain.Kick()
		}
		code := http.StatusOK
		if err != nil {
			code = http.StatusServiceUnavailable
		}
		writeJSON(w, code, res)
	}
}

// kindOf names what a request's path asks for: /api/v1/dlq/... the dead
// letters, else the queue (show and raw answer from both).
func kindOf(r *http.Request) string {
	if strings.HasPrefix(r.URL.Path, "/api/v1/dlq/") {
		return kindName(queue.Dead)
	}
	return kindName(queue.Queued)
}

func kindName(k queue.Kind) string {
	if k == queue.Dead {
		return "dead letters"
	}
	return "queue"
}

// run walks the matching records and applies the action.
func (s *Server) run(ctx context.Context, kind queue.Kind, action string, f queue.Filter, sel Selection, by string) (Result, error) {
	var res Result
	now := s.o.Now()
	var ids []string // hold/release: sent in batches
	flush := func() error {
		if len(ids) == 0 {
			return nil
		}
		err := s.ctl.Apply(ctx, Command{Op: action, IDs: ids, Reason: sel.Reason, By: by})
		if err == nil {
			res.Done += len(ids)
		}
		ids = ids[:0]
		return err
	}
	// Hold and release act per message, not per record: the records of a
	// message split across backends sit side by side in the queue, so a
	// short memory of the last IDs sent is enough, and keeps a bulk hold of
	// millions in constant memory. (A message met again much later, its
	// retry rewritten elsewhere, is held twice: harmless.)
	seen := newRecentSet(4096)
	err := s.each(ctx, kind, f, func(rec queue.Record) error {
		if rec.Env == nil || !f.Match(rec.Env, now) {
			return nil
		}
		res.Matched++
		if sel.DryRun {
			return nil
		}
		switch action {
		case "hold", "release":
			if !seen.add(rec.Env.ID) {
				return nil
			}
			ids = append(ids, rec.Env.ID)
			if len(ids) >= 1000 {
				return flush()
			}
			return nil
		}
		full, err := s.store.Get(ctx, rec.Seq)
		if err != nil {
			res.Errors = append(res.Errors, fmt.Sprintf("%s: %v", rec.Env.ID, err))
			return nil // gone meanwhile (delivered): not an error of the action
		}
		switch action {
		case "delete":
			err = s.store.Delete(ctx, full)
		case "requeue":
			err = s.store.Requeue(ctx, full)
		case "bounce":
			err = s.bounce(ctx, full, sel.Reason, now)
		default:
			err = fmt.Errorf("unknown action %s", action)
		}
		if err != nil {
			res.Errors = append(res.Errors, fmt.Sprintf("%s: %v", rec.Env.ID, err))
			if len(res.Errors) > 100 {
				return fmt.Errorf("too many errors, stopped")
			}
			return nil
		}
		res.Done++
		return nil
	})
	if ferr := flush(); err == nil {
		err = ferr
	}
	return res, err
}

// each calls fn for the records of kind that may match f, without their
// messages: by the catalog for a list of IDs or a recipient, else by a walk
// of the queue (from the oldest listed ID's arrival, when IDs are given).
func (s *Server) each(ctx context.Context, kind queue.Kind, f queue.Filter, fn func(queue.Record) error) error {
	switch {
	case len(f.IDs) > 0 && s.catalogReady():
		for _, id := range f.IDs {
			recs, err := s.findRecords(ctx, id)
			if err != nil {
				return err
			}
			for _, r := range recs {
				if r.Dead() != (kind == queue.Dead) {
					continue
				}
				if err := fn(r); err != nil {
					return err
				}
			}
		}
		return nil
	case kind == queue.Queued && f.To != "" && s.catalogReady():
		key, err := catalogKey(f.To)
		if err != nil {
			return nil
		}
		from := uint32(0)
		for {
			msgs, next, err := s.o.Catalog.Mailbox(key, from, 1000)
			if err != nil {
				return err
			}
			for _, m := range msgs {
				for _, seq := range m.Seqs {
					rec, err := s.store.Get(ctx, seq)
					if errors.Is(err, jetstream.ErrMsgNotFound) {
						continue
					}
					if err != nil {
						return err
					}
					rec.Data = nil
					if err := fn(rec); err != nil {
						return err
					}
				}
			}
			if next == 0 {
				return nil
			}
			from = next
		}
	}
	from := uint64(0)
	if len(f.IDs) > 0 {
		// Start near the oldest selected ID instead of scanning it all.
		from = s.startFor(ctx, f.IDs)
	}
	_, err := s.store.Walk(ctx, kind, from, fn)
	return err
}

// recentSet remembers the last n strings added.
type recentSet struct {
	ring []string
	next int
	in   map[string]int
}

func newRecentSet(n int) *recentSet {
	return &recentSet{ring: make([]string, n), in: make(map[string]int, n)}
}

// add reports whether s was not among the last n added, and adds it.
func (r *recentSet) add(s string) bool {
	if _, ok := r.in[s]; ok {
		return false
	}
	if old := r.ring[r.next]; old != "" {
		if r.in[old]--; r.in[old] <= 0 {
			delete(r.in, old)
		}
	}
	r.ring[r.next] = s
	r.in[s]++
	r.next = (r.next + 1) % len(r.ring)
	return true
}

// startFor is where a walk for these IDs can start: just before the
// oldest one arrived (records are stored when their message arrives, or
// later).
func (s *Server) startFor(ctx context.Context, ids []string) uint64 {
	var oldest time.Time
	for _, id := range ids {
		t, err := envelope.IDTime(id)
		if err != nil {
			return 0
		}
		if oldest.IsZero() || t.Before(oldest) {
			oldest = t
		}
	}
	seq, err := s.store.SeqAt(ctx, oldest.Add(-time.Second))
	if err != nil {
		return 0
	}
	return seq
}

// bounce dead-letters a record's recipients now and, with a smarthost,
// tells the sender.
func (s *Server) bounce(ctx context.Context, rec queue.Record, reason string, now time.Time) error {
	if reason == "" {
		reason = "returned by the postmaster"
	}
	failed := make([]delivery.Result, len(rec.Env.To))
	dead := rec.Env.Clone()
	dead.Gen++
	dead.Errors = make([]string, len(dead.To))
	for i, rcpt := range rec.Env.To {
		failed[i] = delivery.Result{Rcpt: rcpt, Code: 550, Enhanced: "5.0.0", Text: reason}
		dead.Errors[i] = failed[i].String()
	}
	outs := []queue.Output{{Env: dead, Dead: true}}
	if s.reporter != nil {
		if dsn := s.reporter.Report(rec.Env, failed, s.store.Body(ctx, rec), now); dsn != nil {
			outs = append(outs, *dsn)
		}
	}
	return s.store.Rewrite(ctx, rec, outs)
}

func (s *Server) catalogReady() bool { return s.o.Catalog != nil && s.o.Catalog.IsReady() }

// findRecords returns the records of a queue ID: from the catalog, each
// read from the queue (a record the catalog lists but the queue no longer
// holds is dropped, and the catalog told), or by a walk of the queue from
// the ID's arrival while the catalog is not ready.
func (s *Server) findRecords(ctx context.Context, id string) ([]queue.Record, error) {
	if !s.catalogReady() {
		return s.store.Find(ctx, id)
	}
	seqs, err := s.o.Catalog.Seqs(id)
	if err != nil {
		return nil, err
	}
	var out []queue.Record
	for _, seq := range seqs {
		rec, err := s.store.Get(ctx, seq)
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			s.o.Catalog.Forget(seq)
			continue
		}
		if err != nil {
			return nil, err
		}
		if rec.Env == nil || rec.Env.ID != id {
			continue
		}
		rec.Data = nil
		out = append(out, rec)
	}
	return out, nil
}

// listMailbox serves a page of the queued mail for one recipient from the
// catalog: the mailbox's messages by UID from cursor on, each record read
// from the queue and checked against the rest of the filter. The cursor
// of the next page is a UID.
func (s *Server) listMailbox(ctx context.Context, f queue.Filter, cursor uint64, limit int, now time.Time, out *List) error {
	key, err := catalogKey(f.To)
	if err != nil {
		return nil // not a mailbox: nothing is queued for it
	}
	from := uint32(min(cursor, uint64(^uint32(0))))
	for {
		msgs, next, err := s.o.Catalog.Mailbox(key, from, limit)
		if err != nil {
			return err
		}
		for _, m := range msgs {
			out.Scanned++
			for _, seq := range m.Seqs {
				rec, err := s.store.Get(ctx, seq)
				if errors.Is(err, jetstream.ErrMsgNotFound) {
					s.o.Catalog.Forget(seq)
					continue
				}
				if err != nil {
					return err
				}
				rec.Data = nil
				if rec.Env == nil || rec.Dead() || !f.Match(rec.Env, now) {
					continue
				}
				out.Items = append(out.Items, s.item(rec))
			}
			if len(out.Items) >= limit {
				if m.UID < ^uint32(0) {
					out.Next = uint64(m.UID) + 1
				}
				return nil
			}
		}
		if next == 0 {
			return nil
		}
		from = next
	}
}

// catalogKey is the catalog's mailbox key of an address.
func catalogKey(addr string) (string, error) {
	a, err := mailaddr.Parse(addr)
	if err != nil {
		return "", err
	}
	return a.Key(), nil
}
