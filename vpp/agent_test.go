package vpp

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"go.fd.io/govpp/api"

	"github.com/meshturbo/meshturbo/vpp/internal/fakevpp"
	"github.com/meshturbo/meshturbo/vpp/vcl"
)

// These tests drive govpp's real socket client against fakevpp, a fake VPP API socket that
// speaks VPP's wire protocol and keeps a model of VPP's state.

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// seedForeign gives the fake VPP things the agent does not own and must never touch: an
// untagged tap interface with an address and a route through it, and an interface tagged by
// someone else.
func seedForeign(srv *fakevpp.Server) {
	srv.Do(func(v *fakevpp.VPP) {
		tap := v.AddInterface("tap0", "virtio")
		tap.AdminUp = true
		tap.Addrs = []netip.Prefix{netip.MustParsePrefix("10.10.0.1/24")}
		v.AddRoute(0, netip.MustParsePrefix("10.20.0.0/16"), "api", fakevpp.NextHop(tap.SwIfIndex, netip.MustParseAddr("10.10.0.254")))
		other := v.AddInterface("memif0/0", "memif")
		other.Tag = "cni/pod-x"
	})
}

type foreignState struct {
	tap, other fakevpp.Interface
	routes     int
}

func foreign(srv *fakevpp.Server) foreignState {
	var f foreignState
	srv.Do(func(v *fakevpp.VPP) {
		for _, i := range v.Interfaces {
			switch i.Name {
			case "tap0":
				f.tap = *i
				f.tap.Addrs = slices.Clone(i.Addrs)
			case "memif0/0":
				f.other = *i
			}
		}
		for _, r := range v.Routes {
			if r.Prefix == netip.MustParsePrefix("10.20.0.0/16") {
				f.routes++
			}
		}
	})
	return f
}

func checkForeignUntouched(t *testing.T, srv *fakevpp.Server, before foreignState) {
	t.Helper()
	after := foreign(srv)
	if fmt.Sprint(after) != fmt.Sprint(before) {
		t.Errorf("foreign state changed:\nbefore %+v\nafter  %+v", before, after)
	}
}

// TestPlanGolden: the full message plan of a first apply, per driver, in order.
func TestPlanGolden(t *testing.T) {
	for _, drv := range []Driver{DriverDev, DriverRDMA, DriverAFPacket} {
		t.Run(string(drv), func(t *testing.T) {
			srv := startFake(t)
			seedForeign(srv)
			before := foreign(srv)
			cfg := testConfig(t, srv, uplinks[drv])
			a := startAgent(t, cfg)
			if err := a.Reconcile(ctxT(t), sidecars("pod-a", "pod-b")); err != nil {
				t.Fatal(err)
			}
			golden(t, "plan-"+string(drv)+".golden", srv.Plan())
			checkForeignUntouched(t, srv, before)
			checkApplied(t, srv, cfg, "pod-a", "pod-b")
		})
	}
}

// checkApplied compares the fake VPP's state and the hand-off directory with cfg and the
// sidecars.
func checkApplied(t *testing.T, srv *fakevpp.Server, cfg Config, ids ...string) {
	t.Helper()
	u := cfg.Uplink
	srv.Do(func(v *fakevpp.VPP) {
		owned := v.InterfacesTagged(tagPrefix)
		if len(owned) != 1 {
			t.Fatalf("owned interfaces: %+v, want the uplink only", owned)
		}
		up := owned[0]
		if u.MAC != nil && up.MAC.String() != u.MAC.String() {
			t.Errorf("uplink MAC %s, want %s", up.MAC, u.MAC)
		}
		if u.MTU != 0 && up.LinkMTU != u.MTU {
			t.Errorf("uplink MTU %d, want %d", up.LinkMTU, u.MTU)
		}
		if up.RxMode != rxModes[orDefault(u.RxMode, RxPolling)] {
			t.Errorf("uplink rx mode %v, want %s", up.RxMode, u.RxMode)
		}
		if !up.AdminUp {
			t.Error("uplink is down")
		}
		if !slices.Equal(up.Addrs, u.Addresses) {
			t.Errorf("uplink addresses %v, want %v", up.Addrs, u.Addresses)
		}
		var routes []string
		for _, r := range v.Routes {
			if r.Source == "api" && len(r.Paths) == 1 && r.Paths[0].SwIfIndex == up.SwIfIndex {
				routes = append(routes, r.Prefix.String())
			}
		}
		if len(routes) != len(cfg.Routes) {
			t.Errorf("routes through the uplink: %v, want %v", routes, cfg.Routes)
		}
		if !v.SessionEnabled {
			t.Error("session layer disabled")
		}
		wantNS := []string{"default"}
		for _, id := range ids {
			wantNS = append(wantNS, NamespaceID(id))
			ns := v.Namespaces[NamespaceID(id)]
			if ns == nil {
				continue
			}
			if ns.SwIfIndex != up.SwIfIndex || ns.Secret != namespaceSecret(cfg.SecretKey, ns.ID) || ns.SockName != "/run/vpp/app_ns_sockets/"+ns.ID {
				t.Errorf("namespace %+v", ns)
			}
		}
		slices.Sort(wantNS)
		if got := v.NamespaceIDs(); !slices.Equal(got, wantNS) {
			t.Errorf("namespaces %v, want %v", got, wantNS)
		}
	})
	entries, err := os.ReadDir(cfg.HandoffDir)
	if err != nil {
		t.Fatal(err)
	}
	var dirs []string
	for _, e := range entries {
		dirs = append(dirs, e.Name())
	}
	want := slices.Sorted(slices.Values(ids))
	if !slices.Equal(dirs, want) && !(len(dirs) == 0 && len(want) == 0) {
		t.Errorf("hand-off directories %v, want %v", dirs, want)
	}
	for _, id := range ids {
		conf, err := os.ReadFile(filepath.Join(cfg.HandoffDir, id, VCLConfFile))
		if err != nil {
			t.Error(err)
			continue
		}
		wantConf, _ := vcl.Conf(vcl.Params{
			AppSocketAPI: "/run/vpp/app_ns_sockets/" + NamespaceID(id), NamespaceID: NamespaceID(id),
			NamespaceSecret: namespaceSecret(cfg.SecretKey, NamespaceID(id)),
			SegmentSize:     vcl.Defaults.SegmentSize, AddSegmentSize: vcl.Defaults.AddSegmentSize,
			RxFifoSize: vcl.Defaults.RxFifoSize, TxFifoSize: vcl.Defaults.TxFifoSize, EventQueueSize: vcl.Defaults.EventQueueSize,
		})
		if string(conf) != string(wantConf) {
			t.Errorf("%s/vcl.conf:\n%s\nwant\n%s", id, conf, wantConf)
		}
		frag, err := os.ReadFile(filepath.Join(cfg.HandoffDir, id, FragmentFile))
		if err != nil || string(frag) != string(vcl.Fragment()) {
			t.Errorf("%s/%s: %v\n%s", id, FragmentFile, err, frag)
		}
	}
}

func orDefault[T comparable](v, def T) T {
	var zero T
	if v == zero {
		return def
	}
	return v
}

// TestNoOpReapply: applying the same state again dumps and changes nothing.
func TestNoOpReapply(t *testing.T) {
	for _, drv := range []Driver{DriverDev, DriverRDMA, DriverAFPacket} {
		t.Run(string(drv), func(t *testing.T) {
			srv := startFake(t)
			seedForeign(srv)
			cfg := testConfig(t, srv, uplinks[drv])
			a := startAgent(t, cfg)
			d := sidecars("pod-a", "pod-b")
			if err := a.Reconcile(ctxT(t), d); err != nil {
				t.Fatal(err)
			}
			confPath := filepath.Join(cfg.HandoffDir, "pod-a", VCLConfFile)
			st1, err := os.Stat(confPath)
			if err != nil {
				t.Fatal(err)
			}
			srv.ResetPlan()
			if err := a.Reconcile(ctxT(t), d); err != nil {
				t.Fatal(err)
			}
			plan := srv.Plan()
			if len(plan) == 0 {
				t.Fatal("the re-apply sent nothing: it must dump first")
			}
			if c := changes(plan); len(c) != 0 {
				t.Errorf("a no-op re-apply sent changes:\n%s", strings.Join(c, "\n"))
			}
			if st2, err := os.Stat(confPath); err != nil || !st2.ModTime().Equal(st1.ModTime()) {
				t.Errorf("the re-apply rewrote %s", confPath)
			}
		})
	}
}

// TestChangeAndRemoval: a changed sidecar set and a changed uplink configuration send exactly
// the difference.
func TestChangeAndRemoval(t *testing.T) {
	srv := startFake(t)
	seedForeign(srv)
	before := foreign(srv)
	cfg := testConfig(t, srv, uplinks[DriverDev])
	a := startAgent(t, cfg)
	if err := a.Reconcile(ctxT(t), sidecars("pod-a", "pod-b")); err != nil {
		t.Fatal(err)
	}
	sec := func(id string) uint64 { return namespaceSecret(cfg.SecretKey, NamespaceID(id)) }

	srv.ResetPlan()
	if err := a.Reconcile(ctxT(t), sidecars("pod-b", "pod-c")); err != nil {
		t.Fatal(err)
	}
	want := []string{
		"app_namespace_add_del_v4 {Secret:0 IsAdd:false SwIfIndex:4294967295 IP4FibID:0 IP6FibID:0 NamespaceID:mt-pod-a SockName:}",
		fmt.Sprintf("app_namespace_add_del_v4 {Secret:%d IsAdd:true SwIfIndex:3 IP4FibID:0 IP6FibID:0 NamespaceID:mt-pod-c SockName:/run/vpp/app_ns_sockets/mt-pod-c}", sec("pod-c")),
	}
	if got := changes(srv.Plan()); !slices.Equal(got, want) {
		t.Errorf("sidecar change sent\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	checkApplied(t, srv, cfg, "pod-b", "pod-c")

	checkForeignUntouched(t, srv, before)
}

// TestUplinkConfigChange: a new agent with a changed uplink configuration (as after a restart
// with new flags) sends exactly the difference; namespaces, which VPP cannot dump, are
// re-added as they are.
func TestUplinkConfigChange(t *testing.T) {
	srv := startFake(t)
	seedForeign(srv)
	before := foreign(srv)
	cfg := testConfig(t, srv, uplinks[DriverDev])
	a := startAgent(t, cfg)
	if err := a.Reconcile(ctxT(t), sidecars("pod-a")); err != nil {
		t.Fatal(err)
	}
	a.Close()

	cfg2 := cfg
	cfg2.Uplink.Addresses = []netip.Prefix{netip.MustParsePrefix("192.168.60.11/24")}
	cfg2.Uplink.MTU = 1500
	cfg2.Routes = []Route{{Prefix: netip.MustParsePrefix("10.96.0.0/12"), Via: netip.MustParseAddr("192.168.60.1")}}
	srv.ResetPlan()
	a2 := startAgent(t, cfg2)
	if err := a2.Reconcile(ctxT(t), sidecars("pod-a")); err != nil {
		t.Fatal(err)
	}
	golden(t, "plan-uplink-change.golden", changes(srv.Plan()))
	checkApplied(t, srv, cfg2, "pod-a")
	checkForeignUntouched(t, srv, before)
}

// TestDriverSwitch: when the configured uplink changes device, the old interface (found by
// its tag, with the device index the tag keeps) is removed and the new one created.
func TestDriverSwitch(t *testing.T) {
	srv := startFake(t)
	seedForeign(srv)
	before := foreign(srv)
	cfg := testConfig(t, srv, uplinks[DriverDev])
	a := startAgent(t, cfg)
	if err := a.Reconcile(ctxT(t), sidecars("pod-a")); err != nil {
		t.Fatal(err)
	}
	a.Close()

	cfg2 := cfg
	cfg2.Uplink = uplinks[DriverAFPacket]
	srv.ResetPlan()
	a2 := startAgent(t, cfg2)
	if err := a2.Reconcile(ctxT(t), sidecars("pod-a")); err != nil {
		t.Fatal(err)
	}
	golden(t, "plan-driver-switch.golden", changes(srv.Plan()))
	checkApplied(t, srv, cfg2, "pod-a")
	checkForeignUntouched(t, srv, before)
	srv.Do(func(v *fakevpp.VPP) {
		if len(v.Devices) != 0 {
			t.Errorf("devices still attached: %v", v.Devices)
		}
	})
}

// TestAgentRestartRemovesLeftovers: a sidecar removed while the agent was down still loses
// its namespace and hand-off directory: the directory shows the agent made it.
func TestAgentRestartRemovesLeftovers(t *testing.T) {
	srv := startFake(t)
	cfg := testConfig(t, srv, uplinks[DriverDev])
	a := startAgent(t, cfg)
	if err := a.Reconcile(ctxT(t), sidecars("pod-a", "pod-b")); err != nil {
		t.Fatal(err)
	}
	a.Close()

	srv.ResetPlan()
	a2 := startAgent(t, cfg)
	if err := a2.Reconcile(ctxT(t), sidecars("pod-b")); err != nil {
		t.Fatal(err)
	}
	want := []string{
		"app_namespace_add_del_v4 {Secret:0 IsAdd:false SwIfIndex:4294967295 IP4FibID:0 IP6FibID:0 NamespaceID:mt-pod-a SockName:}",
		fmt.Sprintf("app_namespace_add_del_v4 {Secret:%d IsAdd:true SwIfIndex:1 IP4FibID:0 IP6FibID:0 NamespaceID:mt-pod-b SockName:/run/vpp/app_ns_sockets/mt-pod-b}",
			namespaceSecret(cfg.SecretKey, "mt-pod-b")),
	}
	// session_enable_disable_v2 is sent once per connection: VPP has no dump for it.
	got := slices.DeleteFunc(changes(srv.Plan()), func(l string) bool { return strings.HasPrefix(l, "session_enable_disable_v2 ") })
	if !slices.Equal(got, want) {
		t.Errorf("restarted agent sent\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	checkApplied(t, srv, cfg, "pod-b")
}

type applied struct {
	reason string
	err    error
}

func applyHook() (Option, <-chan applied) {
	ch := make(chan applied, 1000)
	return WithApplyHook(func(reason string, err error) {
		select {
		case ch <- applied{reason, err}:
		default:
		}
	}), ch
}

func waitApplied(t *testing.T, ch <-chan applied, reason string) applied {
	t.Helper()
	timeout := time.After(10 * time.Second)
	for {
		select {
		case ap := <-ch:
			if ap.reason == reason {
				return ap
			}
		case <-timeout:
			t.Fatalf("no %q apply within 10s", reason)
		}
	}
}

// TestVPPRestart: when VPP restarts (all state gone, socket back), the agent reconnects and
// applies everything again: the same plan as the first time.
func TestVPPRestart(t *testing.T) {
	srv := startFake(t)
	cfg := testConfig(t, srv, uplinks[DriverRDMA])
	hook, ch := applyHook()
	a := startAgent(t, cfg, hook)
	d := sidecars("pod-a", "pod-b")
	if err := a.Reconcile(ctxT(t), d); err != nil {
		t.Fatal(err)
	}
	first := changes(srv.Plan())
	srv.ResetPlan()
	if err := srv.Restart(); err != nil {
		t.Fatal(err)
	}
	if ap := waitApplied(t, ch, "connected"); ap.err != nil {
		t.Fatalf("re-apply after restart: %v", ap.err)
	}
	if got := changes(srv.Plan()); !slices.Equal(got, first) {
		t.Errorf("after the restart the agent sent\n%s\nwant the first plan\n%s", strings.Join(got, "\n"), strings.Join(first, "\n"))
	}
	checkApplied(t, srv, cfg, "pod-a", "pod-b")
	if s := a.Status(); s.Connects != 2 || !s.Connected || s.LastApplyError != "" || len(s.Namespaces) != 2 {
		t.Errorf("status after restart: %+v", s)
	}
}

// TestRetvalError: a non-zero retval becomes an error naming the message; what was applied
// before it stays, nothing half-made is left untagged, and the next apply continues.
func TestRetvalError(t *testing.T) {
	srv := startFake(t)
	cfg := testConfig(t, srv, uplinks[DriverDev])
	a := startAgent(t, cfg)
	d := sidecars("pod-a")

	srv.Fail("sw_interface_add_del_address", int32(api.ADDRESS_IN_USE), 1)
	err := a.Reconcile(ctxT(t), d)
	var apiErr *APIError
	if !errors.As(err, &apiErr) || apiErr.Message != "sw_interface_add_del_address" || apiErr.Retval != int32(api.ADDRESS_IN_USE) {
		t.Fatalf("Reconcile = %v, want an APIError for sw_interface_add_del_address with retval %d", err, api.ADDRESS_IN_USE)
	}
	if !strings.Contains(err.Error(), "sw_interface_add_del_address") || !strings.Contains(err.Error(), "Address in use") {
		t.Errorf("error %q does not name the message and VPP's reason", err)
	}
	srv.Do(func(v *fakevpp.VPP) {
		owned := v.InterfacesTagged(tagPrefix)
		if len(owned) != 1 || !owned[0].AdminUp || len(owned[0].Addrs) != 0 || len(v.Interfaces) != 2 {
			t.Errorf("after the failure: interfaces %+v", v.Interfaces)
		}
		if len(v.Namespaces) != 1 {
			t.Errorf("namespaces added after a failed step: %v", v.NamespaceIDs())
		}
	})
	if s := a.Status(); !strings.Contains(s.LastApplyError, "sw_interface_add_del_address") {
		t.Errorf("status: %+v", s)
	}

	srv.ResetPlan()
	if err := a.Reconcile(ctxT(t), d); err != nil {
		t.Fatal(err)
	}
	golden(t, "plan-after-retval-error.golden", changes(srv.Plan()))
	checkApplied(t, srv, cfg, "pod-a")
}

// TestCreateFailureRollsBack: when a step of creating the uplink fails, the steps before it
// are undone, as nothing would ever find them again.
func TestCreateFailureRollsBack(t *testing.T) {
	for _, tc := range []struct {
		drv  Driver
		fail string
		undo []string
	}{
		{DriverDev, "dev_create_port_if", []string{"dev_detach"}},
		{DriverDev, "sw_interface_tag_add_del", []string{"dev_remove_port_if", "dev_detach"}},
		{DriverRDMA, "sw_interface_tag_add_del", []string{"rdma_delete"}},
		{DriverAFPacket, "sw_interface_tag_add_del", []string{"af_packet_delete"}},
	} {
		t.Run(string(tc.drv)+"/"+tc.fail, func(t *testing.T) {
			srv := startFake(t)
			a := startAgent(t, testConfig(t, srv, uplinks[tc.drv]))
			srv.Fail(tc.fail, int32(api.UNSPECIFIED), 1)
			err := a.Reconcile(ctxT(t), sidecars("pod-a"))
			var apiErr *APIError
			if !errors.As(err, &apiErr) || apiErr.Message != tc.fail {
				t.Fatalf("Reconcile = %v, want an APIError for %s", err, tc.fail)
			}
			var names []string
			for _, l := range changes(srv.Plan()) {
				name, _, _ := strings.Cut(l, " ")
				names = append(names, name)
			}
			i := slices.Index(names, tc.fail)
			if i < 0 || !slices.Equal(names[i+1:], tc.undo) {
				t.Errorf("after %s failed the agent sent %v, want %v", tc.fail, names[i+1:], tc.undo)
			}
			srv.Do(func(v *fakevpp.VPP) {
				if len(v.Interfaces) != 1 || len(v.Devices) != 0 {
					t.Errorf("left behind: interfaces %v, devices %v", v.Interfaces, v.Devices)
				}
			})
		})
	}
}

// TestMissingReplyTimesOut: a request VPP never answers fails after the request timeout,
// naming the message; the agent then reconnects and applies everything.
func TestMissingReplyTimesOut(t *testing.T) {
	srv := startFake(t)
	cfg := testConfig(t, srv, uplinks[DriverDev])
	cfg.RequestTimeout = 200 * time.Millisecond
	hook, ch := applyHook()
	a := startAgent(t, cfg, hook)

	srv.Drop("sw_interface_set_flags", 1)
	start := time.Now()
	err := a.Reconcile(ctxT(t), sidecars("pod-a"))
	took := time.Since(start)
	var apiErr *APIError
	if !errors.As(err, &apiErr) || apiErr.Message != "sw_interface_set_flags" || !errors.Is(err, ErrNoReply) {
		t.Fatalf("Reconcile = %v, want an APIError for sw_interface_set_flags wrapping ErrNoReply", err)
	}
	if took > 2*time.Second {
		t.Errorf("Reconcile took %v with a 200ms request timeout", took)
	}
	if ap := waitApplied(t, ch, "connected"); ap.err != nil {
		t.Fatalf("re-apply after reconnecting: %v", ap.err)
	}
	checkApplied(t, srv, cfg, "pod-a")
	if s := a.Status(); s.Connects != 2 {
		t.Errorf("Connects = %d, want 2 (a reconnect after the lost reply)", s.Connects)
	}
}

// TestIncompatibleCRC: a message VPP defines with another CRC (or lacks, as without the
// plugin) stops the agent before it sends anything but the handshake.
func TestIncompatibleCRC(t *testing.T) {
	for _, tc := range []struct {
		name string
		drv  Driver
		opt  fakevpp.Option
		want []string
	}{
		{"changed CRC", DriverDev, fakevpp.WithCRC("sw_interface_set_rx_mode", "deadbeef"),
			[]string{"sw_interface_set_rx_mode_b04d1cfe"}},
		{"plugin not loaded", DriverRDMA, fakevpp.WithoutMessages("rdma_create_v4", "rdma_create_v4_reply", "rdma_delete", "rdma_delete_reply"),
			[]string{"rdma_create_v4_c6287ea8", "rdma_create_v4_reply_5383d31f", "rdma_delete_f9e6675e", "rdma_delete_reply_e8d4e804"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := startFake(t, tc.opt)
			a, err := New(testConfig(t, srv, uplinks[tc.drv]))
			if err != nil {
				t.Fatal(err)
			}
			defer a.Close()
			err = a.WaitConnected(ctxT(t))
			var inc *IncompatibleError
			if !errors.As(err, &inc) {
				t.Fatalf("WaitConnected = %v, want an IncompatibleError", err)
			}
			if !slices.Equal(inc.Messages, tc.want) {
				t.Errorf("incompatible messages %v, want %v", inc.Messages, tc.want)
			}
			for _, m := range tc.want {
				if !strings.Contains(err.Error(), m) {
					t.Errorf("error %q does not list %s", err, m)
				}
			}
			<-a.Done()
			if got := waitSeen(t, srv, "sockclnt_delete"); !slices.Equal(got, []string{"sockclnt_create", "sockclnt_delete"}) {
				t.Errorf("VPP received %v, want only the handshake", got)
			}
			if err := a.Reconcile(ctxT(t), sidecars("pod-a")); !errors.As(err, &inc) {
				t.Errorf("Reconcile after giving up = %v", err)
			}
			if srv.Starts() != 1 || len(srv.Seen()) != 2 {
				t.Errorf("the agent tried again: %v", srv.Seen())
			}
		})
	}
}

// TestUnsupportedVersion: a VPP outside the supported range is refused after show_version.
func TestUnsupportedVersion(t *testing.T) {
	srv := startFake(t, fakevpp.WithVersion("24.10-release"))
	a, err := New(testConfig(t, srv, uplinks[DriverDev]))
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	err = a.WaitConnected(ctxT(t))
	var inc *IncompatibleError
	if !errors.As(err, &inc) || inc.Version != "24.10-release" || !strings.Contains(err.Error(), "[25.02, 25.06)") {
		t.Fatalf("WaitConnected = %v", err)
	}
	if got := waitSeen(t, srv, "sockclnt_delete"); !slices.Equal(got, []string{"sockclnt_create", "show_version", "sockclnt_delete"}) {
		t.Errorf("VPP received %v", got)
	}
}

// TestNotConnectedKeepsDesired: without VPP, Reconcile keeps the state and says so; once VPP
// comes up the agent connects (with backoff) and applies it.
func TestNotConnectedKeepsDesired(t *testing.T) {
	srv := startFake(t)
	cfg := testConfig(t, srv, uplinks[DriverAFPacket])
	srv.Close()
	hook, ch := applyHook()
	a, err := New(cfg, hook)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	if err := a.Reconcile(ctxT(t), sidecars("pod-a")); !errors.Is(err, ErrNotConnected) {
		t.Fatalf("Reconcile without VPP = %v, want ErrNotConnected", err)
	}
	srv2, err := fakevpp.New(srv.Path(), fakevpp.WithLogf(t.Logf))
	if err != nil {
		t.Fatal(err)
	}
	defer srv2.Close()
	if ap := waitApplied(t, ch, "connected"); ap.err != nil {
		t.Fatal(ap.err)
	}
	checkApplied(t, srv2, cfg, "pod-a")
}

// TestSidecarCycles: 100 sidecars come and go; nothing stays behind.
func TestSidecarCycles(t *testing.T) {
	srv := startFake(t)
	seedForeign(srv)
	before := foreign(srv)
	cfg := testConfig(t, srv, uplinks[DriverDev])
	a := startAgent(t, cfg)
	base := sidecars("pod-base")
	if err := a.Reconcile(ctxT(t), base); err != nil {
		t.Fatal(err)
	}
	for i := range 100 {
		d := base
		d.Sidecars = append(slices.Clone(base.Sidecars), Sidecar{ID: fmt.Sprintf("pod-%03d", i)}, Sidecar{ID: fmt.Sprintf("pod-%03d-b", i)})
		if err := a.Reconcile(ctxT(t), d); err != nil {
			t.Fatalf("cycle %d add: %v", i, err)
		}
		if err := a.Reconcile(ctxT(t), base); err != nil {
			t.Fatalf("cycle %d remove: %v", i, err)
		}
	}
	checkApplied(t, srv, cfg, "pod-base")
	checkForeignUntouched(t, srv, before)
	srv.Do(func(v *fakevpp.VPP) {
		if len(v.Interfaces) != 4 { // local0, tap0, memif0/0, the uplink
			t.Errorf("interfaces after the cycles: %d", len(v.Interfaces))
		}
	})
}

// TestAdjacencyRoutesUntouched: host routes VPP adds for resolved neighbors on the uplink are
// VPP's, not the agent's, though they go through its interface.
func TestAdjacencyRoutesUntouched(t *testing.T) {
	srv := startFake(t)
	cfg := testConfig(t, srv, uplinks[DriverDev])
	a := startAgent(t, cfg)
	if err := a.Reconcile(ctxT(t), sidecars("pod-a")); err != nil {
		t.Fatal(err)
	}
	gw := netip.MustParseAddr("192.168.50.1")
	srv.Do(func(v *fakevpp.VPP) {
		up := v.InterfacesTagged(tagPrefix)[0]
		v.AddRoute(0, netip.PrefixFrom(gw, 32), "adjacency", fakevpp.NextHop(up.SwIfIndex, gw))
	})
	srv.ResetPlan()
	if err := a.Reconcile(ctxT(t), sidecars("pod-a")); err != nil {
		t.Fatal(err)
	}
	if c := changes(srv.Plan()); len(c) != 0 {
		t.Errorf("the agent changed\n%s", strings.Join(c, "\n"))
	}
}

// TestResyncRepairsDrift: with ResyncInterval set, a change made behind the agent's back
// (someone set the uplink down with vppctl) is repaired, and only that is sent.
func TestResyncRepairsDrift(t *testing.T) {
	srv := startFake(t)
	cfg := testConfig(t, srv, uplinks[DriverDev])
	cfg.ResyncInterval = 20 * time.Millisecond
	hook, ch := applyHook()
	a := startAgent(t, cfg, hook)
	if err := a.Reconcile(ctxT(t), sidecars("pod-a")); err != nil {
		t.Fatal(err)
	}
	waitApplied(t, ch, "resync") // one resync after the reconcile, so the plan below is clean
	srv.ResetPlan()
	srv.Do(func(v *fakevpp.VPP) { v.InterfacesTagged(tagPrefix)[0].AdminUp = false })
	deadline := time.Now().Add(10 * time.Second)
	for {
		if ap := waitApplied(t, ch, "resync"); ap.err != nil {
			t.Fatal(ap.err)
		}
		var up bool
		srv.Do(func(v *fakevpp.VPP) { up = v.InterfacesTagged(tagPrefix)[0].AdminUp })
		if up {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the uplink stayed down")
		}
	}
	want := []string{"sw_interface_set_flags {SwIfIndex:1 Flags:IF_STATUS_API_FLAG_ADMIN_UP}"}
	if got := changes(srv.Plan()); !slices.Equal(got, want) {
		t.Errorf("resync sent\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

// TestRetryAfterFailedApply: an apply that failed is retried with backoff until it succeeds,
// without another Reconcile.
func TestRetryAfterFailedApply(t *testing.T) {
	srv := startFake(t)
	cfg := testConfig(t, srv, uplinks[DriverDev])
	hook, ch := applyHook()
	a := startAgent(t, cfg, hook)
	srv.Fail("session_enable_disable_v2", int32(api.UNSPECIFIED), 2)
	if err := a.Reconcile(ctxT(t), sidecars("pod-a")); err == nil {
		t.Fatal("Reconcile succeeded despite the failure")
	}
	for {
		ap := waitApplied(t, ch, "retry")
		if ap.err == nil {
			break
		}
	}
	checkApplied(t, srv, cfg, "pod-a")
}
