package httpapi

import (
	"bytes"
	"cmp"
	"fmt"
	"slices"
	"sync"

	"github.com/dnbd3go/dnbd3go/cowformat"
	"github.com/dnbd3go/dnbd3go/merger"
)

// fakeSession is one session of the fake Service.
type fakeSession struct {
	info     merger.SessionInfo
	clusters map[int]merger.Update
	mods     map[int]uint32
}

// fakeService is an in-memory merger.Service that records every call and
// can be told to fail. Sessions start Active; Merge makes them Merging.
type fakeService struct {
	mu       sync.Mutex
	next     int
	sessions map[string]*fakeSession
	calls    []string
	updates  []updateCall
	merges   []mergeCall
	creates  []createCall
	errs     map[string]error // by operation: create, update, merge, status, top
	panicOn  string
}

type createCall struct {
	name     string
	rev, bfs int
}

type updateCall struct {
	uuid string
	u    merger.Update
}

type mergeCall struct {
	uuid       string
	orig, size int64
}

func newFake() *fakeService {
	return &fakeService{sessions: make(map[string]*fakeSession), errs: make(map[string]error)}
}

// fail makes operation op return err from now on (nil: succeed again).
func (f *fakeService) fail(op string, err error) {
	f.mu.Lock()
	f.errs[op] = err
	f.mu.Unlock()
}

// begin records a call and returns the error to fail it with.
func (f *fakeService) begin(op, detail string) error {
	f.calls = append(f.calls, op+" "+detail)
	if f.panicOn == op {
		panic("fake panic in " + op)
	}
	return f.errs[op]
}

// addSession adds a session in the given state and returns its uuid.
func (f *fakeService) addSession(name string, rev int, st merger.State) string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.newSession(name, rev, st).info.UUID
}

func (f *fakeService) newSession(name string, rev int, st merger.State) *fakeSession {
	f.next++
	id := fmt.Sprintf("%08x-0000-4000-8000-%012x", f.next, f.next)
	s := &fakeSession{
		info: merger.SessionInfo{UUID: id, ImageName: name, OriginalRevision: rev,
			NewRevision: -1, State: st, BitfieldSize: cowformat.BitfieldSize},
		clusters: make(map[int]merger.Update),
		mods:     make(map[int]uint32),
	}
	f.sessions[id] = s
	return s
}

func (f *fakeService) setState(id string, st merger.State, errText string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.sessions[id].info.State = st
	f.sessions[id].info.Error = errText
}

func (f *fakeService) Create(name string, rev, bfs int) (merger.SessionInfo, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.creates = append(f.creates, createCall{name, rev, bfs})
	if err := f.begin("create", name); err != nil {
		return merger.SessionInfo{}, err
	}
	return f.newSession(name, rev, merger.StateActive).info, nil
}

func (f *fakeService) CanUpload(id string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.begin("canupload", id); err != nil {
		return err
	}
	s, ok := f.sessions[id]
	switch {
	case !ok:
		return fmt.Errorf("session %s: %w", id, merger.ErrSessionNotFound)
	case s.info.State != merger.StateActive:
		return merger.ErrSessionClosed
	}
	return nil
}

func (f *fakeService) Update(id string, u merger.Update) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	u.Blocks = bytes.Clone(u.Blocks)
	f.updates = append(f.updates, updateCall{id, u})
	if err := f.begin("update", id); err != nil {
		return err
	}
	s, ok := f.sessions[id]
	switch {
	case !ok:
		return fmt.Errorf("session %s: %w", id, merger.ErrSessionNotFound)
	case s.info.State != merger.StateActive:
		return merger.ErrSessionClosed
	}
	if _, ok := s.clusters[u.Cluster]; !ok {
		s.info.TotalClusters++
	}
	s.clusters[u.Cluster] = u
	s.mods[u.Cluster]++
	return nil
}

func (f *fakeService) Merge(id string, orig, size int64) (merger.SessionInfo, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.merges = append(f.merges, mergeCall{id, orig, size})
	if err := f.begin("merge", id); err != nil {
		return merger.SessionInfo{}, err
	}
	s, ok := f.sessions[id]
	if !ok {
		return merger.SessionInfo{}, merger.ErrSessionNotFound
	}
	if s.info.State == merger.StateActive {
		s.info.State = merger.StateMerging
		s.info.OriginalFileSize, s.info.NewFileSize = orig, size
	}
	return s.info, nil
}

func (f *fakeService) Status(id string) (merger.SessionInfo, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.begin("status", id); err != nil {
		return merger.SessionInfo{}, err
	}
	s, ok := f.sessions[id]
	if !ok {
		return merger.SessionInfo{}, merger.ErrSessionNotFound
	}
	return s.info, nil
}

func (f *fakeService) TopModified(id string, n int) ([]merger.ClusterCount, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.begin("top", fmt.Sprint(id, " ", n)); err != nil {
		return nil, err
	}
	s, ok := f.sessions[id]
	if !ok {
		return nil, merger.ErrSessionNotFound
	}
	var out []merger.ClusterCount
	for c, m := range s.mods {
		out = append(out, merger.ClusterCount{Cluster: c, Modifications: m})
	}
	slices.SortFunc(out, func(a, b merger.ClusterCount) int {
		return cmp.Or(cmp.Compare(b.Modifications, a.Modifications), cmp.Compare(a.Cluster, b.Cluster))
	})
	if len(out) > n {
		out = out[:n]
	}
	return out, nil
}

// lastUpdate returns the last update call.
func (f *fakeService) lastUpdate() (updateCall, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.updates) == 0 {
		return updateCall{}, false
	}
	return f.updates[len(f.updates)-1], true
}

// callCount returns how many calls the service saw.
func (f *fakeService) callCount() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.calls)
}
