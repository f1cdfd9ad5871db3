package hotupgrade

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/meshturbo/meshturbo/internal/testenv"
)

// burst opens new connections as fast as workers goroutines can, one request each, until
// stopped: the connections that are in a listener's accept queue when it closes.
type burst struct {
	testenv.Tally
	stop chan struct{}
	wg   sync.WaitGroup
}

func startBurst(t testing.TB, addr string, workers int) *burst {
	b := &burst{stop: make(chan struct{})}
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	for range workers {
		b.wg.Add(1)
		go func() {
			defer b.wg.Done()
			for {
				select {
				case <-b.stop:
					return
				default:
				}
				b.Record(testenv.PostOK(client, "http://"+addr+"/", nil))
			}
		}()
	}
	t.Cleanup(b.finish)
	return b
}

func (b *burst) finish() {
	select {
	case <-b.stop:
	default:
		close(b.stop)
	}
	b.wg.Wait()
}

// requireRoot skips tests that need root: the reuseport hand-off sets a sysctl and reads
// Envoy's sockets through pidfd_getfd.
func requireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: sets net.ipv4.tcp_migrate_req and reads Envoy's sockets (pidfd_getfd)")
	}
}

// Envoy 1.39.3 and 1.40.0 share a hot-restart version, so Handoff "reuseport" forces the
// path version skew takes: upgrades and downgrades alternate under constant load plus a
// burst of new connections, and no request fails. Each hand-off (and the rollback) steers
// new connections away from the Envoy that stops accepting; a connection-per-request
// client lost about 1 in 10,000 requests without that (issue 6).
func TestReusePortHandoffAcrossVersions(t *testing.T) {
	requireRoot(t)
	deps := testenv.RequireDeps(t)
	var failProbe atomic.Bool
	logs := &logCounter{match: []string{msgSteered, msgQueued, msgUnsteered}}
	f := newFixture(t, deps.EnvoyOld, func(c *Config) {
		logs.Handler = c.Logger.Handler()
		c.Logger = slog.New(logs)
		c.Handoff = HandoffReusePort
		c.ProbeTimeout = time.Second
		c.Probe = func(context.Context) error {
			if failProbe.Load() {
				return errors.New("probe says no")
			}
			return nil
		}
	})
	ls := startLoads(t, f.listen, 150, modeKeepAlive, modeClose, modeH2C)
	b := startBurst(t, f.listen, 8)
	version := map[string]string{deps.Envoy: deps.EnvoyVersion, deps.EnvoyOld: deps.EnvoyOldVersion}
	for i, bin := range []string{deps.Envoy, deps.EnvoyOld, deps.Envoy, deps.EnvoyOld} {
		before := f.m.Status()
		tag := fmt.Sprint("skew", i+1)
		res := f.upgrade(t, UpgradeRequest{Binary: bin, Bootstrap: f.bootstrap(tag)})
		st := f.m.Status()
		if res.Handoff != HandoffReusePort || st.Version != version[bin] || st.Binary != bin || st.BaseID == before.BaseID {
			t.Fatalf("result %+v, status %+v; want a reuseport hand-off to %s with a new base id", res, st, version[bin])
		}
		// The admin address alternates: the new Envoy cannot bind the one the old holds.
		if wantOther := before.AdminAddr == f.admin; (st.AdminAddr != f.admin) != wantOther {
			t.Errorf("admin of the new Envoy %s (old: %s, configured: %s)", st.AdminAddr, before.AdminAddr, f.admin)
		}
		if _, err := os.Stat(shmPath(before.BaseID)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("the old Envoy's shared memory %s is left (%v)", shmPath(before.BaseID), err)
		}
		if syscall.Kill(before.PID, 0) == nil && !isZombie(before.PID) {
			t.Errorf("the old Envoy (pid %d) still runs", before.PID)
		}
		f.expectConfig(t, tag)
		checkSteeringReleased(t, st.PID)
	}

	// A new Envoy that fails its probe is stopped, with new connections steered back to the
	// old one first.
	failProbe.Store(true)
	before := f.m.Status()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	res, err := f.m.Upgrade(ctx, UpgradeRequest{Bootstrap: f.bootstrap("unprobed")})
	cancel()
	if err == nil || res.Outcome != OutcomeRolledBack || res.Handoff != HandoffReusePort {
		t.Fatalf("upgrade with a failing probe: %+v, %v; want a rolled-back reuseport hand-off", res, err)
	}
	if st := f.m.Status(); st.PID != before.PID || st.BaseID != before.BaseID || st.Phase != PhaseServing {
		t.Fatalf("status after the rollback %+v, before %+v", st, before)
	}
	f.expectConfig(t, "skew4")
	checkSteeringReleased(t, before.PID)
	failProbe.Store(false)

	// Back to hot restart from an Envoy whose admin is elsewhere: the configured one again.
	f.upgrade(t, UpgradeRequest{Bootstrap: f.bootstrap("moved")})
	res = f.upgrade(t, UpgradeRequest{Bootstrap: f.bootstrap("hot"), Handoff: HandoffHotRestart})
	if st := f.m.Status(); res.Handoff != HandoffHotRestart || st.AdminAddr != f.admin {
		t.Errorf("hot restart: result %+v, admin %s; want the configured admin %s", res, st.AdminAddr, f.admin)
	}
	f.expectConfig(t, "hot")

	b.finish()
	ok, failed := b.Counts()
	t.Logf("burst of new connections: ok=%d failed=%d", ok, failed)
	if failed > 0 || ok == 0 {
		t.Errorf("burst: %d ok, %d failed; first errors: %v", ok, failed, b.Errors())
	}
	for _, l := range ls {
		ok, failed, retried, errs := l.finish()
		t.Logf("load %-16s ok=%d failed=%d (retried unseen by Envoy: %d)", l.mode, ok, failed, retried)
		if failed > 0 || ok == 0 {
			t.Errorf("load %s: %d ok, %d failed; first errors:\n  %s", l.mode, ok, failed, strings.Join(errs, "\n  "))
		}
	}
	// Four hand-offs, the rollback, and the hand-off back before the hot restart.
	// An Envoy that has not emptied its accept queues after steerWait (a very slow machine)
	// still had new connections steered away.
	n, q, u := logs.count(msgSteered), logs.count(msgQueued), logs.count(msgUnsteered)
	t.Logf("steering: %d hand-offs with the accept queues emptied, %d with some left after %v, %d without steering", n, q, steerWait, u)
	if n+q != 6 || u != 0 {
		t.Errorf("%d hand-offs steered new connections away from the Envoy that stopped accepting, %d could not; want 6 and 0", n+q, u)
	}
}

// Log messages of steerAway.
const (
	msgSteered   = "hotupgrade: new connections steered away from the Envoy that stops accepting"
	msgQueued    = "hotupgrade: accept queues of the Envoy that stops accepting still hold"
	msgUnsteered = "hotupgrade: cannot steer new connections away"
)

// logCounter passes records on to Handler and counts those whose message starts with one
// of match.
type logCounter struct {
	slog.Handler
	match []string
	mu    sync.Mutex
	n     map[string]int
}

func (c *logCounter) Handle(ctx context.Context, r slog.Record) error {
	for _, m := range c.match {
		if strings.HasPrefix(r.Message, m) {
			c.mu.Lock()
			if c.n == nil {
				c.n = map[string]int{}
			}
			c.n[m]++
			c.mu.Unlock()
		}
	}
	return c.Handler.Handle(ctx, r)
}

func (c *logCounter) WithAttrs(as []slog.Attr) slog.Handler {
	return &logCounter{Handler: c.Handler.WithAttrs(as), match: c.match, n: c.n}
}

func (c *logCounter) WithGroup(name string) slog.Handler {
	return &logCounter{Handler: c.Handler.WithGroup(name), match: c.match, n: c.n}
}

func (c *logCounter) count(m string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.n[m]
}

// checkSteeringReleased checks that the manager (this process) holds no BPF object and no
// copy of a socket of the Envoy envoyPID once a hand-off is over: a copy of a listen socket
// would keep it listening after Envoy closes it.
func checkSteeringReleased(t *testing.T, envoyPID int) {
	t.Helper()
	envoy, err := socketInodes(envoyPID)
	if err != nil {
		t.Fatal(err)
	}
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		link, err := os.Readlink("/proc/self/fd/" + e.Name())
		if err != nil {
			continue
		}
		var ino uint64
		if strings.HasPrefix(link, "anon_inode:bpf") {
			t.Errorf("the manager still holds fd %s: %s", e.Name(), link)
		} else if _, err := fmt.Sscanf(link, "socket:[%d]", &ino); err == nil && envoy[ino] {
			t.Errorf("the manager still holds fd %s: a copy of Envoy's socket %s", e.Name(), link)
		}
	}
}

func isZombie(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true
	}
	for i := len(b) - 1; i > 0; i-- {
		if b[i] == ')' {
			return i+2 < len(b) && b[i+2] == 'Z'
		}
	}
	return false
}

// The kernel mechanism the reuseport hand-off relies on, without Envoy: connections that
// wait in the accept queue of a SO_REUSEPORT listener when it is closed move to another
// listener of the group with net.ipv4.tcp_migrate_req=1 (set by enableMigrateReq).
func TestMigrateReqMovesQueuedConnections(t *testing.T) {
	requireRoot(t)
	if err := enableMigrateReq(t.Logf); err != nil {
		t.Fatal(err)
	}
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1) })
		return errors.Join(err, serr)
	}}
	first, err := lc.Listen(context.Background(), "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer first.Close()
	second, err := lc.Listen(context.Background(), "tcp", first.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer second.Close()
	// Nobody accepts yet: the kernel spreads the connections over both queues.
	const n = 64
	var conns []net.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for range n {
		c, err := net.Dial("tcp", first.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
	}
	queued := queueLen(t, first)
	if queued == 0 || queued == n {
		t.Fatalf("%d of %d connections queued on the first listener; want them spread over both", queued, n)
	}
	first.Close()
	accepted := 0
	for range n {
		_ = second.(*net.TCPListener).SetDeadline(time.Now().Add(2 * time.Second))
		c, err := second.Accept()
		if err != nil {
			break
		}
		accepted++
		c.Close()
	}
	t.Logf("%d connections were queued on the closed listener; the other accepted %d of %d", queued, accepted, n)
	if accepted != n {
		t.Errorf("the remaining listener accepted %d of %d connections: the closed one's queue was not migrated", accepted, n)
	}
}

// queueLen is a listener's accept queue length (its rx_queue in /proc/net/tcp).
func queueLen(t *testing.T, l net.Listener) int {
	t.Helper()
	f, err := l.(*net.TCPListener).File()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile("/proc/net/tcp")
	if err != nil {
		t.Fatal(err)
	}
	var n int
	for _, line := range splitLines(string(b)) {
		var sl, local, remote, state, queues, rest string
		var inode uint64
		if _, err := fmt.Sscan(line, &sl, &local, &remote, &state, &queues, &rest, &rest, &rest, &rest, &inode); err != nil || inode != st.Ino {
			continue
		}
		var tx, rx int
		fmt.Sscanf(queues, "%x:%x", &tx, &rx)
		n = rx
	}
	return n
}

func splitLines(s string) []string {
	var out []string
	for len(s) > 0 {
		i := 0
		for i < len(s) && s[i] != '\n' {
			i++
		}
		out = append(out, s[:i])
		if i < len(s) {
			i++
		}
		s = s[i:]
	}
	return out
}
