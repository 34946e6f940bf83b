package lazyfs

import (
	"errors"
	"fmt"
	"io"
	"sync"
)

// pageSize is the granularity of buffered writes. A dirty page holds the
// whole page as readers see it, so reads never have to merge writes.
const pageSize = 4096

// backing is the part of *os.File an overlay reads from and syncs to.
type backing interface {
	io.ReaderAt
	io.WriterAt
	Truncate(size int64) error
	Sync() error
}

// overlay is what one file looks like to its readers: the backing file's
// content as of its last fsync, with the writes and truncations made since
// then laid over it. Nothing reaches the backing file until flush.
type overlay struct {
	mu sync.Mutex
	// disk is the backing file's size: what it was when the overlay was
	// made, or what the last flush left.
	disk int64
	// size is the size readers see.
	size int64
	// cut hides backing bytes at or beyond it: a truncation since the last
	// flush made them go away, even if the file grew again since.
	cut int64
	// pages are the dirty pages by index, each pageSize long and
	// authoritative for its range; bytes at or beyond size are zero.
	pages map[int64][]byte
	// dirty is set by any write or truncation not yet flushed.
	dirty bool
	// pending counts the bytes written since the last flush (for Stats).
	pending int64
}

func newOverlay(diskSize int64) *overlay {
	return &overlay{disk: diskSize, size: diskSize, cut: diskSize}
}

// readVisible fills p with the backing bytes at off that are still
// visible (below cut and inside the backing file), zeros elsewhere.
func (o *overlay) readVisible(b backing, p []byte, off int64) error {
	clear(p)
	end := min(off+int64(len(p)), o.cut, o.disk)
	if end <= off {
		return nil
	}
	n, err := b.ReadAt(p[:end-off], off)
	if err != nil && !errors.Is(err, io.EOF) {
		return err
	}
	// A backing file shorter than we thought (it should not be) reads as
	// zeros, like a hole.
	clear(p[n : end-off])
	return nil
}

// page returns dirty page idx, filling it from the backing file first.
func (o *overlay) page(b backing, idx int64) ([]byte, error) {
	if pg, ok := o.pages[idx]; ok {
		return pg, nil
	}
	pg := make([]byte, pageSize)
	if err := o.readVisible(b, pg, idx*pageSize); err != nil {
		return nil, err
	}
	if o.pages == nil {
		o.pages = map[int64][]byte{}
	}
	o.pages[idx] = pg
	return pg, nil
}

// read copies the file's content at off into dest and returns how many
// bytes there were (fewer than len(dest) at the end of the file).
func (o *overlay) read(b backing, dest []byte, off int64) (int, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if off >= o.size {
		return 0, nil
	}
	dest = dest[:min(int64(len(dest)), o.size-off)]
	if err := o.readVisible(b, dest, off); err != nil {
		return 0, err
	}
	end := off + int64(len(dest))
	for idx := off / pageSize; idx*pageSize < end; idx++ {
		pg, ok := o.pages[idx]
		if !ok {
			continue
		}
		start := idx * pageSize
		lo, hi := max(start, off), min(start+pageSize, end)
		copy(dest[lo-off:hi-off], pg[lo-start:hi-start])
	}
	return len(dest), nil
}

// write buffers data at off.
func (o *overlay) write(b backing, data []byte, off int64) error {
	o.mu.Lock()
	defer o.mu.Unlock()
	end := off + int64(len(data))
	for idx := off / pageSize; idx*pageSize < end; idx++ {
		pg, err := o.page(b, idx)
		if err != nil {
			return err
		}
		start := idx * pageSize
		lo, hi := max(start, off), min(start+pageSize, end)
		copy(pg[lo-start:hi-start], data[lo-off:hi-off])
	}
	o.size = max(o.size, end)
	o.dirty = true
	o.pending += int64(len(data))
	return nil
}

// truncate sets the size. Shrinking hides the backing bytes beyond the new
// size for good (until the next flush makes it real); growing adds zeros.
func (o *overlay) truncate(size int64) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if size < o.size {
		for idx, pg := range o.pages {
			start := idx * pageSize
			switch {
			case start >= size:
				delete(o.pages, idx)
			case start+pageSize > size:
				clear(pg[size-start:])
			}
		}
	}
	o.cut = min(o.cut, size)
	o.size = size
	o.dirty = true
}

// flush makes the overlay the backing file's content and fsyncs it; it
// returns how many bytes it wrote. On an error the backing file may hold
// part of the change, as a real disk may after a failed fsync.
func (o *overlay) flush(b backing) (int64, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if !o.dirty {
		// Everything the backing file holds was synced by an earlier flush.
		return 0, nil
	}
	// Cut first: a page written below cut must not be undone by it.
	ondisk := min(o.disk, o.cut)
	if ondisk < o.disk {
		if err := b.Truncate(ondisk); err != nil {
			return 0, fmt.Errorf("truncate to %d: %w", ondisk, err)
		}
	}
	var written int64
	for idx, pg := range o.pages {
		start := idx * pageSize
		n := min(int64(pageSize), o.size-start)
		if n <= 0 {
			continue
		}
		if _, err := b.WriteAt(pg[:n], start); err != nil {
			return written, fmt.Errorf("write %d bytes at %d: %w", n, start, err)
		}
		written += n
		ondisk = max(ondisk, start+n)
	}
	if ondisk != o.size {
		// Grown by truncate beyond the last page written, or shrunk.
		if err := b.Truncate(o.size); err != nil {
			return written, fmt.Errorf("truncate to %d: %w", o.size, err)
		}
	}
	if err := b.Sync(); err != nil {
		return written, fmt.Errorf("fsync: %w", err)
	}
	o.disk, o.cut = o.size, o.size
	o.pages = nil
	o.dirty = false
	o.pending = 0
	return written, nil
}

// lost is what a power cut now would throw away: the bytes written since
// the last flush, and whether anything (a truncation too) is unsynced.
func (o *overlay) lost() (bytes int64, dirty bool) {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.pending, o.dirty
}

// currentSize is the size readers see.
func (o *overlay) currentSize() int64 {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.size
}
