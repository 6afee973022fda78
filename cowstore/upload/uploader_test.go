package upload

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/cowformat"
	"github.com/dnbd3go/dnbd3go/cowstore/mergertest"
)

// checkStored compares what the merger holds for a cluster with the fake
// overlay's current content.
func checkStored(t *testing.T, e *env, idx int) {
	t.Helper()
	sess, ok := e.srv.Session(e.src.UUID())
	if !ok {
		t.Fatal("no merger session")
	}
	got, ok := sess.Clusters[idx]
	if !ok {
		t.Fatalf("cluster %d not uploaded", idx)
	}
	bf, blocks, _, _ := e.src.Snapshot(idx)
	if got.Bitfield != bf || !bytes.Equal(got.Blocks, blocks) {
		t.Fatalf("cluster %d on the merger differs from the overlay", idx)
	}
}

func TestEnsureSession(t *testing.T) {
	e := newEnv(t)
	u := e.uploader()
	e.srv.NextUUIDs(fixtureUUID)
	id, err := u.EnsureSession(t.Context())
	if err != nil || id != fixtureUUID || e.src.UUID() != fixtureUUID {
		t.Fatalf("EnsureSession = %q, %v; overlay has %q", id, err, e.src.UUID())
	}
	if id, err := u.EnsureSession(t.Context()); err != nil || id != fixtureUUID {
		t.Fatalf("second EnsureSession = %q, %v", id, err)
	}
	reqs := e.srv.RequestsTo("create")
	if len(reqs) != 1 || string(reqs[0].Body) != "revision=3&bitfieldSize=40&imageName=pool%2Fimg" {
		t.Fatalf("create requests %d, body %q", len(reqs), reqs[0].Body)
	}
	if sess, _ := e.srv.Session(fixtureUUID); sess.ImageName != "pool/img" || sess.Revision != 3 {
		t.Fatalf("session %+v", sess)
	}

	// A preset uuid (--upload-uuid) is used as it is.
	e2 := newEnv(t)
	e2.src.SetUUID("preset-id")
	if id, err := e2.uploader().EnsureSession(t.Context()); err != nil || id != "preset-id" {
		t.Fatalf("preset: %q, %v", id, err)
	}
	if n := len(e2.srv.Requests()); n != 0 {
		t.Fatalf("preset uuid sent %d requests", n)
	}

	// Failures leave the overlay without a uuid.
	e3 := newEnv(t)
	e3.srv.FailCreate(mergertest.Fault{Status: 404, Body: "Image not found", Times: 1})
	u3 := e3.uploader()
	if _, err := u3.EnsureSession(t.Context()); err == nil || !strings.Contains(err.Error(), "Image not found") || e3.src.UUID() != "" {
		t.Fatalf("refused create: %v, uuid %q", err, e3.src.UUID())
	}
	e3.src.setUUIDErr = errors.New("disk full")
	if _, err := u3.EnsureSession(t.Context()); err == nil || !strings.Contains(err.Error(), "disk full") {
		t.Fatalf("SetUUID failure: %v", err)
	}
}

func TestRunRespectsMinDelay(t *testing.T) {
	e := newEnv(t)
	e.session(t)
	for _, c := range []int{0, 4, 9} {
		e.src.write(c, 1, byte(c))
	}
	u := e.uploader()
	stop := runBG(t, u)
	time.Sleep(60 * time.Millisecond) // about ten passes
	e.clock.Advance(59 * time.Second)
	time.Sleep(30 * time.Millisecond)
	if n := len(e.srv.RequestsTo("update")); n != 0 {
		t.Fatalf("%d uploads before the clusters were 60 s old", n)
	}
	if st := u.Stats(); st.Due != 0 || st.Waiting != 3 || st.State != StateBackgroundUpload {
		t.Fatalf("stats before due: %+v", st)
	}
	e.clock.Advance(time.Second)
	waitFor(t, "all clusters clean", func() bool { d, _ := e.src.Counts(); return d == 0 })
	stop()
	for _, c := range []int{0, 4, 9} {
		checkStored(t, e, c)
		if got := e.src.cluster(c); got.uploads != 1 || got.fails != 0 {
			t.Fatalf("cluster %d: uploads %d fails %d", c, got.uploads, got.fails)
		}
	}
	if n := len(e.srv.RequestsTo("update")); n != 3 {
		t.Fatalf("%d uploads, want 3 (a clean cluster must not be uploaded again)", n)
	}
	if st := u.Stats(); st.ClustersUploaded != 3 || st.Clean != 3 || st.BytesUploaded != 3*(40+4096) {
		t.Fatalf("stats %+v", st)
	}
}

func TestMinDelayDefaults(t *testing.T) {
	for in, want := range map[time.Duration]time.Duration{0: 60 * time.Second, -1: 0, time.Second: time.Second} {
		if got := (Config{MinDelay: in}).withDefaults().MinDelay; got != want {
			t.Errorf("MinDelay %v -> %v, want %v", in, got, want)
		}
	}
	e := newEnv(t)
	e.cfg.MinDelay = -1 // no delay
	e.session(t)
	e.src.write(0, 0, 1)
	stop := runBG(t, e.uploader())
	waitFor(t, "immediate upload", func() bool { return !e.src.dirty(0) })
	stop()
}

func TestParallelLimits(t *testing.T) {
	e := newEnv(t)
	e.session(t)
	e.srv.SetLatency(40 * time.Millisecond)
	for c := range 8 {
		e.src.write(c, 0, 1)
	}
	e.clock.Advance(time.Minute)
	u := e.uploader()
	stop := runBG(t, u)
	waitFor(t, "background uploads", func() bool { d, _ := e.src.Counts(); return d == 0 })
	stop()
	if got := e.srv.MaxConcurrentUpdates(); got != 2 {
		t.Fatalf("max concurrent uploads while attached %d, want 2", got)
	}

	// The final flush uses 10 at a time (and ignores MinDelay).
	e.srv.ResetConcurrency()
	for c := range 25 {
		e.src.write(100+c, 3, 2)
	}
	res, err := u.Finish(t.Context(), false)
	if err != nil || res.Uploaded != 25 || res.Dirty != 0 || res.TotalUploaded != 33 || res.MergeRequested {
		t.Fatalf("Finish = %+v, %v", res, err)
	}
	if got := e.srv.MaxConcurrentUpdates(); got != 10 {
		t.Fatalf("max concurrent uploads in the final flush %d, want 10", got)
	}
	if n := len(e.srv.RequestsTo("merge")); n != 0 {
		t.Fatalf("%d merge requests without merge", n)
	}
}

func TestClusterChangedDuringUpload(t *testing.T) {
	e := newEnv(t)
	e.session(t)
	e.src.write(3, 0, 0x10)
	e.clock.Advance(time.Minute)
	var hooked atomic.Int32
	e.srv.SetUpdateHook(func(_ string, cluster int) {
		if cluster == 3 && hooked.Add(1) == 1 {
			e.src.write(3, 7, 0xEE) // a write lands while the upload is in flight
		}
	})
	u := e.uploader()
	stop := runBG(t, u)
	waitFor(t, "first upload", func() bool { return e.src.cluster(3).uploads == 1 })
	time.Sleep(30 * time.Millisecond)
	if !e.src.dirty(3) {
		t.Fatal("a cluster changed during its upload became clean")
	}
	sess, _ := e.srv.Session(fixtureUUID)
	if c := sess.Clusters[3]; c.Bitfield != [cowformat.BitfieldSize]byte{0: 1} {
		t.Fatalf("first upload bitfield %x", c.Bitfield)
	}
	if n := len(e.srv.RequestsTo("update")); n != 1 {
		t.Fatalf("%d uploads before the new change was due", n)
	}
	e.clock.Advance(time.Minute)
	waitFor(t, "second upload", func() bool { return !e.src.dirty(3) })
	stop()
	checkStored(t, e, 3)
	if c := e.src.cluster(3); c.uploads != 2 {
		t.Fatalf("uploads %d, want 2", c.uploads)
	}
}

func TestBackPressurePausesUploads(t *testing.T) {
	for _, tc := range []struct {
		name       string
		retryAfter string
		pause      time.Duration
	}{
		{"retry-after", "1", time.Second},
		{"bare 503", "", 300 * time.Millisecond}, // BackPressureDelay
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			e.cfg.Parallel = 1
			e.cfg.BackPressureDelay = 300 * time.Millisecond
			e.session(t)
			for c := range 4 {
				e.src.write(c, 0, byte(c))
			}
			e.clock.Advance(time.Minute)
			e.srv.FailUpdate(mergertest.Fault{Status: 503, RetryAfter: tc.retryAfter, Times: 1})
			u := e.uploader()
			stop := runBG(t, u)
			waitFor(t, "the 503", func() bool { return u.Stats().BackPressureReplies == 1 })
			st := u.Stats()
			if st.ThrottledUntil.IsZero() || st.BackPressureReplies != 1 || st.FailedUploads != 0 {
				t.Fatalf("stats after 503: %+v", st)
			}
			first := e.srv.RequestsTo("update")[0]
			if c := e.src.cluster(0); c.fails != 0 || c.changed == 0 {
				t.Fatalf("cluster after 503: fails %d changed %d (must stay dirty, not failed)", c.fails, c.changed)
			}
			waitFor(t, "all uploaded", func() bool { d, _ := e.src.Counts(); return d == 0 })
			stop()
			reqs := e.srv.RequestsTo("update")
			if len(reqs) != 5 {
				t.Fatalf("%d update requests, want 5", len(reqs))
			}
			if gap := reqs[1].Time.Sub(first.Time); gap < tc.pause-50*time.Millisecond {
				t.Fatalf("next upload %s after the 503, want a pause of %s", gap, tc.pause)
			}
			if reqs[1].Query.Get("clusterindex") != "0" {
				t.Fatalf("the throttled cluster was not retried first: %s", reqs[1].RawQuery)
			}
		})
	}
}

func TestFailureMarksFailedAndRetries(t *testing.T) {
	e := newEnv(t)
	e.session(t)
	e.src.write(2, 5, 9)
	e.clock.Advance(time.Minute)
	e.srv.FailUpdate(mergertest.Fault{Status: 500, Body: "FASTER upsert failed", Times: 1})
	u := e.uploader()
	stop := runBG(t, u)
	waitFor(t, "failed upload", func() bool { return e.src.cluster(2).fails == 1 })
	time.Sleep(30 * time.Millisecond)
	if n := len(e.srv.RequestsTo("update")); n != 1 {
		t.Fatalf("%d attempts: a failed cluster must wait MinDelay again", n)
	}
	st := u.Stats()
	if !strings.Contains(st.LastError, "HTTP 500") || st.FailedUploads != 1 || st.Waiting != 1 {
		t.Fatalf("stats %+v", st)
	}
	e.clock.Advance(time.Minute)
	waitFor(t, "retry", func() bool { return !e.src.dirty(2) })
	stop()
	checkStored(t, e, 2)
	if c := e.src.cluster(2); c.fails != 0 || c.uploads != 1 {
		t.Fatalf("fails %d uploads %d", c.fails, c.uploads)
	}
}

func TestSnapshotErrorAndLazySession(t *testing.T) {
	e := newEnv(t)
	e.src.write(1, 0, 1)
	e.src.write(2, 0, 1)
	e.clock.Advance(time.Minute)
	e.src.snapErr = map[int]error{1: errors.New("pread: input/output error")}
	e.srv.FailCreate(mergertest.Fault{Status: 500, Times: 1})
	u := e.uploader()
	stop := runBG(t, u)
	// The first pass cannot create the session; a later one does, then
	// uploads cluster 2 and marks cluster 1 failed.
	waitFor(t, "cluster 2 uploaded", func() bool { return !e.src.dirty(2) })
	waitFor(t, "cluster 1 failed", func() bool { return e.src.cluster(1).fails == 1 })
	stop()
	if n := len(e.srv.RequestsTo("create")); n != 2 {
		t.Fatalf("%d create requests, want 2", n)
	}
	if st := u.Stats(); !strings.Contains(st.LastError, "input/output error") {
		t.Fatalf("last error %q", st.LastError)
	}
}

func TestFinishUploadsAndMerges(t *testing.T) {
	e := newEnv(t)
	e.session(t)
	e.src.valid = cowformat.ClusterSize + 1000 // shrunk below the original, then grown
	e.src.size = 6*cowformat.ClusterSize + 5
	e.src.write(0, 0, 0xA0)
	e.src.write(1, 319, 0xA1)
	e.clock.Advance(time.Minute)
	u := e.uploader()
	stop := runBG(t, u)
	waitFor(t, "background uploads", func() bool { d, _ := e.src.Counts(); return d == 0 })
	// New changes that are not due yet, and a change to an uploaded cluster.
	e.src.write(1, 2, 0xB1)
	e.src.write(4, 100, 0xB4)
	e.src.write(6, 0, 0xB6) // past the new end: cut off by the merge
	stop()                  // Run's context ends first, as at detach
	res, err := u.Finish(t.Context(), true)
	if err != nil {
		t.Fatal(err)
	}
	want := Result{UUID: fixtureUUID, Uploaded: 3, TotalUploaded: 5, Rounds: 1, MergeRequested: true, MergeAccepted: true, MergeAttempts: 1}
	if res != want {
		t.Fatalf("Result %+v, want %+v", res, want)
	}
	sess, _ := e.srv.Session(fixtureUUID)
	if len(sess.Merges) != 1 || sess.Merges[0].OriginalFileSize != cowformat.ClusterSize+1000 || sess.Merges[0].NewFileSize != 6*cowformat.ClusterSize+5 {
		t.Fatalf("merges %+v", sess.Merges)
	}
	if r := e.srv.RequestsTo("merge")[0]; string(r.Body) != "originalFileSize=1311720&newFileSize=7864325&uuid="+fixtureUUID {
		t.Fatalf("merge body %q", r.Body)
	}
	orig := make([]byte, 8*cowformat.ClusterSize)
	for i := range orig {
		orig[i] = byte(i*7 + 3)
	}
	merged, err := e.srv.MergedImage(orig, fixtureUUID)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(merged, e.src.view(orig)) {
		t.Fatal("the merged image differs from the overlay's view")
	}
	if _, err := u.Finish(t.Context(), true); !errors.Is(err, ErrFinished) {
		t.Fatalf("second Finish: %v", err)
	}
	if err := u.Run(t.Context()); !errors.Is(err, ErrFinished) {
		t.Fatalf("Run after Finish: %v", err)
	}
}

func TestFinishStopsRunningRun(t *testing.T) {
	e := newEnv(t)
	e.session(t)
	e.src.write(0, 0, 1)
	u := e.uploader()
	done := make(chan error, 1)
	go func() { done <- u.Run(context.Background()) }() // never cancelled
	waitFor(t, "Run running", func() bool { return u.Stats().State == StateBackgroundUpload })
	if err := u.Run(t.Context()); err == nil {
		t.Fatal("a second Run started")
	}
	res, err := u.Finish(t.Context(), false)
	if err != nil || res.Uploaded != 1 {
		t.Fatalf("Finish = %+v, %v", res, err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Run returned %v", err)
		}
	case <-time.After(time.Second):
		t.Fatal("Finish did not stop Run")
	}
}

func TestFinishPersistentFailure(t *testing.T) {
	e := newEnv(t)
	e.session(t)
	for c := range 3 {
		e.src.write(c, 0, 1)
	}
	e.srv.FailUpdate(mergertest.Fault{Status: 500}) // every request
	u := e.uploader()
	res, err := u.Finish(t.Context(), true)
	if err == nil || !strings.Contains(err.Error(), "3 cluster(s) could not be uploaded") || !strings.Contains(err.Error(), "-L") || !strings.Contains(err.Error(), "HTTP 500") {
		t.Fatalf("error %v", err)
	}
	if res.Dirty != 3 || res.Uploaded != 0 || res.Rounds != 5 || res.FailedAttempts != 15 || res.MergeRequested || res.MergeAccepted {
		t.Fatalf("Result %+v", res)
	}
	if n := len(e.srv.RequestsTo("update")); n != 15 {
		t.Fatalf("%d update attempts, want 3 clusters x 5 rounds", n)
	}
	if n := len(e.srv.RequestsTo("merge")); n != 0 {
		t.Fatalf("%d merge requests despite failed uploads", n)
	}
	for c := range 3 {
		if cl := e.src.cluster(c); cl.changed == 0 || cl.fails != 5 {
			t.Fatalf("cluster %d: changed %d fails %d", c, cl.changed, cl.fails)
		}
	}
}

func TestFinishHonoursBackPressureAndRecovers(t *testing.T) {
	e := newEnv(t)
	e.cfg.BackPressureDelay = 100 * time.Millisecond
	e.session(t)
	for c := range 12 {
		e.src.write(c, 0, 1)
	}
	e.srv.FailUpdate(mergertest.Fault{Status: 503, Times: 1})
	e.srv.FailUpdate(mergertest.Fault{Status: 502, Times: 2})
	u := e.uploader()
	start := time.Now()
	res, err := u.Finish(t.Context(), true)
	if err != nil || res.Dirty != 0 || !res.MergeAccepted || res.Uploaded != 12 {
		t.Fatalf("Finish = %+v, %v", res, err)
	}
	if el := time.Since(start); el < 90*time.Millisecond {
		t.Fatalf("Finish took %s, did not pause after the 503", el)
	}
	if res.FailedAttempts != 2 || u.Stats().BackPressureReplies != 1 {
		t.Fatalf("Result %+v, stats %+v", res, u.Stats())
	}
}

func TestFinishBoundedByContext(t *testing.T) {
	e := newEnv(t)
	e.session(t)
	e.src.write(0, 0, 1)
	e.src.write(1, 0, 1)
	e.srv.SetLatency(5 * time.Second)
	u := e.uploader()
	ctx, cancel := context.WithTimeout(t.Context(), 100*time.Millisecond)
	defer cancel()
	start := time.Now()
	res, err := u.Finish(ctx, true)
	if el := time.Since(start); el > 2*time.Second {
		t.Fatalf("Finish took %s", el)
	}
	if !errors.Is(err, context.DeadlineExceeded) || res.Dirty != 2 || res.MergeRequested {
		t.Fatalf("Finish = %+v, %v", res, err)
	}
	if c := e.src.cluster(0); c.fails != 0 || c.changed == 0 {
		t.Fatalf("a cancelled upload must leave the cluster dirty and not failed: %+v", c)
	}
}

func TestMergeRetries(t *testing.T) {
	for _, tc := range []struct {
		name     string
		faults   []mergertest.Fault
		attempts int
		accepted bool
	}{
		{"first succeeds", nil, 1, true},
		{"503 then ok", []mergertest.Fault{{Status: 503, Times: 1}}, 2, true},
		{"retry-after then 500 then ok", []mergertest.Fault{{Status: 503, RetryAfter: "1", Times: 1}, {Status: 500, Times: 1}}, 3, true},
		{"always 500", []mergertest.Fault{{Status: 500}}, 6, false},
		{"404 is final", []mergertest.Fault{{Status: 404, Body: "Session not found"}}, 1, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			e.session(t)
			e.src.write(0, 0, 1)
			for _, f := range tc.faults {
				e.srv.FailMerge(f)
			}
			res, err := e.uploader().Finish(t.Context(), true)
			if (err == nil) != tc.accepted || res.MergeAccepted != tc.accepted || !res.MergeRequested || res.MergeAttempts != tc.attempts {
				t.Fatalf("Finish = %+v, %v", res, err)
			}
			if n := len(e.srv.RequestsTo("merge")); n != tc.attempts {
				t.Fatalf("%d merge requests, want %d", n, tc.attempts)
			}
			if !tc.accepted && !strings.Contains(err.Error(), "all changes are uploaded") {
				t.Fatalf("error %v", err)
			}
			sess, _ := e.srv.Session(fixtureUUID)
			if got := len(sess.Merges); (got == 1) != tc.accepted {
				t.Fatalf("%d accepted merges", got)
			}
		})
	}
}

// TestMergeConflictSaysWhatToDo: a merge refused with 409 is not repeated,
// and the error says why repeating it cannot help and what can be done,
// quoting the merger's reason once.
func TestMergeConflictSaysWhatToDo(t *testing.T) {
	e := newEnv(t)
	e.session(t)
	e.src.write(0, 0, 1)
	reason := "conflict: revision 4 of pool/img already exists; this session was based on revision 3 and its changes were not merged; start a new session from the latest revision"
	e.srv.FailMerge(mergertest.Fault{Status: 409, Body: reason})
	res, err := e.uploader().Finish(t.Context(), true)
	if err == nil || !res.MergeRequested || res.MergeAccepted || res.MergeAttempts != 1 || len(e.srv.RequestsTo("merge")) != 1 {
		t.Fatalf("Finish = %+v, %v; want one refused merge request", res, err)
	}
	msg := err.Error()
	for _, want := range []string{"revision 4 of pool/img", "based on revision 3", "cannot succeed", "-L and without -C", "new session started from the latest revision"} {
		if !strings.Contains(msg, want) {
			t.Errorf("error lacks %q: %s", want, msg)
		}
	}
	if strings.Contains(msg, "requested again later") || strings.Count(strings.ToLower(msg), "conflict") > 1 {
		t.Errorf("error suggests a retry or repeats itself: %s", msg)
	}
}
