// Package cowstore implements the copy-on-write overlay that makes a
// read-only DNBD3 image writable, in the reference client's session format
// (meta version 3), so sessions move freely between dnbd3go and the
// reference FUSE client.
//
// # Session directory
//
//	DIR/meta      header, L1 table, L2 tables (below)
//	DIR/data      8-byte magic, then one 1,310,720-byte slot per cluster,
//	              in first-write order; block n of a cluster at slot+n*4096
//	DIR/status    upload status (written by the uploader, INI)
//	DIR/revision  the image revision the session is based on (our sidecar:
//	              the header has no field for it)
//	DIR/name      the full image name (our sidecar: the header keeps only
//	              199 bytes, and two images may share them); uploads and
//	              Load use it
//	DIR/lock      flock'd by the process that has the session open (Create,
//	              Load); holds its PID, so a second process is refused with
//	              a message that names the first
//
// # The meta file (all integers little-endian)
//
//	offset 0      header, 320 bytes:
//	  0  u64 magic 0xEBE44D6E72F7825E     48 i64 metaSize (48,955,392)
//	  8  u64 imageSize (current size)     56 i64 nextClusterOffset in data
//	 16  i32 version 3                    64 u64 maxImageSize 10^12
//	 20  i32 blocksize (0 in v3)          72 u64 creationTime (unix s)
//	 24  u64 validRemoteSize              80 char[40] uuid (merger session)
//	 32  u32 startL1 (320)               120 char[200] imageName
//	 36  u32 startL2 (65536)
//	 40  i32 bitfieldSize (40)
//	 44  i32 nextL2 (tables handed out)
//	offset 320    L1: 746 x i32, -1 = no table, else the index k of the L2
//	              table at 65536 + k*65536
//	offset 65536  L2 tables, 1024 entries of 64 bytes each:
//	   0 i64 offset of the cluster's slot in data, -1 = none
//	   8 i64 timeChanged (unix s of the last change not yet uploaded; 0 = clean)
//	  16 u32 uploads   20 u32 fails   24 u8[40] bitfield, bit n (LSB first)
//	              = 4 KiB block n of the cluster is in data
//
// An image offset o lives in cluster o/1,310,720 (the merger's
// clusterindex), in L1 entry o/1,342,177,280 and L2 entry
// (o%1,342,177,280)/1,310,720, block (o%1,310,720)/4096.
//
// # Reading, writing, resizing
//
// A byte x < imageSize reads from data if its block's bit is set, else
// from the remote image if x < validRemoteSize, else as zero. Partial-block
// writes read the rest of the block from the remote image: the remote
// bytes of a block are clamp(validRemoteSize - blockStart, 0, 4096) (the
// reference gets this wrong after unaligned truncates). Shrinking lowers
// validRemoteSize; growing clears the bits past the old end, so a shrink
// followed by a grow reads zeros.
//
// Remote reads that follow each other through the image fetch the next
// two 1 MiB segments in the background (readahead.go), so a reader that
// waits for each request (O_DIRECT, a verify pass) finds them ready; the
// remote image never changes, so nothing fetched goes stale. Random reads
// are passed through as they are. Local reports which requests need no
// remote read, so the NBD engine runs them inline (nbdbridge.LocalHinter).
//
// # Durability
//
// Unlike the reference, which changes a MAP_SHARED mapping of meta in place
// with no ordering at all, metadata lives in memory and is committed by
// Flush (NBD FLUSH, FUA writes), by a shrinking Resize, and every
// CommitInterval in the background. The promise: after a crash (SIGKILL or
// power loss) at any instant, the session loads, and every block reads as
// it was at the last acknowledged commit or as a later write left it -
// never as a state it never had (torn metadata, zeros or remote bytes
// where data was, data of another cluster).
//
// A commit takes three steps:
//
//  1. fdatasync(data): the blocks the new entries point to are durable.
//  2. write the new L2 tables, the changed L2 entries and (if it changed)
//     L1; fdatasync(meta).
//  3. write the header (320 bytes, all inside the first 512-byte sector);
//     fdatasync(meta). Skipped if the header did not change.
//
// The committed header is the commit point: its nextL2 and
// nextClusterOffset say which tables and slots exist. Everything step 2
// writes is either harmless before step 3 or invisible until it:
//
//   - a new L2 table has an index >= the committed nextL2, and so has the
//     L1 value that points to it; Load ignores such L1 values (a table
//     index counts as handed out only once a header covers it, and tables
//     are never freed, so an L1 value below nextL2 never changes);
//   - a new slot is >= the committed nextClusterOffset; Load treats an
//     entry with such a slot as never written (slots are never freed and an
//     entry that has one never changes it, so "never written" is exactly
//     its committed state);
//   - any other changed entry (new bits in an old slot, upload counters)
//     points only at data made durable in step 1, so with or without it
//     each block reads its old or its new content. Blocks already local are
//     overwritten in place, as on any disk: an unflushed overwrite may or
//     may not be there after a crash.
//
// Load makes what it ignored durable at once (it rewrites those entries and
// L1, step 2 of a commit), before a new table or slot can reuse the index
// or offset, so an ignored entry can never become valid later.
//
// The remaining hazard is a grow that clears bits (or zeroes the tail of
// the last block) while the committed header still shows those blocks:
// after a shrink and a grow within one commit interval a crash between
// steps 2 and 3 would show remote bytes where the old state had data. So a
// shrink commits before Resize returns (and is undone if that fails): the
// committed size never exceeds the size in memory, and a grow or a write
// past the end only changes blocks beyond the committed size.
//
// The argument assumes what file systems and disks give: fdatasync orders
// the writes before it, and a 512-byte aligned sector is written whole or
// not at all (each L1 value, each 64-byte L2 entry and the header lie
// inside one sector). TestCommitCrashPoints kills a process at every write
// and sync of its commits; TestCommitWritebackOrder rebuilds the files as a
// power loss could leave them, with any subset of the unsynced sectors
// written.
//
// A failed fdatasync fails the session for good (Overlay.Failed): Linux
// may already have dropped the unsynced pages and reports the error only
// once, so a retry would report success for lost data. Every later write,
// resize and flush returns the error; loading the session again (-L) shows
// it as of the last successful commit. A failed write of metadata is
// retried by the next commit (nothing was lost).
package cowstore
