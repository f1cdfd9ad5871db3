package bpf

import (
	"fmt"
	"net"
	"net/netip"
	"testing"
	"time"
)

// TestQueueBounded: a sender whose reader does not read queues, before it blocks, at most
// twice what plain TCP lets it queue, and never sees an error (ENOMEM was what the
// unbounded redirect ended in); the sender backed off to the TCP path once its reader held
// QueueLimit unread, the reader then gets every byte in order, and once it has read them
// all the sender redirects again. Naive redirection (no
// limit) queues far more: the hazard is real on this kernel, not hidden by the test.
func TestQueueBounded(t *testing.T) {
	requirePrivileges(t)
	cg := testCgroup(t)
	w := startWorkload(t, cg)
	cfg := testConfig(t, cg)
	mesh := w.call(wlRequest{Op: "listen", Addr: "127.0.0.1:0"}).Addr
	plain := w.call(wlRequest{Op: "listen", Addr: "127.0.0.1:0"}).Addr
	cfg.SidecarPorts = []uint16{netip.MustParseAddrPort(mesh).Port()}
	a := newAgent(t, cfg)

	fill := func(addr string, idx int, seed uint64) int64 {
		t.Helper()
		w.call(wlRequest{Op: "pairs", Addr: addr, N: 1})
		rep := w.call(wlRequest{Op: "fill", N: idx, Seed: seed})
		for _, p := range rep.Problems {
			t.Errorf("fill %s: %s", addr, p)
		}
		return rep.Bytes
	}
	before := stats(t, a)
	plainBytes := fill(plain, 0, 1)
	accelBytes := fill(mesh, 1, 2)
	d := diff(stats(t, a), before)
	ratio := float64(accelBytes) / float64(plainBytes)
	t.Logf("queued before blocking: plain TCP %d bytes, accelerated %d bytes (queue_ratio=%.2f); redirected %d, queue back-offs %d",
		plainBytes, accelBytes, ratio, d.BytesRedirected, d.QueueBackoff)
	if ratio > 2 {
		t.Errorf("accelerated sender queued %d bytes, more than twice plain TCP's %d", accelBytes, plainBytes)
	}
	if limit := uint64(a.State().QueueLimit); d.BytesRedirected == 0 || d.BytesRedirected > limit {
		t.Errorf("redirected %d bytes, want some and at most the limit %d", d.BytesRedirected, limit)
	}
	if d.QueueBackoff != 1 || d.QueueUnknown != 0 {
		t.Errorf("queue back-offs %d (unknown %d), want 1 (0)", d.QueueBackoff, d.QueueUnknown)
	}
	rep := w.call(wlRequest{Op: "recv"})
	for _, p := range rep.Problems {
		t.Error(p)
	}
	if want := plainBytes + accelBytes; rep.Bytes != want {
		t.Errorf("received %d bytes, want %d", rep.Bytes, want)
	}

	// The reader has read everything, TCP's bytes too: the next sends are redirected again,
	// and still arrive in order. (The first send after the write that would block takes the
	// TCP path without a verdict: the kernel keeps the verdict of a send it could not
	// finish. It is read before the sends that count.)
	w.call(wlRequest{Op: "send", Bytes: 4096, Seed: 3})
	w.call(wlRequest{Op: "recv"})
	before = stats(t, a)
	w.call(wlRequest{Op: "send", Bytes: 1 << 20, MinWrite: 64 << 10, Seed: 4})
	rep = w.call(wlRequest{Op: "recv"})
	for _, p := range rep.Problems {
		t.Error(p)
	}
	d = diff(stats(t, a), before)
	t.Logf("after the reader caught up: %+v", d)
	if d.QueueResumed != 1 || d.BytesRedirected != 1<<20 || d.QueueBackoff != 0 {
		t.Errorf("after the reader caught up: resumed %d, redirected %d bytes, backed off %d; want 1, all %d, 0",
			d.QueueResumed, d.BytesRedirected, d.QueueBackoff, 1<<20)
	}
	w.call(wlRequest{Op: "close"})
	if st := stats(t, a); st.InsertFailed != 0 {
		t.Errorf("insert failures: %+v", st)
	}
	// Address records go with their sockets.
	waitUntil(t, 5*time.Second, func() (bool, string) {
		n := 0
		var k sockopsMtSockKey
		var v sockopsMtSkAddr
		for it := a.sockops.MtSkAddrs.Iterate(); it.Next(&k, &v); {
			n++
		}
		return n == 0, fmt.Sprintf("%d address records left after close", n)
	})
}

// TestQueueUnboundedWhenNaive shows the hazard the limit removes: with naive redirection
// the same idle reader lets the sender queue far more than plain TCP (stopped here at
// 64 MiB by the workload, which is more than ten times plain TCP's).
func TestQueueUnboundedWhenNaive(t *testing.T) {
	requirePrivileges(t)
	cg := testCgroup(t)
	w := startWorkload(t, cg)
	cfg := testConfig(t, cg)
	mesh := w.call(wlRequest{Op: "listen", Addr: "127.0.0.1:0"}).Addr
	cfg.SidecarPorts = []uint16{netip.MustParseAddrPort(mesh).Port()}
	cfg.NaiveRedirect = true
	newAgent(t, cfg)
	w.call(wlRequest{Op: "pairs", Addr: mesh, N: 1})
	rep := w.call(wlRequest{Op: "fill", N: 0, Seed: 3, Bytes: 64 << 20})
	if rep.Bytes < 64<<20 {
		t.Errorf("naive redirect blocked after %d bytes; the hazard this limit removes did not show", rep.Bytes)
	}
	rep = w.call(wlRequest{Op: "recv"})
	for _, p := range rep.Problems {
		t.Error(p)
	}
	w.call(wlRequest{Op: "close"})
}

// BenchmarkQueueFlood reports, for the bounded agent and for naive redirection, what an
// unrelated plain TCP flow (outside the cgroup) keeps of its throughput once 8 accelerated
// senders flooded readers that do not read and hold what they queued (victim_tput_ratio:
// then ÷ before), while they fill (victim_filling_ratio: the 2 cores are shared with the
// flooders' copying), and how much the flooders queued (flood_MiB). One iteration is one
// measurement; run with -benchtime=1x. Naive redirection is expected to report ENOMEM errors:
// that is the hazard.
func BenchmarkQueueFlood(b *testing.B) {
	requirePrivileges(b)
	for _, naive := range []bool{false, true} {
		name := "bounded"
		if naive {
			name = "naive"
		}
		b.Run(name, func(b *testing.B) {
			for range b.N {
				benchFlood(b, naive)
			}
		})
	}
}

func benchFlood(b *testing.B, naive bool) {
	cg := testCgroup(b)
	w := startWorkload(b, cg)
	cfg := testConfig(b, cg)
	mesh := w.call(wlRequest{Op: "listen", Addr: "127.0.0.1:0"}).Addr
	cfg.SidecarPorts = []uint16{netip.MustParseAddrPort(mesh).Port()}
	cfg.NaiveRedirect = naive
	newAgent(b, cfg)
	const flooders = 8
	w.call(wlRequest{Op: "pairs", Addr: mesh, N: flooders})

	const span = time.Second
	before := victimThroughput(b, span, nil)
	var queued int64
	during := victimThroughput(b, span, func() {
		rep, err := w.try(wlRequest{Op: "fill", Flood: true, Bytes: 256 << 20})
		if err != nil {
			b.Error(err)
		}
		for _, p := range rep.Problems {
			b.Error(p)
		}
		queued = rep.Bytes
	})
	// The flooders are blocked now (bounded) or stopped by ENOMEM / 256 MiB each (naive);
	// their bytes stay parked in the kernel while the pairs are open.
	parked := victimThroughput(b, span, nil)
	w.call(wlRequest{Op: "close"})
	b.ReportMetric(parked/before, "victim_tput_ratio")
	b.ReportMetric(during/before, "victim_filling_ratio")
	b.ReportMetric(float64(queued)/(1<<20), "flood_MiB")
	b.Logf("victim %.2f Gbit/s before, %.2f while the flooders fill (CPU shared with them), %.2f with their %d MiB parked",
		before*8/1e9, during*8/1e9, parked*8/1e9, queued>>20)
}

// victimThroughput streams over a plain loopback TCP connection of this process for span
// (with flood running alongside from its start) and returns bytes/s.
func victimThroughput(b *testing.B, span time.Duration, flood func()) float64 {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	c, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	s, err := l.Accept()
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	got := make(chan int64, 1)
	go func() {
		var n int64
		buf := make([]byte, 256<<10)
		for {
			k, err := s.Read(buf)
			n += int64(k)
			if err != nil {
				got <- n
				return
			}
		}
	}()
	done := make(chan struct{})
	if flood != nil {
		go func() { flood(); close(done) }()
	} else {
		close(done)
	}
	buf := make([]byte, 128<<10)
	start := time.Now()
	for time.Since(start) < span {
		if _, err := c.Write(buf); err != nil {
			b.Fatal(err)
		}
	}
	elapsed := time.Since(start)
	c.(*net.TCPConn).CloseWrite()
	n := <-got
	<-done
	return float64(n) / elapsed.Seconds()
}
