package main

import (
	"bufio"
	"context"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/user"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/mxq-dev/mxq/admin"
)

// cli holds the flags every operator command shares.
type cli struct {
	server string
	// token is the node's admin token, or its read-only token: enough for
	// status, queue ls/show/export, dlq ls/show/export, drain watch and
	// continuity status; the server refuses changes with it (403).
	token string
	// ca is a PEM file of the CA that signed the admin API's certificate
	// (admin.tls), when it is not one the system trusts.
	ca   string
	json bool
	out  io.Writer
	in   io.Reader
}

// client is the admin API client of the flags; it fails (exit code 2)
// only when --ca cannot be read.
func (c *cli) client() (*admin.Client, error) {
	op := "cli"
	if u, err := user.Current(); err == nil {
		op = u.Username
	}
	if h, err := os.Hostname(); err == nil {
		op += "@" + h
	}
	cl := &admin.Client{Base: c.server, Token: c.token, Operator: op}
	if c.ca != "" {
		pem, err := os.ReadFile(c.ca)
		if err != nil {
			return nil, &exitError{code: 2, err: fmt.Errorf("--ca: %w", err)}
		}
		if cl.HTTP, err = admin.HTTPClient(pem); err != nil {
			return nil, &exitError{code: 2, err: fmt.Errorf("--ca %s: %w", c.ca, err)}
		}
	}
	return cl, nil
}

// fail turns an API error into a clear message and an exit code: 3 for
// authorization, 1 for the rest. The server's message says which token
// the call needs; this adds where the CLI takes it from.
func fail(err error) error {
	var unknownCA x509.UnknownAuthorityError
	switch {
	case errors.Is(err, admin.ErrUnauthorized):
		return &exitError{code: 3, err: fmt.Errorf("%w\n(the token comes from --token or MXQ_ADMIN_TOKEN: the node's admin.token for everything, its admin.read_token for reading)", err)}
	case errors.As(err, &unknownCA):
		return fmt.Errorf("%w\n(a certificate from a private CA? give the CA with --ca FILE or MXQ_ADMIN_CA)", err)
	}
	return err
}

func (c *cli) printJSON(v any) error {
	enc := json.NewEncoder(c.out)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func addOperatorCommands(root *cobra.Command) {
	addOperatorCommandsTo(root, os.Stdout, os.Stdin)
}

// addOperatorCommandsTo adds the operator commands and their shared flags
// to root, printing to out and reading confirmations from in.
func addOperatorCommandsTo(root *cobra.Command, out io.Writer, in io.Reader) {
	c := &cli{out: out, in: in}
	pf := root.PersistentFlags()
	def := os.Getenv("MXQ_SERVER")
	if def == "" {
		def = "http://127.0.0.1:8025"
	}
	pf.StringVar(&c.server, "server", def, "admin API of a node (MXQ_SERVER)")
	pf.StringVar(&c.token, "token", os.Getenv("MXQ_ADMIN_TOKEN"), "the node's admin token, or its read-only token for reading (MXQ_ADMIN_TOKEN)")
	pf.StringVar(&c.ca, "ca", os.Getenv("MXQ_ADMIN_CA"), "PEM file of the CA of the admin API's certificate, for https:// with a private CA (MXQ_ADMIN_CA)")
	pf.BoolVar(&c.json, "json", false, "print JSON instead of tables")

	root.AddCommand(c.statusCmd(), c.pauseCmd(true), c.pauseCmd(false), c.rateCmd(), c.queueCmd(false), c.queueCmd(true), c.drainCmd())
	root.AddCommand(c.continuityCmd()) // cli_continuity.go
}

func (c *cli) statusCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "status",
		Short: "Show the node, the backends, the queue and the time to drain it",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cl, err := c.client()
			if err != nil {
				return err
			}
			st, err := cl.Status(cmd.Context())
			if err != nil {
				return fail(err)
			}
			if c.json {
				return c.printJSON(st)
			}
			c.printStatus(st)
			return nil
		},
	}
}

func (c *cli) printStatus(st *admin.Status) {
	w := tabwriter.NewWriter(c.out, 0, 4, 2, ' ', 0)
	ready := "ready"
	if !st.Node.Ready {
		ready = "NOT READY: " + st.Node.ReadyError
	}
	drainNote := ""
	if st.Node.Draining {
		drainNote = ", runs the drain"
	}
	fmt.Fprintf(w, "node\t%s (%s%s), %s\n", st.Node.Name, st.Node.Role, drainNote, ready)
	for _, m := range st.Members {
		role := "follower"
		if m.Leader {
			role = "leader"
		}
		fmt.Fprintf(w, "  member\t%s\t%s\t%s\n", m.ID, m.Addr, role)
	}
	paused := ""
	if st.Paused {
		paused = "  (drain PAUSED for all backends)"
	}
	q := st.Queue
	fmt.Fprintf(w, "queue\t%d messages, %s, oldest %s, %d dead letters%s\n", q.Messages, bytesH(q.Bytes), ageH(q.OldestAgeSeconds), q.Dead, paused)
	fmt.Fprintf(w, "delivering\t%.1f msg/s, ETA %s\n", q.DeliveriesPerSecond, etaH(st.ETASeconds))
	w.Flush()
	fmt.Fprintln(c.out)
	w = tabwriter.NewWriter(c.out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "BACKEND\tCIRCUIT\tRATE\tCONNS\tLATENCY\tQUEUED\tOLDEST\tDELIVERED\tDEFERRED\tBOUNCED\tOVERLOADS\tDEAD")
	for _, b := range st.Backends {
		circuit := b.Circuit
		if circuit == "" {
			circuit = "-"
		}
		if b.Paused {
			circuit += " (paused)"
		}
		rate, conns, lat := "-", "-", "-"
		if b.Circuit != "" {
			rate = fmt.Sprintf("%.0f/%.0f/s", b.Rate, b.MaxRate)
			conns = fmt.Sprintf("%d/%d", b.Concurrency, b.MaxConcurrency)
			lat = fmt.Sprintf("%.1fms", b.LatencyMS)
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%d\t%s\t%d\t%d\t%d\t%d\t%d\n", b.Name, circuit, rate, conns, lat, b.Queued, ageH(b.OldestAgeSeconds),
			b.Delivered, b.Deferrals, b.Bounces, b.Overloads, b.Dead)
	}
	w.Flush()
	for _, b := range st.Backends {
		if b.LastError != "" && b.Circuit == "open" {
			fmt.Fprintf(c.out, "\n%s: last error: %s\n", b.Name, b.LastError)
		}
		if b.Bottleneck == "mxq" {
			fmt.Fprintf(c.out, "\n%s: the drain is limited by mxq itself (CPU, or reading the queue), not by the store\n", b.Name)
		}
	}
	if st.Redacted {
		fmt.Fprintln(c.out, "\n(without a token: counts only, last errors hidden; set --token or MXQ_ADMIN_TOKEN)")
	}
}

func bytesH(n uint64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.1f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}

func ageH(sec float64) string {
	if sec <= 0 {
		return "-"
	}
	return durH(time.Duration(sec * float64(time.Second)))
}

func etaH(sec float64) string {
	switch {
	case sec < 0:
		return "unknown (nothing is being delivered)"
	case sec == 0:
		return "now (queue empty)"
	}
	return durH(time.Duration(sec * float64(time.Second)))
}

func durH(d time.Duration) string {
	switch {
	case d >= 48*time.Hour:
		return fmt.Sprintf("%.1fd", d.Hours()/24)
	case d >= time.Hour:
		return fmt.Sprintf("%dh%02dm", int(d.Hours()), int(d.Minutes())%60)
	case d >= time.Minute:
		return fmt.Sprintf("%dm%02ds", int(d.Minutes()), int(d.Seconds())%60)
	}
	return d.Round(100 * time.Millisecond).String()
}

func (c *cli) pauseCmd(pause bool) *cobra.Command {
	var backend string
	use, short := "resume", "Resume the drain (of one backend, or all)"
	if pause {
		use, short = "pause", "Pause the drain (of one backend, or all); mail keeps being accepted"
	}
	cmd := &cobra.Command{
		Use:   use,
		Short: short,
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cl, err := c.client()
			if err != nil {
				return err
			}
			if pause {
				err = cl.Pause(cmd.Context(), backend)
			} else {
				err = cl.Resume(cmd.Context(), backend)
			}
			if err != nil {
				return fail(err)
			}
			target := backend
			if target == "" {
				target = "all backends"
			}
			fmt.Fprintf(c.out, "%sd: %s\n", use, target)
			return nil
		},
	}
	cmd.Flags().StringVar(&backend, "backend", "", "only this backend")
	return cmd
}

func (c *cli) rateCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "rate", Short: "Set or reset a backend's delivery ceilings"}
	var max string
	var conc int
	set := &cobra.Command{
		Use:   "set BACKEND --max 300/s --concurrency 16",
		Short: "Set a backend's ceilings (0 restores the configured value)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			r, err := strconv.ParseFloat(strings.TrimSuffix(max, "/s"), 64)
			if err != nil || r < 0 {
				return &exitError{code: 2, err: fmt.Errorf("--max: want messages per second like 300/s, got %q", max)}
			}
			cl, err := c.client()
			if err != nil {
				return err
			}
			if err := cl.SetRate(cmd.Context(), args[0], r, conc); err != nil {
				return fail(err)
			}
			fmt.Fprintf(c.out, "%s: ceiling %.0f msg/s, %d connections (0: as configured)\n", args[0], r, conc)
			return nil
		},
	}
	set.Flags().StringVar(&max, "max", "0", "messages per second, e.g. 300/s")
	set.Flags().IntVar(&conc, "concurrency", 0, "connections")
	reset := &cobra.Command{
		Use:   "reset BACKEND",
		Short: "Restart a backend's ramp from its start rate",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			cl, err := c.client()
			if err != nil {
				return err
			}
			if err := cl.ResetRate(cmd.Context(), args[0]); err != nil {
				return fail(err)
			}
			fmt.Fprintf(c.out, "%s: ramp restarted\n", args[0])
			return nil
		},
	}
	cmd.AddCommand(set, reset)
	return cmd
}

// filterFlags are the selection flags of queue commands.
type filterFlags struct {
	from, to, domain, backend, olderThan string
	held, notHeld                        bool
}

func (f *filterFlags) add(cmd *cobra.Command) {
	fl := cmd.Flags()
	fl.StringVar(&f.from, "from", "", "sender address")
	fl.StringVar(&f.to, "to", "", "a recipient address")
	fl.StringVar(&f.domain, "domain", "", "a recipient domain")
	fl.StringVar(&f.backend, "backend", "", "backend")
	fl.StringVar(&f.olderThan, "older-than", "", "arrived more than this long ago (2h, 30m)")
	fl.BoolVar(&f.held, "held", false, "held messages only")
	fl.BoolVar(&f.notHeld, "not-held", false, "messages not held only")
}

func (f *filterFlags) filter() admin.Filter {
	af := admin.Filter{From: f.from, To: f.to, Domain: f.domain, Backend: f.backend, OlderThan: f.olderThan}
	if f.held || f.notHeld {
		h := f.held
		af.Held = &h
	}
	return af
}

func (c *cli) queueCmd(dead bool) *cobra.Command {
	name, short := "queue", "List, inspect and act on queued mail"
	if dead {
		name, short = "dlq", "List, inspect, requeue and purge dead letters"
	}
	cmd := &cobra.Command{Use: name, Short: short}

	var ff filterFlags
	var limit int
	var all bool
	ls := &cobra.Command{
		Use:   "ls",
		Short: "List messages (oldest first), with filters",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cl, err := c.client()
			if err != nil {
				return err
			}
			var items []admin.Item
			cursor := uint64(0)
			for {
				page, err := cl.List(cmd.Context(), dead, ff.filter(), limit, cursor)
				if err != nil {
					return fail(err)
				}
				items = append(items, page.Items...)
				if !all || page.Next == 0 {
					if !all && page.Next != 0 && !c.json {
						defer fmt.Fprintf(os.Stderr, "(first %d shown; --limit N or --all for more)\n", len(items))
					}
					break
				}
				cursor = page.Next
			}
			if c.json {
				return c.printJSON(items)
			}
			c.printItems(items)
			return nil
		},
	}
	ff.add(ls)
	ls.Flags().IntVar(&limit, "limit", 100, "at most this many")
	ls.Flags().BoolVar(&all, "all", false, "page through everything")
	cmd.AddCommand(ls)

	cmd.AddCommand(&cobra.Command{
		Use:   "show ID",
		Short: "Show a message: envelope, attempts, last error per recipient, header",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			cl, err := c.client()
			if err != nil {
				return err
			}
			m, err := cl.Show(cmd.Context(), dead, args[0])
			if err != nil {
				return fail(err)
			}
			if c.json {
				return c.printJSON(m)
			}
			c.printMessage(m)
			return nil
		},
	})
	cmd.AddCommand(&cobra.Command{
		Use:   "export ID",
		Short: "Write the raw message (.eml) to standard output",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			cl, err := c.client()
			if err != nil {
				return err
			}
			return fail(cl.Export(cmd.Context(), dead, args[0], c.out))
		},
	})

	actions := []struct{ name, short string }{
		{"hold", "Hold messages: they stay queued and are not delivered"},
		{"release", "Release held messages"},
		{"delete", "Delete messages for good (asks first)"},
		{"requeue", "Retry messages now"},
		{"bounce", "Return messages to their senders now (DSN) and dead-letter them"},
	}
	if dead {
		actions = []struct{ name, short string }{
			{"requeue", "Put dead letters back in the queue, attempts reset"},
			{"purge", "Delete dead letters for good (asks first)"},
		}
	}
	for _, a := range actions {
		cmd.AddCommand(c.actionCmd(dead, a.name, a.short))
	}
	return cmd
}

func (c *cli) actionCmd(dead bool, action, short string) *cobra.Command {
	var ff filterFlags
	var all, yes bool
	var reason string
	cmd := &cobra.Command{
		Use:   action + " [ID...] [filters]",
		Short: short,
		RunE: func(cmd *cobra.Command, args []string) error {
			sel := admin.Selection{IDs: args, All: all, Reason: reason}
			if f := ff.filter(); f != (admin.Filter{}) {
				sel.Filter = &f
			}
			if len(args) == 0 && sel.Filter == nil && !all {
				return &exitError{code: 2, err: errors.New("name messages by ID, or select them with filters (--from, --to, --domain, --backend, --older-than, --held); --all for every one")}
			}
			cl, err := c.client()
			if err != nil {
				return err
			}
			if action == "delete" || action == "purge" {
				sel.DryRun = true
				r, err := cl.Act(cmd.Context(), dead, action, sel)
				if err != nil {
					return fail(err)
				}
				if r.Matched == 0 {
					fmt.Fprintln(c.out, "no message matches; nothing deleted")
					return nil
				}
				if !yes && !c.confirm(fmt.Sprintf("%s %d message record(s) for good? Type yes to confirm: ", action, r.Matched)) {
					return &exitError{code: 1, err: errors.New("not confirmed; nothing deleted")}
				}
				sel.DryRun = false
			}
			r, err := cl.Act(cmd.Context(), dead, action, sel)
			if err != nil {
				return fail(err)
			}
			if c.json {
				return c.printJSON(r)
			}
			fmt.Fprintf(c.out, "%s: %d matched, %d done\n", action, r.Matched, r.Done)
			for _, e := range r.Errors {
				fmt.Fprintln(c.out, "  error:", e)
			}
			if len(r.Errors) > 0 {
				return &exitError{code: 1, err: fmt.Errorf("%d error(s)", len(r.Errors))}
			}
			return nil
		},
	}
	ff.add(cmd)
	cmd.Flags().BoolVar(&all, "all", false, "every message (with no filter)")
	cmd.Flags().StringVar(&reason, "reason", "", "recorded with holds and in bounce reports")
	if action == "delete" || action == "purge" {
		cmd.Flags().BoolVarP(&yes, "yes", "y", false, "do not ask")
	}
	return cmd
}

func (c *cli) confirm(prompt string) bool {
	fmt.Fprint(c.out, prompt)
	line, _ := bufio.NewReader(c.in).ReadString('\n')
	return strings.TrimSpace(line) == "yes"
}

func (c *cli) printItems(items []admin.Item) {
	w := tabwriter.NewWriter(c.out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "ID\tBACKEND\tAGE\tSIZE\tFROM\tTO\tATTEMPTS\tSTATE\tLAST ERROR")
	now := time.Now()
	for _, it := range items {
		if it.Damaged != "" {
			fmt.Fprintf(w, "(seq %d)\t\t\t\t\t\t\tDAMAGED\t%s\n", it.Seq, it.Damaged)
			continue
		}
		state := "queued"
		switch {
		case it.Held:
			state = "held"
		case it.Dead:
			state = "dead"
		case it.NextAttempt.After(now):
			state = "retry in " + durH(it.NextAttempt.Sub(now))
		}
		from := it.From
		if from == "" {
			from = "<>"
		}
		to := strings.Join(it.To, ",")
		if len(it.To) > 2 {
			to = fmt.Sprintf("%s,... (%d)", it.To[0], len(it.To))
		}
		lastErr := ""
		for _, e := range it.Errors {
			if e != "" {
				lastErr = e
			}
		}
		if len(lastErr) > 60 {
			lastErr = lastErr[:57] + "..."
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\t%d\t%s\t%s\n", it.ID, it.Backend, durH(now.Sub(it.Arrived)), bytesH(uint64(it.Size)), from, to, it.Attempts, state, lastErr)
	}
	w.Flush()
}

func (c *cli) printMessage(m *admin.Message) {
	w := tabwriter.NewWriter(c.out, 0, 4, 2, ' ', 0)
	fmt.Fprintf(w, "queue ID\t%s\n", m.ID)
	if m.Held {
		fmt.Fprintf(w, "held\tyes\n")
	}
	for _, r := range m.Records {
		state := "queued"
		if r.Dead {
			state = "dead letter"
		}
		fmt.Fprintf(w, "record\tseq %d, %s, backend %s, part %d\n", r.Seq, state, r.Backend, r.Part)
		from := r.From
		if from == "" {
			from = "<>"
		}
		fmt.Fprintf(w, "  from\t%s\n", from)
		fmt.Fprintf(w, "  arrived\t%s (%s ago)\n", r.Arrived.Format(time.RFC3339), durH(time.Since(r.Arrived)))
		fmt.Fprintf(w, "  size\t%s\n", bytesH(uint64(r.Size)))
		fmt.Fprintf(w, "  attempts\t%d\n", r.Attempts)
		if !r.NextAttempt.IsZero() {
			fmt.Fprintf(w, "  next attempt\t%s\n", r.NextAttempt.Format(time.RFC3339))
		}
		for i, to := range r.To {
			e := ""
			if i < len(r.Errors) && r.Errors[i] != "" {
				e = "  last error: " + r.Errors[i]
			}
			fmt.Fprintf(w, "  to\t%s%s\n", to, e)
		}
	}
	w.Flush()
	fmt.Fprintln(c.out, "\nheader:")
	for _, h := range m.Headers {
		fmt.Fprintf(c.out, "  %s: %s\n", h[0], h[1])
	}
}

func (c *cli) drainCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "drain", Short: "Watch the backlog drain"}
	var every time.Duration
	watch := &cobra.Command{
		Use:   "watch",
		Short: "Live view of the backlog draining: progress, rate, ETA, circuits; ends when the queue is empty",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return fail(c.watch(cmd.Context(), every))
		},
	}
	watch.Flags().DurationVar(&every, "interval", time.Second, "refresh interval")
	cmd.AddCommand(watch)
	return cmd
}

// watch redraws one status line per backend plus a progress bar until the
// queue is empty.
func (c *cli) watch(ctx context.Context, every time.Duration) error {
	cl, err := c.client()
	if err != nil {
		return err
	}
	var start uint64
	lines := 0
	// The view measures the drain itself, from the queue depth over the
	// last ten seconds: quicker to react than the node's one-minute rate.
	type point struct {
		at time.Time
		n  uint64
	}
	var window []point
	for {
		st, err := cl.Status(ctx)
		if err != nil {
			return err
		}
		n := st.Queue.Messages
		if n > start {
			start = n
		}
		now := time.Now()
		window = append(window, point{now, n})
		for len(window) > 2 && now.Sub(window[0].at) > 10*time.Second {
			window = window[1:]
		}
		rate, eta := st.Queue.DeliveriesPerSecond, st.ETASeconds
		if w0 := window[0]; now.Sub(w0.at) > 0 && w0.n > n {
			rate = float64(w0.n-n) / now.Sub(w0.at).Seconds()
			eta = float64(n) / rate
		}
		if n == 0 {
			eta = 0
		}
		if lines > 0 {
			fmt.Fprintf(c.out, "\033[%dA", lines) // back to the top of our block
		}
		done := 1.0
		if start > 0 {
			done = float64(start-n) / float64(start)
		}
		const width = 40
		fill := int(done * width)
		bar := strings.Repeat("#", fill) + strings.Repeat(".", width-fill)
		out := []string{
			fmt.Sprintf("[%s] %3.0f%%  %d of %d left  %.1f msg/s  ETA %s", bar, 100*done, n, start, rate, etaH(eta)),
		}
		for _, b := range st.Backends {
			circuit := b.Circuit
			if circuit == "" {
				circuit = "-"
			}
			if b.Paused || st.Paused {
				circuit += " paused"
			}
			out = append(out, fmt.Sprintf("  %-12s circuit %-14s rate %5.0f/%-5.0f conns %d/%d  latency %6.1fms  queued %d", b.Name, circuit, b.Rate, b.MaxRate, b.Concurrency, b.MaxConcurrency, b.LatencyMS, b.Queued))
		}
		for _, l := range out {
			fmt.Fprintf(c.out, "\r\033[K%s\n", l)
		}
		lines = len(out)
		if n == 0 {
			fmt.Fprintln(c.out, "queue empty: drained.")
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(every):
		}
	}
}
