// Package lazyfs is a FUSE passthrough filesystem that loses what was
// never fsynced, so tests can cut the power under a program and see what
// it had really made durable. It is in the spirit of LazyFS
// (github.com/dsrhaslab/lazyfs), in Go and much smaller.
//
// Killing a process, or a container, leaves the kernel's page cache
// intact: every write the process made is still there afterwards, fsynced
// or not, so such a test proves nothing about fsync. Here a file's writes
// and truncations are kept in memory (an overlay on the backing file that
// every read sees) until fsync or fdatasync on that file, or a write
// through a descriptor opened with O_SYNC or O_DSYNC; only then do they
// reach the backing file, which is then fsynced itself.
//
// PowerCut throws away every overlay: files revert to their content and
// size at their last sync. From that instant the mount is off, like a
// machine without power: every operation fails with EIO, so nothing a
// still-running process does afterwards can change the durable state, and
// no fsync can succeed after the cut. The caller kills the processes that
// used the mount (a power cut kills them too), calls Unmount, and Mount
// again on the same backing directory to "boot": the new mount serves
// exactly the durable state, with an empty page cache.
//
// What is modelled is the loss of unsynced file data, the failure that
// matters for a write-ahead store such as JetStream's file store.
// Metadata is not modelled: create, mkdir, rename, link, unlink, rmdir,
// chmod and utimes are applied to the backing directory at once and
// survive a power cut whether or not the directory was fsynced (a
// directory fsync is passed through and counted). A file created and
// written but never fsynced therefore survives a cut as an empty file,
// and a file renamed over another keeps its new name with its last synced
// content. Also not modelled: torn or reordered writes inside the unsynced
// part (a cut loses all of it, the worst case of a real disk), syncfs(2)
// and sync(2) (Linux sends them to no FUSE server but virtiofs, so they
// make nothing durable here), fallocate (ENOTSUP), O_TMPFILE (EOPNOTSUPP),
// copy_file_range (the kernel falls back to read and write).
//
// The backing directory must be on one filesystem: overlays are keyed by
// the backing inode number.
package lazyfs

import (
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
)

// FS is a mounted lazyfs.
type FS struct {
	backing    string
	mountpoint string
	server     *fuse.Server

	// power is held shared by every operation and exclusively by
	// PowerCut, so a cut falls between two operations, never inside one:
	// an fsync either finished before it (and its data is durable) or
	// fails after it.
	power sync.RWMutex
	off   bool

	mu       sync.Mutex
	overlays map[uint64]*overlay // by backing inode number
	handles  map[*handle]struct{}

	counters counters
}

// Stats counts what the programs on the mount did; it shows how a program
// syncs (nats-server, say).
type Stats struct {
	Writes       int64 // write calls
	WrittenBytes int64
	SyncWrites   int64 // writes through an O_SYNC/O_DSYNC descriptor, each made durable at once
	Fsyncs       int64 // fsync and fdatasync on files
	SyncedBytes  int64 // bytes applied to the backing files by syncs
	DirFsyncs    int64 // fsync on directories
	Truncates    int64 // truncate, ftruncate, and open with O_TRUNC
	// What the last PowerCut threw away.
	LostFiles int64 // files with unsynced writes or truncations
	LostBytes int64 // bytes written and never synced
}

type counters struct {
	writes, writtenBytes, syncWrites, fsyncs, syncedBytes, dirFsyncs, truncates atomic.Int64
	lostFiles, lostBytes                                                        atomic.Int64
}

// Mount serves backingDir at mountpoint (both must exist) until Unmount.
func Mount(backingDir, mountpoint string) (*FS, error) {
	var st syscall.Stat_t
	if err := syscall.Stat(backingDir, &st); err != nil {
		return nil, fmt.Errorf("lazyfs: backing dir: %w", err)
	}
	f := &FS{
		backing:    backingDir,
		mountpoint: mountpoint,
		overlays:   map[uint64]*overlay{},
		handles:    map[*handle]struct{}{},
	}
	root := &fs.LoopbackRoot{Path: backingDir, Dev: uint64(st.Dev)}
	rootNode := &node{LoopbackNode: &fs.LoopbackNode{RootData: root}, fs: f}
	root.RootNode = rootNode
	// Short caches: the kernel sees every write anyway (no writeback
	// cache), so its attributes stay right; a second keeps stat cheap.
	timeout := time.Second
	srv, err := fs.Mount(mountpoint, rootNode, &fs.Options{
		EntryTimeout: &timeout,
		AttrTimeout:  &timeout,
		MountOptions: fuse.MountOptions{
			FsName: "lazyfs:" + backingDir,
			Name:   "lazyfs",
			// Without xattrs the kernel stops asking for
			// security.capability before every write.
			DisableXAttrs: true,
		},
	})
	if err != nil {
		return nil, fmt.Errorf("lazyfs: mount %s on %s: %w", backingDir, mountpoint, err)
	}
	f.server = srv
	return f, nil
}

// Mountpoint is where the filesystem is mounted.
func (f *FS) Mountpoint() string { return f.mountpoint }

// Unmount unmounts the filesystem; files still open on it make it fail
// (EBUSY). Unsynced writes still buffered are dropped, as by PowerCut:
// unmounting does not sync (a program that wants its data must fsync).
func (f *FS) Unmount() error {
	if err := f.server.Unmount(); err != nil {
		return fmt.Errorf("lazyfs: unmount %s: %w", f.mountpoint, err)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	for h := range f.handles {
		h.f.Close()
	}
	f.handles = map[*handle]struct{}{}
	f.overlays = map[uint64]*overlay{}
	return nil
}

// PowerCut discards every write and truncation not made durable by a sync,
// then turns the mount off: from now on every operation fails with EIO.
// Kill the processes using the mount, Unmount, and Mount again to see the
// durable state.
func (f *FS) PowerCut() error {
	f.power.Lock()
	defer f.power.Unlock()
	if f.off {
		return fmt.Errorf("lazyfs: %s: the power is already off", f.mountpoint)
	}
	f.off = true
	f.mu.Lock()
	defer f.mu.Unlock()
	var files, bytes int64
	for _, o := range f.overlays {
		if n, dirty := o.lost(); dirty {
			files++
			bytes += n
		}
	}
	f.overlays = map[uint64]*overlay{}
	f.counters.lostFiles.Store(files)
	f.counters.lostBytes.Store(bytes)
	return nil
}

// Stats returns the counters so far.
func (f *FS) Stats() Stats {
	c := &f.counters
	return Stats{
		Writes: c.writes.Load(), WrittenBytes: c.writtenBytes.Load(), SyncWrites: c.syncWrites.Load(),
		Fsyncs: c.fsyncs.Load(), SyncedBytes: c.syncedBytes.Load(), DirFsyncs: c.dirFsyncs.Load(),
		Truncates: c.truncates.Load(), LostFiles: c.lostFiles.Load(), LostBytes: c.lostBytes.Load(),
	}
}

// enter starts an operation: it fails with EIO once the power is off, else
// the caller must call the returned function when done. Operations must
// not nest enter (a waiting PowerCut would deadlock them).
func (f *FS) enter() (func(), syscall.Errno) {
	f.power.RLock()
	if f.off {
		f.power.RUnlock()
		return nil, syscall.EIO
	}
	return f.power.RUnlock, 0
}

// overlayFor returns the overlay of backing inode ino, making one for a
// backing file of size diskSize if there is none.
func (f *FS) overlayFor(ino uint64, diskSize int64) *overlay {
	f.mu.Lock()
	defer f.mu.Unlock()
	o, ok := f.overlays[ino]
	if !ok {
		o = newOverlay(diskSize)
		f.overlays[ino] = o
	}
	return o
}

// existingOverlay returns the overlay of backing inode ino, or nil.
func (f *FS) existingOverlay(ino uint64) *overlay {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.overlays[ino]
}

// forget drops the overlay of a backing inode that no longer has a name:
// its number may be reused by a new file. Open handles keep theirs.
func (f *FS) forget(ino uint64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.overlays, ino)
}

func (f *FS) addHandle(h *handle) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.handles[h] = struct{}{}
}

func (f *FS) removeHandle(h *handle) {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.handles, h)
}

// openBacking opens a backing file for a handle. It is always opened for
// reading and writing where allowed, whatever the caller asked, because a
// sync through any descriptor flushes the file's writes from all of them;
// O_TRUNC, O_APPEND and O_SYNC are the overlay's business, not the backing
// file's (the kernel turns O_APPEND into offsets).
func openBacking(path string, flags uint32, create bool, mode uint32) (*os.File, error) {
	extra := 0
	if create {
		extra = os.O_CREATE
		if flags&syscall.O_EXCL != 0 {
			extra |= os.O_EXCL
		}
	}
	f, err := os.OpenFile(path, os.O_RDWR|extra, os.FileMode(mode))
	if err == nil {
		return f, nil
	}
	if !os.IsPermission(err) && !errors.Is(err, syscall.EROFS) {
		return nil, err
	}
	return os.OpenFile(path, int(flags&syscall.O_ACCMODE)|extra, os.FileMode(mode))
}
