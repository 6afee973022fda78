package mergertest

import "net/http"

// Fault is an error reply the server gives instead of handling a request.
type Fault struct {
	// Status is the HTTP status to reply with (0 means 500).
	Status int
	// RetryAfter is the value of a Retry-After header ("" sends none),
	// e.g. "1" or an HTTP date.
	RetryAfter string
	// Body is the reply body.
	Body string
	// Times is how many requests get this reply; 0 means every request
	// until ClearFaults.
	Times int
}

func (f Fault) reply() reply {
	rep := reply{status: f.Status, body: f.Body}
	if rep.status == 0 {
		rep.status = http.StatusInternalServerError
	}
	if f.RetryAfter != "" {
		rep.header = map[string]string{"Retry-After": f.RetryAfter}
	}
	return rep
}

// FailCreate queues a fault for create requests. Faults of one endpoint
// apply in the order they were queued.
func (s *Server) FailCreate(f Fault) { s.addFault("create", f) }

// FailUpdate queues a fault for update requests (e.g. Fault{Status: 503,
// RetryAfter: "1", Times: 1}). A faulted update is not stored.
func (s *Server) FailUpdate(f Fault) { s.addFault("update", f) }

// FailMerge queues a fault for merge requests. A faulted merge is not
// recorded as a merge.
func (s *Server) FailMerge(f Fault) { s.addFault("merge", f) }

// ClearFaults removes all queued faults.
func (s *Server) ClearFaults() {
	s.mu.Lock()
	clear(s.faults)
	s.mu.Unlock()
}

func (s *Server) addFault(ep string, f Fault) {
	s.mu.Lock()
	s.faults[ep] = append(s.faults[ep], &f)
	s.mu.Unlock()
}

// takeFault returns the fault for the next request to ep, if any.
func (s *Server) takeFault(ep string) (Fault, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	q := s.faults[ep]
	if len(q) == 0 {
		return Fault{}, false
	}
	f := q[0]
	if f.Times > 0 {
		f.Times--
		if f.Times == 0 {
			s.faults[ep] = q[1:]
		}
	}
	return *f, true
}
