package drain

import (
	"context"
	"slices"

	"github.com/mxq-dev/mxq/queue"
)

// scanner walks one route's records in the stream, oldest or newest first,
// a window at a time, without keeping anything per record: it remembers
// only which ranges of sequence numbers it has not read yet. New mail
// extends the ranges at the top; a rescan starts over from the bottom.
// Newest-first takes windows from the top of the highest range, so mail
// that arrives during a long drain jumps the queue, as intended.
type scanner struct {
	src     Source
	subject string
	newest  bool
	window  int
	bytes   int

	todo  []span // disjoint, sorted ascending
	known uint64 // highest sequence added to todo
}

type span struct{ lo, hi uint64 }

// extend adds (known, last] to the ranges to read.
func (s *scanner) extend(last uint64) {
	if last <= s.known {
		return
	}
	lo := s.known + 1
	s.known = last
	if n := len(s.todo); n > 0 && s.todo[n-1].hi+1 == lo {
		s.todo[n-1].hi = last
		return
	}
	s.todo = append(s.todo, span{lo, last})
}

// rescan forgets what was read: the next windows go over everything again.
func (s *scanner) rescan() {
	s.todo = s.todo[:0]
	if s.known > 0 {
		s.todo = append(s.todo, span{1, s.known})
	}
}

func (s *scanner) empty() bool { return len(s.todo) == 0 }

// remove marks [lo, hi] as read.
func (s *scanner) remove(lo, hi uint64) {
	out := s.todo[:0:0]
	for _, sp := range s.todo {
		if sp.hi < lo || sp.lo > hi {
			out = append(out, sp)
			continue
		}
		if sp.lo < lo {
			out = append(out, span{sp.lo, lo - 1})
		}
		if sp.hi > hi {
			out = append(out, span{hi + 1, sp.hi})
		}
	}
	s.todo = out
}

func (s *scanner) pending(seq uint64) bool {
	for _, sp := range s.todo {
		if seq >= sp.lo && seq <= sp.hi {
			return true
		}
	}
	return false
}

// next reads the next window, in the order the records should be tried.
// It returns no records, and no error, when everything known was read.
func (s *scanner) next(ctx context.Context) ([]queue.Record, error) {
	for !s.empty() {
		var start, end uint64
		if s.newest {
			top := s.todo[len(s.todo)-1]
			start, end = top.lo, top.hi
			if end-start+1 > uint64(s.window) {
				start = end - uint64(s.window) + 1
			}
		} else {
			start, end = s.todo[0].lo, s.known
		}
		recs, pending, err := s.src.ReadFrom(ctx, s.subject, start, s.window, s.bytes)
		if err != nil {
			return nil, err
		}
		// Keep what falls in unread ranges; mark as read what the read
		// covered: up to its last record when it stopped early (a full
		// window, or the byte limit with more pending), else the range.
		var out []queue.Record
		readTo := end
		if n := len(recs); n > 0 && (n == s.window || pending > 0) && recs[n-1].Seq < end {
			readTo = recs[n-1].Seq
		}
		for _, r := range recs {
			if r.Seq <= readTo && s.pending(r.Seq) {
				out = append(out, r)
			}
		}
		s.remove(start, readTo)
		if s.newest {
			slices.Reverse(out)
		}
		if len(out) > 0 {
			return out, nil
		}
	}
	return nil, nil
}
