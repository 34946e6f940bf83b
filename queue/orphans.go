package queue

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/nats-io/nats.go/jetstream"
)

// hdrOrigin names the node that wrote a chunk record, so that a node can
// tell its own leftovers from uploads other nodes have in progress.
const hdrOrigin = "Mxq-Origin"

// Orphans is what CollectOrphans found and removed.
type Orphans struct {
	Messages int    // chunked messages whose chunks were removed
	Chunks   uint64 // chunk records removed
	Bytes    uint64 // stream bytes freed
}

// CollectOrphans removes chunk records that no queued record or dead
// letter refers to, and returns what it freed.
//
// Orphans come from a crash in the middle of a large message's upload
// (chunks stored, envelope not yet) or between deleting a record and
// purging its chunks. They are never mail anyone was promised (a message
// is acknowledged only after its envelope is stored, and an envelope keeps
// its chunks), but each holds up to the size limit of stream space until
// removed, and a full stream refuses mail.
//
// Only chunks stored at sequences up to before are candidates: the node
// notes the stream's last sequence at start, before it accepts or delivers
// anything, and collects in the background afterwards. A chunk this node
// wrote in an earlier life cannot belong to an upload still in progress,
// while one stored since may (a large message arriving now, the copy of a
// body the drain is rewriting). Chunks written by other nodes might too (a
// cluster shares the stream), so with anyOrigin false only chunks whose
// Mxq-Origin is this Store's Origin are candidates; a single node with its
// own stream passes true and also collects what it wrote under another
// name. The scan of records runs on
// to the end of the stream until no new record appears, because another
// node's rewrite appends a record's replacement before deleting it: a
// reference can move ahead of the scan but never vanish from it. A damaged
// record, whose body token cannot be read, stops the collection: nothing is
// removed that it might name.
func (s *Store) CollectOrphans(ctx context.Context, anyOrigin bool, before uint64) (Orphans, error) {
	var out Orphans
	cp := s.prefix + ".c."
	chunks, bytesBefore, err := s.subjects(ctx, cp+">")
	if errors.Is(err, jetstream.ErrStreamNotFound) {
		// A new cluster's stream this node's server does not know yet:
		// nothing in it can be orphaned.
		return out, nil
	}
	if err != nil || len(chunks) == 0 {
		return out, err
	}
	used := map[string]bool{}
	for _, k := range []Kind{Queued, Dead} {
		var damaged uint64
		from := uint64(1)
		for {
			next, err := s.Walk(ctx, k, from, func(r Record) error {
				if r.Env == nil {
					damaged = r.Seq
					return ErrStop
				}
				if r.Env.Chunks > 0 {
					used[r.Env.BodyToken] = true
				}
				return nil
			})
			if err != nil {
				return out, fmt.Errorf("orphan chunks: %w", err)
			}
			if damaged != 0 {
				return out, fmt.Errorf("orphan chunks: record %d is damaged; collect nothing that it might own", damaged)
			}
			if next == from {
				break
			}
			from = next
		}
	}
	for subj, n := range chunks {
		token := strings.TrimPrefix(subj, cp)
		if used[token] {
			continue
		}
		m, err := s.stream.GetLastMsgForSubject(ctx, subj)
		if err != nil {
			if gone(err) {
				continue
			}
			return out, fmt.Errorf("orphan chunks: %w", err)
		}
		if m.Sequence > before {
			continue // stored since the start: an upload may be under way
		}
		if !anyOrigin && (m.Header.Get(hdrOrigin) != s.o.Origin || s.o.Origin == "") {
			continue
		}
		if err := s.purgeChunks(ctx, token); err != nil {
			return out, fmt.Errorf("orphan chunks: %w", err)
		}
		out.Messages++
		out.Chunks += n
	}
	if out.Messages > 0 {
		if _, after, err := s.subjects(ctx, cp+">"); err == nil && after < bytesBefore {
			out.Bytes = bytesBefore - after
		}
	}
	return out, nil
}

// subjects returns the message count of each subject matching filter and
// the stream's size in bytes.
func (s *Store) subjects(ctx context.Context, filter string) (map[string]uint64, uint64, error) {
	ctx, cancel := context.WithTimeout(ctx, s.o.Timeout)
	defer cancel()
	si, err := s.stream.Info(ctx, jetstream.WithSubjectFilter(filter))
	if err != nil {
		return nil, 0, fmt.Errorf("stream info: %w", err)
	}
	return si.State.Subjects, si.State.Bytes, nil
}
