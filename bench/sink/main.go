// Command sink is the mailbox store of the drain benchmark: an LMTP server
// (for mxq) and an SMTP server (for Postfix) that accept every message and
// count it. A small HTTP endpoint tells how many arrived and when:
//
//	GET /count               {"lmtp":N,"smtp":N}
//	GET /wait?proto=lmtp&n=N  blocks until N arrived over that protocol
//	                          (or timeout=… passed), then reports the
//	                          arrival time of the first and the N-th
//
// The times let the caller compute the drain rate without counting its own
// polling. The counts are also printed at exit (SIGTERM, SIGINT).
package main

import (
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/mxq-dev/mxq/internal/testbackend"
)

func main() {
	lmtpAddr := flag.String("lmtp", "127.0.0.1:2424", "LMTP listen address")
	smtpAddr := flag.String("smtp", "127.0.0.1:2425", "SMTP listen address")
	httpAddr := flag.String("http", "127.0.0.1:2480", "HTTP listen address for /count and /wait")
	flag.Parse()

	// testbackend without Capacity accepts at once: the sink must never be
	// what limits the drain.
	servers := map[string]*testbackend.Server{}
	seen := map[string]*messageIDs{}
	for proto, addr := range map[string]string{"lmtp": *lmtpAddr, "smtp": *smtpAddr} {
		ids := &messageIDs{m: map[string]bool{}}
		seen[proto] = ids
		s, err := testbackend.Start(addr, testbackend.Options{SMTP: proto == "smtp", DataReply: ids.add})
		if err != nil {
			log.Fatal(err)
		}
		defer s.Close()
		servers[proto] = s
	}
	counts := func() map[string]int {
		return map[string]int{"lmtp": servers["lmtp"].Count(), "smtp": servers["smtp"].Count()}
	}

	mux := http.NewServeMux()
	mux.HandleFunc("GET /count", func(w http.ResponseWriter, _ *http.Request) {
		json.NewEncoder(w).Encode(counts())
	})
	mux.HandleFunc("GET /wait", func(w http.ResponseWriter, r *http.Request) {
		s := servers[r.FormValue("proto")]
		var n int
		fmt.Sscan(r.FormValue("n"), &n)
		timeout, err := time.ParseDuration(r.FormValue("timeout"))
		if s == nil || n < 1 || err != nil {
			http.Error(w, "want proto=lmtp|smtp, n ≥ 1, timeout=<duration>", http.StatusBadRequest)
			return
		}
		deadline := time.Now().Add(timeout)
		for s.Count() < n && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
		res := waitResult(s.Deliveries(), n)
		res.Unique = seen[r.FormValue("proto")].len()
		json.NewEncoder(w).Encode(res)
	})
	ln, err := net.Listen("tcp", *httpAddr)
	if err != nil {
		log.Fatal(err)
	}
	go http.Serve(ln, mux)

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
	json.NewEncoder(os.Stdout).Encode(counts())
}

type waited struct {
	Count int `json:"count"`
	// Unix times in seconds of the first delivery and of the n-th (or the
	// last, if fewer arrived).
	First float64 `json:"first"`
	Last  float64 `json:"last"`
	// Unique is how many distinct Message-IDs arrived; fewer than Count
	// means duplicates.
	Unique int `json:"unique"`
}

// messageIDs is the set of Message-IDs seen, filled from DataReply, the
// one hook that sees every message's bytes (Deliveries keeps no bytes,
// and keeping 20 000 messages' would cost the sink hundreds of MiB).
type messageIDs struct {
	mu sync.Mutex
	m  map[string]bool
}

func (ids *messageIDs) add(_ string, data []byte) *smtp.SMTPError {
	id := messageID(data)
	ids.mu.Lock()
	ids.m[id] = true
	ids.mu.Unlock()
	return nil
}

func (ids *messageIDs) len() int {
	ids.mu.Lock()
	defer ids.mu.Unlock()
	return len(ids.m)
}

// messageID returns the Message-ID header's value, or "" if there is none.
func messageID(msg []byte) string {
	hdr, _, _ := bytes.Cut(msg, []byte("\r\n\r\n"))
	for line := range bytes.SplitSeq(hdr, []byte("\r\n")) {
		if name, value, ok := bytes.Cut(line, []byte(":")); ok && strings.EqualFold(string(name), "Message-ID") {
			return string(bytes.TrimSpace(value))
		}
	}
	return ""
}

func waitResult(ds []testbackend.Delivery, n int) waited {
	if len(ds) == 0 {
		return waited{}
	}
	at := make([]time.Time, len(ds))
	for i, d := range ds {
		at[i] = d.At
	}
	slices.SortFunc(at, time.Time.Compare)
	unix := func(t time.Time) float64 { return float64(t.UnixNano()) / 1e9 }
	return waited{Count: len(ds), First: unix(at[0]), Last: unix(at[min(n, len(at))-1])}
}
