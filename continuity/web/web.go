// Package web is the held-mail web page: server-rendered HTML, no
// JavaScript at all, for users with no mail client at hand.
//
// A user signs in (the same Guard as IMAP: same passwords, same limits on
// failed logins, same audit log), lists the mail held for them (from,
// subject, date, size; newest first, 50 a page), reads a message as plain
// text or as sanitized HTML, and downloads attachments or the original.
//
// Defences, each meant to hold on its own:
//   - Content-Security-Policy "default-src 'none'": no script runs, nothing
//     loads from anywhere but this server's stylesheet (and data: images);
//     forms post only here; the page cannot be framed.
//   - HTML mail goes through a bluemonday allow-list: no script, style,
//     iframe, object, form or event handler survives, and no image at all
//     (a remote image tells the sender the mail was read); links keep only
//     http, https and mailto and open with noopener/noreferrer.
//   - Downloads are Content-Disposition: attachment with
//     application/octet-stream and nosniff: never rendered by the browser.
//   - Session cookie __Host-, HttpOnly, Secure, SameSite=Strict; a new
//     session ID at each login; idle and absolute timeouts. Posts carry a
//     CSRF token (double-submit before login, per session after) and
//     pass Go's cross-origin protection (Sec-Fetch-Site / Origin).
//   - A message is named by UID in the user's own mailbox only (package
//     mail), so another user's message cannot be reached by guessing.
package web

import (
	"context"
	"crypto/rand"
	"crypto/subtle"
	"embed"
	"encoding/base64"
	"errors"
	"html/template"
	"io/fs"
	"log/slog"
	"net/http"
	"net/netip"
	"strconv"
	"sync"
	"time"

	"github.com/microcosm-cc/bluemonday"

	"github.com/mxq-dev/mxq/continuity/auth"
	"github.com/mxq-dev/mxq/continuity/index"
	"github.com/mxq-dev/mxq/continuity/mail"
)

//go:embed assets
var assets embed.FS

// Options configures the web page.
type Options struct {
	Reader      *mail.Reader
	Guard       *auth.Guard
	IdleTimeout time.Duration // default 30 min
	MaxSession  time.Duration // default 12 h
	Now         func() time.Time
	Logger      *slog.Logger
}

// Server is the web page's handler.
type Server struct {
	o       Options
	idx     *index.Index
	log     *slog.Logger
	tmpl    *template.Template
	css     []byte
	policy  *bluemonday.Policy
	handler http.Handler

	mu       sync.Mutex
	sessions map[string]*session
}

type session struct {
	user     string
	csrf     string
	created  time.Time
	lastSeen time.Time
}

// Cookie names. __Host- makes the browser refuse them unless Secure,
// Path=/ and without Domain: no other host or path can set or read them.
const (
	cookieSession = "__Host-mxq_session"
	cookieLogin   = "__Host-mxq_login"
)

// csp forbids everything but this server's stylesheet, data: images and
// posting forms here.
const csp = "default-src 'none'; style-src 'self'; img-src data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"

// New returns the handler.
func New(o Options) (*Server, error) {
	if o.IdleTimeout <= 0 {
		o.IdleTimeout = 30 * time.Minute
	}
	if o.MaxSession <= 0 {
		o.MaxSession = 12 * time.Hour
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	tmpl, err := template.ParseFS(assets, "assets/*.html")
	if err != nil {
		return nil, err
	}
	css, err := fs.ReadFile(assets, "assets/style.css")
	if err != nil {
		return nil, err
	}
	s := &Server{o: o, idx: o.Reader.Index(), log: o.Logger, tmpl: tmpl, css: css, policy: policy(), sessions: map[string]*session{}}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /style.css", s.style)
	mux.HandleFunc("GET /{$}", s.home)
	mux.HandleFunc("GET /login", s.loginForm)
	mux.HandleFunc("POST /login", s.login)
	mux.HandleFunc("POST /logout", s.logout)
	mux.HandleFunc("GET /mail", s.authed(s.list))
	mux.HandleFunc("GET /mail/{uid}", s.authed(s.message))
	mux.HandleFunc("GET /mail/{uid}/raw", s.authed(s.raw))
	mux.HandleFunc("GET /mail/{uid}/part/{n}", s.authed(s.part))
	cop := http.NewCrossOriginProtection()
	s.handler = cop.Handler(mux)
	return s, nil
}

// ServeHTTP sets the security headers on every response.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	h := w.Header()
	h.Set("Content-Security-Policy", csp)
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("X-Frame-Options", "DENY")
	h.Set("Referrer-Policy", "no-referrer")
	h.Set("Cross-Origin-Opener-Policy", "same-origin")
	h.Set("Cross-Origin-Resource-Policy", "same-origin")
	h.Set("Cache-Control", "no-store")
	s.handler.ServeHTTP(w, r)
}

// Sessions is the number of signed-in sessions.
func (s *Server) Sessions() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.sweepLocked(s.o.Now())
	return len(s.sessions)
}

func randomToken() string {
	b := make([]byte, 32)
	rand.Read(b)
	return base64.RawURLEncoding.EncodeToString(b)
}

func equalTokens(a, b string) bool {
	return a != "" && subtle.ConstantTimeCompare([]byte(a), []byte(b)) == 1
}

func setCookie(w http.ResponseWriter, name, value string, maxAge int) {
	http.SetCookie(w, &http.Cookie{Name: name, Value: value, Path: "/", MaxAge: maxAge,
		HttpOnly: true, Secure: true, SameSite: http.SameSiteStrictMode})
}

// page is what every template gets.
type page struct {
	Title string
	User  string
	CSRF  string
	Error string
	Login string
}

func (s *Server) render(w http.ResponseWriter, code int, name string, data any) {
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.WriteHeader(code)
	if err := s.tmpl.ExecuteTemplate(w, name, data); err != nil {
		s.log.Warn("web: rendering", "template", name, "err", err)
	}
}

func (s *Server) style(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "text/css; charset=utf-8")
	w.Header().Set("Cache-Control", "max-age=3600")
	w.Write(s.css)
}

func (s *Server) home(w http.ResponseWriter, r *http.Request) {
	if _, ok := s.current(r); ok {
		http.Redirect(w, r, "/mail", http.StatusSeeOther)
		return
	}
	http.Redirect(w, r, "/login", http.StatusSeeOther)
}

func (s *Server) loginForm(w http.ResponseWriter, r *http.Request) {
	if _, ok := s.current(r); ok {
		http.Redirect(w, r, "/mail", http.StatusSeeOther)
		return
	}
	s.showLogin(w, http.StatusOK, "", "")
}

func (s *Server) showLogin(w http.ResponseWriter, code int, login, msg string) {
	tok := randomToken()
	setCookie(w, cookieLogin, tok, 3600)
	s.render(w, code, "login.html", page{Title: "Sign in", CSRF: tok, Error: msg, Login: login})
}

func clientAddr(r *http.Request) netip.Addr {
	ap, err := netip.ParseAddrPort(r.RemoteAddr)
	if err != nil {
		return netip.Addr{}
	}
	return ap.Addr().Unmap()
}

func (s *Server) login(w http.ResponseWriter, r *http.Request) {
	r.Body = http.MaxBytesReader(w, r.Body, 16<<10)
	if err := r.ParseForm(); err != nil {
		http.Error(w, "bad form", http.StatusBadRequest)
		return
	}
	c, err := r.Cookie(cookieLogin)
	if err != nil || !equalTokens(c.Value, r.PostForm.Get("csrf")) {
		s.showLogin(w, http.StatusForbidden, "", "Your sign-in form expired; please try again.")
		return
	}
	login := r.PostForm.Get("user")
	if len(login) > 320 {
		login = login[:320]
	}
	ctx, cancel := context.WithTimeout(r.Context(), 30*time.Second)
	defer cancel()
	id, err := s.o.Guard.Login(ctx, auth.Attempt{Login: login, Password: r.PostForm.Get("password"), Addr: clientAddr(r), Proto: "web"})
	switch {
	case errors.Is(err, auth.ErrRateLimited):
		s.showLogin(w, http.StatusTooManyRequests, login, "Too many failed sign-ins. Please wait a few minutes and try again.")
		return
	case errors.Is(err, auth.ErrUnavailable):
		s.showLogin(w, http.StatusServiceUnavailable, login, "Sign-in is unavailable right now. Please try again later.")
		return
	case err != nil:
		s.showLogin(w, http.StatusUnauthorized, login, "Wrong mail address or password.")
		return
	}
	now := s.o.Now()
	sid := randomToken()
	s.mu.Lock()
	s.sweepLocked(now)
	s.capLocked(id.User)
	s.sessions[sid] = &session{user: id.User, csrf: randomToken(), created: now, lastSeen: now}
	s.mu.Unlock()
	setCookie(w, cookieLogin, "", -1)
	setCookie(w, cookieSession, sid, int(s.o.MaxSession/time.Second))
	http.Redirect(w, r, "/mail", http.StatusSeeOther)
}

func (s *Server) logout(w http.ResponseWriter, r *http.Request) {
	r.Body = http.MaxBytesReader(w, r.Body, 16<<10)
	r.ParseForm()
	if c, err := r.Cookie(cookieSession); err == nil {
		s.mu.Lock()
		ss := s.sessions[c.Value]
		if ss != nil && !equalTokens(ss.csrf, r.PostForm.Get("csrf")) {
			s.mu.Unlock()
			http.Error(w, "bad request", http.StatusForbidden)
			return
		}
		delete(s.sessions, c.Value)
		s.mu.Unlock()
	}
	setCookie(w, cookieSession, "", -1)
	http.Redirect(w, r, "/login", http.StatusSeeOther)
}

// current returns the request's live session, and marks it used.
func (s *Server) current(r *http.Request) (session, bool) {
	c, err := r.Cookie(cookieSession)
	if err != nil {
		return session{}, false
	}
	now := s.o.Now()
	s.mu.Lock()
	defer s.mu.Unlock()
	ss := s.sessions[c.Value]
	if ss == nil || s.expired(ss, now) {
		delete(s.sessions, c.Value)
		return session{}, false
	}
	ss.lastSeen = now
	return *ss, true
}

func (s *Server) expired(ss *session, now time.Time) bool {
	return now.Sub(ss.lastSeen) > s.o.IdleTimeout || now.Sub(ss.created) > s.o.MaxSession
}

// Bounds on sessions, so that signing in again and again (a script with a
// valid password) cannot fill the memory: a user's oldest session gives
// way to a new one.
const (
	maxSessionsPerUser = 10
	maxSessions        = 100000
)

// capLocked makes room for one more session of user.
func (s *Server) capLocked(user string) {
	var oldestID, oldestAny string
	var oldest, oldestAll time.Time
	n := 0
	for id, ss := range s.sessions {
		if oldestAny == "" || ss.lastSeen.Before(oldestAll) {
			oldestAny, oldestAll = id, ss.lastSeen
		}
		if ss.user != user {
			continue
		}
		n++
		if oldestID == "" || ss.lastSeen.Before(oldest) {
			oldestID, oldest = id, ss.lastSeen
		}
	}
	if n >= maxSessionsPerUser {
		delete(s.sessions, oldestID)
	} else if len(s.sessions) >= maxSessions {
		delete(s.sessions, oldestAny)
	}
}

func (s *Server) sweepLocked(now time.Time) {
	for id, ss := range s.sessions {
		if s.expired(ss, now) {
			delete(s.sessions, id)
		}
	}
}

type authedHandler func(w http.ResponseWriter, r *http.Request, ss session)

// authed sends requests without a live session to the sign-in page.
func (s *Server) authed(h authedHandler) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		ss, ok := s.current(r)
		if !ok {
			http.Redirect(w, r, "/login", http.StatusSeeOther)
			return
		}
		if !s.idx.IsReady() {
			s.fail(w, ss, http.StatusServiceUnavailable, "Not ready yet", "The mail relay is still indexing the mail it holds. Please try again in a minute.")
			return
		}
		h(w, r, ss)
	}
}

func (s *Server) fail(w http.ResponseWriter, ss session, code int, title, msg string) {
	s.render(w, code, "error.html", page{Title: title, User: ss.user, CSRF: ss.csrf, Error: msg})
}

func (s *Server) notFound(w http.ResponseWriter, ss session) {
	s.fail(w, ss, http.StatusNotFound, "No such message",
		"This message is not held for you (any more): it may have been delivered to your mailbox already.")
}

func (s *Server) who(r *http.Request, ss session) mail.Who {
	return mail.Who{User: ss.user, Proto: "web", Addr: clientAddr(r).String()}
}

func uidParam(r *http.Request) (uint32, bool) {
	n, err := strconv.ParseUint(r.PathValue("uid"), 10, 32)
	return uint32(n), err == nil && n > 0
}
