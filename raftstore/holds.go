package raftstore

// holdSet is the set of held IDs: a persistent (copy-on-write) B+-tree
// ordered by ID, each entry pointing at the Hold of the command that held
// it. See the package doc for why this shape and what it costs.
//
// A holdSet value is immutable once a State carrying it is published:
// readers walk its nodes without locks, and a snapshot persists it while
// later commands apply. A change (withHeld, withReleased) copies only the
// nodes on the paths it touches and shares the rest with the set it
// started from.
//
// Within one change, the nodes it has already copied are modified in place
// rather than copied again: they carry the change's generation (gen), and
// only nodes of that generation are ever written. Every node reachable from
// a set has a generation at most the set's, and a change from set s uses
// s.gen+1, so it can never write to a node that some published set (or a
// sibling change from the same s) can reach.
type holdSet struct {
	root  *holdNode
	count int
	gen   uint64
}

// holdEntry is one held ID. h is shared by all IDs of one hold command
// and never modified.
type holdEntry struct {
	id string
	h  *Hold
}

// holdNode is a leaf (kids == nil: ents) or an inner node (keys, kids).
// keys[i] is at most every ID under kids[i] and greater than every ID under
// kids[i-1]; it need not be the smallest ID under kids[i] (a release of
// that ID leaves the key, which still separates correctly).
type holdNode struct {
	gen  uint64
	ents []holdEntry
	keys []string
	kids []*holdNode
}

// Node sizes. A change copies every leaf it touches, so a leaf is small
// enough to copy for a single ID (64 entries of 24 bytes: 1.5 KiB), yet
// large enough that the tree stays shallow (4 levels at a million) and a
// node's header costs a hold little: with 32, a hold took 57 bytes
// instead of 53; with 128, 50, but a scattered ID copied twice as much.
// A node below a quarter full after a release is joined with a
// neighbour (or evened out with it), so a mass release gives memory back.
const (
	maxLeaf  = 64
	maxInner = 64
	minLeaf  = maxLeaf / 4
	minInner = maxInner / 4
)

func (n *holdNode) leaf() bool { return n.kids == nil }

func (n *holdNode) size() int {
	if n.leaf() {
		return len(n.ents)
	}
	return len(n.kids)
}

// minSize is the fill below which a node (other than the root) is joined
// with a neighbour.
func (n *holdNode) minSize() int {
	if n.leaf() {
		return minLeaf
	}
	return minInner
}

// minKey separates n from its left neighbour in the parent.
func (n *holdNode) minKey() string {
	if n.leaf() {
		return n.ents[0].id
	}
	return n.keys[0]
}

// searchLeaf returns the position of id in ents, or where it would go.
func searchLeaf(ents []holdEntry, id string) (int, bool) {
	lo, hi := 0, len(ents)
	for lo < hi {
		m := int(uint(lo+hi) >> 1)
		if ents[m].id < id {
			lo = m + 1
		} else {
			hi = m
		}
	}
	return lo, lo < len(ents) && ents[lo].id == id
}

// childIndex returns the kid of an inner node whose range holds id: the
// last with keys[i] <= id, or the first when id is below them all.
func childIndex(keys []string, id string) int {
	lo, hi := 1, len(keys)
	for lo < hi {
		m := int(uint(lo+hi) >> 1)
		if keys[m] <= id {
			lo = m + 1
		} else {
			hi = m
		}
	}
	return lo - 1
}

// get returns the hold of id, nil when id is not held.
func (s *holdSet) get(id string) *Hold {
	n := s.root
	if n == nil {
		return nil
	}
	for !n.leaf() {
		n = n.kids[childIndex(n.keys, id)]
	}
	if i, ok := searchLeaf(n.ents, id); ok {
		return n.ents[i].h
	}
	return nil
}

// each calls fn for every held ID in ascending order until fn returns
// false; it reports whether it went through to the end.
func (s *holdSet) each(fn func(id string, h *Hold) bool) bool {
	if s.root == nil {
		return true
	}
	return s.root.each(fn)
}

func (n *holdNode) each(fn func(id string, h *Hold) bool) bool {
	if n.leaf() {
		for _, e := range n.ents {
			if !fn(e.id, e.h) {
				return false
			}
		}
		return true
	}
	for _, k := range n.kids {
		if !k.each(fn) {
			return false
		}
	}
	return true
}

// withHeld returns s with every ID in ids held by h (replacing an earlier
// hold of the same ID, as a later hold wins). s is unchanged.
func (s holdSet) withHeld(ids []string, h *Hold) holdSet {
	t := s
	t.gen++
	for _, id := range ids {
		t.put(id, h)
	}
	return t
}

// withReleased returns s without the IDs in ids; IDs not held are
// ignored. s is unchanged.
func (s holdSet) withReleased(ids []string) holdSet {
	t := s
	t.gen++
	for _, id := range ids {
		// Look first, so that releasing IDs that are not held (a retried
		// release, a filter matching released mail) copies nothing.
		if t.get(id) != nil {
			t.del(id)
		}
	}
	return t
}

// own returns n itself if this change may write to it, else a copy that
// it may. A copy has room for one more element only: scattered IDs touch
// each leaf once, and a node's memory is then what it holds. Nodes that
// keep growing within a change grow by half (room).
func (s *holdSet) own(n *holdNode) *holdNode {
	if n.gen == s.gen {
		return n
	}
	c := &holdNode{gen: s.gen}
	if n.leaf() {
		c.ents = withRoom(n.ents, len(n.ents)+1, maxLeaf)
	} else {
		c.keys = withRoom(n.keys, len(n.keys)+1, maxInner)
		c.kids = withRoom(n.kids, len(n.kids)+1, maxInner)
	}
	return c
}

// withRoom returns a copy of s with capacity for need elements, but not
// more than limit.
func withRoom[T any](s []T, need, limit int) []T {
	return append(make([]T, 0, min(need, limit)), s...)
}

// room returns s, or a copy of it, with capacity for need elements. It
// grows by half at least, so that a node filled one ID at a time (IDs
// ascending past the last) is copied a few times, not once per ID.
func room[T any](s []T, need, limit int) []T {
	if need <= cap(s) {
		return s
	}
	return withRoom(s, max(need, len(s)+len(s)/2), limit)
}

func (s *holdSet) put(id string, h *Hold) {
	if s.root == nil {
		s.root = &holdNode{gen: s.gen}
	}
	s.root = s.own(s.root)
	added, right := s.insert(s.root, id, h)
	if added {
		s.count++
	}
	if right != nil {
		s.root = &holdNode{gen: s.gen, keys: []string{s.root.minKey(), right.minKey()}, kids: []*holdNode{s.root, right}}
	}
}

// insert puts id into n, which this change owns. It reports whether id is
// new, and returns the new right sibling when n had to split.
func (s *holdSet) insert(n *holdNode, id string, h *Hold) (added bool, right *holdNode) {
	if n.leaf() {
		i, found := searchLeaf(n.ents, id)
		if found {
			n.ents[i].h = h
			return false, nil
		}
		e := holdEntry{id, h}
		if len(n.ents) < maxLeaf {
			n.ents = insertAt(room(n.ents, len(n.ents)+1, maxLeaf), i, e)
			return true, nil
		}
		if i == len(n.ents) {
			// Appending (queue IDs grow with time): leave n full rather
			// than half empty for good.
			return true, &holdNode{gen: s.gen, ents: []holdEntry{e}}
		}
		half := len(n.ents) / 2
		right = &holdNode{gen: s.gen, ents: withRoom(n.ents[half:], len(n.ents)-half+1, maxLeaf)}
		clear(n.ents[half:])
		n.ents = n.ents[:half]
		if i <= half {
			n.ents = insertAt(n.ents, i, e)
		} else {
			right.ents = insertAt(right.ents, i-half, e)
		}
		return true, right
	}
	i := childIndex(n.keys, id)
	if id < n.keys[i] {
		n.keys[i] = id // only for i == 0: id is below everything here
	}
	kid := s.own(n.kids[i])
	n.kids[i] = kid
	added, split := s.insert(kid, id, h)
	if split == nil {
		return added, nil
	}
	key, at := split.minKey(), i+1
	if len(n.kids) < maxInner {
		n.keys = insertAt(room(n.keys, len(n.keys)+1, maxInner), at, key)
		n.kids = insertAt(room(n.kids, len(n.kids)+1, maxInner), at, split)
		return added, nil
	}
	if at == len(n.kids) {
		return added, &holdNode{gen: s.gen, keys: []string{key}, kids: []*holdNode{split}}
	}
	half := len(n.kids) / 2
	right = &holdNode{gen: s.gen, keys: withRoom(n.keys[half:], len(n.keys)-half+1, maxInner),
		kids: withRoom(n.kids[half:], len(n.kids)-half+1, maxInner)}
	clear(n.keys[half:])
	clear(n.kids[half:])
	n.keys, n.kids = n.keys[:half], n.kids[:half]
	if at <= half {
		n.keys = insertAt(n.keys, at, key)
		n.kids = insertAt(n.kids, at, split)
	} else {
		right.keys = insertAt(right.keys, at-half, key)
		right.kids = insertAt(right.kids, at-half, split)
	}
	return added, right
}

// del removes id, which must be held.
func (s *holdSet) del(id string) {
	s.root = s.own(s.root)
	s.remove(s.root, id)
	s.count--
	for !s.root.leaf() && len(s.root.kids) == 1 {
		s.root = s.root.kids[0]
	}
	if s.root.leaf() && len(s.root.ents) == 0 {
		s.root = nil
	}
}

func (s *holdSet) remove(n *holdNode, id string) {
	if n.leaf() {
		i, _ := searchLeaf(n.ents, id)
		n.ents = removeAt(n.ents, i)
		return
	}
	i := childIndex(n.keys, id)
	kid := s.own(n.kids[i])
	n.kids[i] = kid
	s.remove(kid, id)
	if kid.size() < kid.minSize() {
		s.rebalance(n, i)
	}
}

// rebalance joins the underfull kids[i] of n with a neighbour, or, when
// both do not fit in one node, evens them out.
func (s *holdSet) rebalance(n *holdNode, i int) {
	if len(n.kids) < 2 {
		return // the root's only kid; del lifts it
	}
	l := i
	if l == len(n.kids)-1 {
		l--
	}
	r := l + 1
	left := s.own(n.kids[l])
	n.kids[l] = left
	right := n.kids[r]
	limit := maxLeaf
	if !left.leaf() {
		limit = maxInner
	}
	if total := left.size() + right.size(); total <= limit {
		if left.leaf() {
			left.ents = append(room(left.ents, total, limit), right.ents...)
		} else {
			left.keys = append(room(left.keys, total, limit), right.keys...)
			left.kids = append(room(left.kids, total, limit), right.kids...)
		}
		n.keys = removeAt(n.keys, r)
		n.kids = removeAt(n.kids, r)
		return
	}
	right = s.own(right)
	n.kids[r] = right
	if left.leaf() {
		left.ents, right.ents = even(left.ents, right.ents, limit)
	} else {
		left.keys, right.keys = even(left.keys, right.keys, limit)
		left.kids, right.kids = even(left.kids, right.kids, limit)
	}
	n.keys[r] = right.minKey()
}

// even moves elements between two owned neighbours so that their lengths
// differ by at most one.
func even[T any](l, r []T, limit int) ([]T, []T) {
	total := len(l) + len(r)
	half := total / 2
	switch {
	case len(l) > half:
		move := len(l) - half
		r = room(r, len(r)+move, limit)
		r = r[:len(r)+move]
		copy(r[move:], r[:len(r)-move])
		copy(r, l[half:])
		clear(l[half:])
		l = l[:half]
	case len(l) < half:
		move := half - len(l)
		l = append(room(l, half, limit), r[:move]...)
		copy(r, r[move:])
		clear(r[len(r)-move:])
		r = r[:len(r)-move]
	}
	return l, r
}

func insertAt[T any](s []T, i int, v T) []T {
	var zero T
	s = append(s, zero)
	copy(s[i+1:], s[i:])
	s[i] = v
	return s
}

// removeAt clears the vacated last slot, so that the backing array does
// not keep a released ID alive.
func removeAt[T any](s []T, i int) []T {
	copy(s[i:], s[i+1:])
	var zero T
	s[len(s)-1] = zero
	return s[:len(s)-1]
}
