package vpp

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"go.fd.io/govpp/adapter"
	"go.fd.io/govpp/adapter/socketclient"
	afpacket "go.fd.io/govpp/binapi/af_packet"
	interfaces "go.fd.io/govpp/binapi/interface"
	"go.fd.io/govpp/binapi/interface_types"
	"go.fd.io/govpp/binapi/ip"
	"go.fd.io/govpp/binapi/ip_types"
	"go.fd.io/govpp/core"

	"github.com/meshturbo/meshturbo/internal/testenv"
)

const realVPPHint = `
=====================================================================================
SKIPPED: TestRealVPP needs a real VPP; VPP_API_SOCKET is not set.
To run it against VPP 25.02 (as root):
  1. start VPP with the startup.conf in vpp/README.md (session { enable use-app-socket-api })
  2. ip link add mtvpp0 type veth peer name mtvpp1 && ip link set mtvpp0 up && ip link set mtvpp1 up
  3. VPP_API_SOCKET=/run/vpp/api.sock VPP_TEST_HOST_IF=mtvpp0 go test -run TestRealVPP -v ./vpp/
     (add VPP_STATS_SOCKET=/run/vpp/stats.sock to check the uplink's counters too)
The same steps run against the fake VPP in TestRealVPPStepsOnFake.
=====================================================================================`

// TestRealVPP runs the real reconciler against a real VPP: connect with govpp's socket client,
// the CRC and version check, a full apply with an af_packet uplink on a host interface the test
// may hand to VPP (VPP_TEST_HOST_IF, e.g. one end of a veth pair), a no-op re-apply, a sidecar
// removal, an agent restart against the state it left, and the removal of every namespace.
// What the agent sent is recorded at the socket client; what VPP holds is read back through a
// connection of the test's own.
func TestRealVPP(t *testing.T) {
	sock := os.Getenv("VPP_API_SOCKET")
	if sock == "" {
		t.Skip(realVPPHint)
	}
	hostIf := os.Getenv("VPP_TEST_HOST_IF")
	if hostIf == "" {
		t.Fatal("VPP_API_SOCKET is set but VPP_TEST_HOST_IF is not: name a host interface VPP may take over (see the hint in realvpp_test.go)")
	}
	realVPPSteps(t, sock, hostIf, os.Getenv("VPP_STATS_SOCKET"))
}

// TestRealVPPStepsOnFake runs TestRealVPP's steps against the fake VPP, so that the test a
// real VPP runs is known to be right everywhere else.
func TestRealVPPStepsOnFake(t *testing.T) {
	srv := startFake(t)
	realVPPSteps(t, srv.Path(), "mtvpp0", "")
}

// sendRecorder records, per agent, the names of the requests govpp's socket client sends
// (control_ping left out: the supervisor's probe sends it at its own pace).
type sendRecorder struct {
	mu   sync.Mutex
	sent []string
}

func (r *sendRecorder) newAdapter(socket string) adapter.VppAPI {
	c := socketclient.NewVppClient(socket)
	c.SetClientName("meshturbo-agent-test")
	return &recordingClient{Client: c, rec: r}
}

// take returns what was sent since the last take.
func (r *sendRecorder) take() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := r.sent
	r.sent = nil
	return out
}

type recordingClient struct {
	*socketclient.Client
	rec   *sendRecorder
	names map[uint16]string // this connection's message ids
}

func (c *recordingClient) Connect() error {
	if err := c.Client.Connect(); err != nil {
		return err
	}
	c.names = map[uint16]string{}
	for _, m := range append(coreMessages(), (&afPacketDriver{}).messages()...) {
		if id, err := c.Client.GetMsgID(m.GetMessageName(), m.GetCrcString()); err == nil {
			c.names[id] = m.GetMessageName()
		}
	}
	return nil
}

func (c *recordingClient) SendMsg(context uint32, data []byte) error {
	if len(data) >= 2 {
		id := binary.BigEndian.Uint16(data)
		name, ok := c.names[id]
		if !ok {
			name = fmt.Sprintf("message-%d", id)
		}
		if name != "control_ping" {
			c.rec.mu.Lock()
			c.rec.sent = append(c.rec.sent, name)
			c.rec.mu.Unlock()
		}
	}
	return c.Client.SendMsg(context, data)
}

func realVPPSteps(t *testing.T, sock, hostIf, statsSock string) {
	addr := netip.MustParsePrefix("198.51.100.2/24")
	route := Route{Prefix: netip.MustParsePrefix("203.0.113.0/24"), Via: netip.MustParseAddr("198.51.100.1")}
	cfg := Config{
		APISocket:    sock,
		StatsSocket:  statsSock,
		Uplink:       Uplink{Driver: DriverAFPacket, HostIf: hostIf, Addresses: []netip.Prefix{addr}},
		Routes:       []Route{route},
		HandoffDir:   t.TempDir(),
		AppSocketDir: "/run/vpp/app_ns_sockets",
		SecretKey:    []byte("TestRealVPP secret key"),
		Logger:       testenv.Logger(t),
	}
	if statsSock == "" {
		cfg.StatsSocket = filepath.Join(t.TempDir(), "no-stats.sock") // counters off
	}
	ctx := ctxT(t)

	// An independent connection to look at VPP and to remove the test's interface and route
	// afterwards (the agent never removes its configured uplink). Its cleanup is registered
	// first, so it runs after the agents' Close.
	conn, err := core.Connect(socketclient.NewVppClient(sock))
	if err != nil {
		t.Fatal(err)
	}
	look := &vppConn{conn: conn, timeout: 5 * time.Second, dead: make(chan struct{}),
		ifc: interfaces.NewServiceClient(conn), ipc: ip.NewServiceClient(conn), afp: afpacket.NewServiceClient(conn)}
	var cleanupAgent *Agent
	t.Cleanup(func() {
		defer conn.Disconnect()
		if cleanupAgent != nil {
			cleanupAgent.Close()
		}
		up, err := findUplink(context.Background(), look, hostIf)
		if err != nil || up == nil {
			t.Logf("cleanup: no uplink to remove (%v)", err)
			return
		}
		if owned, err := cleanupAgent.ownedRoutes(context.Background(), look, map[uint32]bool{uint32(up.SwIfIndex): true}); err == nil {
			for _, r := range owned {
				if err := cleanupAgent.delRoute(context.Background(), look, r); err != nil {
					t.Logf("cleanup: %v", err)
				}
			}
		}
		if _, err := invoke(context.Background(), look, &afpacket.AfPacketDelete{HostIfName: hostIf}, look.afp.AfPacketDelete); err != nil {
			t.Logf("cleanup: %v", err)
		}
	})

	// 1. Connect: handshake, CRC check, show_version in range.
	var rec sendRecorder
	a := startAgent(t, cfg, WithAdapter(rec.newAdapter))
	cleanupAgent = a
	st := a.Status()
	if !st.Connected || st.Version == "" || st.Connects != 1 {
		t.Fatalf("status after connecting: %+v", st)
	}
	t.Logf("connected to VPP %s", st.Version)
	if got := rec.take(); !slices.Equal(got, []string{"show_version"}) {
		t.Errorf("connecting sent %v, want only show_version (the CRC check uses the handshake's table)", got)
	}

	// 2. Full apply, in VPP's order. VPP's defaults decide whether the rx mode needs setting.
	if err := a.Reconcile(ctx, sidecars("rt-a", "rt-b")); err != nil {
		t.Fatal(err)
	}
	got := slices.DeleteFunc(changes(rec.take()), func(n string) bool { return n == "sw_interface_set_rx_mode" })
	want := []string{"af_packet_create_v3", "sw_interface_tag_add_del", "sw_interface_set_flags", "sw_interface_add_del_address",
		"ip_route_add_del", "session_enable_disable_v2", "app_namespace_add_del_v4", "app_namespace_add_del_v4"}
	if !slices.Equal(got, want) {
		t.Errorf("first apply sent\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	up := checkRealState(t, look, a, hostIf, addr, route)
	if s := a.Status(); !slices.Equal(s.Namespaces, []string{"mt-rt-a", "mt-rt-b"}) || s.Uplink == nil ||
		s.Uplink.SwIfIndex != uint32(up.SwIfIndex) || s.LastApplyError != "" {
		t.Errorf("status after the apply: %+v", s)
	}
	// With use-app-socket-api, VPP made each namespace's socket (if it runs on this host).
	sockPath := filepath.Join(cfg.AppSocketDir, "mt-rt-a")
	sockMade := false
	if _, err := os.Stat(sockPath); err != nil {
		t.Logf("note: %s: %v (VPP in another mount namespace, or without use-app-socket-api?)", sockPath, err)
	} else {
		sockMade = true
	}
	if statsSock != "" {
		cs, err := a.Counters()
		if err != nil || len(cs) != 1 || cs[0].SwIfIndex != uint32(up.SwIfIndex) {
			t.Errorf("counters from %s: %+v, %v; want the uplink's", statsSock, cs, err)
		}
	}

	// 3. The same state again: dumps only.
	if err := a.Reconcile(ctx, sidecars("rt-a", "rt-b")); err != nil {
		t.Fatalf("re-apply: %v", err)
	}
	if c := changes(rec.take()); len(c) != 0 {
		t.Errorf("a no-op re-apply sent changes: %v", c)
	}

	// 4. A sidecar goes: exactly its namespace is deleted, with its hand-off directory.
	if err := a.Reconcile(ctx, sidecars("rt-b")); err != nil {
		t.Fatal(err)
	}
	if c := changes(rec.take()); !slices.Equal(c, []string{"app_namespace_add_del_v4"}) {
		t.Errorf("removing a sidecar sent %v, want one app_namespace_add_del_v4", c)
	}
	if _, err := os.Stat(filepath.Join(cfg.HandoffDir, "rt-a")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("hand-off directory of rt-a: %v", err)
	}
	if sockMade {
		if _, err := os.Stat(sockPath); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("%s after its namespace was removed: %v", sockPath, err)
		}
	}

	// 5. A new agent against the state the last one left: VPP's dumps must show it all as
	// wanted (MAC, MTU, rx mode, state, addresses, routes). Only what VPP cannot dump is sent
	// again: the session layer switch and the namespace.
	a.Close()
	var rec2 sendRecorder
	a2 := startAgent(t, cfg, WithAdapter(rec2.newAdapter))
	cleanupAgent = a2
	rec2.take()
	if err := a2.Reconcile(ctx, sidecars("rt-b")); err != nil {
		t.Fatal(err)
	}
	if c := changes(rec2.take()); !slices.Equal(c, []string{"session_enable_disable_v2", "app_namespace_add_del_v4"}) {
		t.Errorf("a restarted agent sent %v, want session_enable_disable_v2 and app_namespace_add_del_v4 only", c)
	}
	if up2 := checkRealState(t, look, a2, hostIf, addr, route); up2.SwIfIndex != up.SwIfIndex {
		t.Errorf("the uplink changed from %d to %d across an agent restart", up.SwIfIndex, up2.SwIfIndex)
	}

	// 6. No sidecars: every namespace goes; the uplink stays (sidecars may come back).
	if err := a2.Reconcile(ctx, Desired{}); err != nil {
		t.Fatal(err)
	}
	if c := changes(rec2.take()); !slices.Equal(c, []string{"app_namespace_add_del_v4"}) {
		t.Errorf("removing the last sidecar sent %v", c)
	}
	if s := a2.Status(); len(s.Namespaces) != 0 {
		t.Errorf("namespaces after removing all: %v", s.Namespaces)
	}
	if entries, err := os.ReadDir(cfg.HandoffDir); err != nil || len(entries) != 0 {
		t.Errorf("hand-off directory after removing all: %v, %v", entries, err)
	}
}

// findUplink returns the interface tagged for the af_packet uplink on hostIf, or nil.
func findUplink(ctx context.Context, look *vppConn, hostIf string) (*interfaces.SwInterfaceDetails, error) {
	all, err := dump[*interfaces.SwInterfaceDetails](ctx, look, &interfaces.SwInterfaceDump{SwIfIndex: interface_types.InterfaceIndex(invalidIndex)}, look.ifc.SwInterfaceDump)
	if err != nil {
		return nil, err
	}
	var up *interfaces.SwInterfaceDetails
	for _, d := range all {
		if d.Tag == makeTag(DriverAFPacket, hostIf, "") {
			if up != nil {
				return nil, fmt.Errorf("two interfaces tagged for %s", hostIf)
			}
			up = d
		}
	}
	return up, nil
}

// checkRealState reads the uplink, its address and the agent's routes back from VPP.
func checkRealState(t *testing.T, look *vppConn, a *Agent, hostIf string, addr netip.Prefix, route Route) *interfaces.SwInterfaceDetails {
	t.Helper()
	ctx := ctxT(t)
	up, err := findUplink(ctx, look, hostIf)
	if err != nil {
		t.Fatal(err)
	}
	if up == nil {
		t.Fatalf("no interface tagged for %s", hostIf)
	}
	if up.Flags&interface_types.IF_STATUS_API_FLAG_ADMIN_UP == 0 {
		t.Errorf("%s is down", up.InterfaceName)
	}
	addrs, err := dump[*ip.IPAddressDetails](ctx, look, &ip.IPAddressDump{SwIfIndex: up.SwIfIndex}, look.ipc.IPAddressDump)
	if err != nil {
		t.Fatal(err)
	}
	if len(addrs) != 1 || fromPrefix(ip_types.Prefix(addrs[0].Prefix)) != addr {
		t.Errorf("addresses on %s: %v, want %v", up.InterfaceName, addrs, addr)
	}
	owned, err := a.ownedRoutes(ctx, look, map[uint32]bool{uint32(up.SwIfIndex): true})
	if err != nil {
		t.Fatal(err)
	}
	if len(owned) != 1 || owned[0].route != route {
		t.Errorf("owned routes %+v, want %v", owned, route)
	}
	return up
}
