// Command mxq is the durable inbound mail queue: `mxq serve` runs a node,
// the other commands operate a running one.
package main

import (
	"errors"
	"fmt"
	"os"

	"github.com/spf13/cobra"

	"github.com/mxq-dev/mxq/config"
)

// exitError carries a process exit code through cobra.
type exitError struct {
	code int
	err  error
}

func (e *exitError) Error() string { return e.err.Error() }
func (e *exitError) Unwrap() error { return e.err }

func main() {
	root := &cobra.Command{
		Use:           "mxq",
		Short:         "mxq: a durable inbound mail queue in front of your mailbox store",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.AddCommand(serveCmd())
	root.AddCommand(sleepCmd())
	addOperatorCommands(root)
	if err := root.Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "mxq:", err)
		var ee *exitError
		if errors.As(err, &ee) {
			os.Exit(ee.code)
		}
		if errors.Is(err, config.ErrInvalid) {
			os.Exit(2)
		}
		os.Exit(1)
	}
}
