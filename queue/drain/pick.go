package drain

import (
	"slices"
	"time"

	"github.com/mxq-dev/mxq/queue/catalog"
)

// picker decides which records a route drain looks at next, from the
// catalog's due keys, without keeping anything per record: it remembers
// only which spans of the route's due order it has not looked at yet.
//
// Records sort by the time they are due (the time they were stored, a
// retry's next attempt, a release) and then by sequence. Time moves the
// top: what became due since the last look is a new span at the top. New
// mail and released mail are due now, retries when their time comes, so
// they all land in that new span. The exceptions are records due a moment
// before where the picker already looked (the catalog indexed them a moment
// after: it follows the stream) and records the drain put back; for those
// the catalog reports the lowest place it added to (Added), and the picker
// opens a span there again. Oldest first takes from the lowest span
// upward, newest first from the highest downward, so mail that arrives
// during a long drain jumps the queue, as intended.
//
// What the picker looked at and passed over is never read again: held
// records (the catalog moves them out of the due keys), records in flight,
// records just finished. That is what keeps a pass flat however much mail
// is held or waiting for a retry.
type picker struct {
	newest bool
	todo   []pspan // disjoint, ascending
	top    catalog.Pos
}

// pspan is the due positions in (lo, hi].
type pspan struct{ lo, hi catalog.Pos }

var bottom = catalog.Pos{}

func newPicker(newest bool) *picker { return &picker{newest: newest} }

// advance opens the span of everything that became due up to now.
func (p *picker) advance(now time.Time) {
	hi := catalog.Pos{Due: now.UnixNano(), Seq: ^uint64(0)}
	if !p.top.Less(hi) {
		return
	}
	p.add(pspan{p.top, hi})
	p.top = hi
}

// rewind opens the span from just before at up to what was looked at.
func (p *picker) rewind(at catalog.Pos) {
	lo := before(at)
	if !lo.Less(p.top) {
		return
	}
	p.add(pspan{lo, p.top})
}

func before(at catalog.Pos) catalog.Pos {
	if at.Seq > 0 {
		return catalog.Pos{Due: at.Due, Seq: at.Seq - 1}
	}
	return catalog.Pos{Due: at.Due - 1, Seq: ^uint64(0)}
}

// add merges sp into todo.
func (p *picker) add(sp pspan) {
	out := p.todo[:0:0]
	for _, t := range p.todo {
		if t.hi.Less(sp.lo) || sp.hi.Less(t.lo) {
			out = append(out, t)
			continue
		}
		if t.lo.Less(sp.lo) {
			sp.lo = t.lo
		}
		if sp.hi.Less(t.hi) {
			sp.hi = t.hi
		}
	}
	out = append(out, sp)
	slices.SortFunc(out, func(a, b pspan) int {
		if a.lo.Less(b.lo) {
			return -1
		}
		if b.lo.Less(a.lo) {
			return 1
		}
		return 0
	})
	p.todo = out
}

func (p *picker) empty() bool { return len(p.todo) == 0 }

// span is where to look next: the lowest span (oldest first) or the
// highest (newest first).
func (p *picker) span() pspan {
	if p.newest {
		return p.todo[len(p.todo)-1]
	}
	return p.todo[0]
}

// looked marks the part of the current span that a look covered: up to
// (oldest first) or down to (newest first) last, or all of it when the
// look found fewer records than it asked for.
func (p *picker) looked(last catalog.Pos, all bool) {
	i := 0
	if p.newest {
		i = len(p.todo) - 1
	}
	switch {
	case all:
		p.todo = slices.Delete(p.todo, i, i+1)
	case p.newest:
		p.todo[i].hi = before(last)
		if !p.todo[i].lo.Less(p.todo[i].hi) {
			p.todo = slices.Delete(p.todo, i, i+1)
		}
	default:
		p.todo[i].lo = last
		if !p.todo[i].lo.Less(p.todo[i].hi) {
			p.todo = slices.Delete(p.todo, i, i+1)
		}
	}
}
