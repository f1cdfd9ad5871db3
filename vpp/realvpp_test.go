package vpp

import (
	"context"
	"errors"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

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
=====================================================================================`

// TestRealVPP runs the agent against a real VPP, with an af_packet uplink on a host
// interface the test may hand to VPP (VPP_TEST_HOST_IF, e.g. one end of a veth pair). It
// checks the result with its own connection, since a real VPP keeps no plan for the test.
func TestRealVPP(t *testing.T) {
	sock := os.Getenv("VPP_API_SOCKET")
	if sock == "" {
		t.Skip(realVPPHint)
	}
	hostIf := os.Getenv("VPP_TEST_HOST_IF")
	if hostIf == "" {
		t.Fatal("VPP_API_SOCKET is set but VPP_TEST_HOST_IF is not: name a host interface VPP may take over (see the hint in realvpp_test.go)")
	}
	addr := netip.MustParsePrefix("198.51.100.2/24")
	route := Route{Prefix: netip.MustParsePrefix("203.0.113.0/24"), Via: netip.MustParseAddr("198.51.100.1")}
	cfg := Config{
		APISocket:    sock,
		Uplink:       Uplink{Driver: DriverAFPacket, HostIf: hostIf, Addresses: []netip.Prefix{addr}},
		Routes:       []Route{route},
		HandoffDir:   t.TempDir(),
		AppSocketDir: "/run/vpp/app_ns_sockets",
		Logger:       testenv.Logger(t),
	}
	a := startAgent(t, cfg)

	// An independent connection to look at VPP, and to remove the test's interface after.
	conn, err := core.Connect(socketclient.NewVppClient(sock))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(conn.Disconnect)
	look := &vppConn{conn: conn, timeout: 5 * time.Second, dead: make(chan struct{}),
		ifc: interfaces.NewServiceClient(conn), ipc: ip.NewServiceClient(conn), afp: afpacket.NewServiceClient(conn)}
	ctx := ctxT(t)
	t.Cleanup(func() {
		// The agent never removes its configured uplink; the test does.
		if _, err := invoke(context.Background(), look, &afpacket.AfPacketDelete{HostIfName: hostIf}, look.afp.AfPacketDelete); err != nil {
			t.Logf("cleanup: %v", err)
		}
	})

	if err := a.Reconcile(ctx, sidecars("rt-a", "rt-b")); err != nil {
		t.Fatal(err)
	}
	if err := a.Reconcile(ctx, sidecars("rt-a", "rt-b")); err != nil {
		t.Fatalf("re-apply: %v", err)
	}

	all, err := dump[*interfaces.SwInterfaceDetails](ctx, look, &interfaces.SwInterfaceDump{SwIfIndex: interface_types.InterfaceIndex(invalidIndex)}, look.ifc.SwInterfaceDump)
	if err != nil {
		t.Fatal(err)
	}
	var up *interfaces.SwInterfaceDetails
	for _, d := range all {
		if d.Tag == makeTag(DriverAFPacket, hostIf, "") {
			if up != nil {
				t.Fatalf("two interfaces tagged for %s", hostIf)
			}
			up = d
		}
	}
	if up == nil {
		t.Fatalf("no interface tagged for %s in %d interfaces", hostIf, len(all))
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
	if s := a.Status(); !slices.Equal(s.Namespaces, []string{"mt-rt-a", "mt-rt-b"}) {
		t.Errorf("status namespaces %v", s.Namespaces)
	}
	// With use-app-socket-api, VPP made each namespace's socket (if it runs on this host).
	sockPath := filepath.Join(cfg.AppSocketDir, "mt-rt-a")
	if _, err := os.Stat(sockPath); err != nil {
		t.Logf("note: %s: %v (VPP in another mount namespace, or without use-app-socket-api?)", sockPath, err)
	}

	if err := a.Reconcile(ctx, Desired{}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(sockPath); err == nil {
		t.Errorf("%s still exists after its namespace was removed", sockPath)
	} else if !errors.Is(err, fs.ErrNotExist) {
		t.Log(err)
	}
}
