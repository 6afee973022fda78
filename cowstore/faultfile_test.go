package cowstore

import (
	"errors"
	"sync"
	"syscall"
)

// faultPlan drives the faultFiles of one session: it counts the
// operations of the commit path (writes to meta, syncs of either file),
// can SIGKILL the process just before the n-th of them, and can make
// syncs fail.
type faultPlan struct {
	mu       sync.Mutex
	armed    bool
	ops      int
	killAt   int                // kill before operation killAt (1-based; 0: never)
	syncErrs map[string][]error // what the next syncs of a file return
	metaErrs []error            // what the next writes to meta return
}

// op counts one operation and kills the process if it is the chosen one.
func (p *faultPlan) op() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.armed {
		return
	}
	p.ops++
	if p.ops == p.killAt {
		syscall.Kill(syscall.Getpid(), syscall.SIGKILL)
		select {} // the signal is on its way
	}
}

// arm starts counting.
func (p *faultPlan) arm() {
	p.mu.Lock()
	p.armed = true
	p.mu.Unlock()
}

// count returns the operations counted so far.
func (p *faultPlan) count() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.ops
}

// failSyncs makes the next syncs of file name return errs, in order.
func (p *faultPlan) failSyncs(name string, errs ...error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.syncErrs == nil {
		p.syncErrs = map[string][]error{}
	}
	p.syncErrs[name] = append(p.syncErrs[name], errs...)
}

func (p *faultPlan) syncErr(name string) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if errs := p.syncErrs[name]; len(errs) > 0 {
		p.syncErrs[name] = errs[1:]
		return errs[0]
	}
	return nil
}

// failMetaWrites makes the next writes to meta return errs, in order,
// without writing.
func (p *faultPlan) failMetaWrites(errs ...error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.metaErrs = append(p.metaErrs, errs...)
}

func (p *faultPlan) metaErr() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.metaErrs) > 0 {
		err := p.metaErrs[0]
		p.metaErrs = p.metaErrs[1:]
		return err
	}
	return nil
}

// wrap is an Options.wrapFile for the plan.
func (p *faultPlan) wrap(name string, f storeFile) storeFile {
	return &faultFile{storeFile: f, name: name, plan: p}
}

// faultFile is a session file under a faultPlan.
type faultFile struct {
	storeFile
	name string
	plan *faultPlan
}

func (f *faultFile) WriteAt(p []byte, off int64) (int, error) {
	if f.name == "meta" {
		f.plan.op()
		if err := f.plan.metaErr(); err != nil {
			return 0, err
		}
	}
	return f.storeFile.WriteAt(p, off)
}

// Datasync fails as planned. Like Linux after a writeback error, a failed
// sync reports the error once: the next one succeeds although the data
// may be gone (the reason a failure must be final).
func (f *faultFile) Datasync() error {
	f.plan.op()
	if err := f.plan.syncErr(f.name); err != nil {
		return err
	}
	return f.storeFile.Datasync()
}

var errInjectedEIO = errors.New("input/output error (injected)")
