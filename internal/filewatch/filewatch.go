// Package filewatch tells when a set of small files has changed, by their
// contents.
//
// It compares hashes of what the files hold rather than watching for
// events or modification times: Kubernetes updates a mounted Secret by
// swapping a symlink (no event on the file itself), cert-manager may write
// a file with an unchanged time, and a poll of a few kilobytes every few
// seconds costs nothing. Polling also sees a file that was deleted and
// written again, which inotify watchers commonly lose.
package filewatch

import (
	"context"
	"crypto/sha256"
	"fmt"
	"os"
	"time"
)

// Files remembers the contents of some files.
type Files struct {
	paths []string
	sums  [][sha256.Size]byte
	seen  bool
}

// New watches paths; the first Changed reports true.
func New(paths ...string) *Files {
	return &Files{paths: paths, sums: make([][sha256.Size]byte, len(paths))}
}

// Changed reads the files and reports whether any differs from the last
// call, returning their contents. A file that cannot be read is an error;
// the remembered state is then left as it was, so the change is reported
// again once the file is readable.
func (f *Files) Changed() (bool, [][]byte, error) {
	data := make([][]byte, len(f.paths))
	sums := make([][sha256.Size]byte, len(f.paths))
	for i, p := range f.paths {
		b, err := os.ReadFile(p)
		if err != nil {
			return false, nil, fmt.Errorf("filewatch: %w", err)
		}
		data[i], sums[i] = b, sha256.Sum256(b)
	}
	changed := !f.seen
	for i := range sums {
		changed = changed || sums[i] != f.sums[i]
	}
	return changed, data, nil
}

// Accept records the contents last returned by Changed as seen. It is
// separate from Changed so that a caller whose parse fails (a certificate
// written before its key) sees the change again on the next poll.
func (f *Files) Accept(data [][]byte) {
	for i, b := range data {
		f.sums[i] = sha256.Sum256(b)
	}
	f.seen = true
}

// Poll calls check every interval until ctx ends.
func Poll(ctx context.Context, interval time.Duration, check func()) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			check()
		}
	}
}
