package main

import "runtime"

// minProcs is the fewest Ps (runtime.GOMAXPROCS) mxq serve runs with.
//
// Go's default is one P per core (or the container's CPU limit). mxq on
// two cores accepted 8 to 12 % more mail at 32 sessions with 8 Ps than
// with 2 (interleaved A/B runs, 5 of 5 and 4 of 6 rounds faster; at 1
// session one run 8 % slower and another equal, at 128 equal; with
// smtp-source as the client 2, 4 and 8 Ps were within 2 %; the
// no-storage server gains ~3 %). What mxq has and a plain SMTP server has
// not is a chain of goroutines on each group commit (committer, the
// embedded server's parser and stream loop, the ack) that the sessions
// wait on, and blocking file writes and fsyncs in that chain. With more Ps than cores the kernel interleaves that chain
// with the SMTP sessions instead of queueing it behind them in two run
// queues, and a P held in a blocking write no longer stops half the
// scheduler until sysmon takes it back.
const minProcs = 8

// raiseProcs applies minProcs unless the operator set GOMAXPROCS; a
// machine with more cores keeps one P per core. It returns the setting.
func raiseProcs(getenv func(string) string) int {
	n := runtime.GOMAXPROCS(0)
	if getenv("GOMAXPROCS") == "" && n < minProcs {
		runtime.GOMAXPROCS(minProcs)
		return minProcs
	}
	return n
}
