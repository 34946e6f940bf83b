package imapview

import (
	"bytes"
	"context"
	"io"
	"slices"
	"strings"
	"time"

	"github.com/emersion/go-imap/v2"
	"github.com/emersion/go-imap/v2/imapserver"
	gomessage "github.com/emersion/go-message"
	gomail "github.com/emersion/go-message/mail"
	"github.com/emersion/go-message/textproto"

	"github.com/mxq-dev/mxq/continuity/index"
)

// Search evaluates criteria on the client's view of the folder. Keys on
// the envelope (dates, size, flags, UIDs) cost nothing; header keys read
// the cached header; TEXT and BODY read the message.
func (ss *session) Search(kind imapserver.NumKind, criteria *imap.SearchCriteria, options *imap.SearchOptions) (*imap.SearchData, error) {
	ctx, cancel := ss.ctx()
	defer cancel()
	var (
		data   imap.SearchData
		seqSet imap.SeqSet
		uidSet imap.UIDSet
	)
	all := ss.resolve(imap.SeqSet{imap.SeqRange{Start: 1, Stop: 0}})
	if len(ss.uids) == 0 {
		all = nil
	}
	for _, it := range all {
		m, ok := ss.idx.Get(ss.user, it.uid)
		if !ok {
			continue
		}
		c := &candidate{ss: ss, ctx: ctx, it: it, m: m}
		if !c.match(criteria) {
			continue
		}
		num := it.seq
		if kind == imapserver.NumKindUID {
			num = it.uid
			uidSet.AddNum(imap.UID(it.uid))
		} else {
			seqSet.AddNum(it.seq)
		}
		if data.Min == 0 || num < data.Min {
			data.Min = num
		}
		data.Max = max(data.Max, num)
		data.Count++
	}
	if kind == imapserver.NumKindUID {
		data.All = uidSet
	} else {
		data.All = seqSet
	}
	return &data, nil
}

// candidate is a message being matched, its header and body read at most
// once and only if a key needs them.
type candidate struct {
	ss  *session
	ctx context.Context
	it  item
	m   index.Message

	header *textproto.Header
	body   []byte
	failed bool
}

func (c *candidate) getHeader() (textproto.Header, bool) {
	if c.header == nil && !c.failed {
		h, err := c.ss.s.o.Reader.Header(c.ctx, c.ss.user, c.m)
		if err != nil {
			c.failed = true
			return textproto.Header{}, false
		}
		c.header = &h
	}
	if c.header == nil {
		return textproto.Header{}, false
	}
	return *c.header, true
}

func (c *candidate) getBody() ([]byte, bool) {
	if c.body == nil && !c.failed {
		_, r, err := c.ss.s.o.Reader.OpenQuiet(c.ctx, c.ss.user, c.it.uid)
		if err == nil {
			c.body, err = io.ReadAll(r)
		}
		if err != nil {
			c.failed = true
		}
	}
	return c.body, c.body != nil
}

func (c *candidate) match(cr *imap.SearchCriteria) bool {
	for _, set := range cr.SeqNum {
		if !containsSeq(set, c.it.seq, uint32(len(c.ss.uids))) {
			return false
		}
	}
	last := uint32(0)
	if n := len(c.ss.uids); n > 0 {
		last = c.ss.uids[n-1]
	}
	for _, set := range cr.UID {
		if !containsUID(set, c.it.uid, last) {
			return false
		}
	}
	if !matchDate(c.m.Arrived, cr.Since, cr.Before) {
		return false
	}
	flags := c.ss.flags[c.it.uid]
	for _, f := range cr.Flag {
		if !slices.Contains(flags, canonical(f)) {
			return false
		}
	}
	for _, f := range cr.NotFlag {
		if slices.Contains(flags, canonical(f)) {
			return false
		}
	}
	if cr.Larger != 0 && c.m.Size <= cr.Larger {
		return false
	}
	if cr.Smaller != 0 && c.m.Size >= cr.Smaller {
		return false
	}
	if len(cr.Header) > 0 || !cr.SentSince.IsZero() || !cr.SentBefore.IsZero() {
		h, ok := c.getHeader()
		if !ok {
			return false
		}
		mh := gomail.Header{Header: gomessage.Header{Header: h}}
		for _, f := range cr.Header {
			if !matchFields(mh.FieldsByKey(f.Key), f.Value) {
				return false
			}
		}
		if !cr.SentSince.IsZero() || !cr.SentBefore.IsZero() {
			t, err := mh.Date()
			if err != nil || !matchDate(t, cr.SentSince, cr.SentBefore) {
				return false
			}
		}
	}
	for _, text := range cr.Text {
		b, ok := c.getBody()
		if !ok || !matchEntity(b, text, true) {
			return false
		}
	}
	for _, text := range cr.Body {
		b, ok := c.getBody()
		if !ok || !matchEntity(b, text, false) {
			return false
		}
	}
	for i := range cr.Not {
		if c.match(&cr.Not[i]) {
			return false
		}
	}
	for i := range cr.Or {
		if !c.match(&cr.Or[i][0]) && !c.match(&cr.Or[i][1]) {
			return false
		}
	}
	return true
}

func containsSeq(set imap.SeqSet, seq, n uint32) bool {
	for _, r := range set {
		if inRange(r.Start, r.Stop, seq, n) {
			return true
		}
	}
	return false
}

// matchDate compares dates only, in UTC, as RFC 3501 asks.
func matchDate(t, since, before time.Time) bool {
	t = time.Date(t.Year(), t.Month(), t.Day(), 0, 0, 0, 0, time.UTC)
	if !since.IsZero() && t.Before(since) {
		return false
	}
	if !before.IsZero() && !t.Before(before) {
		return false
	}
	return true
}

func matchFields(fields gomessage.HeaderFields, pattern string) bool {
	if pattern == "" {
		return fields.Len() > 0
	}
	pattern = strings.ToLower(pattern)
	for fields.Next() {
		v, err := fields.Text()
		if err != nil {
			v = fields.Value()
		}
		if strings.Contains(strings.ToLower(v), pattern) {
			return true
		}
	}
	return false
}

// matchEntity looks for text in the text parts of a message (and its
// header fields when includeHeader), decoded; a part that cannot be
// decoded is searched raw.
func matchEntity(msg []byte, pattern string, includeHeader bool) bool {
	if pattern == "" {
		return true
	}
	e, err := gomessage.Read(bytes.NewReader(msg))
	if e == nil {
		return bytes.Contains(bytes.ToLower(msg), bytes.ToLower([]byte(pattern)))
	}
	_ = err // unknown charset or encoding: the entity is still readable
	return entityContains(e, strings.ToLower(pattern), includeHeader, 0)
}

func entityContains(e *gomessage.Entity, pattern string, includeHeader bool, depth int) bool {
	if includeHeader && matchFields(e.Header.Fields(), pattern) {
		return true
	}
	if depth > 20 {
		return false
	}
	if mr := e.MultipartReader(); mr != nil {
		for {
			p, err := mr.NextPart()
			if err != nil {
				return false
			}
			if entityContains(p, pattern, includeHeader, depth+1) {
				return true
			}
		}
	}
	t, _, _ := e.Header.ContentType()
	if t != "" && !strings.HasPrefix(t, "text/") && !strings.HasPrefix(t, "message/") {
		return false
	}
	b, _ := io.ReadAll(io.LimitReader(e.Body, 16<<20))
	return bytes.Contains(bytes.ToLower(b), []byte(pattern))
}
