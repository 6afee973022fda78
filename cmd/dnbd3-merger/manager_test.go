package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/cowformat"
	"github.com/dnbd3go/dnbd3go/cowstore/upload"
)

// TestRunWithManager runs the command with the real merger.Manager:
// create, upload, merge over HTTP, then a restart on the same working
// directory still knows the session.
func TestRunWithManager(t *testing.T) {
	root, args := dirs(t)
	args = append(args, "--listen", "127.0.0.1:0", "--min-free-space", "0")
	const cs = cowformat.ClusterSize
	orig := make([]byte, 3*cs+5000)
	for i := range orig {
		orig[i] = byte(i*31 + i/4096)
	}
	if err := os.WriteFile(filepath.Join(root, "orig", "test.r1"), orig, 0o644); err != nil {
		t.Fatal(err)
	}
	s := startRun(t, context.Background(), args, openManager)
	ctx := context.Background()
	m, err := upload.NewMergerClient(s.addrs[0].String(), upload.MergerConfig{})
	if err != nil {
		t.Fatal(err)
	}
	defer m.CloseIdleConnections()
	id, err := m.Create(ctx, "test", 1)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.Create(ctx, "missing", 1); err == nil {
		t.Fatal("create for a missing image succeeded")
	}

	want := append([]byte(nil), orig...)
	newSize := int64(4 * cs)
	want = append(want, make([]byte, int(newSize)-len(want))...)
	upd := func(cluster int, blocks map[int]byte) {
		var bf [40]byte
		var data []byte
		for b := 0; b < 320; b++ {
			fill, ok := blocks[b]
			if !ok {
				continue
			}
			bf[b/8] |= 1 << (b % 8)
			blk := bytes.Repeat([]byte{fill}, 4096)
			data = append(data, blk...)
			copy(want[cluster*cs+b*4096:], blk)
		}
		if err := m.Update(ctx, id, cluster, bf, data); err != nil {
			t.Fatalf("update cluster %d: %v", cluster, err)
		}
	}
	upd(1, map[int]byte{0: 0xAA, 5: 0xBB})
	upd(3, map[int]byte{2: 0xCC})

	// A restart in the middle of the session: it is still there.
	s.cancel()
	if code := s.wait(t); code != 0 {
		t.Fatalf("exit %d:\n%s", code, s.stderr)
	}
	m.CloseIdleConnections()
	s = startRun(t, context.Background(), args, openManager)
	m, err = upload.NewMergerClient(s.addrs[0].String(), upload.MergerConfig{})
	if err != nil {
		t.Fatal(err)
	}
	defer m.CloseIdleConnections()
	st, err := m.Status(ctx, id)
	if err != nil || st.State != "Active" || st.TotalClusters != 2 || st.OriginalImageVersion != 1 || st.ImageName != "test" {
		t.Fatalf("status after restart = %+v, %v", st, err)
	}

	for i := 0; i < 2; i++ {
		if err := m.Merge(ctx, id, int64(len(orig)), newSize); err != nil {
			t.Fatalf("merge %d: %v", i, err)
		}
	}
	deadline := time.Now().Add(20 * time.Second)
	for st.State != "Done" {
		if st.State == "Failed" || time.Now().After(deadline) {
			t.Fatalf("merge did not finish: %+v\n%s", st, s.stderr)
		}
		time.Sleep(20 * time.Millisecond)
		if st, err = m.Status(ctx, id); err != nil {
			t.Fatal(err)
		}
	}
	if st.NewImageVersion != 2 {
		t.Errorf("status = %+v", st)
	}
	got, err := os.ReadFile(filepath.Join(root, "dest", "test.r2"))
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(want) || sha256.Sum256(got) != sha256.Sum256(want) {
		t.Fatalf("test.r2: %d bytes, want %d, contents differ", len(got), len(want))
	}
	s.cancel()
	if code := s.wait(t); code != 0 {
		t.Fatalf("exit %d", code)
	}
}
