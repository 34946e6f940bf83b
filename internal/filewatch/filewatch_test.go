package filewatch

import (
	"os"
	"path/filepath"
	"testing"
)

func TestChanged(t *testing.T) {
	dir := t.TempDir()
	// A Kubernetes Secret volume: the file is a symlink into a versioned
	// directory, and an update swaps a symlink, not the file.
	for _, v := range []string{"v1", "v2"} {
		os.MkdirAll(filepath.Join(dir, v), 0o755)
		os.WriteFile(filepath.Join(dir, v, "tls.crt"), []byte("cert "+v), 0o644)
	}
	os.Symlink("v1", filepath.Join(dir, "..data"))
	path := filepath.Join(dir, "tls.crt")
	os.Symlink("..data/tls.crt", path)

	f := New(path)
	steps := []struct {
		name   string
		do     func()
		accept bool
		want   bool
	}{
		{"first look", func() {}, false, true},
		{"not accepted: still a change", func() {}, true, true},
		{"accepted, unchanged", func() {}, false, false},
		{"symlink swapped", func() {
			os.Symlink("v2", filepath.Join(dir, "..data.tmp"))
			os.Rename(filepath.Join(dir, "..data.tmp"), filepath.Join(dir, "..data"))
		}, true, true},
		{"same contents rewritten", func() { os.WriteFile(filepath.Join(dir, "v2", "tls.crt"), []byte("cert v2"), 0o644) }, false, false},
	}
	for _, s := range steps {
		s.do()
		changed, data, err := f.Changed()
		if err != nil || changed != s.want {
			t.Fatalf("%s: changed %v, %v; want %v", s.name, changed, err, s.want)
		}
		if s.accept {
			f.Accept(data)
		}
	}
	os.Remove(filepath.Join(dir, "v2", "tls.crt"))
	if _, _, err := f.Changed(); err == nil {
		t.Fatal("a missing file is not an error")
	}
}
