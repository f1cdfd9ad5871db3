package hotupgrade

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/meshturbo/meshturbo/hotupgrade/internal/steer"
	"github.com/meshturbo/meshturbo/internal/testenv"
)

// TestHelperListener is not a test: run by listenerProcess, it listens on the addresses in
// HU_LISTEN with two SO_REUSEPORT sockets each (as Envoy does with two workers), never
// accepts, and exits when its stdin closes.
func TestHelperListener(t *testing.T) {
	addrs := os.Getenv("HU_LISTEN")
	if addrs == "" {
		t.Skip("helper process for the steering tests")
	}
	lc := reusePortConfig()
	var ls []net.Listener
	for _, a := range strings.Split(addrs, ",") {
		for range 2 {
			l, err := lc.Listen(context.Background(), "tcp", a)
			if err != nil {
				fmt.Println("error:", err)
				os.Exit(1)
			}
			ls = append(ls, l)
		}
	}
	fmt.Println("ready")
	_, _ = bufio.NewReader(os.Stdin).ReadString('\n')
	for _, l := range ls {
		l.Close()
	}
	os.Exit(0)
}

func reusePortConfig() net.ListenConfig {
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1) })
		return errors.Join(err, serr)
	}}
	lc.SetMultipathTCP(false) // Envoy's listeners are TCP
	return lc
}

// listenerProcess starts a process that listens on addrs like an Envoy (see
// TestHelperListener) and returns it as an Envoy of epoch.
func listenerProcess(t *testing.T, epoch int, addrs ...string) *process {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperListener$")
	cmd.Env = append(os.Environ(), "HU_LISTEN="+strings.Join(addrs, ","))
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		stdin.Close()
		_ = cmd.Wait()
	})
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if line != "ready\n" {
		t.Fatalf("listener process: %q, %v", line, err)
	}
	return &process{epoch: epoch, pidNum: cmd.Process.Pid, exited: make(chan struct{})}
}

// queues sums the accept queues of p's listen sockets per address.
func queues(t *testing.T, p *process, ports map[int]bool) map[string]int {
	t.Helper()
	socks, err := listenSockets(p.pid(), ports)
	if err != nil {
		t.Fatal(err)
	}
	defer closeSockets(socks)
	out := map[string]int{}
	for _, s := range socks {
		n, err := steer.Backlog(s.fd)
		if err != nil {
			t.Fatal(err)
		}
		out[s.addr.String()] += n
	}
	return out
}

// steerAway between two processes that listen like Envoys on an IPv4 and an IPv6 address
// (two sockets each per address), and one address only the old one has: new connections
// go to the new process's sockets only, and once the steering is closed, to both again.
func TestSteerAway(t *testing.T) {
	requireRoot(t)
	port := freePort(t)
	only := freePort(t)
	v4, v6, v4only := net.JoinHostPort("127.0.0.1", port), net.JoinHostPort("::1", port), net.JoinHostPort("127.0.0.1", only)
	ports := map[int]bool{atoi(t, port): true, atoi(t, only): true}
	old := listenerProcess(t, 1, v4, v6, v4only)
	child := listenerProcess(t, 2, v4, v6)
	logs := &logCounter{Handler: testenv.Logger(t).Handler(), match: []string{msgSteered, msgQueued, msgUnsteered}}
	m := &Manager{cfg: Config{Logger: slog.New(logs)}}

	// The old process never accepts: steerAway waits steerWait for its queues, in vain.
	testenv.DialN(t, v4, 10)
	st := m.steerAway(nil, old, child, ports)
	if st == nil {
		t.Fatal("steerAway: no steering")
	}
	const n = 100
	before, beforeC := queues(t, old, ports), queues(t, child, ports)
	for _, a := range []string{v4, v6, v4only} {
		testenv.DialN(t, a, n)
	}
	q, qc := queues(t, old, ports), queues(t, child, ports)
	if q[v4] != before[v4] || q[v6] != before[v6] || q[v4only] != before[v4only]+n || qc[v4] != beforeC[v4]+n || qc[v6] != beforeC[v6]+n {
		t.Errorf("steered: old queues %v (before %v), new %v (before %v); want %d more on each address of the new process, and on the old one's own",
			q, before, qc, beforeC, n)
	}

	// Back to the old process, as a rollback does.
	if st = m.steerAway(st, child, old, ports); st == nil {
		t.Fatal("steerAway back: no steering")
	}
	testenv.DialN(t, v6, n)
	if q2, qc2 := queues(t, old, ports), queues(t, child, ports); q2[v6] != q[v6]+n || qc2[v6] != qc[v6] {
		t.Errorf("steered back: old queues %v, new %v; want the %d new connections on the old process", q2, qc2, n)
	}
	st.close(m, old)
	q, qc = queues(t, old, ports), queues(t, child, ports)
	testenv.DialN(t, v6, n)
	q2, qc2 := queues(t, old, ports), queues(t, child, ports)
	if q2[v6] == q[v6] || qc2[v6] == qc[v6] {
		t.Errorf("steering closed: %d new connections went %d/%d; want them spread", n, q2[v6]-q[v6], qc2[v6]-qc[v6])
	}
	if s, u := logs.count(msgSteered)+logs.count(msgQueued), logs.count(msgUnsteered); s != 2 || u != 0 {
		t.Errorf("%d steerings logged, %d failures; want 2 and 0", s, u)
	}
}

// A failure to steer is logged and leaves nothing attached: here the new process's sockets
// are in another program's map already (a socket can be in one only).
func TestSteerAwayFallsBack(t *testing.T) {
	requireRoot(t)
	port := freePort(t)
	v4 := net.JoinHostPort("127.0.0.1", port)
	ports := map[int]bool{atoi(t, port): true}
	old := listenerProcess(t, 1, v4)
	child := listenerProcess(t, 2, v4)
	logs := &logCounter{Handler: testenv.Logger(t).Handler(), match: []string{msgSteered, msgUnsteered}}
	m := &Manager{cfg: Config{Logger: slog.New(logs)}}

	other, err := steer.New()
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	socks, err := listenSockets(child.pid(), ports)
	if err != nil {
		t.Fatal(err)
	}
	err = other.To(fdsOf(socks))
	closeSockets(socks)
	if err != nil {
		t.Fatal(err)
	}
	if st := m.steerAway(nil, old, child, ports); st != nil {
		t.Fatal("steerAway steered to sockets another program's map holds")
	}
	if u := logs.count(msgUnsteered); u != 1 {
		t.Errorf("%d failures to steer logged; want 1", u)
	}
	const n = 100
	testenv.DialN(t, v4, n)
	if q, qc := queues(t, old, ports), queues(t, child, ports); q[v4] == 0 || qc[v4] == 0 {
		t.Errorf("after the failure: old queues %v, new %v; want the %d connections spread (no program left)", q, qc, n)
	}
}

func freePort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	_, port, _ := net.SplitHostPort(l.Addr().String())
	return port
}

func atoi(t *testing.T, s string) int {
	t.Helper()
	n, err := strconv.Atoi(s)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// TestCheckReusePort: the reuseport hand-off's precheck names the ports whose listen
// sockets lack SO_REUSEPORT (a second Envoy could not bind them) and passes otherwise.
func TestCheckReusePort(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: reads the listeners through pidfd_getfd")
	}
	// Plain TCP, as Envoy's (Go listens with MPTCP by default, which listenSockets skips).
	var tcp net.ListenConfig
	tcp.SetMultipathTCP(false)
	plain, err := tcp.Listen(context.Background(), "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Close()
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1) })
		return errors.Join(err, serr)
	}}
	lc.SetMultipathTCP(false)
	reuse, err := lc.Listen(context.Background(), "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer reuse.Close()
	port := func(l net.Listener) int { return l.Addr().(*net.TCPAddr).Port }

	if err := checkReusePort(os.Getpid(), map[int]bool{port(reuse): true}); err != nil {
		t.Errorf("a SO_REUSEPORT listener: %v", err)
	}
	err = checkReusePort(os.Getpid(), map[int]bool{port(reuse): true, port(plain): true})
	if err == nil || !strings.Contains(err.Error(), fmt.Sprintf("[%d]", port(plain))) || !strings.Contains(err.Error(), HandoffHotRestart) {
		t.Errorf("a listener without SO_REUSEPORT: %v, want its port %d named and the hot-restart hand-off suggested", err, port(plain))
	}
}
