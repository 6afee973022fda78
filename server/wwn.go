package server

// WWN returns the World Wide Name the reference derives from an image name
// (shown by the RPC and used for iSCSI): h = h*131 + c over the name's bytes
// taken as signed chars (as C's char is on x86), with u64 wrap-around, then
// (h & 0xFFFFFF) | 0x2000000347000000 | ((h & 0xFFF000000) << 24).
func wwn(name string) uint64 {
	var h uint64
	for i := 0; i < len(name); i++ {
		h = h*131 + uint64(int64(int8(name[i])))
	}
	return (h & 0xFFFFFF) | 0x2000000347000000 | ((h & 0xFFF000000) << 24)
}
