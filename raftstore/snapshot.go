package raftstore

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
)

// snapshotVersion is the snapshot format, unchanged since the holds were a
// map: one JSON document
//
//	{"version":1,"state":{"index":N,"paused":B,"routes":{...},"holds":{"ID":{"by":...,"at":...,"reason":...},...}}}
//
// with the holds in ascending ID order. A node of any version reads any
// other's snapshot, which a rolling upgrade (and a rollback) needs: the
// leader sends its snapshot to followers of the other version. Both sides
// stream it (writeSnapshot, readSnapshot), so neither holds the whole
// document in memory the way json.Encoder and json.Decoder would (112 MB
// at a million holds).
const snapshotVersion = 1

// writeSnapshot writes st as a version 1 document, byte for byte what
// json.NewEncoder(w).Encode wrote for the same state when it had its holds
// in a map (encoding/json sorts map keys, as the tree is sorted).
func writeSnapshot(w *bufio.Writer, st *State) error {
	head, err := json.Marshal(st) // index, paused, routes: holds are unexported
	if err != nil {
		return err
	}
	if _, err := w.WriteString(`{"version":1,"state":`); err != nil {
		return err
	}
	if st.HoldCount() == 0 {
		w.Write(head)
		_, err := w.WriteString("}\n")
		return err
	}
	w.Write(head[:len(head)-1]) // reopen the state's object for the holds
	w.WriteString(`,"holds":{`)
	// A hold's value is encoded once per command that held, not once per
	// ID: bulk holds share one *Hold.
	values := map[*Hold][]byte{}
	var last *Hold
	var lastValue []byte
	first := true
	st.holds.each(func(id string, h *Hold) bool {
		if h != last {
			if lastValue = values[h]; lastValue == nil {
				if lastValue, err = json.Marshal(h); err != nil {
					return false
				}
				values[h] = lastValue
			}
			last = h
		}
		if !first {
			w.WriteByte(',')
		}
		first = false
		writeJSONString(w, id)
		w.WriteByte(':')
		_, err = w.Write(lastValue)
		return err == nil
	})
	if err != nil {
		return err
	}
	_, err = w.WriteString("}}}\n")
	return err
}

// writeJSONString writes s as encoding/json does. Queue IDs are plain
// ASCII, written as they are; anything else goes through json.Marshal so
// that its escapes (HTML characters, U+2028) stay identical.
func writeJSONString(w *bufio.Writer, s string) {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < 0x20 || c > 0x7e || c == '"' || c == '\\' || c == '<' || c == '>' || c == '&' {
			b, _ := json.Marshal(s) // a string always encodes
			w.Write(b)
			return
		}
	}
	w.WriteByte('"')
	w.WriteString(s)
	w.WriteByte('"')
}

// readSnapshot reads a version 1 document one hold at a time. It accepts
// what json.Decoder accepted when decoding the document into the old
// State: keys in any order and any case, unknown keys ignored, null for an
// object.
func readSnapshot(r io.Reader) (*State, error) {
	dec := json.NewDecoder(r)
	version := 0
	var st *State
	err := readObject(dec, func(key string) error {
		switch {
		case strings.EqualFold(key, "version"):
			if err := dec.Decode(&version); err != nil {
				return err
			}
			if version != snapshotVersion {
				// Before reading a possibly large state we cannot use.
				return fmt.Errorf("unknown version %d", version)
			}
			return nil
		case strings.EqualFold(key, "state"):
			var err error
			st, err = readState(dec)
			return err
		}
		return skipValue(dec)
	})
	if err != nil {
		return nil, err
	}
	if version != snapshotVersion {
		return nil, fmt.Errorf("unknown version %d", version)
	}
	if st == nil {
		st = &State{}
	}
	return st, nil
}

func readState(dec *json.Decoder) (*State, error) {
	st := &State{}
	st.holds.gen = 1 // a fresh tree: every node belongs to this restore
	// Holds with equal By, At and Reason (one command's, in the old
	// format written once per ID) share one *Hold again.
	shared := map[Hold]*Hold{}
	err := readObject(dec, func(key string) error {
		switch {
		case strings.EqualFold(key, "index"):
			return dec.Decode(&st.Index)
		case strings.EqualFold(key, "paused"):
			return dec.Decode(&st.Paused)
		case strings.EqualFold(key, "routes"):
			return dec.Decode(&st.Routes)
		case strings.EqualFold(key, "holds"):
			return readObject(dec, func(id string) error {
				var h Hold
				if err := dec.Decode(&h); err != nil {
					return fmt.Errorf("hold %q: %w", id, err)
				}
				p := shared[h]
				if p == nil {
					p = new(Hold)
					*p = h
					shared[h] = p
				}
				st.holds.put(id, p)
				return nil
			})
		}
		return skipValue(dec)
	})
	if len(st.Routes) == 0 {
		st.Routes = nil // as apply leaves it
	}
	return st, err
}

// readObject reads a JSON object, or null, calling field with each key
// while dec stands before that key's value, which field must consume.
func readObject(dec *json.Decoder, field func(key string) error) error {
	tok, err := dec.Token()
	if err != nil {
		return err
	}
	if tok == nil {
		return nil
	}
	if d, ok := tok.(json.Delim); !ok || d != '{' {
		return fmt.Errorf("want an object, not %v", tok)
	}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return err
		}
		key, ok := tok.(string)
		if !ok {
			return errors.New("object key is not a string") // Token does not allow it; be safe
		}
		if err := field(key); err != nil {
			return err
		}
	}
	_, err = dec.Token() // '}'
	return err
}

func skipValue(dec *json.Decoder) error {
	var v json.RawMessage
	return dec.Decode(&v)
}
