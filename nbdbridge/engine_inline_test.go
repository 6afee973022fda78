package nbdbridge

import (
	"testing"
	"time"

	"github.com/pojntfx/go-nbd/pkg/protocol"
)

// hintedBackend says that requests below its first megabyte are local.
type hintedBackend struct{ *MemoryBackend }

func (hintedBackend) Local(write bool, off, n int64) bool { return off+n <= 1<<20 }

// A request whose kind was slow lately still runs inline when alone in
// flight if the backend says it needs no network round trip; without the
// hint it goes to a worker.
func TestEngineInlineWorthyLocalHint(t *testing.T) {
	req := func(typ uint16, off uint64) protocol.TransmissionRequestHeader {
		return protocol.TransmissionRequestHeader{Type: typ, Offset: off, Length: 4096}
	}
	slow := func(e *Engine) {
		for range 50 {
			e.noteCost(wireCmdRead, 10*time.Millisecond)
			e.noteCost(wireCmdWrite, 10*time.Millisecond)
		}
	}
	h := NewEngine(hintedBackend{NewMemoryBackend(4 << 20)}, EngineOptions{})
	defer h.Close()
	plain := NewEngine(NewMemoryBackend(4<<20), EngineOptions{})
	defer plain.Close()
	for _, typ := range []uint16{wireCmdRead, wireCmdWrite} {
		if !h.inlineWorthy(req(typ, 0)) || !plain.inlineWorthy(req(typ, 0)) {
			t.Errorf("cmd %d: a fast kind does not run inline", typ)
		}
	}
	slow(h)
	slow(plain)
	for _, typ := range []uint16{wireCmdRead, wireCmdWrite} {
		if !h.inlineWorthy(req(typ, 0)) {
			t.Errorf("cmd %d: a local request of a slow kind does not run inline", typ)
		}
		if h.inlineWorthy(req(typ, 2<<20)) {
			t.Errorf("cmd %d: a remote request of a slow kind runs inline", typ)
		}
		if plain.inlineWorthy(req(typ, 0)) {
			t.Errorf("cmd %d: a slow kind runs inline without a hint", typ)
		}
	}
	if h.inlineWorthy(req(wireCmdFlush, 0)) != h.fast(wireCmdFlush) {
		t.Error("the hint is asked about a FLUSH")
	}
}
