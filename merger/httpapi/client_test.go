package httpapi

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/cowformat"
	"github.com/dnbd3go/dnbd3go/cowstore/upload"
	"github.com/dnbd3go/dnbd3go/internal/testutil"
	"github.com/dnbd3go/dnbd3go/merger"
)

// These tests drive the handler with dnbd3go's own merger client
// (cowstore/upload), which sends what dnbd3-fuse sends.

func newClient(t *testing.T, target string, cfg upload.MergerConfig) *upload.MergerClient {
	t.Helper()
	m, err := upload.NewMergerClient(target, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(m.CloseIdleConnections)
	return m
}

func TestRealClientRoundTrip(t *testing.T) {
	f, srv := start(t, Options{})
	ctx := context.Background()
	// -C host:port, as dnbd3-fuse takes it.
	m := newClient(t, srv.Listener.Addr().String(), upload.MergerConfig{})

	id, err := m.Create(ctx, "pool/win 11", 4)
	if err != nil {
		t.Fatal(err)
	}
	if !testutil.UUID.MatchString(id) || len(f.creates) != 1 || f.creates[0] != (createCall{"pool/win 11", 4, 40}) {
		t.Fatalf("create: %q, %+v", id, f.creates)
	}
	bf, blocks := sparseBody(3, 64, 200)
	if err := m.Update(ctx, id, 12, bf, blocks); err != nil {
		t.Fatal(err)
	}
	u, _ := f.lastUpdate()
	if u.uuid != id || u.u.Cluster != 12 || u.u.Full || u.u.Bitfield != bf || !bytes.Equal(u.u.Blocks, blocks) {
		t.Fatalf("update arrived as %s cluster %d full=%v, %d bytes", u.uuid, u.u.Cluster, u.u.Full, len(u.u.Blocks))
	}
	st, err := m.Status(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	want := upload.SessionStatus{ImageName: "pool/win 11", NewImageVersion: -1, OriginalImageVersion: 4, State: "Active", TotalClusters: 1}
	if st != want {
		t.Fatalf("status = %+v, want %+v", st, want)
	}
	for i := 0; i < 3; i++ { // the client's retries must all be accepted
		if err := m.Merge(ctx, id, 5<<20, 6<<20); err != nil {
			t.Fatalf("merge %d: %v", i, err)
		}
	}
	if len(f.merges) != 3 || f.merges[0] != (mergeCall{id, 5 << 20, 6 << 20}) {
		t.Fatalf("merges = %+v", f.merges)
	}
	if st, _ := m.Status(ctx, id); st.State != "Merging" {
		t.Fatalf("state after merge = %q", st.State)
	}
	// Updates after the merge are refused (409), a permanent failure.
	err = m.Update(ctx, id, 1, bf, blocks)
	var se *upload.StatusError
	if !errors.As(err, &se) || se.StatusCode != http.StatusConflict {
		t.Fatalf("update after merge: %v", err)
	}

	// The client's error paths: unknown image, back-pressure.
	f.fail("create", merger.ErrImageNotFound)
	if _, err := m.Create(ctx, "nothing", 1); !errors.As(err, &se) || se.StatusCode != 404 || se.Body != "Image not found" {
		t.Fatalf("create of a missing image: %v", err)
	}
	f.fail("update", &merger.BackPressureError{RetryAfter: 3 * time.Second, Reason: "copying"})
	err = m.Update(ctx, f.addSession("pool/win 11", 4, merger.StateActive), 1, bf, blocks)
	if d, ok := upload.BackPressure(err); !ok || d != 3*time.Second {
		t.Fatalf("back-pressure: %v (%v, %v)", err, d, ok)
	}
}

func TestRealClientTLSAndToken(t *testing.T) {
	f := newFake()
	srv := httptest.NewUnstartedServer(New(f, Options{Token: "a-long-random-token", Logger: testutil.Logger(t)}))
	srv.Config.ErrorLog = log.New(io.Discard, "", 0) // handshake noise from closed idle connections
	srv.StartTLS()
	t.Cleanup(srv.Close)
	ctx := context.Background()

	m := newClient(t, srv.URL, upload.MergerConfig{Token: "a-long-random-token", Client: srv.Client()})
	id, err := m.Create(ctx, "img", 1)
	if err != nil {
		t.Fatal(err)
	}
	full := bytes.Repeat([]byte{0xAB}, cowformat.ClusterSize)
	var all [cowformat.BitfieldSize]byte
	for i := range all {
		all[i] = 0xFF
	}
	if err := m.Update(ctx, id, 2, all, full); err != nil {
		t.Fatal(err)
	}
	if u, _ := f.lastUpdate(); !u.u.Full || !bytes.Equal(u.u.Blocks, full) {
		t.Fatalf("full update arrived full=%v", u.u.Full)
	}
	if err := m.Merge(ctx, id, 0, cowformat.ClusterSize*3); err != nil {
		t.Fatal(err)
	}
	if st, err := m.Status(ctx, id); err != nil || st.State != "Merging" || st.TotalClusters != 1 {
		t.Fatalf("status = %+v, %v", st, err)
	}

	bad := newClient(t, srv.URL, upload.MergerConfig{Token: "wrong", Client: srv.Client()})
	_, err = bad.Create(ctx, "img", 1)
	var se *upload.StatusError
	if !errors.As(err, &se) || se.StatusCode != http.StatusUnauthorized {
		t.Fatalf("wrong token: %v", err)
	}
	if len(f.creates) != 1 {
		t.Fatalf("creates = %d", len(f.creates))
	}
}

// memSource is a tiny in-memory overlay for the Uploader.
type memSource struct {
	mu       sync.Mutex
	uuid     string
	clusters map[int]*memCluster
}

type memCluster struct {
	bits   [cowformat.BitfieldSize]byte
	blocks []byte
	gen    uint64
	dirty  bool
}

func (s *memSource) DirtyClusters(fn func(index int, changed int64)) {
	s.mu.Lock()
	var idx []int
	for i, c := range s.clusters {
		if c.dirty {
			idx = append(idx, i)
		}
	}
	s.mu.Unlock()
	for _, i := range idx {
		fn(i, 1)
	}
}

func (s *memSource) Counts() (dirty, clean int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, c := range s.clusters {
		if c.dirty {
			dirty++
		} else {
			clean++
		}
	}
	return dirty, clean
}

func (s *memSource) Snapshot(i int) ([cowformat.BitfieldSize]byte, []byte, uint64, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	c := s.clusters[i]
	return c.bits, bytes.Clone(c.blocks), c.gen, nil
}

func (s *memSource) MarkUploaded(i int, gen uint64) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	c := s.clusters[i]
	if c.gen != gen {
		return false
	}
	c.dirty = false
	return true
}

func (s *memSource) MarkFailed(int, uint64) {}
func (s *memSource) UUID() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.uuid
}

func (s *memSource) SetUUID(id string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.uuid = id
	return nil
}
func (s *memSource) ImageName() string      { return "pool/img" }
func (s *memSource) RID() uint16            { return 3 }
func (s *memSource) ValidRemoteSize() int64 { return 7 * cowformat.ClusterSize }
func (s *memSource) Size() int64            { return 9 * cowformat.ClusterSize }

// TestUploaderFinish runs the client's final flush and merge request
// against the handler.
func TestUploaderFinish(t *testing.T) {
	f, srv := start(t, Options{Token: "tok"})
	src := &memSource{clusters: make(map[int]*memCluster)}
	for _, i := range []int{0, 1, 5, 8} {
		bf, blocks := sparseBody(i, i+10, 319-i)
		src.clusters[i] = &memCluster{bits: bf, blocks: blocks, gen: 1, dirty: true}
	}
	m := newClient(t, srv.URL, upload.MergerConfig{Token: "tok"})
	up := upload.New(src, m, upload.Config{Logger: testutil.Logger(t), RetryBackoff: 10 * time.Millisecond})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	res, err := up.Finish(ctx, true)
	if err != nil {
		t.Fatal(err)
	}
	if res.Uploaded != 4 || res.Dirty != 0 || !res.MergeAccepted || res.MergeAttempts != 1 || !testutil.UUID.MatchString(res.UUID) {
		t.Fatalf("result = %+v", res)
	}
	if len(f.creates) != 1 || f.creates[0] != (createCall{"pool/img", 3, 40}) {
		t.Fatalf("creates = %+v", f.creates)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	s := f.sessions[res.UUID]
	if s == nil || len(s.clusters) != 4 || s.info.State != merger.StateMerging {
		t.Fatalf("session = %+v", s)
	}
	for i, c := range src.clusters {
		got := s.clusters[i]
		if got.Bitfield != c.bits || !bytes.Equal(got.Blocks, c.blocks) || got.Full {
			t.Errorf("cluster %d arrived wrong", i)
		}
	}
	if len(f.merges) != 1 || f.merges[0] != (mergeCall{res.UUID, 7 * cowformat.ClusterSize, 9 * cowformat.ClusterSize}) {
		t.Fatalf("merges = %+v", f.merges)
	}
}
