package web

import (
	"bufio"
	"errors"
	"fmt"
	"html"
	"html/template"
	"io"
	"mime"
	"net/http"
	"path"
	"strconv"
	"strings"
	"unicode"
	"unicode/utf8"

	"github.com/microcosm-cc/bluemonday"

	gomessage "github.com/emersion/go-message"
	_ "github.com/emersion/go-message/charset" // decode non-UTF-8 text parts and headers
	gomail "github.com/emersion/go-message/mail"

	"github.com/mxq-dev/mxq/continuity/index"
	"github.com/mxq-dev/mxq/continuity/mail"
)

// Limits of what a page shows; the rest is in the downloadable original.
const (
	pageSize     = 50
	maxTextShown = 1 << 20 // bytes of a text part
	maxHTMLInput = 2 << 20 // bytes of an HTML part given to the sanitizer
	maxParts     = 500
)

type listItem struct {
	UID     uint32
	From    string
	Subject string
	Date    string
	Size    string
}

type listPage struct {
	page
	Total      int
	Messages   []listItem
	Prev, Next int
}

func (s *Server) list(w http.ResponseWriter, r *http.Request, ss session) {
	msgs, _ := s.idx.List(ss.user)
	p, _ := strconv.Atoi(r.URL.Query().Get("page"))
	p = max(p, 1)
	data := listPage{page: page{Title: "Held mail", User: ss.user, CSRF: ss.csrf}, Total: len(msgs)}
	// Newest first; only the page shown has its headers read.
	end := len(msgs) - (p-1)*pageSize
	start := max(end-pageSize, 0)
	if end > 0 {
		if start > 0 {
			data.Next = p + 1
		}
		if p > 1 {
			data.Prev = p - 1
		}
		for i := end - 1; i >= start; i-- {
			m := msgs[i]
			it := listItem{UID: m.UID, From: m.From, Date: m.Arrived.Format("2 Jan 2006 15:04"), Size: sizeH(m.Size)}
			if sum, err := s.o.Reader.Summary(r.Context(), ss.user, m); err == nil {
				it.Subject, it.Date = sum.Subject, sum.Date.Format("2 Jan 2006 15:04")
				if sum.From != "" {
					it.From = sum.From
				}
			} else if errors.Is(err, mail.ErrNotFound) {
				continue // delivered while the page was being made
			}
			data.Messages = append(data.Messages, it)
		}
	}
	s.render(w, http.StatusOK, "list.html", data)
}

func sizeH(n int64) string {
	switch {
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.0f KB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}

type attachment struct {
	N    int
	Name string
	Type string
	Size string
}

type messagePage struct {
	page
	UID               uint32
	Subject, From, To string
	Cc, Date          string
	View              string
	HasHTML           bool
	Text              string
	HTML              template.HTML
	Attachments       []attachment
	Notes             []string
}

// open reads a held message for the page; when it cannot, it has answered
// (not found, or try again) and ok is false.
func (s *Server) open(w http.ResponseWriter, r *http.Request, ss session, uid uint32, what string) (index.Message, io.Reader, bool) {
	m, body, err := s.o.Reader.Open(r.Context(), s.who(r, ss), uid, what)
	if errors.Is(err, mail.ErrNotFound) {
		s.notFound(w, ss)
		return m, nil, false
	}
	if err != nil {
		s.log.Warn("web: reading a held message", "user", ss.user, "uid", uid, "what", what, "err", err)
		s.fail(w, ss, http.StatusServiceUnavailable, "Cannot read the message now", "Please try again in a moment.")
		return m, nil, false
	}
	return m, body, true
}

func (s *Server) message(w http.ResponseWriter, r *http.Request, ss session) {
	uid, ok := uidParam(r)
	if !ok {
		s.notFound(w, ss)
		return
	}
	m, body, ok := s.open(w, r, ss, uid, "web message")
	if !ok {
		return
	}
	data := messagePage{page: page{Title: "Message", User: ss.user, CSRF: ss.csrf}, UID: uid}
	parsed := parse(body)
	h := parsed.header
	data.Subject, data.From, data.To, data.Cc = parsed.subject, addrList(h, "From"), addrList(h, "To"), addrList(h, "Cc")
	data.Date = m.Arrived.Format("Mon, 2 Jan 2006 15:04 MST")
	if d, err := h.Date(); err == nil && !d.IsZero() {
		data.Date = d.Format("Mon, 2 Jan 2006 15:04 MST")
	}
	data.Title = data.Subject
	data.Attachments = parsed.attachments
	data.Notes = parsed.notes
	data.HasHTML = parsed.html != ""
	data.View = r.URL.Query().Get("view")
	if data.View != "text" && data.View != "html" {
		data.View = "text"
		if data.HasHTML {
			data.View = "html"
		}
	}
	if data.View == "html" && !data.HasHTML {
		data.View = "text"
	}
	switch data.View {
	case "html":
		clean, removed := s.sanitize(parsed.html)
		data.HTML = template.HTML(clean)
		if removed > 0 {
			data.Notes = append(data.Notes, fmt.Sprintf("%d image(s) were not loaded: images in mail can tell the sender you read it.", removed))
		}
	default:
		data.Text = parsed.text
		if data.Text == "" && data.HasHTML {
			data.Text = htmlToText(parsed.html)
		}
	}
	s.render(w, http.StatusOK, "message.html", data)
}

// parsed is what the message page shows of a message.
type parsed struct {
	header      gomail.Header
	subject     string
	text        string
	html        string
	attachments []attachment
	notes       []string
}

// parse reads a message for display, in bounded memory whatever its size
// or shape: text and HTML are cut at their limits, attachments only
// counted. Malformed MIME shows what could be read, with a note; a
// message that is not MIME at all shows as text.
func parse(body io.Reader) parsed {
	var p parsed
	br := bufio.NewReaderSize(body, 64<<10)
	// Keep the start: if the header cannot be parsed at all, it is what
	// the page shows.
	head, _ := br.Peek(64 << 10)
	head = append([]byte(nil), head...)
	e, err := gomessage.Read(br)
	if e == nil {
		p.text = toValidUTF8(string(head))
		p.notes = append(p.notes, "This message is not in a format that can be shown properly; the start of it is shown as it was received.")
		return p
	}
	if err != nil && !gomessage.IsUnknownCharset(err) && !gomessage.IsUnknownEncoding(err) {
		p.notes = append(p.notes, "Part of this message could not be decoded.")
	}
	p.header = gomail.Header{Header: e.Header}
	if subj, err := p.header.Subject(); err == nil {
		p.subject = subj
	} else {
		p.subject = e.Header.Get("Subject")
	}
	leaf := 0
	werr := walk(e, func(part *gomessage.Entity) {
		n := leaf
		leaf++
		if n >= maxParts {
			return
		}
		ct, params, cterr := part.Header.ContentType()
		if cterr != nil || ct == "" {
			ct = "text/plain"
		}
		disp, dparams, derr := part.Header.ContentDisposition()
		if derr != nil && strings.HasPrefix(strings.ToLower(strings.TrimSpace(part.Header.Get("Content-Disposition"))), "attachment") {
			disp = "attachment" // parameters broken, intent clear
		}
		name := dparams["filename"]
		if name == "" {
			name = params["name"]
		}
		isAttachment := disp == "attachment" || name != ""
		switch {
		case !isAttachment && ct == "text/plain" && p.text == "":
			b, truncated := readLimited(part.Body, maxTextShown)
			p.text = toValidUTF8(string(b))
			if truncated {
				p.notes = append(p.notes, "The text is too long to show whole; download the original to read all of it.")
			}
		case !isAttachment && ct == "text/html" && p.html == "":
			b, truncated := readLimited(part.Body, maxHTMLInput)
			p.html = toValidUTF8(string(b))
			if truncated {
				p.notes = append(p.notes, "The formatted text is too long to show whole; download the original to read all of it.")
			}
		case strings.HasPrefix(ct, "multipart/"):
			// An empty or broken container: nothing to show.
		default:
			size, _ := io.Copy(io.Discard, part.Body)
			p.attachments = append(p.attachments, attachment{N: n, Name: safeName(name, n, ct), Type: ct, Size: sizeH(size)})
		}
	})
	if werr != nil {
		p.notes = append(p.notes, "This message is damaged (its MIME structure is broken); what could be read is shown.")
	}
	if leaf > maxParts {
		p.notes = append(p.notes, fmt.Sprintf("Only the first %d of %d parts are listed.", maxParts, leaf))
	}
	return p
}

// walk calls fn for each leaf part, depth-first. It returns the first
// error of the MIME structure, after visiting everything before it.
func walk(e *gomessage.Entity, fn func(*gomessage.Entity)) error {
	return walkDepth(e, fn, 0)
}

func walkDepth(e *gomessage.Entity, fn func(*gomessage.Entity), depth int) error {
	mr := e.MultipartReader()
	if mr == nil {
		fn(e)
		return nil
	}
	if depth > 20 {
		return errors.New("MIME nesting too deep")
	}
	for {
		part, err := mr.NextPart()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			if part == nil {
				return err
			}
		}
		if werr := walkDepth(part, fn, depth+1); werr != nil {
			return werr
		}
		if err != nil {
			return err
		}
	}
}

// nthPart returns the n-th leaf part, as the message page numbered them.
func nthPart(body io.Reader, n int) (*gomessage.Entity, error) {
	e, err := gomessage.Read(bufio.NewReader(body))
	if e == nil {
		return nil, err
	}
	leaf := 0
	var found *gomessage.Entity
	var stop = errors.New("found")
	var visit func(e *gomessage.Entity, depth int) error
	visit = func(e *gomessage.Entity, depth int) error {
		mr := e.MultipartReader()
		if mr == nil {
			if leaf == n {
				found = e
				return stop
			}
			leaf++
			return nil
		}
		if depth > 20 {
			return errors.New("MIME nesting too deep")
		}
		for {
			part, err := mr.NextPart()
			if err != nil {
				return err
			}
			if err := visit(part, depth+1); err != nil {
				return err
			}
		}
	}
	if err := visit(e, 0); found != nil {
		return found, nil
	} else if err == nil || err == io.EOF {
		return nil, mail.ErrNotFound
	} else {
		return nil, err
	}
}

func readLimited(r io.Reader, n int) ([]byte, bool) {
	b, _ := io.ReadAll(io.LimitReader(r, int64(n)+1))
	if len(b) > n {
		// Cut at a rune boundary.
		b = b[:n]
		for len(b) > 0 && !utf8.Valid(b[len(b)-min(len(b), 3):]) {
			b = b[:len(b)-1]
		}
		io.Copy(io.Discard, r)
		return b, true
	}
	return b, false
}

func toValidUTF8(s string) string { return strings.ToValidUTF8(s, "\uFFFD") }

func addrList(h gomail.Header, key string) string {
	if list, err := h.AddressList(key); err == nil && len(list) > 0 {
		out := make([]string, len(list))
		for i, a := range list {
			out[i] = a.Address
			if a.Name != "" {
				out[i] = a.Name + " <" + a.Address + ">"
			}
		}
		return strings.Join(out, ", ")
	}
	v, err := h.Text(key)
	if err != nil {
		v = h.Get(key)
	}
	return toValidUTF8(v)
}

// policy is the allow-list for HTML mail: text formatting, tables, links;
// nothing that runs, loads or styles.
func policy() *bluemonday.Policy {
	p := bluemonday.NewPolicy()
	p.AllowElements("p", "br", "div", "span", "b", "i", "u", "s", "strong", "em", "small", "big", "sub", "sup",
		"blockquote", "pre", "code", "tt", "ul", "ol", "li", "dl", "dt", "dd", "h1", "h2", "h3", "h4", "h5", "h6",
		"hr", "table", "thead", "tbody", "tfoot", "tr", "td", "th", "caption", "center", "font", "strike", "del",
		"ins", "abbr", "cite", "q", "address")
	p.AllowAttrs("href").OnElements("a")
	p.AllowURLSchemes("http", "https", "mailto")
	p.RequireParseableURLs(true)
	p.RequireNoFollowOnLinks(true)
	p.RequireNoReferrerOnLinks(true)
	p.AddTargetBlankToFullyQualifiedLinks(true)
	p.AllowAttrs("colspan", "rowspan").Matching(bluemonday.Integer).OnElements("td", "th")
	p.AllowAttrs("align").Matching(bluemonday.CellAlign).OnElements("td", "th", "tr", "p", "div", "table", "h1", "h2", "h3")
	return p
}

// sanitize returns the safe rendition of HTML mail and how many images it
// dropped.
func (s *Server) sanitize(src string) (string, int) {
	removed := strings.Count(strings.ToLower(src), "<img")
	return s.policy.Sanitize(src), removed
}

// htmlToText is the text of an HTML part without any markup, for the
// plain-text view of a message that has only HTML.
func htmlToText(src string) string {
	p := bluemonday.NewPolicy() // allows no element: text only
	t := p.Sanitize(strings.NewReplacer("<br", "\n<br", "</p>", "</p>\n", "</div>", "</div>\n", "</tr>", "</tr>\n").Replace(src))
	// The sanitizer escapes the text; the template escapes it again.
	return html.UnescapeString(t)
}

// safeName makes an attachment's name harmless for a listing and a
// Content-Disposition: no path, no control characters, bounded.
func safeName(name string, n int, ct string) string {
	name = path.Base(strings.ReplaceAll(toValidUTF8(name), "\\", "/"))
	name = strings.Map(func(r rune) rune {
		if unicode.IsControl(r) || r == '"' || r == '/' {
			return -1
		}
		return r
	}, name)
	name = strings.TrimLeft(strings.TrimSpace(name), ".")
	if len(name) > 120 {
		name = name[len(name)-120:]
		name = strings.ToValidUTF8(name, "")
	}
	if name == "" || name == "." {
		ext := map[string]string{"text/plain": ".txt", "text/html": ".html", "message/rfc822": ".eml"}[ct]
		if exts, _ := mime.ExtensionsByType(ct); ext == "" && len(exts) > 0 {
			ext = exts[0]
		}
		if ext == "" {
			ext = ".bin"
		}
		name = fmt.Sprintf("part-%d%s", n+1, ext)
	}
	return name
}

// download sends a body as a file to save, never to render.
func download(w http.ResponseWriter, name string, size int64, body io.Reader) error {
	h := w.Header()
	h.Set("Content-Type", "application/octet-stream")
	h.Set("Content-Disposition", mime.FormatMediaType("attachment", map[string]string{"filename": name}))
	if size >= 0 {
		h.Set("Content-Length", strconv.FormatInt(size, 10))
	}
	_, err := io.Copy(w, body)
	return err
}

func (s *Server) raw(w http.ResponseWriter, r *http.Request, ss session) {
	uid, ok := uidParam(r)
	if !ok {
		s.notFound(w, ss)
		return
	}
	m, body, ok := s.open(w, r, ss, uid, "web original")
	if !ok {
		return
	}
	name := fmt.Sprintf("message-%s.eml", m.Arrived.UTC().Format("20060102-150405"))
	if err := download(w, name, m.Size, io.LimitReader(body, m.Size)); err != nil {
		s.log.Debug("web: download cut", "user", ss.user, "uid", uid, "err", err)
	}
}

func (s *Server) part(w http.ResponseWriter, r *http.Request, ss session) {
	uid, ok := uidParam(r)
	n, err := strconv.Atoi(r.PathValue("n"))
	if !ok || err != nil || n < 0 || n >= maxParts {
		s.notFound(w, ss)
		return
	}
	_, body, ok := s.open(w, r, ss, uid, "web attachment "+strconv.Itoa(n))
	if !ok {
		return
	}
	part, err := nthPart(body, n)
	if err != nil {
		s.notFound(w, ss)
		return
	}
	ct, params, _ := part.Header.ContentType()
	_, dparams, _ := part.Header.ContentDisposition()
	name := dparams["filename"]
	if name == "" {
		name = params["name"]
	}
	if err := download(w, safeName(name, n, ct), -1, part.Body); err != nil {
		s.log.Debug("web: download cut", "user", ss.user, "uid", uid, "err", err)
	}
}
