package server

import "testing"

// TestConfigDumpBytes pins the text of Config.String (the RPC's q=config)
// byte for byte, for a full file, the defaults and values that are
// clamped or spelled specially.
func TestConfigDumpBytes(t *testing.T) {
	for _, tc := range []struct {
		name, conf, want string
	}{
		{"full", cfgTestFull, `[dnbd3]
basePath=/srv/dnbd3
listenPort=5004
serverPenalty=100000
clientPenalty=1024
isProxy=true
backgroundReplication=hashblock
bgrMinClients=2
bgrWindowSize=8
lookupMissingForProxy=false
sparseFiles=true
ignoreAllocErrors=true
removeMissingImages=false
uplinkTimeout=1250
clientTimeout=60
closeUnusedFd=true
vmdkLegacyMode=false
proxyPrivateOnly=true
pretendClient=true
autoFreeDiskSpaceDelay=36000
iScsiServer=false
[limits]
maxClients=1000
maxImages=2048
maxPayload=9000000
maxReplicationSize=107374182400
maxPrefetch=524288
minRequestSize=64000
[logging]
file=/var/log/dnbd3.log
fileMask=ERROR WARNING DEBUG2
consoleMask=ERROR
consoleTimestamps=true
`},
		{"defaults", "[dnbd3]\nbasePath=/srv\n", `[dnbd3]
basePath=/srv
listenPort=5003
serverPenalty=0
clientPenalty=0
isProxy=false
backgroundReplication=true
bgrMinClients=0
bgrWindowSize=1
lookupMissingForProxy=true
sparseFiles=false
ignoreAllocErrors=false
removeMissingImages=true
uplinkTimeout=5000
clientTimeout=15000
closeUnusedFd=false
vmdkLegacyMode=false
proxyPrivateOnly=false
pretendClient=false
autoFreeDiskSpaceDelay=36000
iScsiServer=true
[limits]
maxClients=4000
maxImages=5000
maxPayload=9000000
maxReplicationSize=100000000000
maxPrefetch=262144
minRequestSize=0
[logging]
file=
fileMask=ERROR WARNING MINOR INFO DEBUG1
consoleMask=ERROR WARNING MINOR INFO
consoleTimestamps=false
`},
		{"special", "[dnbd3]\nbasePath=/srv//\nautoFreeDiskSpaceDelay=-5\nbgrWindowSize=0\nbackgroundReplication=HashBlock\n[limits]\nmaxClients=9999\n[logging]\nconsoleMask=\n", `[dnbd3]
basePath=/srv
listenPort=5003
serverPenalty=0
clientPenalty=0
isProxy=false
backgroundReplication=hashblock
bgrMinClients=0
bgrWindowSize=1
lookupMissingForProxy=true
sparseFiles=false
ignoreAllocErrors=false
removeMissingImages=true
uplinkTimeout=5000
clientTimeout=15000
closeUnusedFd=false
vmdkLegacyMode=false
proxyPrivateOnly=false
pretendClient=false
autoFreeDiskSpaceDelay=-1
iScsiServer=true
[limits]
maxClients=4000
maxImages=5000
maxPayload=9000000
maxReplicationSize=100000000000
maxPrefetch=262144
minRequestSize=0
[logging]
file=
fileMask=ERROR WARNING MINOR INFO DEBUG1
consoleMask=
consoleTimestamps=false
`},
	} {
		c, _, err := LoadConfig(cfgTestDir(t, tc.conf), nil)
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		if got := c.String(); got != tc.want {
			t.Errorf("%s: String() =\n%s\nwant\n%s", tc.name, got, tc.want)
		}
	}
	// DefaultConfig alone (no basePath) too.
	d := DefaultConfig()
	if got := d.String(); got[:len("[dnbd3]\nbasePath=\nlistenPort=5003\n")] != "[dnbd3]\nbasePath=\nlistenPort=5003\n" {
		t.Errorf("DefaultConfig().String() = %q", got)
	}
}
