package main

import (
	"fmt"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/mxq-dev/mxq/continuity"
)

// continuityCmd is `mxq continuity`: the view of held mail users read
// during an outage.
func (c *cli) continuityCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "continuity", Short: "The view of held mail users read during an outage (IMAP, web)"}
	cmd.AddCommand(&cobra.Command{
		Use:   "status",
		Short: "Show whether the view is on, its sessions, the users seen, logins and reads",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cl, err := c.client()
			if err != nil {
				return err
			}
			var st continuity.Status
			if err := cl.Continuity(cmd.Context(), &st); err != nil {
				return fail(err)
			}
			if c.json {
				return c.printJSON(st)
			}
			c.printContinuity(st)
			return nil
		},
	})
	return cmd
}

func (c *cli) printContinuity(st continuity.Status) {
	if !st.Enabled {
		fmt.Fprintln(c.out, "continuity: disabled (continuity.enabled: false)")
		return
	}
	if st.Error != "" {
		fmt.Fprintf(c.out, "continuity: enabled but NOT RUNNING: %s\n", st.Error)
		return
	}
	w := tabwriter.NewWriter(c.out, 0, 4, 2, ' ', 0)
	var listen []string
	for _, l := range []struct{ name, addr string }{{"imaps", st.Listen.IMAP}, {"imap+starttls", st.Listen.IMAPStartTLS}, {"https", st.Listen.Web}} {
		if l.addr != "" {
			listen = append(listen, l.name+" "+l.addr)
		}
	}
	fmt.Fprintf(w, "continuity\tenabled: %s\n", strings.Join(listen, ", "))
	ix := st.Index
	state := "ready"
	if !ix.Ready {
		state = "BUILDING"
	}
	fmt.Fprintf(w, "index\t%s, %d messages for %d users (%s), UIDVALIDITY %d, last change applied %s ago\n", state, ix.Messages, ix.Mailboxes,
		bytesH(uint64(max(ix.Bytes, 0))), ix.UIDValidity, durH(time.Since(ix.LastSync)))
	fmt.Fprintf(w, "sessions\t%d IMAP, %d web\n", st.Sessions.IMAP, st.Sessions.Web)
	var results []string
	for k, v := range st.Logins {
		results = append(results, fmt.Sprintf("%d %s", v, k))
	}
	sort.Strings(results)
	if len(results) == 0 {
		results = []string{"none"}
	}
	fmt.Fprintf(w, "logins\t%s\n", strings.Join(results, ", "))
	fmt.Fprintf(w, "reads\t%d messages read\n", st.Reads)
	fmt.Fprintf(w, "users seen\t%d\n", st.UsersSeen)
	w.Flush()
	if len(st.RecentUsers) > 0 {
		fmt.Fprintln(c.out)
		w = tabwriter.NewWriter(c.out, 0, 4, 2, ' ', 0)
		fmt.Fprintln(w, "RECENT USER\tVIA\tLAST LOGIN")
		for _, u := range st.RecentUsers {
			fmt.Fprintf(w, "%s\t%s\t%s ago\n", u.User, u.Proto, durH(time.Since(u.Last)))
		}
		w.Flush()
	}
}
