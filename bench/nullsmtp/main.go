// Command nullsmtp is the benchmark's ceiling: a go-smtp server configured
// like mxq's relay (same library, same extensions, same limits) that reads
// every message and throws it away. Whatever rate it reaches with a client
// beside it on the same machine is the most any SMTP acceptor can reach
// there; mxq's benchmark reports its own rate as a ratio of this one.
package main

import (
	"flag"
	"io"
	"log"
	"net"
	"time"

	"github.com/emersion/go-smtp"
)

type backend struct{}

func (backend) NewSession(*smtp.Conn) (smtp.Session, error) { return session{}, nil }

type session struct{}

func (session) Reset()                               {}
func (session) Logout() error                        { return nil }
func (session) Mail(string, *smtp.MailOptions) error { return nil }
func (session) Rcpt(string, *smtp.RcptOptions) error { return nil }
func (session) Data(r io.Reader) error {
	_, err := io.Copy(io.Discard, r)
	return err
}

func main() {
	addr := flag.String("listen", "127.0.0.1:2526", "listen address")
	flag.Parse()
	s := smtp.NewServer(backend{})
	s.Domain = "nullsmtp"
	s.MaxMessageBytes = 50 << 20
	s.MaxRecipients = 100
	s.ReadTimeout = 5 * time.Minute
	s.WriteTimeout = time.Minute
	s.EnableSMTPUTF8 = true
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		log.Fatal(err)
	}
	log.Fatal(s.Serve(ln))
}
