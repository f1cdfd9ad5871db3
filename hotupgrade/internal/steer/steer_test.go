package steer

import (
	"context"
	"errors"
	"net"
	"os"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/meshturbo/meshturbo/internal/testenv"
)

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: loads a BPF program and attaches it to sockets")
	}
}

// listeners opens n TCP listeners on one address with SO_REUSEPORT: one reuseport group.
func listeners(t *testing.T, addr string, n int) []*net.TCPListener {
	t.Helper()
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1) })
		return errors.Join(err, serr)
	}}
	// Go listens with MPTCP where it can; Envoy's listeners, and the sockarray, are TCP.
	lc.SetMultipathTCP(false)
	var ls []*net.TCPListener
	for range n {
		l, err := lc.Listen(context.Background(), "tcp", addr)
		if err != nil {
			if len(ls) == 0 {
				t.Skipf("listen on %s: %v", addr, err)
			}
			t.Fatal(err)
		}
		t.Cleanup(func() { l.Close() })
		ls = append(ls, l.(*net.TCPListener))
		addr = l.Addr().String()
	}
	return ls
}

// fd is the listener's own descriptor (no copy, which would keep the socket listening
// after the listener closes).
func fd(t *testing.T, l *net.TCPListener) int {
	t.Helper()
	rc, err := l.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var out int
	if err := rc.Control(func(f uintptr) { out = int(f) }); err != nil {
		t.Fatal(err)
	}
	return out
}

func fds(t *testing.T, ls ...*net.TCPListener) []int {
	var out []int
	for _, l := range ls {
		out = append(out, fd(t, l))
	}
	return out
}

// queued is the accept queue length of each listener.
func queued(t *testing.T, ls ...*net.TCPListener) []int {
	t.Helper()
	var out []int
	for _, l := range ls {
		n, err := Backlog(fd(t, l))
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, n)
	}
	return out
}

func newSteer(t *testing.T) *Steer {
	t.Helper()
	s, err := New()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Error(err)
		}
	})
	return s
}

func TestSteer(t *testing.T) {
	requireRoot(t)
	for _, addr := range []string{"127.0.0.1:0", "[::1]:0"} {
		t.Run(addr, func(t *testing.T) {
			ls := listeners(t, addr, 2)
			a, b := ls[0], ls[1]
			s := newSteer(t)
			const n = 200
			if err := s.To(fds(t, b)); err != nil {
				t.Fatal(err)
			}
			testenv.DialN(t, a.Addr().String(), n)
			if q := queued(t, a, b); q[0] != 0 || q[1] != n {
				t.Fatalf("steered to the second listener: queues %v, want [0 %d]", q, n)
			}
			// The other way round: a group's sockets can be swapped while it is steered.
			if err := s.To(fds(t, a)); err != nil {
				t.Fatal(err)
			}
			testenv.DialN(t, a.Addr().String(), n)
			if q := queued(t, a, b); q[0] != n || q[1] != n {
				t.Fatalf("steered to the first listener: queues %v, want [%d %d]", q, n, n)
			}
			if err := s.Detach(fds(t, b)); err != nil {
				t.Fatal(err)
			}
			testenv.DialN(t, a.Addr().String(), n)
			q := queued(t, a, b)
			t.Logf("after detaching, %d more connections went %d/%d", n, q[0]-n, q[1]-n)
			if q[0] == n || q[1] == n || q[0]+q[1] != 3*n {
				t.Fatalf("detached: queues %v, want the %d new connections spread over both", q, n)
			}
		})
	}
}

// Several sockets per group (one per Envoy worker): the connections spread over the chosen
// ones, and those queued on a closing member move to them too (the program is attached for
// select-or-migrate, so this holds even with net.ipv4.tcp_migrate_req=0).
func TestSteerGroupAndMigration(t *testing.T) {
	requireRoot(t)
	ls := listeners(t, "127.0.0.1:0", 4)
	old, b1, b2, c := ls[0], ls[1], ls[2], ls[3]
	other := listeners(t, "127.0.0.1:0", 2) // a second group, not steered
	s := newSteer(t)
	const n = 200
	testenv.DialN(t, old.Addr().String(), n) // unsteered: spread over all four
	before := queued(t, old, b1, b2, c)
	if before[0] == 0 {
		t.Fatalf("queues %v: nothing queued on the first listener", before)
	}
	if err := s.To(append(fds(t, b1, b2), fd(t, other[1]))); err != nil {
		t.Fatal(err)
	}
	testenv.DialN(t, old.Addr().String(), n)
	mid := queued(t, old, b1, b2, c)
	if mid[0] != before[0] || mid[3] != before[3] || mid[1] == before[1] || mid[2] == before[2] || mid[1]+mid[2] != before[1]+before[2]+n {
		t.Fatalf("steered to the middle two: queues %v before, %v after %d more; want them all on the middle two, on both", before, mid, n)
	}
	testenv.DialN(t, other[0].Addr().String(), n)
	if q := queued(t, other...); q[0] != 0 || q[1] != n {
		t.Fatalf("second group steered to its second socket: queues %v", q)
	}
	old.Close()
	after := queued(t, b1, b2, c)
	if after[2] != before[3] || after[0]+after[1] != mid[1]+mid[2]+before[0] {
		t.Fatalf("closed the first listener with %d queued: queues of the others %v, were %v; want its queue moved to the middle two", before[0], after, mid[1:])
	}
	// Steering only the second group puts the first back on the kernel's hash.
	if err := s.To(fds(t, other[1])); err != nil {
		t.Fatal(err)
	}
	testenv.DialN(t, b1.Addr().String(), n)
	if q := queued(t, b1, b2, c); q[2] == after[2] {
		t.Errorf("first group no longer steered: queues %v after %d more, were %v; want some on the last listener", q, n, after)
	}
	if err := s.Detach(fds(t, b1, other[0])); err != nil {
		t.Fatal(err)
	}
}

func TestBadSocket(t *testing.T) {
	requireRoot(t)
	s := newSteer(t)
	c, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	rc, _ := c.(*net.UDPConn).SyscallConn()
	var udp int
	_ = rc.Control(func(f uintptr) { udp = int(f) })
	if err := s.To([]int{udp}); err == nil {
		t.Error("steering to a UDP socket: no error")
	}
	// A listener without SO_REUSEPORT has no group to attach to.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if err := s.To([]int{fd(t, l.(*net.TCPListener))}); err == nil {
		t.Error("steering to a listener without SO_REUSEPORT: no error")
	}
}

// What a process that dies while steering leaves behind (its descriptors of the program and
// maps close, nothing is detached): the program goes on steering to the sockets it was
// given, and once those close, the group's other sockets get every connection, including
// those that were queued on the closed ones.
func TestSteerOutlivesItsOwner(t *testing.T) {
	requireRoot(t)
	ls := listeners(t, "127.0.0.1:0", 3)
	a, b1, b2 := ls[0], ls[1], ls[2]
	s, err := New()
	if err != nil {
		t.Fatal(err)
	}
	if err := s.To(fds(t, b1, b2)); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	const n = 100
	testenv.DialN(t, a.Addr().String(), n)
	q := queued(t, a, b1, b2)
	if q[0] != 0 || q[1]+q[2] != n {
		t.Fatalf("owner gone: queues %v, want all %d on the last two", q, n)
	}
	b1.Close()
	testenv.DialN(t, a.Addr().String(), n)
	q = queued(t, a, b2)
	t.Logf("one steered socket closed: queues %v", q)
	if q[0]+q[1] != 2*n || q[0] == 0 {
		t.Fatalf("one steered socket closed: queues %v, want %d connections in all, some (its queue at least) on the unsteered one", q, 2*n)
	}
	b2.Close()
	testenv.DialN(t, a.Addr().String(), n)
	if q := queued(t, a); q[0] != 3*n {
		t.Fatalf("all steered sockets closed: the other one queues %d, want all %d", q[0], 3*n)
	}
}
