// Package imapview serves held mail over IMAP (go-imap v2), read-only:
// each user sees one folder (INBOX by default) holding the messages mxq
// keeps for their address, so that their usual mail client works while
// the mailbox store is down.
//
// What a client can do: LOGIN (only over TLS: implicit, or after
// STARTTLS), LIST/LSUB/STATUS of the one folder, SELECT or EXAMINE it,
// FETCH anything (the body is served byte for byte as queued, streamed;
// ENVELOPE and BODYSTRUCTURE are parsed from it), SEARCH by the usual
// keys, IDLE and NOOP to see new arrivals and, as EXPUNGE, messages the
// drain delivered to the store. Flags (\Seen when a message is read,
// others with STORE) live in the session only: PERMANENTFLAGS is empty,
// which tells the client exactly that. What would change or remove held
// mail is refused with NO [CANNOT] and a sentence saying why: APPEND,
// COPY, STORE \Deleted, CREATE, DELETE, RENAME. EXPUNGE (and CLOSE) have
// nothing to remove, since no message can carry \Deleted, and succeed.
//
// Each session keeps the list of UIDs its client knows, in sequence
// order. Polls (after every command, and in IDLE whenever the index
// signals a change of the user's mailbox) compare it with the index:
// UIDs gone are reported as EXPUNGE (highest sequence first, so that no
// report shifts another), new UIDs — always above the known ones — as
// EXISTS. During FETCH, STORE and SEARCH, where IMAP forbids EXPUNGE, a
// gone message stays in the session's list and simply returns nothing.
package imapview

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/emersion/go-imap/v2"
	"github.com/emersion/go-imap/v2/imapserver"

	"github.com/mxq-dev/mxq/continuity/auth"
	"github.com/mxq-dev/mxq/continuity/index"
	"github.com/mxq-dev/mxq/continuity/mail"
)

// Options configures the IMAP view.
type Options struct {
	// Folder is the folder's name ("INBOX" is matched case-insensitively,
	// as IMAP requires).
	Folder string
	Reader *mail.Reader
	Guard  *auth.Guard
	// TLS serves implicit TLS and STARTTLS.
	TLS *tls.Config
	// MaxSessions caps concurrent connections (default 1000).
	MaxSessions int
	Logger      *slog.Logger
}

// Server is the IMAP view.
type Server struct {
	o        Options
	idx      *index.Index
	log      *slog.Logger
	implicit *imapserver.Server
	startTLS *imapserver.Server
	sessions atomic.Int64

	mu        sync.Mutex
	listeners []net.Listener
}

// New returns the server; Serve* run it.
func New(o Options) *Server {
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.MaxSessions <= 0 {
		o.MaxSessions = 1000
	}
	s := &Server{o: o, idx: o.Reader.Index(), log: o.Logger}
	caps := imap.CapSet{imap.CapIMAP4rev1: {}}
	logger := imapLogger{o.Logger}
	s.implicit = imapserver.New(&imapserver.Options{NewSession: s.newSession, Caps: caps, Logger: logger})
	s.startTLS = imapserver.New(&imapserver.Options{NewSession: s.newSession, Caps: caps, Logger: logger, TLSConfig: o.TLS})
	return s
}

// ServeTLS serves implicit TLS (port 993 style) on ln until Close.
func (s *Server) ServeTLS(ln net.Listener) error {
	return s.implicit.Serve(tls.NewListener(ln, s.o.TLS))
}

// ServeSTARTTLS serves ln (port 143 style): LOGIN only after STARTTLS.
func (s *Server) ServeSTARTTLS(ln net.Listener) error {
	return s.startTLS.Serve(ln)
}

// Close stops both servers and their connections.
func (s *Server) Close() error {
	return errors.Join(s.implicit.Close(), s.startTLS.Close())
}

// Sessions is the number of connected clients.
func (s *Server) Sessions() int { return int(s.sessions.Load()) }

func (s *Server) newSession(c *imapserver.Conn) (imapserver.Session, *imapserver.GreetingData, error) {
	if n := s.sessions.Add(1); n > int64(s.o.MaxSessions) {
		s.sessions.Add(-1)
		return nil, nil, &imap.Error{Type: imap.StatusResponseTypeBye, Text: "Too many connections, try again later"}
	}
	var addr netip.Addr
	if ap, err := netip.ParseAddrPort(c.NetConn().RemoteAddr().String()); err == nil {
		addr = ap.Addr().Unmap()
	}
	return &session{s: s, idx: s.idx, addr: addr, flags: map[uint32][]imap.Flag{}}, nil, nil
}

// imapLogger sends the library's messages (mostly clients that hung up)
// to slog at debug level.
type imapLogger struct{ l *slog.Logger }

func (l imapLogger) Printf(format string, args ...any) {
	msg := "imap: " + fmt.Sprintf(format, args...)
	if strings.HasPrefix(format, "panic") {
		l.l.Error(msg) // a bug of ours or the library's: the client was cut off
		return
	}
	l.l.Debug(msg)
}

// Refusals, each saying why.
var (
	errReadOnly = &imap.Error{Type: imap.StatusResponseTypeNo, Code: imap.ResponseCodeCannot,
		Text: "mxq holds this mail until your mailbox is back; it can be read here, not changed"}
	errNoDelete = &imap.Error{Type: imap.StatusResponseTypeNo, Code: imap.ResponseCodeCannot,
		Text: "Messages cannot be deleted here: mxq keeps them until they are delivered to your mailbox"}
	errNoFolders = &imap.Error{Type: imap.StatusResponseTypeNo, Code: imap.ResponseCodeCannot,
		Text: "Folders cannot be created, deleted or renamed in the view of held mail"}
	errNoCopy = &imap.Error{Type: imap.StatusResponseTypeNo, Code: imap.ResponseCodeCannot,
		Text: "Messages cannot be copied or moved: the view of held mail has one read-only folder"}
	errExamine = &imap.Error{Type: imap.StatusResponseTypeNo, Code: imap.ResponseCodeCannot,
		Text: "The folder was opened with EXAMINE: flags cannot be changed"}
	errNotReady = &imap.Error{Type: imap.StatusResponseTypeNo, Code: imap.ResponseCodeUnavailable,
		Text: "mxq is still indexing the mail it holds; try again in a minute"}
	errLimited = &imap.Error{Type: imap.StatusResponseTypeNo, Code: imap.ResponseCodeUnavailable,
		Text: "Too many failed logins; try again later"}
	errAuthDown = &imap.Error{Type: imap.StatusResponseTypeNo, Code: imap.ResponseCodeUnavailable,
		Text: "Authentication is unavailable; try again later"}
	errGone = &imap.Error{Type: imap.StatusResponseTypeNo, Code: imap.ResponseCodeUnavailable,
		Text: "The message could not be read now; try again"}
)

func (ss *session) errNoFolder(name string) error {
	return &imap.Error{Type: imap.StatusResponseTypeNo, Code: imap.ResponseCodeNonExistent,
		Text: fmt.Sprintf("No folder %q: the mail held for you while your mailbox is down is in %s", name, ss.folder())}
}

// sysFlags are the flags a client may set for the session.
var sysFlags = []imap.Flag{imap.FlagSeen, imap.FlagAnswered, imap.FlagFlagged, imap.FlagDraft}

// session is one connection.
type session struct {
	s    *Server
	idx  *index.Index
	addr netip.Addr
	user string // mailbox key once logged in

	selected bool
	readOnly bool
	uids     []uint32               // the client's view: sequence number i+1 is uids[i]
	flags    map[uint32][]imap.Flag // per UID, for this session only
}

func (ss *session) ctx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), 2*time.Minute)
}

func (ss *session) Close() error {
	ss.s.sessions.Add(-1)
	return nil
}

func (ss *session) Login(username, password string) error {
	ctx, cancel := ss.ctx()
	defer cancel()
	id, err := ss.s.o.Guard.Login(ctx, auth.Attempt{Login: username, Password: password, Addr: ss.addr, Proto: "imap"})
	switch {
	case errors.Is(err, auth.ErrRateLimited):
		return errLimited
	case errors.Is(err, auth.ErrUnavailable):
		return errAuthDown
	case err != nil:
		return imapserver.ErrAuthFailed
	}
	if !ss.idx.IsReady() {
		return errNotReady
	}
	ss.user = id.User
	return nil
}

func (ss *session) isFolder(name string) bool {
	f := ss.s.o.Folder
	if strings.EqualFold(f, "INBOX") {
		return strings.EqualFold(name, "INBOX")
	}
	return name == f
}

func (ss *session) folder() string {
	if strings.EqualFold(ss.s.o.Folder, "INBOX") {
		return "INBOX"
	}
	return ss.s.o.Folder
}

func (ss *session) Select(name string, options *imap.SelectOptions) (*imap.SelectData, error) {
	if !ss.isFolder(name) {
		return nil, ss.errNoFolder(name)
	}
	uids, next := ss.idx.UIDs(ss.user)
	ss.selected, ss.readOnly, ss.uids = true, options.ReadOnly, uids
	data := &imap.SelectData{
		Flags:          sysFlags,
		PermanentFlags: []imap.Flag{}, // flags are kept for the session only
		NumMessages:    uint32(len(uids)),
		UIDNext:        imap.UID(next),
		UIDValidity:    ss.idx.UIDValidity(),
	}
	for i, uid := range uids {
		if !slices.Contains(ss.flags[uid], imap.FlagSeen) {
			data.FirstUnseenSeqNum = uint32(i + 1)
			break
		}
	}
	return data, nil
}

func (ss *session) Unselect() error {
	ss.selected, ss.uids = false, nil
	return nil
}

func (ss *session) Create(string, *imap.CreateOptions) error { return errNoFolders }
func (ss *session) Delete(string) error                      { return errNoFolders }
func (ss *session) Rename(string, string, *imap.RenameOptions) error {
	return errNoFolders
}

func (ss *session) Subscribe(name string) error {
	if !ss.isFolder(name) {
		return ss.errNoFolder(name)
	}
	return nil
}

func (ss *session) Unsubscribe(name string) error { return ss.Subscribe(name) }

func (ss *session) List(w *imapserver.ListWriter, ref string, patterns []string, options *imap.ListOptions) error {
	if len(patterns) == 0 {
		// LIST "" "": the hierarchy delimiter.
		return w.WriteList(&imap.ListData{Attrs: []imap.MailboxAttr{imap.MailboxAttrNoSelect}, Delim: '/'})
	}
	for _, p := range patterns {
		if imapserver.MatchList(ss.folder(), '/', ref, p) {
			data := &imap.ListData{Mailbox: ss.folder(), Delim: '/', Attrs: []imap.MailboxAttr{imap.MailboxAttrHasNoChildren}}
			if options.SelectSubscribed || options.ReturnSubscribed {
				data.Attrs = append(data.Attrs, imap.MailboxAttrSubscribed)
			}
			return w.WriteList(data)
		}
	}
	return nil
}

func (ss *session) Status(name string, options *imap.StatusOptions) (*imap.StatusData, error) {
	if !ss.isFolder(name) {
		return nil, ss.errNoFolder(name)
	}
	msgs, next := ss.idx.List(ss.user)
	data := &imap.StatusData{Mailbox: ss.folder(), UIDNext: imap.UID(next), UIDValidity: ss.idx.UIDValidity()}
	n := uint32(len(msgs))
	if options.NumMessages {
		data.NumMessages = &n
	}
	if options.NumUnseen {
		unseen := uint32(0)
		for _, m := range msgs {
			if !slices.Contains(ss.flags[m.UID], imap.FlagSeen) {
				unseen++
			}
		}
		data.NumUnseen = &unseen
	}
	if options.NumRecent {
		zero := uint32(0)
		data.NumRecent = &zero
	}
	if options.NumDeleted {
		zero := uint32(0)
		data.NumDeleted = &zero
	}
	if options.Size {
		var size int64
		for _, m := range msgs {
			size += m.Size
		}
		data.Size = &size
	}
	return data, nil
}

func (ss *session) Append(string, imap.LiteralReader, *imap.AppendOptions) (*imap.AppendData, error) {
	return nil, errReadOnly
}

func (ss *session) Copy(imap.NumSet, string) (*imap.CopyData, error) { return nil, errNoCopy }

// Expunge removes nothing: no message can be marked \Deleted here.
func (ss *session) Expunge(*imapserver.ExpungeWriter, *imap.UIDSet) error { return nil }

// Poll reports the changes of the user's mailbox since the client last
// heard: EXPUNGE for messages delivered meanwhile (when allowed), EXISTS
// for new ones.
func (ss *session) Poll(w *imapserver.UpdateWriter, allowExpunge bool) error {
	if !ss.selected {
		return nil
	}
	now, _ := ss.idx.UIDs(ss.user)
	if allowExpunge {
		for i := len(ss.uids) - 1; i >= 0; i-- {
			uid := ss.uids[i]
			if _, found := slices.BinarySearch(now, uid); found {
				continue
			}
			if err := w.WriteExpunge(uint32(i + 1)); err != nil {
				return err
			}
			ss.uids = slices.Delete(ss.uids, i, i+1)
			delete(ss.flags, uid)
		}
	}
	last := uint32(0)
	if len(ss.uids) > 0 {
		last = ss.uids[len(ss.uids)-1]
	}
	i, _ := slices.BinarySearch(now, last+1)
	if added := now[i:]; len(added) > 0 {
		ss.uids = append(ss.uids, added...)
		return w.WriteNumMessages(uint32(len(ss.uids)))
	}
	return nil
}

// Idle reports changes as they happen, until the client ends the IDLE.
func (ss *session) Idle(w *imapserver.UpdateWriter, stop <-chan struct{}) error {
	for {
		// Watch before polling, so that a change in between is not lost.
		changed := ss.idx.Watch(ss.user)
		if err := ss.Poll(w, true); err != nil {
			return err
		}
		select {
		case <-changed:
		case <-stop:
			return nil
		}
	}
}

// item is a message a command names: its sequence number in the
// client's view and its UID.
type item struct {
	seq uint32
	uid uint32
}

// resolve turns a sequence or UID set into the messages of the client's
// view it names, in sequence order.
func (ss *session) resolve(numSet imap.NumSet) []item {
	var out []item
	switch set := numSet.(type) {
	case imap.SeqSet:
		n := uint32(len(ss.uids))
		for _, r := range set {
			start, stop := r.Start, r.Stop
			if start == 0 {
				start = n
			}
			if stop == 0 {
				stop = n
			}
			if start > stop {
				start, stop = stop, start
			}
			for seq := start; seq <= stop && seq <= n; seq++ {
				if seq >= 1 {
					out = append(out, item{seq, ss.uids[seq-1]})
				}
			}
		}
		slices.SortFunc(out, func(a, b item) int { return int(a.seq) - int(b.seq) })
		out = slices.CompactFunc(out, func(a, b item) bool { return a.seq == b.seq })
	case imap.UIDSet:
		max := uint32(0)
		if len(ss.uids) > 0 {
			max = ss.uids[len(ss.uids)-1]
		}
		for i, uid := range ss.uids {
			if containsUID(set, uid, max) {
				out = append(out, item{uint32(i + 1), uid})
			}
		}
	}
	return out
}

// containsUID is UIDSet.Contains with "*" standing for max.
func containsUID(set imap.UIDSet, uid, max uint32) bool {
	for _, r := range set {
		if inRange(uint32(r.Start), uint32(r.Stop), uid, max) {
			return true
		}
	}
	return false
}

// inRange reports whether x is in the IMAP range start:stop, where 0
// stands for "*" (max) and the bounds may come in either order.
func inRange(start, stop, x, max uint32) bool {
	if start == 0 {
		start = max
	}
	if stop == 0 {
		stop = max
	}
	if start > stop {
		start, stop = stop, start
	}
	return x >= start && x <= stop
}

func (ss *session) who() mail.Who {
	return mail.Who{User: ss.user, Proto: "imap", Addr: ss.addr.String()}
}

func (ss *session) Fetch(w *imapserver.FetchWriter, numSet imap.NumSet, options *imap.FetchOptions) error {
	ctx, cancel := ss.ctx()
	defer cancel()
	markSeen := false
	for _, bs := range options.BodySection {
		markSeen = markSeen || !bs.Peek
	}
	for _, bs := range options.BinarySection {
		markSeen = markSeen || !bs.Peek
	}
	markSeen = markSeen && !ss.readOnly
	for _, it := range ss.resolve(numSet) {
		m, ok := ss.idx.Get(ss.user, it.uid)
		if !ok {
			continue // delivered since: reported as EXPUNGE at the next poll
		}
		if err := ss.fetchOne(ctx, w, it, m, options, markSeen); err != nil {
			return err
		}
	}
	return nil
}

// errPartial aborts a FETCH whose literal could not be completed: the
// connection cannot carry on after a short literal.
var errPartial = errors.New("imapview: message body shorter than announced")

func (ss *session) fetchOne(ctx context.Context, w *imapserver.FetchWriter, it item, m index.Message, options *imap.FetchOptions, markSeen bool) error {
	rd := ss.s.o.Reader
	audited := false
	// open returns the message; the first open that shows content is the
	// audited read.
	open := func(content bool, what string) (io.Reader, error) {
		var body io.Reader
		var err error
		if content && !audited {
			_, body, err = rd.Open(ctx, ss.who(), it.uid, what)
			audited = err == nil
		} else {
			_, body, err = rd.OpenQuiet(ctx, ss.user, it.uid)
		}
		return body, err
	}
	// Read what needs reading before the response starts: a message that
	// vanished meanwhile then yields no response at all rather than half
	// of one.
	var env *imap.Envelope
	if options.Envelope {
		h, err := rd.Header(ctx, ss.user, m)
		if errors.Is(err, mail.ErrNotFound) {
			return nil
		}
		if err != nil {
			return errGone
		}
		env = imapserver.ExtractEnvelope(h)
	}
	var bs imap.BodyStructure
	if options.BodyStructure != nil {
		body, err := open(false, "")
		if errors.Is(err, mail.ErrNotFound) {
			return nil
		}
		if err != nil {
			return errGone
		}
		bs = repairStructure(imapserver.ExtractBodyStructure(body))
	}
	seenChanged := false
	if markSeen && !slices.Contains(ss.flags[it.uid], imap.FlagSeen) {
		ss.flags[it.uid] = append(ss.flags[it.uid], imap.FlagSeen)
		seenChanged = true
	}

	resp := w.CreateMessage(it.seq)
	resp.WriteUID(imap.UID(it.uid))
	if options.Flags || seenChanged {
		resp.WriteFlags(ss.flagList(it.uid))
	}
	if options.InternalDate {
		resp.WriteInternalDate(m.Arrived)
	}
	if options.RFC822Size {
		resp.WriteRFC822Size(m.Size)
	}
	if env != nil {
		resp.WriteEnvelope(env)
	}
	if bs != nil {
		resp.WriteBodyStructure(bs)
	}
	for _, sec := range options.BodySection {
		whole := sec.Specifier == imap.PartSpecifierNone && len(sec.Part) == 0 && sec.Partial == nil &&
			len(sec.HeaderFields) == 0 && len(sec.HeaderFieldsNot) == 0
		content := sec.Specifier != imap.PartSpecifierHeader && sec.Specifier != imap.PartSpecifierMIME
		body, err := open(content, sectionName(sec))
		if err != nil {
			// The response has started: end it cleanly without the section.
			resp.Close()
			return errGone
		}
		if whole {
			// The message as queued, streamed: a 50 MiB message never sits
			// in memory whole.
			wc := resp.WriteBodySection(sec, m.Size)
			n, err := io.Copy(wc, io.LimitReader(body, m.Size))
			if err == nil && n != m.Size {
				err = errPartial
			}
			if err != nil {
				return fmt.Errorf("fetching message %s: %w", m.ID, err)
			}
			if err := wc.Close(); err != nil {
				return err
			}
			continue
		}
		buf := imapserver.ExtractBodySection(body, sec)
		if err := writeSection(resp.WriteBodySection(sec, int64(len(buf))), buf); err != nil {
			return err
		}
	}
	for _, sec := range options.BinarySection {
		body, err := open(true, "BINARY")
		if err != nil {
			resp.Close()
			return errGone
		}
		buf := imapserver.ExtractBinarySection(body, sec)
		if err := writeSection(resp.WriteBinarySection(sec, int64(len(buf))), buf); err != nil {
			return err
		}
	}
	for _, sec := range options.BinarySectionSize {
		body, err := open(false, "")
		if err != nil {
			resp.Close()
			return errGone
		}
		resp.WriteBinarySectionSize(sec, imapserver.ExtractBinarySectionSize(body, sec))
	}
	return resp.Close()
}

// writeSection writes one extracted section whose size was announced.
func writeSection(wc io.WriteCloser, buf []byte) error {
	if _, err := wc.Write(buf); err != nil {
		wc.Close()
		return err
	}
	return wc.Close()
}

func sectionName(sec *imap.FetchItemBodySection) string {
	var b strings.Builder
	b.WriteString("BODY[")
	for i, p := range sec.Part {
		if i > 0 {
			b.WriteByte('.')
		}
		fmt.Fprint(&b, p)
	}
	if sec.Specifier != imap.PartSpecifierNone {
		if len(sec.Part) > 0 {
			b.WriteByte('.')
		}
		b.WriteString(string(sec.Specifier))
	}
	b.WriteByte(']')
	return b.String()
}

func (ss *session) flagList(uid uint32) []imap.Flag {
	return slices.Clone(ss.flags[uid])
}

func (ss *session) Store(w *imapserver.FetchWriter, numSet imap.NumSet, flags *imap.StoreFlags, options *imap.StoreOptions) error {
	if flags.Op != imap.StoreFlagsDel {
		for _, f := range flags.Flags {
			if strings.EqualFold(string(f), string(imap.FlagDeleted)) {
				return errNoDelete
			}
		}
	}
	if ss.readOnly {
		return errExamine
	}
	items := ss.resolve(numSet)
	for _, it := range items {
		if _, ok := ss.idx.Get(ss.user, it.uid); !ok {
			continue
		}
		cur := ss.flags[it.uid]
		switch flags.Op {
		case imap.StoreFlagsSet:
			cur = nil
			fallthrough
		case imap.StoreFlagsAdd:
			for _, f := range flags.Flags {
				if f = canonical(f); !slices.Contains(cur, f) {
					cur = append(cur, f)
				}
			}
		case imap.StoreFlagsDel:
			for _, f := range flags.Flags {
				f = canonical(f)
				cur = slices.DeleteFunc(cur, func(g imap.Flag) bool { return g == f })
			}
		}
		ss.flags[it.uid] = cur
	}
	if flags.Silent {
		return nil
	}
	for _, it := range items {
		if _, ok := ss.idx.Get(ss.user, it.uid); !ok {
			continue
		}
		resp := w.CreateMessage(it.seq)
		resp.WriteUID(imap.UID(it.uid))
		resp.WriteFlags(ss.flagList(it.uid))
		if err := resp.Close(); err != nil {
			return err
		}
	}
	return nil
}

// canonical spells system flags the standard way and keeps keywords as
// they are.
func canonical(f imap.Flag) imap.Flag {
	for _, s := range append(sysFlags, imap.FlagDeleted) {
		if strings.EqualFold(string(f), string(s)) {
			return s
		}
	}
	return f
}

// repairStructure makes a BODYSTRUCTURE writable whatever the message: a
// multipart with no part at all (a boundary never found) gets one empty
// text part, where the library would refuse to write it and drop the
// connection.
func repairStructure(bs imap.BodyStructure) imap.BodyStructure {
	switch b := bs.(type) {
	case *imap.BodyStructureSinglePart:
		if b.Extended == nil {
			b.Extended = &imap.BodyStructureSinglePartExt{}
		}
		if b.MessageRFC822 != nil {
			b.MessageRFC822.BodyStructure = repairStructure(b.MessageRFC822.BodyStructure)
			if b.MessageRFC822.Envelope == nil {
				b.MessageRFC822.Envelope = &imap.Envelope{}
			}
		}
	case *imap.BodyStructureMultiPart:
		if b.Extended == nil {
			b.Extended = &imap.BodyStructureMultiPartExt{}
		}
		for i, c := range b.Children {
			b.Children[i] = repairStructure(c)
		}
		if len(b.Children) == 0 {
			b.Children = []imap.BodyStructure{&imap.BodyStructureSinglePart{
				Type: "text", Subtype: "plain", Params: map[string]string{"charset": "us-ascii"}, Encoding: "7bit",
				Text: &imap.BodyStructureText{}, Extended: &imap.BodyStructureSinglePartExt{},
			}}
		}
	case nil:
		return repairStructure(&imap.BodyStructureSinglePart{Type: "text", Subtype: "plain"})
	}
	return bs
}
