package hotupgrade

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Hand-off modes (Config.Handoff, UpgradeRequest.Handoff).
const (
	// HandoffAuto hot-restarts when the hot-restart versions of the running and the new
	// binary are equal, and hands off by reuseport otherwise.
	HandoffAuto = "auto"
	// HandoffHotRestart passes the listen sockets through Envoy's hot restart (upgrade.go).
	HandoffHotRestart = "hotrestart"
	// HandoffReusePort starts the new Envoy on its own next to the old one (below).
	HandoffReusePort = "reuseport"
)

// The reuseport hand-off needs nothing from Envoy's hot restart, so it also works between
// binaries whose hot-restart versions differ (Envoy refuses to hot-restart across them),
// upgrades and downgrades alike:
//
//  1. Precheck: `--mode validate` of the new bootstrap; every listen socket of the running
//     Envoy has SO_REUSEPORT (Envoy's listeners set it unless enable_reuse_port is false);
//     its admin answers (the manager drains it through its admin); and
//     net.ipv4.tcp_migrate_req is 1 in the pod's network namespace (the manager sets it,
//     see enableMigrateReq).
//  2. The new Envoy starts as an independent process: a base id of its own (its own
//     hot-restart shared memory and sockets, --restart-epoch 0). It binds the same listener
//     addresses; with SO_REUSEPORT on both sides the kernel spreads new connections over the
//     listen sockets of both Envoys from then on. The admin address cannot be shared (Envoy
//     does not set SO_REUSEPORT on it): when the old Envoy holds the configured one, the new
//     Envoy's admin binds Config.HandoffAdminAddr (or a free port) instead (--config-yaml
//     over the bootstrap), and the next reuseport hand-off moves it back; Status.AdminAddr
//     says where it is. A hot restart from there binds the configured address again.
//  3. The manager waits for the new Envoy to be LIVE and runs the probe; until then the old
//     Envoy serves as before (both take new connections), and a failure rolls back: new
//     connections are steered to the old Envoy's sockets as in step 4, and once the new
//     Envoy has accepted what its sockets had queued its listeners are stopped, its
//     connections are drained, it is stopped.
//  4. The manager steers new connections away from the old Envoy (steering.go): a
//     sk_reuseport program attached to each reuseport group the two Envoys share sends every
//     new connection to one of the new Envoy's sockets of the group. It waits (up to
//     steerWait) until the old Envoy has accepted what its sockets had queued, and only then
//     is the old Envoy told to stop accepting: POST /drain_listeners closes its listen
//     sockets, empty. A connection that still reaches one of their queues (a handshake that
//     was under way, or the wait ran out) moves to a new Envoy's socket when the socket
//     closes (net.ipv4.tcp_migrate_req=1, and the program chooses where it goes) instead of
//     being reset. Without steering (a kernel without sk_reuseport programs, or a manager
//     without CAP_BPF and CAP_NET_ADMIN: logged, and the hand-off goes on) it relies on
//     that move alone, as it did before steering: in bench-upgrade's skew runs about 1 in
//     10,000 connection-per-request requests then timed out and more waited a second or
//     longer (issue 6), most likely connections that reached an old Envoy's queue between
//     its workers stopping accepting and its sockets closing. Then POST
//     /drain_listeners?graceful starts Envoy's drain sequence on the old Envoy's
//     connections (HTTP/1 Connection: close, GOAWAY for HTTP/2).
//  5. As for a hot restart, the old Envoy is stopped when its connections reach zero (idle
//     ones are closed after DrainIdle, see awaitDrained) or DrainTimeout passes, and its
//     shared memory is removed. The steering program is detached (the kernel hashes over
//     the new Envoy's sockets again) and released.
//
// A manager that dies mid-hand-off leaves the program attached, steering to the sockets it
// last chose, and nothing stranded: the kernel removes a socket from the program's map when
// the socket closes, a selection from an empty slot falls back to the kernel's hash over
// the group, and the program never drops a connection; it goes with the group's last socket
// or is replaced by the next hand-off's (see package steer). The copies of Envoy's sockets
// the manager held close with it (a socket Envoy had closed meanwhile closes then, and its
// queue moves). A restarted manager that rolls the hand-off back (recover) steers back to
// the old Envoy first, as any rollback does.
//
// Stats do not carry over (they do through a hot restart): the new Envoy's counters start
// at zero.

// precheckResult is what the precheck decided.
type precheckResult struct {
	configPath, version string
	handoff             string // HandoffHotRestart or HandoffReusePort
	adminOverride       string // reuseport: the new Envoy's admin address, if not the configured one
}

func (m *Manager) precheck(ctx context.Context, req UpgradeRequest, old *process, epoch int, running string, adminClosed bool, ports map[int]bool) (precheckResult, error) {
	var pc precheckResult
	switch req.Handoff {
	case HandoffAuto, HandoffHotRestart, HandoffReusePort:
	default:
		return pc, fmt.Errorf("hand-off %q is not %s, %s or %s", req.Handoff, HandoffAuto, HandoffHotRestart, HandoffReusePort)
	}
	if err := checkBinary(req.Binary); err != nil {
		return pc, err
	}
	if _, _, err := net.SplitHostPort(req.AdminAddr); err != nil {
		return pc, fmt.Errorf("admin address %q: %w", req.AdminAddr, err)
	}
	var err error
	if pc.version, err = Version(ctx, req.Binary); err != nil {
		return pc, err
	}
	hrv, err := HotRestartVersion(ctx, req.Binary)
	if err != nil {
		return pc, err
	}
	switch {
	case req.Handoff == HandoffReusePort, req.Handoff == HandoffAuto && hrv != running:
		pc.handoff = HandoffReusePort
	case hrv != running:
		return pc, fmt.Errorf("%w: %s has %q, the running Envoy %q (hand off with %q or %q instead)",
			ErrIncompatible, req.Binary, hrv, running, HandoffReusePort, HandoffAuto)
	default:
		pc.handoff = HandoffHotRestart
	}
	if pc.handoff == HandoffReusePort {
		if adminClosed {
			return pc, fmt.Errorf("the running Envoy's admin listener is closed (a hot-restart hand-off to it was rolled back), and the %s hand-off drains it through its admin: upgrade with hand-off %q first", HandoffReusePort, HandoffHotRestart)
		}
		if err := checkReusePort(old.pid(), ports); err != nil {
			return pc, err
		}
		if req.AdminAddr == old.adminAddr {
			if pc.adminOverride, err = m.handoffAdmin(old.adminAddr); err != nil {
				return pc, err
			}
		}
		if err := enableMigrateReq(m.cfg.Logger.Info); err != nil {
			return pc, err
		}
	}
	if pc.configPath, err = m.writeBootstrap(epoch, req.Bootstrap); err != nil {
		return pc, err
	}
	if err := validateBootstrap(ctx, req.Binary, pc.configPath, pc.adminOverride); err != nil {
		return pc, err
	}
	return pc, nil
}

// handoffAdmin picks the admin address of an Envoy started next to one whose admin is on
// taken.
func (m *Manager) handoffAdmin(taken string) (string, error) {
	if a := m.cfg.HandoffAdminAddr; a != "" && a != taken {
		return a, nil
	}
	host, _, _ := net.SplitHostPort(taken)
	l, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
	if err != nil {
		return "", fmt.Errorf("find a free admin port on %s for the new Envoy (or set HandoffAdminAddr): %w", host, err)
	}
	defer l.Close()
	return l.Addr().String(), nil
}

const migrateReqPath = "/proc/sys/net/ipv4/tcp_migrate_req"

// enableMigrateReq sets net.ipv4.tcp_migrate_req to 1 in the manager's network namespace
// (the pod's, which Envoy shares): when a listen socket of a SO_REUSEPORT group is closed,
// the kernel then moves the connections in its accept queue, and the half-open ones, to
// another socket of the group instead of resetting them (Linux 5.14+). The manager leaves
// it set: the setting changes nothing but what happens to such queued connections, and
// putting 0 back could reset the queue of a hand-off another manager in the same network
// namespace runs at that moment. logf reports a change.
func enableMigrateReq(logf func(msg string, args ...any)) error {
	b, err := os.ReadFile(migrateReqPath)
	if err != nil {
		return fmt.Errorf("read %s: %w (the reuseport hand-off needs Linux 5.14+ for net.ipv4.tcp_migrate_req)", migrateReqPath, err)
	}
	was := strings.TrimSpace(string(b))
	if was == "1" {
		return nil
	}
	if err := os.WriteFile(migrateReqPath, []byte("1"), 0o644); err != nil {
		return fmt.Errorf("set net.ipv4.tcp_migrate_req=1 (it is %s): %w; without it connections queued on the old Envoy's listeners are reset when it stops accepting. Run the manager with CAP_NET_ADMIN in the pod's network namespace, or set the sysctl for the pod (securityContext.sysctls, after allowing it in the kubelet's --allowed-unsafe-sysctls)", was, err)
	}
	logf("hotupgrade: set net.ipv4.tcp_migrate_req=1 for reuseport hand-offs (left set)", "was", was)
	return nil
}

// checkReusePort checks that every listen socket process pid holds on ports has
// SO_REUSEPORT, so that a second Envoy can bind the same addresses. It reads the option
// through copies of the sockets (pidfd_getfd: root or CAP_SYS_PTRACE).
func checkReusePort(pid int, ports map[int]bool) error {
	if len(ports) == 0 {
		return nil
	}
	socks, err := listenSockets(pid, ports)
	if err != nil {
		return fmt.Errorf("check the running Envoy's listeners for SO_REUSEPORT: %w", err)
	}
	defer closeSockets(socks)
	var without []int
	for _, s := range socks {
		reuse, err := unix.GetsockoptInt(s.fd, unix.SOL_SOCKET, unix.SO_REUSEPORT)
		if port := int(s.addr.Port()); err == nil && reuse == 0 && !slices.Contains(without, port) {
			without = append(without, port)
		}
	}
	if len(without) > 0 {
		slices.Sort(without)
		return fmt.Errorf("the running Envoy's listeners on ports %v do not set SO_REUSEPORT, so a second Envoy cannot bind them: remove enable_reuse_port: false from those listeners, or hand off with %q", without, HandoffHotRestart)
	}
	return nil
}

// promoteLocked makes child the serving Envoy and old the draining one; m.mu is held.
func (m *Manager) promoteLocked(child, old *process, req UpgradeRequest, si serverInfo) {
	m.current, m.bootstrap, m.admin, m.baseID = child, req.Bootstrap, req.AdminAddr, child.baseID
	m.child, m.draining, m.drainDeadline = nil, old, time.Now().Add(m.cfg.DrainTimeout)
	m.status.Epoch, m.status.Version, m.status.Binary = child.epoch, child.version, child.binary
	m.status.HotRestartVersion, m.status.PID, m.status.Started = si.HotRestartVersion, child.pid(), child.started
	m.status.AdminAddr, m.status.BaseID = child.adminAddr, child.baseID
	m.status.AdminClosed = false
}

// upgradeReusePort runs steps 2-5 of a reuseport hand-off (see above) once the precheck
// passed.
func (m *Manager) upgradeReusePort(ctx context.Context, req UpgradeRequest, old *process, pc precheckResult, ports map[int]bool,
	res UpgradeResult, reject func(error) (UpgradeResult, error)) (UpgradeResult, error) {
	baseID, err := m.chooseBaseID()
	if err != nil {
		return reject(err)
	}
	// 2. Start the new Envoy next to the old one.
	m.mu.Lock()
	m.ports, m.handoff = ports, HandoffReusePort
	m.mu.Unlock()
	m.setPhase(PhaseHandingOff)
	hstart := time.Now()
	child, err := startProcess(processConfig{
		binary: req.Binary, version: pc.version, configPath: pc.configPath, adminAddr: req.AdminAddr, adminOverride: pc.adminOverride,
		epoch: res.ToEpoch, baseID: baseID, restartEpoch: 0, drain: m.cfg.drainArgs(), extraArgs: m.cfg.ExtraArgs, stdout: m.cfg.Output,
	})
	if err != nil {
		_ = removeShm(baseID)
		return reject(err)
	}
	si, err := m.startedChild(ctx, child)
	res.HandoffMS = time.Since(hstart).Milliseconds()
	if err != nil {
		return m.rollbackReusePort(res, child, old, ports, false, fmt.Errorf("hand-off: %w", err), nil)
	}

	// 3. Probe: both Envoys accept connections meanwhile.
	if m.cfg.Probe != nil {
		m.setPhase(PhaseProbing)
		pstart := time.Now()
		err := m.probe(ctx, child)
		res.ProbeMS = time.Since(pstart).Milliseconds()
		if err != nil {
			return m.rollbackReusePort(res, child, old, ports, true, err, nil)
		}
	}
	if !child.alive() {
		return m.rollbackReusePort(res, child, old, ports, true, fmt.Errorf("envoy epoch %d exited: %v", child.epoch, child.err), nil)
	}

	// 4. New connections go to the new Envoy only; once the old Envoy has accepted what
	// its sockets had queued, it stops accepting.
	dstart := time.Now()
	st := m.steerAway(nil, old, child, ports)
	if err := stopAccepting(ctx, old, ports, m.cfg.HandoffTimeout); err != nil {
		if listening(old.pid(), ports) {
			return m.rollbackReusePort(res, child, old, ports, true, err, st)
		}
		m.cfg.Logger.Warn("hotupgrade: drain the old Envoy", "epoch", old.epoch, "error", err)
	}
	m.mu.Lock()
	m.promoteLocked(child, old, req, si)
	relays := append([]*relay{m.relay}, m.standins...)
	m.relay, m.standins = nil, nil
	m.mu.Unlock()

	// 5. Stop the old Envoy when its connections are gone.
	m.setPhase(PhaseDraining)
	res.OldConnections, res.OldStopped = m.awaitDrained(ctx, old, ports, adminIdle(old.adminAddr), m.cfg.DrainTimeout)
	_ = old.stop(5 * time.Second)
	m.retire(old, relays)
	st.close(m, child)
	res.DrainMS = time.Since(dstart).Milliseconds()
	if old.configPath != pc.configPath {
		_ = os.Remove(old.configPath)
	}
	res.Outcome = OutcomeUpgraded
	m.setPhase(PhaseServing)
	return res, nil
}

// rollbackReusePort rolls a reuseport hand-off back (see rollback): a new Envoy that
// listens gets no new connections from then on, and stops accepting once it has accepted
// what its sockets had queued, as the old one would have (see steerAway). st is the
// hand-off's steering, if it got that far.
func (m *Manager) rollbackReusePort(res UpgradeResult, child, old *process, ports map[int]bool, accepting bool, cause error, st *steering) (UpgradeResult, error) {
	if child.alive() && listening(child.pid(), ports) {
		st = m.steerAway(st, child, old, ports)
	}
	res, err := m.rollback(res, nil, child, ports, accepting, cause)
	st.close(m, old)
	return res, err
}

// retire forgets an old Envoy that a reuseport hand-off replaced and that has exited: its
// shared memory, and the relays of its base id (the new Envoy has a base id of its own, so
// none of them has anything left to do).
func (m *Manager) retire(old *process, relays []*relay) {
	for _, r := range relays {
		if r != nil {
			_ = r.Close()
		}
	}
	if err := removeShm(old.baseID); err != nil {
		m.cfg.Logger.Warn("hotupgrade: remove the old Envoy's shared memory", "error", err)
	}
	m.mu.Lock()
	m.draining, m.ports, m.handoff = nil, nil, ""
	m.mu.Unlock()
}

// stopAccepting tells an Envoy to close its listen sockets (POST /drain_listeners: the
// kernel migrates what is still queued, see enableMigrateReq and steerAway) and then to
// drain its connections (POST /drain_listeners?graceful: Connection: close, GOAWAY), and
// waits until it holds no listen socket on ports. Listeners are stopped first: a manager
// that dies in between leaves an Envoy that no longer listens, which a restarted manager
// recognizes as told to drain, and finishes (see recover).
func stopAccepting(ctx context.Context, p *process, ports map[int]bool, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	if _, err := admin(ctx, http.MethodPost, p.adminAddr, "/drain_listeners"); err != nil {
		return fmt.Errorf("stop the listeners of envoy epoch %d (admin %s): %w", p.epoch, p.adminAddr, err)
	}
	if _, err := admin(ctx, http.MethodPost, p.adminAddr, "/drain_listeners?graceful"); err != nil {
		return fmt.Errorf("start the drain of envoy epoch %d (admin %s): %w", p.epoch, p.adminAddr, err)
	}
	if !stoppedListening(ctx, p, ports, timeout) {
		return fmt.Errorf("envoy epoch %d still listens on %v after POST /drain_listeners", p.epoch, sortedPorts(ports))
	}
	return nil
}

func sortedPorts(ports map[int]bool) []int {
	var out []int
	for p := range ports {
		out = append(out, p)
	}
	slices.Sort(out)
	return out
}
