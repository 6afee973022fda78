// Package cowformat defines the copy-on-write session format (version 3)
// shared by the COW overlay (cowstore), its uploader (cowstore/upload),
// the merger and their test doubles: the cluster geometry, the meta
// file's layout and the offsets of its header fields. The format is the
// reference's; ../shared/spec/cow-format.md (beside this repository) describes it.
package cowformat

// Cluster geometry: a cluster is BitfieldSize*8 blocks, one bit of its
// bitfield per block.
const (
	BlockSize     = 4096                      // bytes per block
	BitfieldSize  = 40                        // bytes of bitfield per cluster
	ClusterBlocks = BitfieldSize * 8          // 320 blocks
	ClusterSize   = ClusterBlocks * BlockSize // 1,310,720 bytes
	L2Entries     = 1024                      // clusters per L2 table
	L2Span        = L2Entries * ClusterSize   // 1,342,177,280 bytes per table
	MaxImageSize  = 1_000_000_000_000         // 10^12 bytes
	L1Entries     = (MaxImageSize + L2Span - 1) / L2Span
	// MaxClusters bounds a cluster index.
	MaxClusters = (MaxImageSize + ClusterSize - 1) / ClusterSize
)

// Files of a session: the meta file (header, L1 table, L2 tables) and the
// data file (magic, then one slot per cluster).
const (
	MetaMagic   uint64 = 0xEBE44D6E72F7825E
	DataMagic   uint64 = 0xEBE44D6E72F7825F
	Version            = 3
	HeaderSize         = 320
	L2EntrySize        = 64
	L2TableSize        = L2Entries * L2EntrySize // 65536
	StartL1            = HeaderSize
	StartL2            = ((StartL1 + L1Entries*4 + L2TableSize - 1) / L2TableSize) * L2TableSize
	MetaSize           = StartL2 + L1Entries*L2TableSize
	FirstSlot          = ClusterSize // data slots start after one cluster (magic at 0)
)

// Offsets of the header's fields in the meta file (little endian).
const (
	OffMagic             = 0   // uint64 MetaMagic
	OffImageSize         = 8   // uint64
	OffVersion           = 16  // uint32
	OffBlockSize         = 20  // uint32, never written in version 3
	OffValidRemoteSize   = 24  // uint64
	OffStartL1           = 32  // uint32
	OffStartL2           = 36  // uint32
	OffBitfieldSize      = 40  // uint32
	OffNextL2            = 44  // int32
	OffMetaSize          = 48  // uint64
	OffNextClusterOffset = 56  // uint64
	OffMaxImageSize      = 64  // uint64
	OffCreationTime      = 72  // uint64
	OffUUID              = 80  // UUIDField bytes, NUL-terminated
	UUIDField            = 40  //
	OffImageName         = 120 // NameField bytes, NUL-terminated
	NameField            = 200 //
)
