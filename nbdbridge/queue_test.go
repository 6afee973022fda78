package nbdbridge

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func fakeQueue(t *testing.T, attrs map[string]string) Sysfs {
	t.Helper()
	root := t.TempDir()
	q := filepath.Join(root, "block", "nbd3", "queue")
	if err := os.MkdirAll(q, 0o755); err != nil {
		t.Fatal(err)
	}
	for k, v := range attrs {
		os.WriteFile(filepath.Join(q, k), []byte(v+"\n"), 0o644)
	}
	return Sysfs{Root: root}
}

func readQueue(t *testing.T, s Sysfs, attr string) string {
	b, err := os.ReadFile(s.queueFile(3, attr))
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

func TestTuneQueue(t *testing.T) {
	s := fakeQueue(t, map[string]string{"read_ahead_kb": "128", "max_sectors_kb": "128", "max_hw_sectors_kb": "32768"})
	got, err := s.TuneQueue(3, QueueSettings{ReadAheadKB: 512, MaxSectorsKB: -1})
	if err != nil {
		t.Fatal(err)
	}
	if got != (QueueSettings{ReadAheadKB: 512, MaxSectorsKB: 32768}) || readQueue(t, s, "max_sectors_kb") != "32768" {
		t.Fatalf("got %+v, max_sectors_kb %s", got, readQueue(t, s, "max_sectors_kb"))
	}
	// clamped to the hardware limit
	if got, err = s.TuneQueue(3, QueueSettings{MaxSectorsKB: 1 << 20}); err != nil || got.MaxSectorsKB != 32768 {
		t.Fatalf("clamp: %+v %v", got, err)
	}
	if got, err = s.TuneQueue(3, QueueSettings{MaxSectorsKB: 1024}); err != nil || got.MaxSectorsKB != 1024 || got.ReadAheadKB != 512 {
		t.Fatalf("1024: %+v %v", got, err)
	}
	// zero leaves everything alone
	if got, err = s.TuneQueue(3, QueueSettings{}); err != nil || got != (QueueSettings{ReadAheadKB: 512, MaxSectorsKB: 1024}) {
		t.Fatalf("zero: %+v %v", got, err)
	}
	if _, err := (Sysfs{Root: t.TempDir()}).TuneQueue(3, QueueSettings{ReadAheadKB: 512}); err == nil || !strings.Contains(err.Error(), "/dev/nbd3") {
		t.Fatalf("missing device: %v", err)
	}
}
