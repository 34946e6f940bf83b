package lazyfs

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

// node is a file or directory: go-fuse's loopback node, for the metadata
// operations it applies to the backing directory as they come, with file
// data, sizes and the power switch handled here. Every operation the
// loopback node implements is overridden, if only to fail once the power
// is off.
type node struct {
	*fs.LoopbackNode
	fs *FS
}

var (
	_ fs.NodeWrapChilder    = (*node)(nil)
	_ fs.NodeLookuper       = (*node)(nil)
	_ fs.NodeGetattrer      = (*node)(nil)
	_ fs.NodeSetattrer      = (*node)(nil)
	_ fs.NodeStatxer        = (*node)(nil)
	_ fs.NodeOpener         = (*node)(nil)
	_ fs.NodeCreater        = (*node)(nil)
	_ fs.NodeTmpfiler       = (*node)(nil)
	_ fs.NodeUnlinker       = (*node)(nil)
	_ fs.NodeRenamer        = (*node)(nil)
	_ fs.NodeLinker         = (*node)(nil)
	_ fs.NodeMkdirer        = (*node)(nil)
	_ fs.NodeRmdirer        = (*node)(nil)
	_ fs.NodeMknoder        = (*node)(nil)
	_ fs.NodeSymlinker      = (*node)(nil)
	_ fs.NodeReadlinker     = (*node)(nil)
	_ fs.NodeStatfser       = (*node)(nil)
	_ fs.NodeOpendirHandler = (*node)(nil)
	_ fs.NodeReaddirer      = (*node)(nil)
	_ fs.NodeCopyFileRanger = (*node)(nil)
	_ fs.NodeGetxattrer     = (*node)(nil)
	_ fs.NodeSetxattrer     = (*node)(nil)
	_ fs.NodeRemovexattrer  = (*node)(nil)
	_ fs.NodeListxattrer    = (*node)(nil)
	_ fs.FileReader         = (*handle)(nil)
	_ fs.FileWriter         = (*handle)(nil)
	_ fs.FileFsyncer        = (*handle)(nil)
	_ fs.FileFlusher        = (*handle)(nil)
	_ fs.FileReleaser       = (*handle)(nil)
	_ fs.FileReaddirenter   = (*dirHandle)(nil)
	_ fs.FileSeekdirer      = (*dirHandle)(nil)
	_ fs.FileReleasedirer   = (*dirHandle)(nil)
	_ fs.FileFsyncdirer     = (*dirHandle)(nil)
)

// WrapChild makes the loopback's new nodes ours.
func (n *node) WrapChild(ctx context.Context, ops fs.InodeEmbedder) fs.InodeEmbedder {
	if ln, ok := ops.(*fs.LoopbackNode); ok {
		return &node{LoopbackNode: ln, fs: n.fs}
	}
	return ops
}

// path is the node's backing path.
func (n *node) path() string {
	return filepath.Join(n.RootData.Path, n.Path(n.RootData.RootNode.EmbeddedInode()))
}

// toErrno keeps an errno wrapped in err, and makes anything else EIO.
func toErrno(err error) syscall.Errno {
	var e syscall.Errno
	if errors.As(err, &e) {
		return e
	}
	return syscall.EIO
}

// fixSize reports the size readers see instead of the backing file's.
func fixSize(a *fuse.Attr, o *overlay) {
	if o == nil {
		return
	}
	a.Size = uint64(o.currentSize())
	a.Blocks = (a.Size + 511) / 512
}

func (n *node) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	done, errno := n.fs.enter()
	if errno != 0 {
		return nil, errno
	}
	defer done()
	ch, errno := n.LoopbackNode.Lookup(ctx, name, out)
	if errno == 0 {
		// out.Attr.Ino is still the backing inode number here.
		fixSize(&out.Attr, n.fs.existingOverlay(out.Attr.Ino))
	}
	return ch, errno
}

func (n *node) Getattr(ctx context.Context, f fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	done, errno := n.fs.enter()
	if errno != 0 {
		return errno
	}
	defer done()
	return n.getattr(f, out)
}

func (n *node) getattr(f fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	var st syscall.Stat_t
	if h, ok := f.(*handle); ok {
		if err := syscall.Fstat(int(h.f.Fd()), &st); err != nil {
			return toErrno(err)
		}
		out.FromStat(&st)
		fixSize(&out.Attr, h.ov)
		return 0
	}
	stat := syscall.Lstat
	if n.IsRoot() {
		stat = syscall.Stat
	}
	if err := stat(n.path(), &st); err != nil {
		return toErrno(err)
	}
	out.FromStat(&st)
	if st.Mode&syscall.S_IFMT == syscall.S_IFREG {
		fixSize(&out.Attr, n.fs.existingOverlay(st.Ino))
	}
	return 0
}

func (n *node) Statx(ctx context.Context, f fs.FileHandle, flags uint32, mask uint32, out *fuse.StatxOut) syscall.Errno {
	done, errno := n.fs.enter()
	if errno != 0 {
		return errno
	}
	defer done()
	var st unix.Statx_t
	var o *overlay
	var err error
	if h, ok := f.(*handle); ok {
		o = h.ov
		err = unix.Statx(int(h.f.Fd()), "", int(flags)|unix.AT_EMPTY_PATH, int(mask), &st)
	} else {
		err = unix.Statx(unix.AT_FDCWD, n.path(), int(flags)|unix.AT_SYMLINK_NOFOLLOW, int(mask), &st)
	}
	if err != nil {
		return toErrno(err)
	}
	out.FromStatx(&st)
	if o == nil && st.Mode&unix.S_IFMT == unix.S_IFREG {
		o = n.fs.existingOverlay(st.Ino)
	}
	if o != nil {
		out.Size = uint64(o.currentSize())
		out.Blocks = (out.Size + 511) / 512
	}
	return 0
}

// settable is what Setattr passes to the backing file at once: metadata.
const settable = fuse.FATTR_MODE | fuse.FATTR_UID | fuse.FATTR_GID | fuse.FATTR_ATIME |
	fuse.FATTR_MTIME | fuse.FATTR_ATIME_NOW | fuse.FATTR_MTIME_NOW

func (n *node) Setattr(ctx context.Context, f fs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	done, errno := n.fs.enter()
	if errno != 0 {
		return errno
	}
	defer done()
	rest := *in
	if size, ok := in.GetSize(); ok {
		// A size change is data: it waits in the overlay for a sync.
		o, errno := n.overlayOf(f)
		if errno != 0 {
			return errno
		}
		o.truncate(int64(size))
		n.fs.counters.truncates.Add(1)
		rest.Valid &^= fuse.FATTR_SIZE
	}
	if rest.Valid&settable != 0 {
		if errno := n.LoopbackNode.Setattr(ctx, nil, &rest, out); errno != 0 {
			return errno
		}
	}
	return n.getattr(f, out)
}

// overlayOf is the overlay of the file behind handle f, or of this node's
// backing file when there is no handle (truncate(2) by path).
func (n *node) overlayOf(f fs.FileHandle) (*overlay, syscall.Errno) {
	if h, ok := f.(*handle); ok {
		return h.ov, 0
	}
	var st syscall.Stat_t
	if err := syscall.Lstat(n.path(), &st); err != nil {
		return nil, toErrno(err)
	}
	if st.Mode&syscall.S_IFMT != syscall.S_IFREG {
		return nil, syscall.EINVAL
	}
	return n.fs.overlayFor(st.Ino, st.Size), 0
}

func (n *node) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	done, errno := n.fs.enter()
	if errno != 0 {
		return nil, 0, errno
	}
	defer done()
	bf, err := openBacking(n.path(), flags, false, 0)
	if err != nil {
		return nil, 0, toErrno(err)
	}
	h, errno := n.fs.newHandle(bf, flags)
	if errno != 0 {
		bf.Close()
		return nil, 0, errno
	}
	return h, 0, 0
}

func (n *node) Create(ctx context.Context, name string, flags uint32, mode uint32, out *fuse.EntryOut) (*fs.Inode, fs.FileHandle, uint32, syscall.Errno) {
	done, errno := n.fs.enter()
	if errno != 0 {
		return nil, nil, 0, errno
	}
	defer done()
	bf, err := openBacking(filepath.Join(n.path(), name), flags, true, mode)
	if err != nil {
		return nil, nil, 0, toErrno(err)
	}
	// The loopback's Lookup makes the inode just as for an existing file.
	ch, errno := n.LoopbackNode.Lookup(ctx, name, out)
	if errno != 0 {
		bf.Close()
		return nil, nil, 0, errno
	}
	h, errno := n.fs.newHandle(bf, flags)
	if errno != 0 {
		bf.Close()
		return nil, nil, 0, errno
	}
	fixSize(&out.Attr, h.ov)
	return ch, h, 0, 0
}

// Tmpfile is refused: an O_TMPFILE file has no name to open it by later.
func (n *node) Tmpfile(ctx context.Context, flags uint32, mode uint32, out *fuse.EntryOut) (*fs.Inode, fs.FileHandle, uint32, syscall.Errno) {
	return nil, nil, 0, syscall.EOPNOTSUPP
}

// CopyFileRange answers ENOSYS so the kernel copies with read and write,
// which go through the overlay.
func (n *node) CopyFileRange(ctx context.Context, fhIn fs.FileHandle, offIn uint64, out *fs.Inode, fhOut fs.FileHandle, offOut uint64, length uint64, flags uint64) (uint32, syscall.Errno) {
	return 0, syscall.ENOSYS
}

func (n *node) Unlink(ctx context.Context, name string) syscall.Errno {
	done, errno := n.fs.enter()
	if errno != 0 {
		return errno
	}
	defer done()
	p := filepath.Join(n.path(), name)
	var st syscall.Stat_t
	statErr := syscall.Lstat(p, &st)
	if err := syscall.Unlink(p); err != nil {
		return toErrno(err)
	}
	if statErr == nil && st.Nlink <= 1 {
		n.fs.forget(st.Ino)
	}
	return 0
}

func (n *node) Rename(ctx context.Context, name string, newParent fs.InodeEmbedder, newName string, flags uint32) syscall.Errno {
	done, errno := n.fs.enter()
	if errno != 0 {
		return errno
	}
	defer done()
	// A file renamed over loses its last name: forget its overlay after.
	var replaced *syscall.Stat_t
	if np, ok := newParent.(*node); ok && flags&fs.RENAME_EXCHANGE == 0 {
		var src, dst syscall.Stat_t
		if syscall.Lstat(filepath.Join(np.path(), newName), &dst) == nil &&
			syscall.Lstat(filepath.Join(n.path(), name), &src) == nil &&
			src.Ino != dst.Ino && dst.Nlink <= 1 {
			replaced = &dst
		}
	}
	if errno := n.LoopbackNode.Rename(ctx, name, newParent, newName, flags); errno != 0 {
		return errno
	}
	if replaced != nil {
		n.fs.forget(replaced.Ino)
	}
	return 0
}

func (n *node) Link(ctx context.Context, target fs.InodeEmbedder, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	done, errno := n.fs.enter()
	if errno != 0 {
		return nil, errno
	}
	defer done()
	if t, ok := target.(*node); ok {
		target = t.LoopbackNode
	}
	ch, errno := n.LoopbackNode.Link(ctx, target, name, out)
	if errno == 0 {
		fixSize(&out.Attr, n.fs.existingOverlay(out.Attr.Ino))
	}
	return ch, errno
}

func (n *node) Mkdir(ctx context.Context, name string, mode uint32, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	done, errno := n.fs.enter()
	if errno != 0 {
		return nil, errno
	}
	defer done()
	return n.LoopbackNode.Mkdir(ctx, name, mode, out)
}

func (n *node) Rmdir(ctx context.Context, name string) syscall.Errno {
	done, errno := n.fs.enter()
	if errno != 0 {
		return errno
	}
	defer done()
	return n.LoopbackNode.Rmdir(ctx, name)
}

func (n *node) Mknod(ctx context.Context, name string, mode uint32, dev uint32, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	done, errno := n.fs.enter()
	if errno != 0 {
		return nil, errno
	}
	defer done()
	return n.LoopbackNode.Mknod(ctx, name, mode, dev, out)
}

func (n *node) Symlink(ctx context.Context, target, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	done, errno := n.fs.enter()
	if errno != 0 {
		return nil, errno
	}
	defer done()
	return n.LoopbackNode.Symlink(ctx, target, name, out)
}

func (n *node) Readlink(ctx context.Context) ([]byte, syscall.Errno) {
	done, errno := n.fs.enter()
	if errno != 0 {
		return nil, errno
	}
	defer done()
	return n.LoopbackNode.Readlink(ctx)
}

func (n *node) Statfs(ctx context.Context, out *fuse.StatfsOut) syscall.Errno {
	done, errno := n.fs.enter()
	if errno != 0 {
		return errno
	}
	defer done()
	return n.LoopbackNode.Statfs(ctx, out)
}

// Extended attributes are switched off at mount (DisableXAttrs); these
// only keep the loopback's versions from being reached.
func (n *node) Getxattr(ctx context.Context, attr string, dest []byte) (uint32, syscall.Errno) {
	return 0, syscall.ENOTSUP
}

func (n *node) Setxattr(ctx context.Context, attr string, data []byte, flags uint32) syscall.Errno {
	return syscall.ENOTSUP
}

func (n *node) Removexattr(ctx context.Context, attr string) syscall.Errno {
	return syscall.ENOTSUP
}

func (n *node) Listxattr(ctx context.Context, dest []byte) (uint32, syscall.Errno) {
	return 0, syscall.ENOTSUP
}

func (n *node) OpendirHandle(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	done, errno := n.fs.enter()
	if errno != 0 {
		return nil, 0, errno
	}
	defer done()
	ds, errno := fs.NewLoopbackDirStream(n.path())
	if errno != 0 {
		return nil, 0, errno
	}
	return &dirHandle{fs: n.fs, ds: ds}, 0, 0
}

func (n *node) Readdir(ctx context.Context) (fs.DirStream, syscall.Errno) {
	done, errno := n.fs.enter()
	if errno != 0 {
		return nil, errno
	}
	defer done()
	return fs.NewLoopbackDirStream(n.path())
}

// newHandle makes the handle of an opened backing file.
func (f *FS) newHandle(bf *os.File, flags uint32) (*handle, syscall.Errno) {
	var st syscall.Stat_t
	if err := syscall.Fstat(int(bf.Fd()), &st); err != nil {
		return nil, toErrno(err)
	}
	h := &handle{
		fs:   f,
		f:    bf,
		ov:   f.overlayFor(st.Ino, st.Size),
		sync: flags&(syscall.O_SYNC|syscall.O_DSYNC) != 0,
	}
	if flags&syscall.O_TRUNC != 0 {
		h.ov.truncate(0)
		f.counters.truncates.Add(1)
	}
	f.addHandle(h)
	return h, 0
}

// handle is an open file: reads and writes go to the file's overlay, which
// all handles of the file share; the backing descriptor is read for what
// the overlay does not hold, and written only by a sync.
type handle struct {
	fs *FS
	f  *os.File
	ov *overlay
	// sync: opened with O_SYNC or O_DSYNC, so every write is durable
	// before it returns (nats-server writes its meta files that way).
	sync bool
}

func (h *handle) Read(ctx context.Context, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	done, errno := h.fs.enter()
	if errno != 0 {
		return nil, errno
	}
	defer done()
	n, err := h.ov.read(h.f, dest, off)
	if err != nil {
		return nil, toErrno(err)
	}
	return fuse.ReadResultData(dest[:n]), 0
}

func (h *handle) Write(ctx context.Context, data []byte, off int64) (uint32, syscall.Errno) {
	done, errno := h.fs.enter()
	if errno != 0 {
		return 0, errno
	}
	defer done()
	if err := h.ov.write(h.f, data, off); err != nil {
		return 0, toErrno(err)
	}
	h.fs.counters.writes.Add(1)
	h.fs.counters.writtenBytes.Add(int64(len(data)))
	if h.sync {
		h.fs.counters.syncWrites.Add(1)
		if errno := h.sync1(); errno != 0 {
			return 0, errno
		}
	}
	return uint32(len(data)), 0
}

// Fsync serves fsync and fdatasync alike: both make the data durable,
// and metadata is not modelled.
func (h *handle) Fsync(ctx context.Context, flags uint32) syscall.Errno {
	done, errno := h.fs.enter()
	if errno != 0 {
		return errno
	}
	defer done()
	h.fs.counters.fsyncs.Add(1)
	return h.sync1()
}

func (h *handle) sync1() syscall.Errno {
	n, err := h.ov.flush(h.f)
	h.fs.counters.syncedBytes.Add(n)
	if err != nil {
		return toErrno(err)
	}
	return 0
}

// Flush is close(2): it syncs nothing, as on a local disk.
func (h *handle) Flush(ctx context.Context) syscall.Errno { return 0 }

// Release closes the backing file, power or not, so nothing leaks.
func (h *handle) Release(ctx context.Context) syscall.Errno {
	h.fs.removeHandle(h)
	h.f.Close()
	return 0
}

// dirHandle is an open directory: the loopback's listing, with the power
// switch and a count of directory fsyncs.
type dirHandle struct {
	fs *FS
	ds fs.DirStream
}

func (d *dirHandle) Readdirent(ctx context.Context) (*fuse.DirEntry, syscall.Errno) {
	done, errno := d.fs.enter()
	if errno != 0 {
		return nil, errno
	}
	defer done()
	if r, ok := d.ds.(fs.FileReaddirenter); ok {
		return r.Readdirent(ctx)
	}
	if !d.ds.HasNext() {
		return nil, 0
	}
	e, errno := d.ds.Next()
	return &e, errno
}

func (d *dirHandle) Seekdir(ctx context.Context, off uint64) syscall.Errno {
	done, errno := d.fs.enter()
	if errno != 0 {
		return errno
	}
	defer done()
	if s, ok := d.ds.(fs.FileSeekdirer); ok {
		return s.Seekdir(ctx, off)
	}
	return syscall.ENOTSUP
}

func (d *dirHandle) Releasedir(ctx context.Context, flags uint32) {
	if r, ok := d.ds.(fs.FileReleasedirer); ok {
		r.Releasedir(ctx, flags)
		return
	}
	d.ds.Close()
}

// Fsyncdir passes the fsync to the backing directory. Directory entries
// are not modelled (they reach the backing directory at once), so this
// only counts, and fails once the power is off.
func (d *dirHandle) Fsyncdir(ctx context.Context, flags uint32) syscall.Errno {
	done, errno := d.fs.enter()
	if errno != 0 {
		return errno
	}
	defer done()
	d.fs.counters.dirFsyncs.Add(1)
	if s, ok := d.ds.(fs.FileFsyncdirer); ok {
		return s.Fsyncdir(ctx, flags)
	}
	return 0
}
