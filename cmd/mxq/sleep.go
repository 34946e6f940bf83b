package main

import (
	"fmt"
	"strconv"
	"time"

	"github.com/spf13/cobra"
)

// sleepCmd is `mxq sleep DURATION`, hidden: the container image holds
// nothing but mxq, so a Kubernetes preStop hook that waits for the
// endpoints to drop the pod before SIGTERM needs a command in it.
func sleepCmd() *cobra.Command {
	return &cobra.Command{
		Use:    "sleep DURATION",
		Short:  "Wait DURATION (e.g. 5s), then exit: for a preStop hook",
		Hidden: true,
		Args:   cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			d, err := time.ParseDuration(args[0])
			if n, nerr := strconv.ParseFloat(args[0], 64); err != nil && nerr == nil {
				d, err = time.Duration(n*float64(time.Second)), nil // plain seconds, like sleep(1)
			}
			if err != nil || d < 0 {
				return fmt.Errorf("sleep: want a duration such as 5s, got %q", args[0])
			}
			select {
			case <-time.After(d):
			case <-cmd.Context().Done():
			}
			return nil
		},
	}
}
