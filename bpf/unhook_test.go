package bpf

import (
	"errors"
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/cilium/ebpf"
)

// waitUntil polls cond until it holds or timeout passes; then it fails with what cond said
// last.
func waitUntil(t testing.TB, timeout time.Duration, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		ok, why := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %v: %s", timeout, why)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func hooked(t testing.TB, a *Agent, s wlSock) bool {
	t.Helper()
	_, err := a.Lookup(SockKey{Local: s.Local, Remote: s.Remote})
	if err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		t.Fatal(err)
	}
	return err == nil
}

// TestUnhookKeepsUnreadBytes: a pair demoted for streaming small writes leaves the sockhash
// end by end, each only once no redirected byte waits unread in its queue (removing a socket
// with unread redirected bytes would drop them). Afterwards both ends run as plain TCP (the
// sk_msg program sees none of their sends) and every byte arrives, in order.
func TestUnhookKeepsUnreadBytes(t *testing.T) {
	requirePrivileges(t)
	cg := testCgroup(t)
	w := startWorkload(t, cg)
	cfg := testConfig(t, cg)
	cfg.SmallMsg = smallWrite // the small-write rule (off by default) demotes the pair below
	a := newAgent(t, cfg)
	if st := a.State().Unhook; !st.On {
		t.Fatalf("unhook is off: %s", st.Off)
	}
	addr := w.call(wlRequest{Op: "listen", Addr: "127.0.0.1:0"}).Addr
	if err := a.SetMesh(nil, []uint16{netip.MustParseAddrPort(addr).Port()}); err != nil {
		t.Fatal(err)
	}
	p := w.call(wlRequest{Op: "pairs", Addr: addr, N: 1}).Pairs[0]
	before := stats(t, a)

	// The server sends 4 KiB, redirected into the client's queue; the client doesn't read.
	w.call(wlRequest{Op: "send", Reverse: true, Bytes: 4096, Seed: 1})
	// The client streams 1000 writes of 100 bytes: its pair is demoted at the 16th; the
	// server doesn't read either, so 15 redirected writes wait in its queue.
	w.call(wlRequest{Op: "send", Bytes: 100 * 1000, MinWrite: 100, Seed: 2})
	d := diff(stats(t, a), before)
	if d.SocketsDemoted != 1 || d.MsgRedirected != 1+DefaultSmallRun-1 {
		t.Fatalf("want the pair demoted after %d redirected writes: %+v", DefaultSmallRun-1, d)
	}
	// Both ends hold unread redirected bytes: several sweeps later both are still hooked.
	waitUntil(t, 5*time.Second, func() (bool, string) {
		d := diff(stats(t, a), before)
		return d.UnhookDeferred >= 6, "the sweeper did not come back to the deferred sockets"
	})
	if !hooked(t, a, p.Client) || !hooked(t, a, p.Server) {
		t.Fatalf("a socket with unread redirected bytes left the sockhash (client %v, server %v)",
			hooked(t, a, p.Client), hooked(t, a, p.Server))
	}

	// The server reads everything: it leaves the sockhash; the client still may not.
	if rep := w.call(wlRequest{Op: "recv"}); len(rep.Problems) > 0 || rep.Bytes != 100*1000 {
		t.Fatalf("server read %d bytes: %v", rep.Bytes, rep.Problems)
	}
	waitUntil(t, 5*time.Second, func() (bool, string) {
		return !hooked(t, a, p.Server), "the server end was not unhooked after reading its queue"
	})
	if !hooked(t, a, p.Client) {
		t.Fatal("the client end left the sockhash with 4 KiB unread")
	}
	if rep := w.call(wlRequest{Op: "recv", Reverse: true}); len(rep.Problems) > 0 || rep.Bytes != 4096 {
		t.Fatalf("client read %d bytes: %v", rep.Bytes, rep.Problems)
	}
	waitUntil(t, 5*time.Second, func() (bool, string) {
		return !hooked(t, a, p.Client), "the client end was not unhooked after reading its queue"
	})
	if d := diff(stats(t, a), before); d.SocketsUnhooked != 2 {
		t.Fatalf("unhooked %d sockets, want 2", d.SocketsUnhooked)
	}

	// Plain TCP now, both ways, byte-exact; the sk_msg program sees nothing.
	mid := stats(t, a)
	w.call(wlRequest{Op: "send", Bytes: 1 << 20, MinWrite: 100, Seed: 3})
	w.call(wlRequest{Op: "send", Reverse: true, Bytes: 64 << 10, MinWrite: 1000, Seed: 4})
	for _, rev := range []bool{false, true} {
		if rep := w.call(wlRequest{Op: "recv", Reverse: rev}); len(rep.Problems) > 0 {
			t.Fatalf("after unhook: %v", rep.Problems)
		}
	}
	if d := diff(stats(t, a), mid); d.MsgRedirected+d.MsgTCPOnly+d.MsgFallthrough != 0 {
		t.Fatalf("the sk_msg program still saw sends of unhooked sockets: %+v", d)
	}
	if st := a.State().Unhook; st.Deferred != 0 || st.LastError != "" {
		t.Fatalf("unhook state: %+v", st)
	}
	w.call(wlRequest{Op: "close"})
}

// TestKeepDemoted: with unhooking off, demoted sockets stay in the sockhash on the TCP path.
func TestKeepDemoted(t *testing.T) {
	requirePrivileges(t)
	cg := testCgroup(t)
	w := startWorkload(t, cg)
	cfg := testConfig(t, cg)
	cfg.SmallMsg = smallWrite // the small-write rule (off by default) demotes the pair below
	cfg.KeepDemoted = true
	a := newAgent(t, cfg)
	if st := a.State().Unhook; st.On || st.Off == "" {
		t.Fatalf("unhook state %+v, want off with a reason", st)
	}
	addr := w.call(wlRequest{Op: "listen", Addr: "127.0.0.1:0"}).Addr
	if err := a.SetMesh(nil, []uint16{netip.MustParseAddrPort(addr).Port()}); err != nil {
		t.Fatal(err)
	}
	p := w.call(wlRequest{Op: "pairs", Addr: addr, N: 1}).Pairs[0]
	before := stats(t, a)
	w.call(wlRequest{Op: "send", Bytes: 100 * 1000, MinWrite: 100, Seed: 2})
	if rep := w.call(wlRequest{Op: "recv"}); len(rep.Problems) > 0 {
		t.Fatal(rep.Problems)
	}
	time.Sleep(100 * time.Millisecond) // what would be several sweeps
	d := diff(stats(t, a), before)
	if d.SocketsDemoted != 1 || d.MsgTCPOnly != 1000-(DefaultSmallRun-1) || d.SocketsUnhooked != 0 {
		t.Fatalf("want the sender kept hooked on the TCP path: %+v", d)
	}
	if !hooked(t, a, p.Client) || !hooked(t, a, p.Server) {
		t.Fatal("a socket left the sockhash")
	}
	w.call(wlRequest{Op: "close"})
}

// TestUnhookWaitsForQuietEnds: a socket leaves the sockhash only after its peer was seen
// outside any send or read since the demotion (so that no redirect decided before the
// demotion can still be on its way to it). A reader blocked in read holds its end busy:
// neither end is unhooked until the read returns, and then both are.
func TestUnhookWaitsForQuietEnds(t *testing.T) {
	requirePrivileges(t)
	cg := testCgroup(t)
	w := startWorkload(t, cg)
	cfg := testConfig(t, cg)
	cfg.SmallMsg = smallWrite                // the small-write rule (off by default) demotes the pair below
	cfg.UnhookGrace = 300 * time.Millisecond // the reader is blocked well before it ends
	a := newAgent(t, cfg)
	addr := w.call(wlRequest{Op: "listen", Addr: "127.0.0.1:0"}).Addr
	if err := a.SetMesh(nil, []uint16{netip.MustParseAddrPort(addr).Port()}); err != nil {
		t.Fatal(err)
	}
	p := w.call(wlRequest{Op: "pairs", Addr: addr, N: 1}).Pairs[0]
	before := stats(t, a)
	// The server reads the client's stream and one byte more: it blocks after the stream.
	w.call(wlRequest{Op: "recvasync", Bytes: 100*1000 + 1})
	w.call(wlRequest{Op: "send", Bytes: 100 * 1000, MinWrite: 100, Seed: 5})
	if d := diff(stats(t, a), before); d.SocketsDemoted != 1 {
		t.Fatalf("pair not demoted: %+v", d)
	}
	// Well past the grace period, with sweeps every 10 ms: both ends still hooked.
	waitUntil(t, 5*time.Second, func() (bool, string) {
		d := diff(stats(t, a), before)
		return d.UnhookDeferred >= 20, fmt.Sprintf("only %d deferrals", d.UnhookDeferred)
	})
	if d := diff(stats(t, a), before); d.SocketsUnhooked != 0 || !hooked(t, a, p.Client) || !hooked(t, a, p.Server) {
		t.Fatalf("unhooked while the server was blocked in read: %+v", d)
	}
	// The last byte ends the read: both ends leave.
	w.call(wlRequest{Op: "send", Bytes: 1, Seed: 6})
	if rep := w.call(wlRequest{Op: "recvwait"}); len(rep.Problems) > 0 || rep.Bytes != 100*1000+1 {
		t.Fatalf("server read %d bytes: %v", rep.Bytes, rep.Problems)
	}
	waitUntil(t, 5*time.Second, func() (bool, string) {
		return !hooked(t, a, p.Client) && !hooked(t, a, p.Server), "not unhooked after the read returned"
	})
	w.call(wlRequest{Op: "close"})
}
