package bpf

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
)

func TestProbeFindsEverything(t *testing.T) {
	requirePrivileges(t)
	feats, err := Probe()
	for _, f := range feats {
		t.Logf("%-45s supported=%v %s", f.Feature, f.Supported, f.Error)
	}
	// This kernel has all of them; a missing one here is a bug, not a skip.
	if err != nil {
		t.Fatalf("Probe: %v", err)
	}
	if len(feats) != len(AllFeatures) {
		t.Fatalf("got %d statuses for %d features", len(feats), len(AllFeatures))
	}
}

func TestConfigValidation(t *testing.T) {
	requirePrivileges(t)
	cg := testCgroup(t)
	for _, tc := range []struct {
		name string
		cfg  Config
		want string
	}{
		{"no cgroup", Config{}, "CgroupPath is required"},
		{"cgroup v1", Config{CgroupPath: "/sys/fs/cgroup/cpu"}, "not a cgroup v2 directory"},
		{"missing cgroup", Config{CgroupPath: cg + "/nope"}, "no such file"},
		{"pin outside bpffs", Config{CgroupPath: cg, PinPath: "/tmp/meshturbo"}, "not below BPFFS"},
		{"pin is bpffs", Config{CgroupPath: cg, PinPath: "/sys/fs/bpf"}, "not below BPFFS"},
		{"bad mesh IP", Config{CgroupPath: cg, MeshIPs: []netip.Addr{netip.IPv4Unspecified()}}, "not a usable address"},
		{"port 0", Config{CgroupPath: cg, SidecarPorts: []uint16{0}}, "sidecar port 0"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a, err := New(tc.cfg)
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

// TestKeyByteOrder looks up, from user space, the key of every socket of accelerated pairs
// (IPv4, IPv6, and IPv4 through a dual-stack listener) and checks the socket cookie: the
// sockops program builds exactly the key user space expects, ports in host order.
func TestKeyByteOrder(t *testing.T) {
	requirePrivileges(t)
	cg := testCgroup(t)
	w := startWorkload(t, cg)
	cfg := testConfig(t, cg)
	a := newAgent(t, cfg)

	var ports []uint16
	var addrs []string
	for _, l := range []string{"127.0.0.1:0", "[::1]:0", ":0"} {
		addr := w.call(wlRequest{Op: "listen", Addr: l}).Addr
		ap := netip.MustParseAddrPort(addr)
		ports = append(ports, ap.Port())
		if l == ":0" {
			addr = netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), ap.Port()).String()
		}
		addrs = append(addrs, addr)
	}
	if err := a.SetMesh(nil, ports); err != nil {
		t.Fatal(err)
	}
	before := stats(t, a)
	var pairs []wlPair
	for _, addr := range addrs {
		pairs = append(pairs, w.call(wlRequest{Op: "pairs", Addr: addr, N: 3}).Pairs...)
	}
	for _, p := range pairs {
		for _, s := range []wlSock{p.Client, p.Server} {
			cookie, err := a.Lookup(SockKey{Local: s.Local, Remote: s.Remote})
			if err != nil {
				t.Fatalf("socket %v -> %v not found by its key: %v", s.Local, s.Remote, err)
			}
			if cookie != s.Cookie || cookie == 0 {
				t.Fatalf("socket %v -> %v: cookie %d, socket's SO_COOKIE %d", s.Local, s.Remote, cookie, s.Cookie)
			}
			swapped := SockKey{
				Local:  netip.AddrPortFrom(s.Local.Addr(), swap16(s.Local.Port())),
				Remote: netip.AddrPortFrom(s.Remote.Addr(), swap16(s.Remote.Port())),
			}
			if _, err := a.Lookup(swapped); !errors.Is(err, ebpf.ErrKeyNotExist) {
				t.Fatalf("byte-swapped ports found: %v", err)
			}
		}
	}
	after := stats(t, a)
	if got, want := after.SocketsInserted-before.SocketsInserted, uint64(2*len(pairs)); got != want {
		t.Fatalf("inserted %d sockets, want %d", got, want)
	}
	if n := len(sockets(t, a)); n != 2*len(pairs) {
		t.Fatalf("sockhash holds %d sockets, want %d", n, 2*len(pairs))
	}
	if after.InsertFailed != 0 {
		t.Fatalf("insert failures: %+v", after)
	}
	w.call(wlRequest{Op: "close"})
	if n := len(sockets(t, a)); n != 0 {
		t.Fatalf("sockhash holds %d sockets after close, want 0", n)
	}
}

func swap16(p uint16) uint16 { return p<<8 | p>>8 }

// TestStreams moves byte-exact streams both ways through accelerated pairs: many pairs with
// small writes, some with mixed, a few with large writes, each set at once. Once with every
// send redirected (naive), once with the small-write rule, which moves sockets streaming
// small writes to TCP mid-stream.
func TestStreams(t *testing.T) {
	requirePrivileges(t)
	for _, naive := range []bool{true, false} {
		name := "small-write rule"
		if naive {
			name = "naive redirect"
		}
		t.Run(name, func(t *testing.T) { testStreams(t, naive) })
	}
}

func testStreams(t *testing.T, naive bool) {
	cg := testCgroup(t)
	w := startWorkload(t, cg)
	cfg := testConfig(t, cg)
	cfg.NaiveRedirect = naive
	a := newAgent(t, cfg)
	addr := w.call(wlRequest{Op: "listen", Addr: "127.0.0.1:0"}).Addr
	if err := a.SetMesh(nil, []uint16{netip.MustParseAddrPort(addr).Port()}); err != nil {
		t.Fatal(err)
	}

	large := int64(32 << 20)
	if *long {
		large = 1 << 30
	}
	for _, tc := range []struct {
		name     string
		pairs    int
		bytes    int64
		min, max int
	}{
		{"small writes, 64 pairs", 64, 256 << 10, 1, 256},
		{"mixed writes, 16 pairs", 16, 2 << 20, 1, 64 << 10},
		{"large writes, 2 pairs", 2, large, 64 << 10, 1 << 20},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := stats(t, a)
			w.call(wlRequest{Op: "pairs", Addr: addr, N: tc.pairs})
			rep := w.call(wlRequest{Op: "stream", Bytes: tc.bytes, MinWrite: tc.min, MaxWrite: tc.max, Seed: 42})
			for _, p := range rep.Problems {
				t.Error(p)
			}
			want := 2 * int64(tc.pairs) * tc.bytes
			if rep.Bytes != want {
				t.Fatalf("moved %d bytes, want %d", rep.Bytes, want)
			}
			d := diff(stats(t, a), before)
			t.Logf("%d MiB, counters: %+v", rep.Bytes>>20, d)
			if d.SocketsInserted != uint64(2*tc.pairs) || d.InsertFailed != 0 {
				t.Errorf("inserted %d (failed %d), want %d", d.SocketsInserted, d.InsertFailed, 2*tc.pairs)
			}
			// Sends of sockets unhooked after their pair was demoted pass no program, nor do
			// sends right after one that would block on the TCP path (the kernel keeps the
			// last verdict then), which the queue back-off brings.
			if seen := d.BytesRedirected + d.BytesTCPOnly; seen > uint64(want) || d.SocketsUnhooked == 0 && d.QueueBackoff == 0 && seen != uint64(want) ||
				d.MsgFallthrough != 0 || d.StateFailed != 0 {
				t.Errorf("bytes redirected %d + on TCP %d (unhooked sockets %d), want all %d, none fallen through",
					d.BytesRedirected, d.BytesTCPOnly, d.SocketsUnhooked, want)
			}
			if naive && (d.BytesRedirected != uint64(want) || d.SocketsDemoted != 0) {
				t.Errorf("naive: redirected %d bytes, want all %d", d.BytesRedirected, want)
			}
			if d.BytesRedirected == 0 {
				t.Errorf("nothing redirected")
			}
			if n := len(sockets(t, a)); n != 0 {
				t.Errorf("sockhash holds %d sockets after close", n)
			}
		})
	}
}

// TestSmallWriteRule: with the rule on (Config.SmallMsg; off by default), a socket streaming
// small writes moves to TCP after DefaultSmallRun of them and stays there (byte-exact across the switch); request/response traffic with small
// messages and streams of large writes stay redirected.
func TestSmallWriteRule(t *testing.T) {
	requirePrivileges(t)
	cg := testCgroup(t)
	w := startWorkload(t, cg)
	cfg := testConfig(t, cg)
	// This test is about the small-write rule: a reader that falls behind on a loaded machine
	// must not demote the large writes through the queue bound (TestQueueBounded covers it).
	cfg.QueueLimit = 256 << 20
	cfg.SmallMsg = smallWrite // off by default
	a := newAgent(t, cfg)
	addr := w.call(wlRequest{Op: "listen", Addr: "127.0.0.1:0"}).Addr
	if err := a.SetMesh(nil, []uint16{netip.MustParseAddrPort(addr).Port()}); err != nil {
		t.Fatal(err)
	}
	// Writes of exactly 100 bytes: one send each.
	before := stats(t, a)
	w.call(wlRequest{Op: "pairs", Addr: addr, N: 1})
	rep := w.call(wlRequest{Op: "stream", Bytes: 100 * 1000, MinWrite: 100, MaxWrite: 100, Seed: 14, OneWay: true})
	for _, p := range rep.Problems {
		t.Error(p)
	}
	d := diff(stats(t, a), before)
	t.Logf("one-way small writes: %+v", d)
	// Later sends either pass the program on the TCP path or, once the sweeper unhooked the
	// pair, no program at all.
	if d.SocketsDemoted != 1 || d.MsgRedirected != DefaultSmallRun-1 || d.MsgTCPOnly == 0 || d.MsgTCPOnly > 1000-(DefaultSmallRun-1) {
		t.Errorf("want the sender moved to TCP at send %d of 1000", DefaultSmallRun)
	}

	before = stats(t, a)
	w.call(wlRequest{Op: "pairs", Addr: addr, N: 2})
	rep = w.call(wlRequest{Op: "pingpong", N: 2000, MinWrite: 64})
	d = diff(stats(t, a), before)
	t.Logf("small ping-pong: %+v", d)
	if d.SocketsDemoted != 0 || d.MsgRedirected != 2*2*2000 || rep.Bytes != 2*2*2000*64 {
		t.Errorf("want every ping-pong message redirected")
	}
	w.call(wlRequest{Op: "close"})

	before = stats(t, a)
	w.call(wlRequest{Op: "pairs", Addr: addr, N: 1})
	rep = w.call(wlRequest{Op: "stream", Bytes: 64 << 20, MinWrite: 64 << 10, MaxWrite: 64 << 10, Seed: 15, OneWay: true})
	for _, p := range rep.Problems {
		t.Error(p)
	}
	d = diff(stats(t, a), before)
	t.Logf("one-way 64 KiB writes: %+v", d)
	if d.SocketsDemoted != 0 || d.BytesRedirected != 64<<20 {
		t.Errorf("want every large write redirected")
	}
}

func diff(a, b Stats) Stats {
	return Stats{
		SocketsInserted:  a.SocketsInserted - b.SocketsInserted,
		InsertFailed:     a.InsertFailed - b.InsertFailed,
		InsertBusy:       a.InsertBusy - b.InsertBusy,
		InsertFull:       a.InsertFull - b.InsertFull,
		SocketsSkipped:   a.SocketsSkipped - b.SocketsSkipped,
		MsgRedirected:    a.MsgRedirected - b.MsgRedirected,
		BytesRedirected:  a.BytesRedirected - b.BytesRedirected,
		MsgFallthrough:   a.MsgFallthrough - b.MsgFallthrough,
		BytesFallthrough: a.BytesFallthrough - b.BytesFallthrough,
		MsgTCPOnly:       a.MsgTCPOnly - b.MsgTCPOnly,
		BytesTCPOnly:     a.BytesTCPOnly - b.BytesTCPOnly,
		StateFailed:      a.StateFailed - b.StateFailed,
		SocketsDemoted:   a.SocketsDemoted - b.SocketsDemoted,

		SocketsUnhooked:   a.SocketsUnhooked - b.SocketsUnhooked,
		UnhookDeferred:    a.UnhookDeferred - b.UnhookDeferred,
		ConnectRedirected: a.ConnectRedirected - b.ConnectRedirected,
		ConnectSidecar:    a.ConnectSidecar - b.ConnectSidecar,
		ConnectExcluded:   a.ConnectExcluded - b.ConnectExcluded,
		OrigDstRecorded:   a.OrigDstRecorded - b.OrigDstRecorded,
		OrigDstAnswered:   a.OrigDstAnswered - b.OrigDstAnswered,
		QueueBackoff:      a.QueueBackoff - b.QueueBackoff,
		QueueResumed:      a.QueueResumed - b.QueueResumed,
		QueueUnknown:      a.QueueUnknown - b.QueueUnknown,
		BlockingDemoted:   a.BlockingDemoted - b.BlockingDemoted,
		BlockingSkipped:   a.BlockingSkipped - b.BlockingSkipped,
		Unpaired:          a.Unpaired - b.Unpaired,
	}
}

// TestResetAndHalfClose: a reset on either end of an accelerated pair reaches the other end
// as ECONNRESET (as on plain TCP), and both entries leave the sockhash. Half-close is covered
// by every stream (each direction ends with a FIN while the other still flows).
func TestResetAndHalfClose(t *testing.T) {
	requirePrivileges(t)
	cg := testCgroup(t)
	w := startWorkload(t, cg)
	a := newAgent(t, testConfig(t, cg))
	addr := w.call(wlRequest{Op: "listen", Addr: "127.0.0.1:0"}).Addr
	if err := a.SetMesh(nil, []uint16{netip.MustParseAddrPort(addr).Port()}); err != nil {
		t.Fatal(err)
	}
	w.call(wlRequest{Op: "pairs", Addr: addr, N: 8})
	if n := len(sockets(t, a)); n != 16 {
		t.Fatalf("sockhash holds %d sockets, want 16", n)
	}
	rep := w.call(wlRequest{Op: "rst"})
	for _, p := range rep.Problems {
		t.Error(p)
	}
	for _, s := range rep.Seen {
		if s != "ECONNRESET" {
			t.Errorf("reader saw %s after the peer's reset, want ECONNRESET", s)
		}
	}
	if n := len(sockets(t, a)); n != 0 {
		t.Fatalf("sockhash holds %d sockets after resets, want 0", n)
	}
	if s := stats(t, a); s.MsgRedirected == 0 {
		t.Fatalf("nothing was redirected: %+v", s)
	}
}

// TestChurn opens, uses and closes connections one after another; the sockhash is back to
// empty and every socket was inserted.
func TestChurn(t *testing.T) {
	requirePrivileges(t)
	n := 10000
	if *long {
		n = 100000
	}
	cg := testCgroup(t)
	w := startWorkload(t, cg)
	a := newAgent(t, testConfig(t, cg))
	addr := w.call(wlRequest{Op: "listen", Addr: "127.0.0.1:0"}).Addr
	if err := a.SetMesh(nil, []uint16{netip.MustParseAddrPort(addr).Port()}); err != nil {
		t.Fatal(err)
	}
	base := len(sockets(t, a))
	before := stats(t, a)
	w.call(wlRequest{Op: "churn", Addr: addr, N: n})
	d := diff(stats(t, a), before)
	t.Logf("%d connections: %+v", n, d)
	if got := len(sockets(t, a)); got != base {
		t.Fatalf("sockhash holds %d sockets, baseline %d", got, base)
	}
	if d.SocketsInserted != uint64(2*n) || d.InsertFailed != 0 {
		t.Fatalf("inserted %d, failed %d; want %d, 0", d.SocketsInserted, d.InsertFailed, 2*n)
	}
	if d.MsgRedirected != uint64(2*n) || d.MsgFallthrough != 0 {
		t.Fatalf("redirected %d, fell through %d; want %d, 0", d.MsgRedirected, d.MsgFallthrough, 2*n)
	}
}

// TestNonMeshNeverInserted: sockets in the cgroup that are no mesh pair, and mesh-looking
// sockets outside the cgroup, never enter the sockhash. Mesh IPs: both ends must be in the set.
func TestNonMeshNeverInserted(t *testing.T) {
	requirePrivileges(t)
	cg := testCgroup(t)
	in := startWorkload(t, cg)
	out := startWorkload(t, "")
	a := newAgent(t, testConfig(t, cg))

	sidecar := in.call(wlRequest{Op: "listen", Addr: "127.0.0.1:0"}).Addr
	other := in.call(wlRequest{Op: "listen", Addr: "127.0.0.1:0"}).Addr
	podIP := in.call(wlRequest{Op: "listen", Addr: "127.0.0.2:0"}).Addr
	outside := out.call(wlRequest{Op: "listen", Addr: "127.0.0.1:0"}).Addr
	mesh := []netip.Addr{netip.MustParseAddr("127.0.0.2"), netip.MustParseAddr("127.0.0.3")}
	if err := a.SetMesh(mesh, []uint16{netip.MustParseAddrPort(sidecar).Port(), netip.MustParseAddrPort(outside).Port()}); err != nil {
		t.Fatal(err)
	}

	check := func(name string, w *workload, addr, from string, wantIn bool, wantSkipped uint64) {
		t.Helper()
		before := stats(t, a)
		w.call(wlRequest{Op: "pairs", Addr: addr, From: from, N: 4})
		d := diff(stats(t, a), before)
		n := len(sockets(t, a))
		if wantIn && (n != 8 || d.SocketsInserted != 8) || !wantIn && (n != 0 || d.SocketsInserted != 0) {
			t.Errorf("%s: sockhash holds %d, inserted %d; accelerated=%v expected", name, n, d.SocketsInserted, wantIn)
		}
		if d.SocketsSkipped != wantSkipped {
			t.Errorf("%s: skipped %d, want %d", name, d.SocketsSkipped, wantSkipped)
		}
		rep := w.call(wlRequest{Op: "stream", Bytes: 64 << 10, MinWrite: 1, MaxWrite: 4096, Seed: 7})
		for _, p := range rep.Problems {
			t.Errorf("%s: %s", name, p)
		}
	}
	check("loopback to a sidecar port", in, sidecar, "", true, 0)
	check("loopback, no sidecar port", in, other, "", false, 8)
	check("both ends mesh IPs", in, podIP, "127.0.0.3", true, 0)
	check("one end not a mesh IP", in, podIP, "127.0.0.4", false, 8)
	// Sockets outside the cgroup: sockops never runs for them.
	check("outside the cgroup", out, outside, "", false, 0)
}

// TestProbeFailureLeavesTrafficAlone forces the sk_msg probe to fail: New returns a clean
// error naming the feature and wrapping ebpf.ErrNotSupported; nothing is pinned or attached
// and traffic flows as before.
func TestProbeFailureLeavesTrafficAlone(t *testing.T) {
	requirePrivileges(t)
	cg := testCgroup(t)
	w := startWorkload(t, cg)
	cfg := testConfig(t, cg)
	_, err := New(cfg, WithProbeFailure(FeatureSkMsg))
	if !errors.Is(err, ebpf.ErrNotSupported) {
		t.Fatalf("New: %v, want ErrNotSupported", err)
	}
	var mf *MissingFeatureError
	if !errors.As(err, &mf) || mf.Feature != FeatureSkMsg || !strings.Contains(err.Error(), "sk_msg program type") {
		t.Fatalf("error does not name the feature: %v", err)
	}
	t.Logf("error: %v", err)
	if _, err := os.Stat(cfg.PinPath); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("pin path exists after a failed probe: %v", err)
	}
	if ids := attachedSockOps(t, cg); len(ids) != 0 {
		t.Fatalf("sockops programs attached: %v", ids)
	}
	addr := w.call(wlRequest{Op: "listen", Addr: "127.0.0.1:0"}).Addr
	w.call(wlRequest{Op: "pairs", Addr: addr, N: 4})
	rep := w.call(wlRequest{Op: "stream", Bytes: 1 << 20, MinWrite: 1, MaxWrite: 8192, Seed: 3})
	for _, p := range rep.Problems {
		t.Error(p)
	}
}

func attachedSockOps(t testing.TB, cg string) []ebpf.ProgramID {
	t.Helper()
	f, err := os.Open(cg)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	res, err := link.QueryPrograms(link.QueryOptions{Target: int(f.Fd()), Attach: ebpf.AttachCGroupSockOps})
	if err != nil {
		t.Fatal(err)
	}
	var ids []ebpf.ProgramID
	for _, p := range res.Programs {
		ids = append(ids, p.ID)
	}
	return ids
}

// TestRestartAdopts: Close and New again on the same pins adopt the maps and links (no
// EBUSY, one sockops program on the cgroup), pairs accelerated before the restart keep
// being redirected, and the counters keep rising.
func TestRestartAdopts(t *testing.T) {
	requirePrivileges(t)
	cg := testCgroup(t)
	w := startWorkload(t, cg)
	cfg := testConfig(t, cg)
	addr := w.call(wlRequest{Op: "listen", Addr: "127.0.0.1:0"}).Addr
	cfg.SidecarPorts = []uint16{netip.MustParseAddrPort(addr).Port()}

	a1, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	w.call(wlRequest{Op: "pairs", Addr: addr, N: 4})
	w.call(wlRequest{Op: "send", Bytes: 256 << 10, Seed: 1})
	if err := a1.Close(); err != nil {
		t.Fatal(err)
	}
	// Between agents: still attached, still redirecting.
	counters, err := ebpf.LoadPinnedMap(filepath.Join(cfg.PinPath, "mt_stats"), nil)
	if err != nil {
		t.Fatal(err)
	}
	s0, _ := readStats(counters)
	w.call(wlRequest{Op: "send", Bytes: 64 << 10, Seed: 2})
	s1, _ := readStats(counters)
	counters.Close()
	if d := diff(s1, s0); d.BytesRedirected != 4*64<<10 {
		t.Errorf("without an agent: %+v, want 256 KiB redirected", d)
	}

	for round := range 3 {
		a2, err := New(cfg)
		if err != nil {
			t.Fatalf("restart %d: %v", round, err)
		}
		st := a2.State()
		for _, p := range st.Programs {
			if !p.Adopted {
				t.Errorf("restart %d: %s not adopted: %+v", round, p.Program, p)
			}
		}
		if !slices.Contains(st.ReusedMaps, "mt_sockhash") || !slices.Contains(st.ReusedMaps, "mt_stats") || len(st.ReplacedMaps) != 0 {
			t.Errorf("restart %d: reused %v, replaced %v", round, st.ReusedMaps, st.ReplacedMaps)
		}
		if ids := attachedSockOps(t, cg); len(ids) != 1 || ids[0] != st.Programs[1].ProgramID {
			t.Errorf("restart %d: sockops programs on the cgroup %v, want just ours (%d)", round, ids, st.Programs[1].ProgramID)
		}
		if n := len(sockets(t, a2)); n != 8 {
			t.Errorf("restart %d: sockhash holds %d, want the 8 live sockets", round, n)
		}
		w.call(wlRequest{Op: "send", Bytes: 64 << 10, Seed: uint64(10 + round)})
		s2 := stats(t, a2)
		if s2.MsgRedirected <= s1.MsgRedirected || s2.BytesRedirected != s1.BytesRedirected+4*64<<10 {
			t.Errorf("restart %d: counters did not keep rising: %+v then %+v", round, s1, s2)
		}
		if s2.InsertFailed != 0 || s2.MsgFallthrough != 0 {
			t.Errorf("restart %d: failures %+v", round, s2)
		}
		s1 = s2
		// New connections after the restart are accelerated by the new programs.
		if err := a2.Close(); err != nil {
			t.Fatal(err)
		}
	}
	rep := w.call(wlRequest{Op: "recv"})
	for _, p := range rep.Problems {
		t.Error(p)
	}
	if want := int64(4 * (256 + 64 + 3*64) << 10); rep.Bytes != want {
		t.Errorf("received %d bytes, want %d", rep.Bytes, want)
	}
	w.call(wlRequest{Op: "close"})
}

// TestUninstallKeepsLivePairs: Uninstall removes every pin and detaches both programs, but
// deletes no sockhash entry: bytes queued in accelerated pairs are all delivered, the pairs
// keep redirecting until they close, new connections are not accelerated, and once the
// last pair closes the kernel frees every object.
func TestUninstallKeepsLivePairs(t *testing.T) {
	requirePrivileges(t)
	cg := testCgroup(t)
	w := startWorkload(t, cg)
	cfg := testConfig(t, cg)
	addr := w.call(wlRequest{Op: "listen", Addr: "127.0.0.1:0"}).Addr
	cfg.SidecarPorts = []uint16{netip.MustParseAddrPort(addr).Port()}
	cfg.QueueLimit = 32 << 20 // let 8 MiB per pair sit unread in the peers' queues
	a, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	w.call(wlRequest{Op: "pairs", Addr: addr, N: 4})
	w.call(wlRequest{Op: "send", Bytes: 8 << 20, Seed: 5}) // 8 MiB unread per pair

	// Handles of our own, to watch the objects after the pins are gone.
	sockhash, err := ebpf.LoadPinnedMap(filepath.Join(cfg.PinPath, "mt_sockhash"), nil)
	if err != nil {
		t.Fatal(err)
	}
	counters, err := ebpf.LoadPinnedMap(filepath.Join(cfg.PinPath, "mt_stats"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Uninstall(); err != nil {
		t.Fatalf("Uninstall: %v", err)
	}
	if _, err := os.Stat(cfg.PinPath); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("pin path still there: %v", err)
	}
	if ids := attachedSockOps(t, cg); len(ids) != 0 {
		t.Fatalf("sockops still attached: %v", ids)
	}
	if bpftool, err := exec.LookPath("bpftool"); err == nil { // a second opinion
		out, _ := exec.Command(bpftool, "cgroup", "show", cg).CombinedOutput()
		if strings.Contains(string(out), "sock_ops") {
			t.Fatalf("bpftool still shows sock_ops on the cgroup:\n%s", out)
		}
	}
	keys, err := sockhashKeys(sockhash)
	if err != nil || len(keys) != 8 {
		t.Fatalf("live entries after uninstall: %d (%v), want all 8", len(keys), err)
	}
	before, err := readStats(counters)
	if err != nil {
		t.Fatal(err)
	}
	w.call(wlRequest{Op: "send", Bytes: 1 << 20, Seed: 6})
	rep := w.call(wlRequest{Op: "recv"})
	for _, p := range rep.Problems {
		t.Error(p)
	}
	if rep.Bytes != 4*9<<20 {
		t.Errorf("received %d bytes, want %d", rep.Bytes, 4*9<<20)
	}
	after, _ := readStats(counters)
	if d := diff(after, before); d.BytesRedirected != 4<<20 {
		t.Errorf("live pairs after uninstall: %+v, want 4 MiB still redirected", d)
	}
	// New connections are no longer accelerated.
	w.call(wlRequest{Op: "pairs", Addr: addr, N: 2})
	if keys, _ := sockhashKeys(sockhash); len(keys) != 8 {
		t.Errorf("new connections inserted after uninstall: %d entries", len(keys))
	}
	w.call(wlRequest{Op: "close"})
	if keys, _ := sockhashKeys(sockhash); len(keys) != 0 {
		t.Errorf("%d entries after the pairs closed", len(keys))
	}
	sockhash.Close()
	counters.Close()
	if err := checkNoLeftovers(); err != nil {
		t.Fatalf("objects left after uninstall and drain: %v", err)
	}
}

// TestLayoutChangeReplacesPinnedMaps: a pinned map another agent version made with another
// layout is replaced, not a crash; pairs in the old sockhash keep working until they close.
func TestLayoutChangeReplacesPinnedMaps(t *testing.T) {
	requirePrivileges(t)
	cg := testCgroup(t)
	w := startWorkload(t, cg)
	cfg := testConfig(t, cg)
	addr := w.call(wlRequest{Op: "listen", Addr: "127.0.0.1:0"}).Addr
	cfg.SidecarPorts = []uint16{netip.MustParseAddrPort(addr).Port()}
	cfg.MaxConns = 1024
	old, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	w.call(wlRequest{Op: "pairs", Addr: addr, N: 2})
	w.call(wlRequest{Op: "send", Bytes: 1 << 20, Seed: 8})
	if err := old.Close(); err != nil {
		t.Fatal(err)
	}
	// A foreign map where our counters were pinned.
	foreign, err := ebpf.NewMap(&ebpf.MapSpec{Name: "mt_stats", Type: ebpf.Array, KeySize: 4, ValueSize: 8, MaxEntries: 1})
	if err != nil {
		t.Fatal(err)
	}
	statsPin := filepath.Join(cfg.PinPath, "mt_stats")
	if err := os.Remove(statsPin); err != nil {
		t.Fatal(err)
	}
	if err := foreign.Pin(statsPin); err != nil {
		t.Fatal(err)
	}
	foreign.Close()

	cfg.MaxConns = 2048
	a := newAgent(t, cfg)
	st := a.State()
	var replaced []string
	for _, r := range st.ReplacedMaps {
		replaced = append(replaced, r.Name)
		t.Logf("replaced %s: %s", r.Name, r.Reason)
	}
	// mt_pairs and mt_sk_addrs are sized from MaxConns too.
	if !slices.Equal(replaced, []string{"mt_pairs", "mt_sk_addrs", "mt_sockhash", "mt_stats"}) {
		t.Fatalf("replaced %v, want mt_pairs, mt_sk_addrs, mt_sockhash and mt_stats", replaced)
	}
	for _, p := range st.Programs {
		if p.Program == "mt_redir" && p.Adopted {
			t.Errorf("sk_msg link of the old sockhash adopted")
		}
	}
	// The old pairs: not in the new sockhash, still redirecting in the old one.
	if n := len(sockets(t, a)); n != 0 {
		t.Errorf("new sockhash holds %d", n)
	}
	w.call(wlRequest{Op: "send", Bytes: 1 << 20, Seed: 9})
	rep := w.call(wlRequest{Op: "recv"})
	for _, p := range rep.Problems {
		t.Error(p)
	}
	if rep.Bytes != 2*2<<20 {
		t.Errorf("old pairs delivered %d bytes, want %d", rep.Bytes, 2*2<<20)
	}
	w.call(wlRequest{Op: "close"})
	// New pairs go into the new sockhash.
	w.call(wlRequest{Op: "pairs", Addr: addr, N: 2})
	if n := len(sockets(t, a)); n != 4 {
		t.Errorf("new sockhash holds %d, want 4", n)
	}
	rep = w.call(wlRequest{Op: "stream", Bytes: 1 << 20, MinWrite: 1, MaxWrite: 65536, Seed: 10})
	for _, p := range rep.Problems {
		t.Error(p)
	}
	if s := stats(t, a); s.BytesRedirected != 4<<20 || s.InsertFailed != 0 {
		t.Errorf("new counters %+v, want 4 MiB redirected", s)
	}
}

// TestSetMesh: the mesh set is replaced as a whole and decides which new connections are
// accelerated; shrinking it leaves accelerated connections alone.
func TestSetMesh(t *testing.T) {
	requirePrivileges(t)
	cg := testCgroup(t)
	w := startWorkload(t, cg)
	a := newAgent(t, testConfig(t, cg))
	addr := w.call(wlRequest{Op: "listen", Addr: "127.0.0.1:0"}).Addr
	port := netip.MustParseAddrPort(addr).Port()
	ips := []netip.Addr{netip.MustParseAddr("10.1.0.1"), netip.MustParseAddr("fd00::1")}
	if err := a.SetMesh(ips, []uint16{15001, port}); err != nil {
		t.Fatal(err)
	}
	st := a.State()
	if !slices.Equal(st.MeshIPs, ips) || !slices.Equal(st.SidecarPorts, slices.Sorted(slices.Values([]uint16{port, 15001}))) {
		t.Fatalf("state mesh %v %v", st.MeshIPs, st.SidecarPorts)
	}
	w.call(wlRequest{Op: "pairs", Addr: addr, N: 1})
	if err := a.SetMesh(ips[:1], []uint16{15001}); err != nil {
		t.Fatal(err)
	}
	w.call(wlRequest{Op: "pairs", Addr: addr, N: 1})
	if n := len(sockets(t, a)); n != 2 {
		t.Fatalf("sockhash holds %d, want the 2 of the first pair only", n)
	}
	rep := w.call(wlRequest{Op: "stream", Bytes: 1 << 20, MinWrite: 1, MaxWrite: 65536, Seed: 11})
	for _, p := range rep.Problems {
		t.Error(p)
	}
	if st := a.State(); len(st.MeshIPs) != 1 || len(st.SidecarPorts) != 1 {
		t.Fatalf("state after shrink %v %v", st.MeshIPs, st.SidecarPorts)
	}
}

// TestMissedPeerFallsThroughForGood: a mesh pair whose server end is outside the cgroup (its
// listener was made before the workload joined it) has only its client in the sockhash. The
// client's sends miss the peer, take the TCP path, and stay on it (so bytes can't be read
// out of order); every path is counted and the streams are byte-exact.
func TestMissedPeerFallsThroughForGood(t *testing.T) {
	requirePrivileges(t)
	cg := testCgroup(t)
	w := startWorkload(t, "")
	a := newAgent(t, testConfig(t, cg))
	addr := w.call(wlRequest{Op: "listen", Addr: "127.0.0.1:0"}).Addr
	if err := a.SetMesh(nil, []uint16{netip.MustParseAddrPort(addr).Port()}); err != nil {
		t.Fatal(err)
	}
	w.call(wlRequest{Op: "join", Addr: cg})
	pairs := w.call(wlRequest{Op: "pairs", Addr: addr, N: 4}).Pairs
	keys := sockets(t, a)
	if len(keys) != 4 {
		t.Fatalf("sockhash holds %d, want the 4 clients", len(keys))
	}
	for _, p := range pairs {
		if _, err := a.Lookup(SockKey{Local: p.Client.Local, Remote: p.Client.Remote}); err != nil {
			t.Fatalf("client not inserted: %v", err)
		}
	}
	// The first send of each client misses; its pair is demoted and the client, with nothing
	// queued for it, is unhooked: plain TCP from then on.
	w.call(wlRequest{Op: "send", Bytes: 1000, Seed: 11})
	if rep := w.call(wlRequest{Op: "recv"}); len(rep.Problems) > 0 {
		t.Fatal(rep.Problems)
	}
	waitUntil(t, 5*time.Second, func() (bool, string) {
		n := len(sockets(t, a))
		return n == 0, fmt.Sprintf("%d clients still in the sockhash after their miss", n)
	})
	rep := w.call(wlRequest{Op: "stream", Bytes: 2 << 20, MinWrite: 1, MaxWrite: 16 << 10, Seed: 12})
	for _, p := range rep.Problems {
		t.Error(p)
	}
	s := stats(t, a)
	t.Logf("counters: %+v", s)
	// After its miss a client is TCP-only, and once unhooked (its pair demoted) its sends pass
	// no program at all.
	if s.MsgRedirected != 0 || s.MsgFallthrough != 4 || s.BytesFallthrough != 4*1000 || s.SocketsUnhooked != 4 || s.StateFailed != 0 {
		t.Fatalf("want exactly one miss per client and the rest TCP-only: %+v", s)
	}
}

// TestSecondOwnerIsCountedNotSilent: two agents (two pin paths) on one cgroup, as with
// another sockmap user on the node. By default the second refuses to start, naming the first;
// told to coexist it runs: each socket can be in one sk_msg sockhash only, the loser's inserts
// of connecting ends fail with EBUSY and are counted (it then leaves their accepting ends
// out), and each agent sees the other's program. A restart on its own pins is no conflict.
func TestSecondOwnerIsCountedNotSilent(t *testing.T) {
	requirePrivileges(t)
	cg := testCgroup(t)
	w := startWorkload(t, cg)
	addr := w.call(wlRequest{Op: "listen", Addr: "127.0.0.1:0"}).Addr
	ports := []uint16{netip.MustParseAddrPort(addr).Port()}
	cfgA, cfgB := testConfig(t, cg), testConfig(t, cg)
	cfgA.SidecarPorts, cfgB.SidecarPorts = ports, ports
	a := newAgent(t, cfgA)
	if err := a.Close(); err != nil { // a restart on its own pins: no conflict
		t.Fatal(err)
	}
	a = newAgent(t, cfgA)
	if st := a.State(); len(st.OtherOwners) != 0 {
		t.Fatalf("the restarted agent sees itself as another owner: %v", st.OtherOwners)
	}
	_, err := New(cfgB)
	var conflict *OwnerConflictError
	if !errors.As(err, &conflict) || len(conflict.Owners) != 1 || conflict.Owners[0].ProgramID != a.State().Programs[1].ProgramID ||
		!strings.Contains(err.Error(), "CoexistWithOtherOwners") {
		t.Fatalf("second owner: %v, want a refusal naming the first agent's sockops program", err)
	}
	t.Logf("refusal: %v", err)
	if _, err := os.Stat(cfgB.PinPath); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the refused agent left its pin path: %v", err)
	}
	cfgB.CoexistWithOtherOwners = true
	b := newAgent(t, cfgB)
	if other := b.State().OtherSockOps; len(other) != 1 || other[0] != a.State().Programs[1].ProgramID {
		t.Errorf("second agent sees other sockops %v, want the first agent's", other)
	}
	if owners := b.State().OtherOwners; len(owners) != 1 {
		t.Errorf("second agent's other owners: %v", owners)
	}
	w.call(wlRequest{Op: "pairs", Addr: addr, N: 4})
	sa, sb := stats(t, a), stats(t, b)
	t.Logf("first: %+v", sa)
	t.Logf("second: %+v", sb)
	// Each connecting end fails with EBUSY in the agent that comes second; that agent then
	// leaves the accepting end out (its connecting end is not in its sockhash).
	if sa.SocketsInserted+sb.SocketsInserted != 8 || sa.InsertBusy+sb.InsertBusy != 4 ||
		sa.InsertFailed+sb.InsertFailed != 4 || sa.Unpaired+sb.Unpaired != 4 {
		t.Fatalf("want 8 inserts, 4 EBUSY failures and 4 unpaired between the two")
	}
	rep := w.call(wlRequest{Op: "stream", Bytes: 1 << 20, MinWrite: 1, MaxWrite: 65536, Seed: 13})
	for _, p := range rep.Problems {
		t.Error(p)
	}
}

// TestLayoutHashMismatchReplacesAll: maps of an agent whose key/value layouts differ (as
// recorded in mt_meta; same sizes would pass MapSpec.Compatible) are all replaced.
func TestLayoutHashMismatchReplacesAll(t *testing.T) {
	requirePrivileges(t)
	cg := testCgroup(t)
	cfg := testConfig(t, cg)
	a, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	meta, err := ebpf.LoadPinnedMap(filepath.Join(cfg.PinPath, "mt_meta"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := meta.Put(uint32(0), uint64(12345)); err != nil {
		t.Fatal(err)
	}
	meta.Close()
	b := newAgent(t, cfg)
	st := b.State()
	spec, err := loadSockops()
	if err != nil {
		t.Fatal(err)
	}
	pinned := 0
	for _, ms := range spec.Maps {
		if ms.Pinning == ebpf.PinByName {
			pinned++
		}
	}
	if len(st.ReplacedMaps) != pinned-1 || !slices.Equal(st.ReusedMaps, []string{"mt_meta"}) {
		t.Fatalf("reused %v, replaced %+v; want all but mt_meta replaced", st.ReusedMaps, st.ReplacedMaps)
	}
	for _, r := range st.ReplacedMaps {
		if r.Reason != "key or value layout changed" {
			t.Errorf("%s: %s", r.Name, r.Reason)
		}
	}
}
