package server

import (
	"reflect"
	"testing"
)

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

// TestConfigKeyTable checks the key table: one key per Config field,
// unique names, defaults that parse cleanly and are written back as
// spelled.
func TestConfigKeyTable(t *testing.T) {
	// Every field non-zero, so that copying it shows.
	var src Config
	sv := reflect.ValueOf(&src).Elem()
	for i := range sv.NumField() {
		f := sv.Field(i)
		switch f.Kind() {
		case reflect.Bool:
			f.SetBool(true)
		case reflect.String:
			f.SetString("x")
		case reflect.Int, reflect.Int64:
			f.SetInt(7)
		case reflect.Uint8, reflect.Uint16:
			f.SetUint(7)
		default:
			t.Fatalf("field %s: kind %s not handled by this test", sv.Type().Field(i).Name, f.Kind())
		}
	}
	owner := map[string]string{}
	names := map[string]bool{}
	for _, k := range configKeys {
		if names[k.section+"."+k.name] {
			t.Errorf("[%s] %s twice", k.section, k.name)
		}
		names[k.section+"."+k.name] = true
		var dst Config
		k.copy(&dst, &src)
		dv := reflect.ValueOf(dst)
		for i := range dv.NumField() {
			if dv.Field(i).IsZero() {
				continue
			}
			field := sv.Type().Field(i).Name
			if o, ok := owner[field]; ok {
				t.Errorf("field %s set by [%s] %s and %s", field, k.section, k.name, o)
			}
			owner[field] = k.section + "." + k.name
		}
		if k.def == "" {
			continue
		}
		var c Config
		note, err := k.parse(&c, k.def)
		if err != nil || note != "" {
			t.Errorf("[%s] %s: default %q: %q, %v", k.section, k.name, k.def, note, err)
		}
		if got := k.format(&c); got != k.def {
			t.Errorf("[%s] %s: default %q written back as %q", k.section, k.name, k.def, got)
		}
	}
	for i := range sv.NumField() {
		if name := sv.Type().Field(i).Name; owner[name] == "" {
			t.Errorf("field %s has no key", name)
		}
	}
}
