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
// # Durability
//
// Unlike the reference, which changes a MAP_SHARED mapping of meta in place
// with no ordering at all, metadata lives in memory and is committed in
// order: data is fdatasync'd, then the metadata that points at it is
// written and meta is fdatasync'd. Flush (NBD FLUSH, FUA writes) commits,
// and a background commit runs every CommitInterval, so an acknowledged
// flush survives SIGKILL and power loss, and an unflushed write is either
// there or not, never a block of garbage.
package cowstore
