package envelope

import (
	"errors"
	"strings"
	"sync"
	"time"
)

// IDLen is the length of a queue ID.
const IDLen = 20

// alphabet is Crockford's base32; its characters are in ASCII order, so IDs
// of equal length compare like the numbers they encode.
const alphabet = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"

// IDGen makes queue IDs: 96 bits, written as 20 base32 characters, made of
// 48 bits of milliseconds since the Unix epoch, a 16-bit counter within the
// millisecond, and a 32-bit salt that differs per process. IDs from one
// generator strictly increase; IDs from different nodes sort by arrival time
// to the millisecond and cannot collide unless two salts do.
type IDGen struct {
	now  func() time.Time
	salt uint32

	mu     sync.Mutex
	lastMS int64
	seq    uint32
}

// NewIDGen returns a generator reading the clock now and using salt to keep
// IDs of concurrent nodes apart (pass a random value).
func NewIDGen(now func() time.Time, salt uint32) *IDGen {
	return &IDGen{now: now, salt: salt}
}

// New returns the next queue ID.
func (g *IDGen) New() string {
	g.mu.Lock()
	ms := g.now().UnixMilli()
	if ms <= g.lastMS {
		// Same millisecond, or the clock stepped back: stay monotonic.
		ms = g.lastMS
		g.seq++
		if g.seq > 0xffff {
			ms++
			g.seq = 0
		}
	} else {
		g.seq = 0
	}
	g.lastMS = ms
	seq := g.seq
	g.mu.Unlock()

	hi := uint64(ms)<<16 | uint64(seq) // 64 bits
	lo := uint64(g.salt)               // 32 bits
	var b [IDLen]byte
	// 96 bits = 20 chars × 5 bits minus 4 spare high bits.
	for i := IDLen - 1; i >= 0; i-- {
		b[i] = alphabet[lo&31]
		lo = lo>>5 | (hi&31)<<27
		hi >>= 5
	}
	return string(b[:])
}

// ErrBadID reports a string that is not a queue ID.
var ErrBadID = errors.New("not a queue ID")

// IDTime returns the arrival time encoded in a queue ID.
func IDTime(id string) (time.Time, error) {
	if !ValidID(id) {
		return time.Time{}, ErrBadID
	}
	var v uint64
	// The first 12 characters carry the top 60 bits: 4 spare, 48 of time, 8 of counter.
	for i := 0; i < 12; i++ {
		v = v<<5 | uint64(strings.IndexByte(alphabet, id[i]))
	}
	return time.UnixMilli(int64(v >> 8)), nil
}

// ValidID reports whether id has the shape of a queue ID.
func ValidID(id string) bool {
	if len(id) != IDLen {
		return false
	}
	for i := 0; i < len(id); i++ {
		if strings.IndexByte(alphabet, id[i]) < 0 {
			return false
		}
	}
	return true
}
