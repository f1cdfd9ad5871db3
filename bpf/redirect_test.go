package bpf

import (
	"errors"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
)

// childCgroup makes a cgroup below parent, removed before parent (cleanups run last first).
func childCgroup(t testing.TB, parent, name string) string {
	t.Helper()
	dir := filepath.Join(parent, name)
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatalf("create cgroup: %v", err)
	}
	t.Cleanup(func() {
		var err error
		for range 50 {
			if err = os.Remove(dir); err == nil || errors.Is(err, os.ErrNotExist) {
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
		t.Errorf("remove cgroup %s: %v", dir, err)
	})
	return dir
}

func freeTCPPort(t testing.TB) uint16 {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return netip.MustParseAddrPort(l.Addr().String()).Port()
}

// TestRedirectConnect4: with the redirect mode on, an app in the cgroup that connects to X:port
// lands on the sidecar's outbound listener, which reads X:port back with SO_ORIGINAL_DST.
// Excluded ports and CIDRs, processes outside the cgroup and the sidecar's own connects reach
// their real destination. Switching the mode off detaches the programs.
func TestRedirectConnect4(t *testing.T) {
	requirePrivileges(t)
	cg := testCgroup(t)
	appCg := childCgroup(t, cg, "app")
	sidecarCg := childCgroup(t, cg, "sidecar")
	app := startWorkload(t, appCg)
	sidecar := startWorkload(t, sidecarCg)
	outside := startWorkload(t, "")

	outbound := sidecar.call(wlRequest{Op: "listen", Addr: "127.0.0.1:0"}).Addr
	realDst := outside.call(wlRequest{Op: "listen", Addr: "127.0.0.4:0"}).Addr
	exclPortDst := outside.call(wlRequest{Op: "listen", Addr: "127.0.0.1:0"}).Addr
	exclCIDRDst := outside.call(wlRequest{Op: "listen", Addr: "127.0.0.3:0"}).Addr
	exclPort := netip.MustParseAddrPort(exclPortDst).Port()

	cfg := testConfig(t, cg)
	cfg.SidecarPorts = []uint16{netip.MustParseAddrPort(outbound).Port()}
	cfg.Redirect = RedirectConfig{
		Enabled:        true,
		SidecarIP:      netip.MustParseAddr("127.0.0.1"),
		OutboundPort:   netip.MustParseAddrPort(outbound).Port(),
		SidecarCgroups: []string{sidecarCg},
		ExcludePorts:   []uint16{exclPort},
		ExcludeCIDRs:   []netip.Prefix{netip.MustParsePrefix("127.0.0.3/32")},
	}
	a := newAgent(t, cfg)
	st := a.State()
	if !st.Redirect.On || st.Redirect.Off != "" {
		t.Fatalf("redirect state %+v", st.Redirect)
	}

	// Redirected: a destination that doesn't even exist (a service VIP) and a real one.
	for _, dst := range []string{"10.255.77.1:8080", realDst} {
		before := stats(t, a)
		c := app.call(wlRequest{Op: "connect", Addr: dst}).Pairs[0].Client
		if c.Remote.String() != outbound {
			t.Fatalf("app's connect to %s went to %s, want the sidecar %s", dst, c.Remote, outbound)
		}
		rep := sidecar.call(wlRequest{Op: "origdst", Addr: c.Local.String()})
		if rep.Addr != dst {
			t.Fatalf("sidecar read SO_ORIGINAL_DST %q (error %v), want %s", rep.Addr, rep.Seen, dst)
		}
		if got, ok, err := a.OriginalDst(c.Local, c.Remote); err != nil || !ok || got.String() != dst {
			t.Fatalf("OriginalDst: %v %v %v", got, ok, err)
		}
		d := diff(stats(t, a), before)
		if d.ConnectRedirected != 1 || d.OrigDstRecorded != 1 || d.OrigDstAnswered != 1 {
			t.Fatalf("counters: %+v", d)
		}
		// The app↔sidecar pair is a mesh pair (sidecar port): accelerated as well.
		if !hooked(t, a, c) {
			t.Errorf("app↔sidecar connection not in the sockhash")
		}
	}

	// Never redirected: they reach the real destination.
	for _, tc := range []struct {
		name string
		w    *workload
		dst  string
		want func(Stats) bool
	}{
		{"excluded port", app, exclPortDst, func(d Stats) bool { return d.ConnectExcluded == 1 }},
		{"excluded CIDR", app, exclCIDRDst, func(d Stats) bool { return d.ConnectExcluded == 1 }},
		{"the sidecar's own connect", sidecar, realDst, func(d Stats) bool { return d.ConnectSidecar == 1 }},
		{"a process outside the cgroup", outside, realDst, func(d Stats) bool { return d.ConnectSidecar+d.ConnectExcluded == 0 }},
		{"straight to the sidecar", app, outbound, func(d Stats) bool { return true }},
	} {
		before := stats(t, a)
		c := tc.w.call(wlRequest{Op: "connect", Addr: tc.dst}).Pairs[0].Client
		d := diff(stats(t, a), before)
		if c.Remote.String() != tc.dst || d.ConnectRedirected != 0 || !tc.want(d) {
			t.Errorf("%s: connect to %s went to %s; counters %+v", tc.name, tc.dst, c.Remote, d)
		}
		if tc.dst == outbound {
			// Not redirected, so the sidecar gets no original destination from us: the
			// kernel's own answer stays (an error, or with netfilter's conntrack active on
			// the node the connection's own destination).
			rep := sidecar.call(wlRequest{Op: "origdst", Addr: c.Local.String()})
			if rep.Addr != "" && rep.Addr != outbound {
				t.Errorf("%s: SO_ORIGINAL_DST answered %q", tc.name, rep.Addr)
			}
			if _, ok, _ := a.OriginalDst(c.Local, c.Remote); ok {
				t.Errorf("%s: an original destination is filed", tc.name)
			}
		}
	}

	// An agent restart adopts the pinned connect4 and getsockopt links: redirection goes on.
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	r := newAgent(t, cfg)
	adopted := 0
	for _, p := range r.State().Programs {
		if p.Adopted {
			adopted++
		}
	}
	if adopted != 4 {
		t.Fatalf("restart adopted %d of 4 links: %+v", adopted, r.State().Programs)
	}
	c := app.call(wlRequest{Op: "connect", Addr: "10.255.77.2:9090"}).Pairs[0].Client
	if rep := sidecar.call(wlRequest{Op: "origdst", Addr: c.Local.String()}); c.Remote.String() != outbound || rep.Addr != "10.255.77.2:9090" {
		t.Fatalf("after the restart: connect went to %s, SO_ORIGINAL_DST %q", c.Remote, rep.Addr)
	}

	// The mode switched off (same pins, an agent restart): connect4 and getsockopt detached,
	// connects go where they were meant to.
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	cfg.Redirect.Enabled = false
	b := newAgent(t, cfg)
	if st := b.State(); st.Redirect.On {
		t.Fatalf("redirect still on: %+v", st.Redirect)
	}
	for _, pin := range []string{pinLinkConnect4, pinLinkGetsockopt} {
		if _, err := os.Stat(filepath.Join(cfg.PinPath, pin)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s still pinned: %v", pin, err)
		}
	}
	if c := app.call(wlRequest{Op: "connect", Addr: realDst}).Pairs[0].Client; c.Remote.String() != realDst {
		t.Fatalf("with the mode off, a connect to %s went to %s", realDst, c.Remote)
	}
}

// TestRedirectFeatureMissing: a missing redirect feature turns the mode off with the feature
// named; acceleration stays on and connects are untouched.
func TestRedirectFeatureMissing(t *testing.T) {
	requirePrivileges(t)
	cg := testCgroup(t)
	sidecarCg := childCgroup(t, cg, "sidecar")
	app := startWorkload(t, cg)
	dst := app.call(wlRequest{Op: "listen", Addr: "127.0.0.1:0"}).Addr
	cfg := testConfig(t, cg)
	cfg.Redirect = RedirectConfig{Enabled: true, OutboundPort: freeTCPPort(t), SidecarCgroups: []string{sidecarCg}}
	a := newAgent(t, cfg, WithProbeFailure(FeatureConnect4))
	st := a.State()
	if st.Redirect.On || !strings.Contains(st.Redirect.Off, string(FeatureConnect4)) {
		t.Fatalf("redirect state %+v, want off naming %q", st.Redirect, FeatureConnect4)
	}
	if !errors.Is(errForcedProbe, ebpf.ErrNotSupported) {
		t.Fatal("forced probe error does not wrap ErrNotSupported")
	}
	if c := app.call(wlRequest{Op: "connect", Addr: dst}).Pairs[0].Client; c.Remote.String() != dst {
		t.Fatalf("connect to %s went to %s", dst, c.Remote)
	}
	if _, err := os.Stat(filepath.Join(cfg.PinPath, pinLinkConnect4)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("connect4 link pinned: %v", err)
	}
}

func TestRedirectConfigValidation(t *testing.T) {
	requirePrivileges(t)
	cg := testCgroup(t)
	for _, tc := range []struct {
		name string
		rc   RedirectConfig
		want string
	}{
		{"no sidecar cgroup", RedirectConfig{Enabled: true}, "SidecarCgroups is required"},
		{"sidecar cgroup v1", RedirectConfig{Enabled: true, SidecarCgroups: []string{"/sys/fs/cgroup/cpu"}}, "not a cgroup v2 directory"},
		{"IPv6 sidecar", RedirectConfig{Enabled: true, SidecarIP: netip.MustParseAddr("::1"), SidecarCgroups: []string{cg}}, "not IPv4"},
		{"IPv6 CIDR", RedirectConfig{Enabled: true, SidecarCgroups: []string{cg}, ExcludeCIDRs: []netip.Prefix{netip.MustParsePrefix("fd00::/8")}}, "not an IPv4 prefix"},
		{"port 0", RedirectConfig{Enabled: true, SidecarCgroups: []string{cg}, ExcludePorts: []uint16{0}}, "excluded port 0"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := testConfig(t, cg)
			cfg.Redirect = tc.rc
			a, err := New(cfg)
			if err == nil {
				a.Close()
				t.Fatal("New succeeded")
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %q does not say %q", err, tc.want)
			}
		})
	}
}
