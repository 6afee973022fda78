package nbdbridge

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// DefaultReadAheadKB is the read-ahead Attach gives a device, as the
// reference kernel module does for /dev/dnbdX (the nbd driver leaves the
// block layer's 128 KiB): sequential readers then send fewer, larger
// requests.
const DefaultReadAheadKB = 512

// QueueSettings tune the block-layer queue of a device
// (/sys/block/nbdX/queue). A zero field leaves the setting alone.
type QueueSettings struct {
	// ReadAheadKB is read_ahead_kb.
	ReadAheadKB int
	// MaxSectorsKB is max_sectors_kb, the largest request the block layer
	// builds; it is clamped to max_hw_sectors_kb (32 MiB for nbd, whose
	// driver leaves 128 KiB). Negative means as large as the queue allows.
	MaxSectorsKB int
}

// TuneQueue applies q to device index and returns what the queue has
// afterwards.
func TuneQueue(index int, q QueueSettings) (QueueSettings, error) { return Sysfs{}.TuneQueue(index, q) }

// TuneQueue applies q to device index and returns what the queue has
// afterwards.
func (s Sysfs) TuneQueue(index int, q QueueSettings) (QueueSettings, error) {
	var got QueueSettings
	if q.MaxSectorsKB != 0 {
		hw, err := s.queueInt(index, "max_hw_sectors_kb")
		if err != nil {
			return got, err
		}
		want := hw
		if q.MaxSectorsKB > 0 {
			want = min(q.MaxSectorsKB, hw)
		}
		if err := s.setQueueInt(index, "max_sectors_kb", want); err != nil {
			return got, err
		}
	}
	if q.ReadAheadKB > 0 {
		if err := s.setQueueInt(index, "read_ahead_kb", q.ReadAheadKB); err != nil {
			return got, err
		}
	}
	var err error
	if got.ReadAheadKB, err = s.queueInt(index, "read_ahead_kb"); err != nil {
		return got, err
	}
	got.MaxSectorsKB, err = s.queueInt(index, "max_sectors_kb")
	return got, err
}

func (s Sysfs) queueFile(index int, attr string) string {
	return filepath.Join(s.blockDir(index), "queue", attr)
}

func (s Sysfs) queueInt(index int, attr string) (int, error) {
	b, err := os.ReadFile(s.queueFile(index, attr))
	if err != nil {
		return 0, fmt.Errorf("%s of %s: %w", attr, DevicePath(index), err)
	}
	n, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return 0, fmt.Errorf("nbdbridge: %s of %s: bad sysfs value %q", attr, DevicePath(index), b)
	}
	return n, nil
}

func (s Sysfs) setQueueInt(index int, attr string, v int) error {
	if err := os.WriteFile(s.queueFile(index, attr), []byte(strconv.Itoa(v)), 0); err != nil {
		return fmt.Errorf("set %s of %s to %d: %w", attr, DevicePath(index), v, err)
	}
	return nil
}
