package lazyfs

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/hanwen/go-fuse/v2/fs"
)

// needFUSE skips when this machine cannot mount a FUSE filesystem.
func needFUSE(t *testing.T) {
	t.Helper()
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.Skip("no /dev/fuse")
	}
	if _, err := exec.LookPath("fusermount3"); err != nil {
		t.Skip("fusermount3 not installed")
	}
}

// mountT mounts a lazyfs of backing on a new directory, unmounted at the
// end of the test whatever happens.
func mountT(t *testing.T, backing string) *FS {
	t.Helper()
	mnt := t.TempDir()
	f, err := Mount(backing, mnt)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := f.Unmount(); err != nil {
			// Lazy, so a failed test does not leave a mount behind.
			exec.Command("fusermount3", "-u", "-z", mnt).Run()
		}
	})
	return f
}

// reboot cuts the power, unmounts and mounts the backing dir again.
func reboot(t *testing.T, f *FS, backing string) *FS {
	t.Helper()
	if err := f.PowerCut(); err != nil {
		t.Fatal(err)
	}
	if err := f.Unmount(); err != nil {
		t.Fatal(err)
	}
	return mountT(t, backing)
}

func create(t *testing.T, p string, flags int) *os.File {
	t.Helper()
	fd, err := os.OpenFile(p, os.O_CREATE|os.O_RDWR|flags, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	return fd
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func writeAt(t *testing.T, fd *os.File, s []byte, off int64) {
	t.Helper()
	if _, err := fd.WriteAt(s, off); err != nil {
		t.Fatal(err)
	}
}

func TestLazyPowerCut(t *testing.T) {
	needFUSE(t)
	rng := rand.New(rand.NewPCG(1, 2))
	big := make([]byte, 3*pageSize+123)
	for i := range big {
		big[i] = byte(rng.IntN(256))
	}
	bigPatched := bytes.Clone(big)
	copy(bigPatched[pageSize-10:], bytes.Repeat([]byte{'Z'}, 2*pageSize))

	tests := []struct {
		name string
		// run works in dir, the mount; the file checked is dir/f.
		run func(t *testing.T, dir string)
		// before is f's content before the cut; after, after it (nil:
		// f must not exist).
		before, after []byte
	}{
		{
			name: "write without fsync is lost",
			run: func(t *testing.T, dir string) {
				fd := create(t, filepath.Join(dir, "f"), 0)
				writeAt(t, fd, []byte("hello"), 0)
				must(t, fd.Close())
			},
			// Creating the file is metadata: it survives, empty.
			before: []byte("hello"), after: []byte{},
		},
		{
			name: "write and fsync is kept",
			run: func(t *testing.T, dir string) {
				fd := create(t, filepath.Join(dir, "f"), 0)
				writeAt(t, fd, []byte("hello"), 0)
				must(t, fd.Sync())
				must(t, fd.Close())
			},
			before: []byte("hello"), after: []byte("hello"),
		},
		{
			name: "write and fdatasync is kept",
			run: func(t *testing.T, dir string) {
				fd := create(t, filepath.Join(dir, "f"), 0)
				writeAt(t, fd, []byte("hello"), 0)
				must(t, syscall.Fdatasync(int(fd.Fd())))
				must(t, fd.Close())
			},
			before: []byte("hello"), after: []byte("hello"),
		},
		{
			name: "only the synced prefix survives",
			run: func(t *testing.T, dir string) {
				fd := create(t, filepath.Join(dir, "f"), os.O_APPEND)
				_, err := fd.Write([]byte("hello"))
				must(t, err)
				must(t, fd.Sync())
				_, err = fd.Write([]byte(" world"))
				must(t, err)
				must(t, fd.Close())
			},
			before: []byte("hello world"), after: []byte("hello"),
		},
		{
			name: "overwrite after sync is undone",
			run: func(t *testing.T, dir string) {
				fd := create(t, filepath.Join(dir, "f"), 0)
				writeAt(t, fd, []byte("aaaa"), 0)
				must(t, fd.Sync())
				writeAt(t, fd, []byte("bb"), 1)
				must(t, fd.Close())
			},
			before: []byte("abba"), after: []byte("aaaa"),
		},
		{
			name: "writes across pages, partly synced",
			run: func(t *testing.T, dir string) {
				fd := create(t, filepath.Join(dir, "f"), 0)
				writeAt(t, fd, big, 0)
				must(t, fd.Sync())
				writeAt(t, fd, bytes.Repeat([]byte{'Z'}, 2*pageSize), pageSize-10)
				must(t, fd.Close())
			},
			before: bigPatched, after: big,
		},
		{
			name: "ftruncate without sync is undone",
			run: func(t *testing.T, dir string) {
				fd := create(t, filepath.Join(dir, "f"), 0)
				writeAt(t, fd, []byte("hello world"), 0)
				must(t, fd.Sync())
				must(t, fd.Truncate(5))
				must(t, fd.Close())
			},
			before: []byte("hello"), after: []byte("hello world"),
		},
		{
			name: "ftruncate and sync is kept",
			run: func(t *testing.T, dir string) {
				fd := create(t, filepath.Join(dir, "f"), 0)
				writeAt(t, fd, []byte("hello world"), 0)
				must(t, fd.Sync())
				must(t, fd.Truncate(5))
				must(t, fd.Sync())
				must(t, fd.Close())
			},
			before: []byte("hello"), after: []byte("hello"),
		},
		{
			name: "shrink then grow reads zeros, synced",
			run: func(t *testing.T, dir string) {
				fd := create(t, filepath.Join(dir, "f"), 0)
				writeAt(t, fd, []byte("hello world"), 0)
				must(t, fd.Sync())
				must(t, fd.Truncate(2))
				writeAt(t, fd, []byte("X"), 5)
				must(t, fd.Truncate(8))
				must(t, fd.Sync())
				must(t, fd.Close())
			},
			before: []byte("he\x00\x00\x00X\x00\x00"), after: []byte("he\x00\x00\x00X\x00\x00"),
		},
		{
			name: "shrink then grow, unsynced",
			run: func(t *testing.T, dir string) {
				fd := create(t, filepath.Join(dir, "f"), 0)
				writeAt(t, fd, []byte("hello world"), 0)
				must(t, fd.Sync())
				must(t, fd.Truncate(2))
				writeAt(t, fd, []byte("X"), 5)
				must(t, fd.Close())
			},
			before: []byte("he\x00\x00\x00X"), after: []byte("hello world"),
		},
		{
			name: "truncate by path without sync is undone",
			run: func(t *testing.T, dir string) {
				fd := create(t, filepath.Join(dir, "f"), 0)
				writeAt(t, fd, []byte("hello world"), 0)
				must(t, fd.Sync())
				must(t, fd.Close())
				must(t, os.Truncate(filepath.Join(dir, "f"), 3))
			},
			before: []byte("hel"), after: []byte("hello world"),
		},
		{
			name: "open with O_TRUNC without sync is undone",
			run: func(t *testing.T, dir string) {
				fd := create(t, filepath.Join(dir, "f"), 0)
				writeAt(t, fd, []byte("hello"), 0)
				must(t, fd.Sync())
				must(t, fd.Close())
				must(t, os.WriteFile(filepath.Join(dir, "f"), []byte("hi"), 0o644))
			},
			before: []byte("hi"), after: []byte("hello"),
		},
		{
			name: "O_SYNC writes are durable",
			run: func(t *testing.T, dir string) {
				fd := create(t, filepath.Join(dir, "f"), os.O_SYNC|os.O_TRUNC)
				writeAt(t, fd, []byte("meta"), 0)
				must(t, fd.Close())
			},
			before: []byte("meta"), after: []byte("meta"),
		},
		{
			name: "O_DSYNC writes are durable",
			run: func(t *testing.T, dir string) {
				fd := create(t, filepath.Join(dir, "f"), syscall.O_DSYNC)
				writeAt(t, fd, []byte("meta"), 0)
				must(t, fd.Close())
			},
			before: []byte("meta"), after: []byte("meta"),
		},
		{
			name: "fsync through another descriptor",
			run: func(t *testing.T, dir string) {
				w := create(t, filepath.Join(dir, "f"), 0)
				writeAt(t, w, []byte("shared"), 0)
				r, err := os.Open(filepath.Join(dir, "f"))
				must(t, err)
				must(t, r.Sync())
				must(t, r.Close())
				must(t, w.Close())
			},
			before: []byte("shared"), after: []byte("shared"),
		},
		{
			// nats-server's writeAtomically: tmp file with O_SYNC, rename,
			// fsync of the directory.
			name: "rename of a synced file survives",
			run: func(t *testing.T, dir string) {
				old := create(t, filepath.Join(dir, "f"), 0)
				writeAt(t, old, []byte("old"), 0)
				must(t, old.Sync())
				must(t, old.Close())
				fd := create(t, filepath.Join(dir, "f.tmp"), 0)
				writeAt(t, fd, []byte("new"), 0)
				must(t, fd.Sync())
				must(t, fd.Close())
				must(t, os.Rename(filepath.Join(dir, "f.tmp"), filepath.Join(dir, "f")))
				d, err := os.Open(dir)
				must(t, err)
				must(t, d.Sync())
				must(t, d.Close())
			},
			before: []byte("new"), after: []byte("new"),
		},
		{
			// The classic bug: renaming an unsynced file over a good one.
			// The name is metadata and survives; the data does not.
			name: "rename of an unsynced file keeps the name, not the data",
			run: func(t *testing.T, dir string) {
				old := create(t, filepath.Join(dir, "f"), 0)
				writeAt(t, old, []byte("old"), 0)
				must(t, old.Sync())
				must(t, old.Close())
				fd := create(t, filepath.Join(dir, "f.tmp"), 0)
				writeAt(t, fd, []byte("new"), 0)
				must(t, fd.Close())
				must(t, os.Rename(filepath.Join(dir, "f.tmp"), filepath.Join(dir, "f")))
			},
			before: []byte("new"), after: []byte{},
		},
		{
			name: "a synced file renamed away is gone",
			run: func(t *testing.T, dir string) {
				fd := create(t, filepath.Join(dir, "f"), 0)
				writeAt(t, fd, []byte("x"), 0)
				must(t, fd.Sync())
				must(t, fd.Close())
				must(t, os.Rename(filepath.Join(dir, "f"), filepath.Join(dir, "g")))
			},
			before: nil, after: nil,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			backing := t.TempDir()
			f := mountT(t, backing)
			dir := f.Mountpoint()
			tc.run(t, dir)
			check(t, filepath.Join(dir, "f"), tc.before, "before the cut")
			f = reboot(t, f, backing)
			check(t, filepath.Join(f.Mountpoint(), "f"), tc.after, "after the cut")
			// The backing file itself holds the durable state.
			check(t, filepath.Join(backing, "f"), tc.after, "backing file after the cut")
		})
	}
}

// check compares a file's content and stat size with want (nil: absent).
func check(t *testing.T, p string, want []byte, when string) {
	t.Helper()
	got, err := os.ReadFile(p)
	if want == nil {
		if !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("%s: %s exists (%q, %v), want it absent", when, p, got, err)
		}
		return
	}
	if err != nil {
		t.Fatalf("%s: %v", when, err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("%s: %s holds %q, want %q", when, p, trunc(got), trunc(want))
	}
	st, err := os.Stat(p)
	if err != nil {
		t.Fatalf("%s: %v", when, err)
	}
	if st.Size() != int64(len(want)) {
		t.Fatalf("%s: stat size %d, want %d", when, st.Size(), len(want))
	}
}

func trunc(b []byte) []byte {
	if len(b) > 40 {
		return append(b[:40:40], "..."...)
	}
	return b
}

// TestLazyPowerOff checks that nothing works between the cut and the next
// mount, so a process that outlives the cut by a moment can neither make
// anything durable nor change what is.
func TestLazyPowerOff(t *testing.T) {
	needFUSE(t)
	backing := t.TempDir()
	f := mountT(t, backing)
	p := filepath.Join(f.Mountpoint(), "f")
	fd := create(t, p, 0)
	writeAt(t, fd, []byte("synced"), 0)
	must(t, fd.Sync())
	writeAt(t, fd, []byte(" and not"), 6)

	must(t, f.PowerCut())
	if st := f.Stats(); st.LostFiles != 1 || st.LostBytes != int64(len(" and not")) || st.Fsyncs != 1 {
		t.Errorf("stats after the cut: %+v", st)
	}
	if _, err := fd.WriteAt([]byte("late"), 0); !errors.Is(err, syscall.EIO) {
		t.Errorf("write after the cut: %v, want EIO", err)
	}
	if err := fd.Sync(); !errors.Is(err, syscall.EIO) {
		t.Errorf("fsync after the cut: %v, want EIO", err)
	}
	if _, err := os.Create(filepath.Join(f.Mountpoint(), "new")); !errors.Is(err, syscall.EIO) {
		t.Errorf("create after the cut: %v, want EIO", err)
	}
	if err := f.PowerCut(); err == nil {
		t.Error("a second PowerCut succeeded")
	}
	fd.Close()
	must(t, f.Unmount())

	if _, err := os.Stat(filepath.Join(backing, "new")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a file created after the cut exists: %v", err)
	}
	f = mountT(t, backing)
	check(t, filepath.Join(f.Mountpoint(), "f"), []byte("synced"), "after the cut")
}

// TestLazyNoPassthrough guards the design: a handle the kernel could pass
// through to the backing file would bypass the overlay.
func TestLazyNoPassthrough(t *testing.T) {
	var h any = &handle{}
	if _, ok := h.(fs.FilePassthroughFder); ok {
		t.Fatal("handle implements FilePassthroughFder")
	}
}

// TestLazyOverlay exercises the overlay alone against random operations,
// with a plain byte slice as the model.
func TestLazyOverlay(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	for round := 0; round < 200; round++ {
		path := filepath.Join(t.TempDir(), "f")
		initial := make([]byte, rng.IntN(3*pageSize))
		for i := range initial {
			initial[i] = byte(rng.IntN(256))
		}
		must(t, os.WriteFile(path, initial, 0o644))
		b, err := os.OpenFile(path, os.O_RDWR, 0)
		must(t, err)
		o := newOverlay(int64(len(initial)))
		model, durable := bytes.Clone(initial), bytes.Clone(initial)
		for op := 0; op < 30; op++ {
			switch rng.IntN(4) {
			case 0, 1:
				off := rng.IntN(len(model) + pageSize)
				data := make([]byte, 1+rng.IntN(2*pageSize))
				for i := range data {
					data[i] = byte(rng.IntN(256))
				}
				must(t, o.write(b, data, int64(off)))
				if need := off + len(data); need > len(model) {
					model = append(model, make([]byte, need-len(model))...)
				}
				copy(model[off:], data)
			case 2:
				size := rng.IntN(len(model) + pageSize)
				o.truncate(int64(size))
				if size <= len(model) {
					model = model[:size]
				} else {
					model = append(model, make([]byte, size-len(model))...)
				}
			case 3:
				if _, err := o.flush(b); err != nil {
					t.Fatal(err)
				}
				durable = bytes.Clone(model)
			}
			got := make([]byte, len(model)+10)
			n, err := o.read(b, got, 0)
			must(t, err)
			if !bytes.Equal(got[:n], model) {
				t.Fatalf("round %d op %d: overlay reads %d bytes differing from the model's %d", round, op, n, len(model))
			}
			onDisk, err := os.ReadFile(path)
			must(t, err)
			if !bytes.Equal(onDisk, durable) {
				t.Fatalf("round %d op %d: backing file is not the last synced state", round, op)
			}
		}
		b.Close()
	}
}
