package hotupgrade

import (
	"encoding/binary"
	"testing"

	"google.golang.org/protobuf/encoding/protowire"
)

func TestHotRestartMessageHeader(t *testing.T) {
	// A Stats reply longer than one datagram is classified by its first 4096 bytes.
	long := hrMessage(2, 3, protowire.AppendBytes(protowire.AppendTag(nil, 4, protowire.BytesType), make([]byte, 10000)))
	for _, tc := range []struct {
		name  string
		msg   []byte
		kind  hrKind
		total int
		ok    bool
	}{
		{"ShutdownAdmin request", hrRequest(reqShutdownAdmin), reqShutdownAdmin, 12, true},
		{"DrainListeners request", hrRequest(reqDrainListeners), reqDrainListeners, 12, true},
		{"Terminate request", hrRequest(reqTerminate), reqTerminate, 12, true},
		{"stats reply made for a gone parent", hrReply(reqStats), replyStats, 12, true},
		{"no-socket reply", hrReply(reqPassListenSocket), replyPassListenSocket, len(hrReply(reqPassListenSocket)), true},
		{"first chunk of a long reply", long[:4096], replyStats, len(long), true},
		{"didnt_recognize only", func() []byte {
			b := protowire.AppendVarint(protowire.AppendTag(nil, 3, protowire.VarintType), 1)
			return append(binary.BigEndian.AppendUint64(nil, uint64(len(b))), b...)
		}(), hrUnknown, 10, true},
		{"too short", []byte{0, 0, 0}, hrUnknown, 0, false},
	} {
		total, kind, ok := hrHeader(tc.msg)
		if kind != tc.kind || total != tc.total || ok != tc.ok {
			t.Errorf("%s: hrHeader = %d, %v, %v; want %d, %v, %v", tc.name, total, kind, ok, tc.total, tc.kind, tc.ok)
		}
	}
	// fd -1 is a sign-extended varint, as protobuf encodes negative int32s.
	reply := hrReply(reqPassListenSocket)
	if want := []byte{0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01}; string(reply[len(reply)-len(want):]) != string(want) {
		t.Errorf("no-socket reply %x does not end in fd -1 (%x)", reply, want)
	}
}
