package fakevpp

import (
	"encoding/binary"
	"net"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"go.fd.io/govpp/binapi/memclnt"
	"go.fd.io/govpp/binapi/rdma"
	"go.fd.io/govpp/codec"
)

// TestWireHandshake speaks the socket protocol byte by byte, without govpp's client: a
// 16-byte header with the length in bytes 8-11, sockclnt_create as message 15, a table of
// name_crc entries back, control_ping answered with the request's context.
func TestWireHandshake(t *testing.T) {
	dir, err := os.MkdirTemp("", "fakevpp")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	srv, err := New(filepath.Join(dir, "api.sock"), WithLogf(t.Logf), WithCRC("show_version", "deadbeef"), WithoutMessages("rdma_delete"))
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	c, err := net.Dial("unix", srv.Path())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))

	req, err := codec.EncodeMsg(&memclnt.SockclntCreate{Name: "raw"}, sockclntCreateID)
	if err != nil {
		t.Fatal(err)
	}
	binary.BigEndian.PutUint32(req[2:6], 77) // sockclnt_create carries only a context
	if err := writeFrame(c, req); err != nil {
		t.Fatal(err)
	}
	data, err := readFrame(c)
	if err != nil {
		t.Fatal(err)
	}
	var rep memclnt.SockclntCreateReply
	if err := codec.DecodeMsg(data, &rep); err != nil {
		t.Fatal(err)
	}
	if rep.Response != 0 || rep.Index == 0 || int(rep.Count) != len(rep.MessageTable) {
		t.Fatalf("reply %+v", rep)
	}
	ids := map[string]uint16{}
	var names []string
	for _, e := range rep.MessageTable {
		ids[e.Name] = e.Index
		names = append(names, e.Name)
	}
	if ids["sockclnt_create_"+(&memclnt.SockclntCreate{}).GetCrcString()] != sockclntCreateID {
		t.Errorf("sockclnt_create is not message %d", sockclntCreateID)
	}
	if _, ok := ids["show_version_deadbeef"]; !ok {
		t.Error("the CRC override is not in the table")
	}
	if slices.Contains(names, "rdma_delete_"+(&rdma.RdmaDelete{}).GetCrcString()) {
		t.Error("an omitted message is in the table")
	}

	ping, err := codec.EncodeMsg(&memclnt.ControlPing{}, ids["control_ping_"+(&memclnt.ControlPing{}).GetCrcString()])
	if err != nil {
		t.Fatal(err)
	}
	binary.BigEndian.PutUint32(ping[2:6], rep.Index)
	binary.BigEndian.PutUint32(ping[6:10], 0xabcd)
	if err := writeFrame(c, ping); err != nil {
		t.Fatal(err)
	}
	data, err = readFrame(c)
	if err != nil {
		t.Fatal(err)
	}
	if id := binary.BigEndian.Uint16(data[:2]); id != ids["control_ping_reply_"+(&memclnt.ControlPingReply{}).GetCrcString()] {
		t.Errorf("reply id %d is not control_ping_reply", id)
	}
	if ctx := binary.BigEndian.Uint32(data[2:6]); ctx != 0xabcd {
		t.Errorf("reply context %#x, want the request's", ctx)
	}
	if got := srv.Seen(); !slices.Equal(got, []string{"sockclnt_create", "control_ping"}) {
		t.Errorf("seen %v", got)
	}
}
