package hotupgrade

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"
)

// An upgrade replaces the serving Envoy (epoch N) by epoch N+1 through Envoy's hot restart,
// with the manager's relay on the hot-restart sockets (see relay), unless it hands off by
// reuseport (handoff.go: version skew, or Handoff "reuseport"). The hot-restart sequence, as
// Envoy 1.39/1.40 run it:
//
//  1. Precheck, nothing started yet: the new binary's --hot-restart-version must equal the
//     running Envoy's (its admin /server_info, read when it became LIVE; with Handoff "auto"
//     a difference picks the reuseport hand-off instead), and
//     `--mode validate` must accept the new bootstrap.
//  2. Start epoch N+1: same --base-id and worker count, its own --socket-path. Its first
//     request is ShutdownAdmin: epoch N closes its admin listener (for good) so that N+1
//     can bind the same admin address. Then N+1 asks for each listen socket per worker
//     (PassListenSocket, the fd comes back over SCM_RIGHTS), initializes, starts its workers
//     (from now on both epochs accept on the same sockets) and sends DrainListeners.
//  3. The relay holds DrainListeners. The manager waits for N+1's admin to answer LIVE with
//     restart_epoch N+1, then runs the probe.
//  4. The relay passes DrainListeners on: epoch N closes its listen sockets (N+1 keeps the
//     same sockets, so nothing queued is lost) and starts draining: each HTTP/1 response
//     carries Connection: close, HTTP/2 connections get GOAWAY.
//  5. The manager polls epoch N's TCP sockets (/proc) until it holds no listen socket and no
//     connection on the listener ports, or DrainTimeout passes; then it stops it (SIGTERM).
//     Connections that have been idle HTTP connections for DrainIdle (no request in flight:
//     its gauges, asked over the hot-restart socket since its admin is closed) are closed
//     on the way (see awaitDrained).
//     Envoy's own --parent-shutdown-time-s timer has no say: the relay keeps N+1's Terminate.
//
// A failure before step 4 rolls back: epoch N+1 is stopped (gracefully if it was already
// accepting: its listeners stop, the parent still holds the sockets, and its connections are
// told to close), the hot-restart "initializing" flag it may have left in shared memory is
// cleared, and epoch N serves on. Only its admin listener is lost (step 2).

// UpgradeRequest names what the next epoch runs. Empty fields keep the current value.
type UpgradeRequest struct {
	Binary    string
	Bootstrap []byte
	// AdminAddr is the admin address the new bootstrap configures, if it changes.
	AdminAddr string
	// Handoff overrides Config.Handoff for this upgrade: HandoffAuto, HandoffHotRestart or
	// HandoffReusePort.
	Handoff string
}

// Outcomes of an upgrade.
const (
	OutcomeUpgraded   = "upgraded"
	OutcomeRejected   = "rejected"    // the precheck failed; nothing was started
	OutcomeRolledBack = "rolled_back" // the new epoch failed and was stopped; the old one serves
)

// UpgradeResult describes one upgrade.
type UpgradeResult struct {
	Outcome     string `json:"outcome"`
	Error       string `json:"error,omitempty"`
	FromEpoch   int    `json:"from_epoch"`
	ToEpoch     int    `json:"to_epoch"`
	FromVersion string `json:"from_version"`
	ToVersion   string `json:"to_version,omitempty"`
	// Handoff is how the listeners were handed over: HandoffHotRestart or HandoffReusePort.
	Handoff    string    `json:"handoff,omitempty"`
	Started    time.Time `json:"started"`
	PrecheckMS int64     `json:"precheck_ms"`
	HandoffMS  int64     `json:"handoff_ms"` // start of the new epoch until LIVE
	ProbeMS    int64     `json:"probe_ms"`
	DrainMS    int64     `json:"drain_ms"` // DrainListeners until the old epoch exited
	TotalMS    int64     `json:"total_ms"`
	// OldConnections is how many connections the old epoch held when it was told to drain;
	// OldStopped says why it was stopped.
	OldConnections int    `json:"old_connections"`
	OldStopped     string `json:"old_stopped,omitempty"`
	// ClearedInitializing: the failed epoch had left Envoy's "initializing" flag set in shared
	// memory, and the manager cleared it so the next upgrade can start.
	ClearedInitializing bool `json:"cleared_initializing,omitempty"`
}

var (
	// ErrUpgradeInProgress is returned by TryUpgrade while another upgrade runs.
	ErrUpgradeInProgress = errors.New("hotupgrade: an upgrade is in progress")
	// ErrClosed is returned by upgrades requested after Close.
	ErrClosed = errors.New("hotupgrade: manager closed")
	// ErrIncompatible: the new binary's hot-restart version differs from the running one's.
	ErrIncompatible = errors.New("hot-restart versions differ")
)

// Upgrade replaces the running Envoy by a new epoch running req, waiting for an upgrade in
// progress to finish first (upgrades never interleave). It returns when the old epoch has
// been stopped, or the new one rolled back. The error is nil only for OutcomeUpgraded.
func (m *Manager) Upgrade(ctx context.Context, req UpgradeRequest) (UpgradeResult, error) {
	select {
	case <-m.life.Done():
		return UpgradeResult{}, ErrClosed
	default:
	}
	select {
	case m.sem <- struct{}{}:
	case <-ctx.Done():
		return UpgradeResult{}, ctx.Err()
	case <-m.life.Done():
		return UpgradeResult{}, ErrClosed
	}
	defer func() { <-m.sem }()
	return m.upgrade(ctx, req)
}

// TryUpgrade is Upgrade, but fails with ErrUpgradeInProgress instead of waiting.
func (m *Manager) TryUpgrade(ctx context.Context, req UpgradeRequest) (UpgradeResult, error) {
	select {
	case <-m.life.Done():
		return UpgradeResult{}, ErrClosed
	default:
	}
	select {
	case m.sem <- struct{}{}:
	default:
		return UpgradeResult{}, ErrUpgradeInProgress
	}
	defer func() { <-m.sem }()
	return m.upgrade(ctx, req)
}

func (m *Manager) upgrade(ctx context.Context, req UpgradeRequest) (res UpgradeResult, err error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	defer context.AfterFunc(m.life, cancel)()

	start := time.Now()
	m.mu.Lock()
	old, bootstrap, hrVersion, configured, adminClosed := m.current, m.bootstrap, m.status.HotRestartVersion, m.admin, m.status.AdminClosed
	m.mu.Unlock()
	res = UpgradeResult{FromEpoch: old.epoch, ToEpoch: old.epoch + 1, FromVersion: old.version, Started: start}
	defer func() {
		res.TotalMS = time.Since(start).Milliseconds()
		m.record(res)
		if err != nil {
			m.cfg.Logger.Warn("envoy upgrade failed", "outcome", res.Outcome, "from_epoch", res.FromEpoch, "error", err)
		} else {
			m.cfg.Logger.Info("envoy upgraded", "epoch", res.ToEpoch, "version", res.ToVersion,
				"handoff_ms", res.HandoffMS, "drain_ms", res.DrainMS, "old_stopped", res.OldStopped)
		}
	}()
	reject := func(err error) (UpgradeResult, error) {
		res.Outcome, res.Error = OutcomeRejected, err.Error()
		m.mu.Lock()
		m.ports, m.handoff = nil, ""
		m.mu.Unlock()
		m.setPhase(PhaseServing)
		return res, fmt.Errorf("hotupgrade: upgrade to epoch %d rejected: %w", res.ToEpoch, err)
	}
	if !old.alive() {
		return reject(fmt.Errorf("envoy epoch %d is not running", old.epoch))
	}
	if req.Binary == "" {
		req.Binary = old.binary
	}
	if req.Bootstrap == nil {
		req.Bootstrap = bootstrap
	}
	if req.AdminAddr == "" {
		req.AdminAddr = configured
	}
	if req.Handoff == "" {
		req.Handoff = m.cfg.Handoff
	}
	m.reapStandins()

	// 1. Precheck.
	m.setPhase(PhasePrechecking)
	ps, err := sockets(old.pid())
	if err != nil {
		return reject(err)
	}
	ports := ps.listenPorts
	if _, p, err := net.SplitHostPort(old.adminAddr); err == nil {
		n, _ := strconv.Atoi(p)
		delete(ports, n)
	}
	pc, err := m.precheck(ctx, req, old, res.ToEpoch, hrVersion, adminClosed, ports)
	res.ToVersion, res.Handoff, res.PrecheckMS = pc.version, pc.handoff, time.Since(start).Milliseconds()
	if err != nil {
		return reject(err)
	}
	configPath, version := pc.configPath, pc.version
	if pc.handoff == HandoffReusePort {
		return m.upgradeReusePort(ctx, req, old, pc, ports, res, reject)
	}
	r, err := m.relayFor(old)
	if err != nil {
		return reject(err)
	}
	sctx, scancel := context.WithTimeout(ctx, m.cfg.HandoffTimeout)
	err = r.startChild(sctx)
	scancel()
	if err != nil {
		return reject(err)
	}
	// A previous manager run, or an epoch that died in a way not seen here, may have left
	// the flag; the serving epoch has cleared its own, and nothing else is starting.
	if cleared, err := clearInitializing(old.baseID); err == nil && cleared {
		res.ClearedInitializing = true
	}

	// 2. Start the next epoch and wait for it to be LIVE.
	m.mu.Lock()
	m.ports, m.handoff = ports, HandoffHotRestart
	m.mu.Unlock()
	m.setPhase(PhaseHandingOff)
	hstart := time.Now()
	inherit, inherited := r.inherit()
	child, err := startProcess(processConfig{
		binary: req.Binary, version: version, configPath: configPath, adminAddr: req.AdminAddr,
		epoch: res.ToEpoch, baseID: old.baseID, restartEpoch: old.restartEpoch + 1, drain: m.cfg.drainArgs(), extraArgs: m.cfg.ExtraArgs, stdout: m.cfg.Output,
		inherit: inherit,
	})
	inherited()
	if err != nil {
		r.childExited()
		return reject(err)
	}
	si, err := m.startedChild(ctx, child)
	res.HandoffMS = time.Since(hstart).Milliseconds()
	if err != nil {
		return m.rollback(res, r, child, ports, false, fmt.Errorf("hand-off: %w; %s", err, r.state()))
	}

	// 3. Probe.
	if m.cfg.Probe != nil {
		m.setPhase(PhaseProbing)
		pstart := time.Now()
		err := m.probe(ctx, child)
		res.ProbeMS = time.Since(pstart).Milliseconds()
		if err != nil {
			return m.rollback(res, r, child, ports, true, err)
		}
	}

	// 4. Let the old epoch drain; the new one serves from now on.
	dstart := time.Now()
	r.release()
	select {
	case <-r.drained():
	case <-child.exited:
		return m.rollback(res, r, child, ports, true, fmt.Errorf("envoy epoch %d exited: %v", child.epoch, child.err))
	case <-time.After(m.cfg.HandoffTimeout):
		return m.rollback(res, r, child, ports, true, fmt.Errorf("envoy epoch %d never sent DrainListeners; %s", child.epoch, r.state()))
	case <-ctx.Done():
		return m.rollback(res, r, child, ports, true, ctx.Err())
	}
	m.mu.Lock()
	m.promoteLocked(child, old, req, si)
	m.standins = append(m.standins, r)
	m.relay = nil
	m.mu.Unlock()

	// 5. Stop the old epoch when its connections are gone.
	m.setPhase(PhaseDraining)
	res.OldConnections, res.OldStopped = m.awaitDrained(ctx, old, ports, relayIdle(r), m.cfg.DrainTimeout)

	_ = old.stop(5 * time.Second)
	r.parentExited()
	m.mu.Lock()
	m.draining, m.ports, m.handoff = nil, nil, ""
	m.mu.Unlock()
	res.DrainMS = time.Since(dstart).Milliseconds()
	if old.configPath != configPath {
		_ = os.Remove(old.configPath)
	}
	res.Outcome = OutcomeUpgraded
	m.setPhase(PhaseServing)
	return res, nil
}

// relayFor returns the relay whose parent is p, creating it on p's first upgrade.
func (m *Manager) relayFor(p *process) (*relay, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.relay != nil {
		return m.relay, nil
	}
	r, err := newRelay(p.baseID, p.restartEpoch, m.cfg.Logger, m.relayHook())
	if err != nil {
		return nil, err
	}
	m.relay = r
	return r, nil
}

// relayHook is the test hook for relays, nil outside tests.
func (m *Manager) relayHook() func(hrKind) {
	h := m.cfg.hooks.relayRequest
	if h == nil {
		return nil
	}
	return func(k hrKind) {
		m.mu.Lock()
		c := m.child
		m.mu.Unlock()
		h(c, k)
	}
}

func (m *Manager) setChild(c *process) {
	m.mu.Lock()
	m.child = c
	m.mu.Unlock()
}

// reapStandins closes relays that have nothing left to answer.
func (m *Manager) reapStandins() {
	m.mu.Lock()
	var keep, done []*relay
	for _, r := range m.standins {
		if r.finished() {
			done = append(done, r)
		} else {
			keep = append(keep, r)
		}
	}
	m.standins = keep
	m.mu.Unlock()
	for _, r := range done {
		_ = r.Close()
	}
}

// probe runs the configured probe until it passes, the child exits, or ProbeTimeout ends.
func (m *Manager) probe(ctx context.Context, child *process) error {
	ctx, cancel := context.WithTimeout(ctx, m.cfg.ProbeTimeout)
	defer cancel()
	var last error
	for {
		if last = m.cfg.Probe(ctx); last == nil {
			return nil
		}
		select {
		case <-child.exited:
			return fmt.Errorf("envoy epoch %d exited during the probe: %v (probe: %w)", child.epoch, child.err, last)
		case <-ctx.Done():
			return fmt.Errorf("probe of epoch %d failed: %w", child.epoch, last)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// idleFunc reports whether an Envoy's downstream connections are all HTTP connections with
// no request in flight, from its gauges.
type idleFunc func(ctx context.Context) (bool, error)

// httpIdle reads Envoy gauges: every listener connection is an HTTP connection
// (listener.*.downstream_cx_active <= http.*.downstream_cx_active) and no request is in
// flight (http.*.downstream_rq_active == 0). The admin listener does not count.
func httpIdle(g map[string]uint64) bool {
	var listenerCx, httpCx, rqActive uint64
	for name, v := range g {
		switch {
		case strings.HasPrefix(name, "http.admin."), strings.HasPrefix(name, "listener.admin."):
		case strings.HasPrefix(name, "http.") && strings.HasSuffix(name, ".downstream_rq_active"):
			rqActive += v
		case strings.HasPrefix(name, "http.") && strings.HasSuffix(name, ".downstream_cx_active"):
			httpCx += v
		case strings.HasPrefix(name, "listener.") && strings.HasSuffix(name, ".downstream_cx_active") &&
			!strings.Contains(name, ".worker_") && !strings.Contains(name, ".main_thread."):
			listenerCx += v
		}
	}
	return rqActive == 0 && listenerCx <= httpCx
}

// adminIdle asks an Envoy's admin for its gauges.
func adminIdle(addr string) idleFunc {
	return func(ctx context.Context) (bool, error) {
		body, err := admin(ctx, http.MethodGet, addr, "/stats?usedonly&filter=downstream_(rq|cx)_active")
		if err != nil {
			return false, err
		}
		g := map[string]uint64{}
		for _, line := range strings.Split(string(body), "\n") {
			name, val, ok := strings.Cut(line, ": ")
			if n, err := strconv.ParseUint(strings.TrimSpace(val), 10, 64); ok && err == nil {
				g[name] = n
			}
		}
		return httpIdle(g), nil
	}
}

// relayIdle asks a draining parent, whose admin is closed, through the hot-restart relay.
func relayIdle(r *relay) idleFunc {
	return func(ctx context.Context) (bool, error) {
		g, err := r.parentStats(ctx)
		if err != nil {
			return false, err
		}
		return httpIdle(g), nil
	}
}

// awaitDrained waits until p holds neither a listen socket nor a connection on ports (twice
// in a row, 20 ms apart), or DrainTimeout passes, or ctx ends. It returns the connections p
// had at the start and why it stopped waiting.
//
// Idle connections are closed rather than waited for: a client that keeps a connection
// without using it never gets Envoy's Connection: close, and Envoy 1.40 leaves open the
// connections it accepted in the same loop as its listener stop, after answering them with
// Connection: close (a client reading to EOF waits on them until its timeout). Once p's
// remaining connections have been idle HTTP connections (no request in flight, see
// httpIdle) for DrainIdle, those with nothing queued are shut down while p runs
// (closeQuiet, see the package doc), and p's own close of them brings the count to zero.
// Without the rights to do that, p is stopped with them.
func (m *Manager) awaitDrained(ctx context.Context, p *process, ports map[int]bool, idle idleFunc, timeout time.Duration) (int, string) {
	first, _, _ := downstream(p.pid(), ports)
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	zero, closed := 0, 0
	var idleSince, asked time.Time
	for {
		conns, listening, err := downstream(p.pid(), ports)
		switch {
		case err != nil:
			return first, fmt.Sprintf("exited (%v)", err)
		case conns == 0 && !listening:
			if zero++; zero == 2 {
				if closed > 0 {
					return first, fmt.Sprintf("connections reached zero (%d idle ones closed after %s)", closed, m.cfg.DrainIdle)
				}
				return first, "connections reached zero"
			}
		case !listening && idle != nil && time.Since(asked) >= 100*time.Millisecond:
			zero, asked = 0, time.Now()
			actx, cancel := context.WithTimeout(ctx, time.Second)
			ok, err := idle(actx)
			cancel()
			switch {
			case err != nil || !ok:
				idleSince = time.Time{}
			case idleSince.IsZero():
				idleSince = asked
			case asked.Sub(idleSince) >= m.cfg.DrainIdle:
				// Close the idle connections while Envoy runs, rather than kill it with
				// them: see closeQuiet and the package doc (idle keep-alive connections).
				n, err := closeQuiet(p.pid(), ports)
				if err != nil {
					m.cfg.Logger.Warn("hotupgrade: close the old Envoy's idle connections; stopping it with them", "epoch", p.epoch, "error", err)
					return first, fmt.Sprintf("%d connections idle (no request in flight) for %s", conns, m.cfg.DrainIdle)
				}
				closed += n
			}
		default:
			zero = 0
		}
		select {
		case <-p.exited:
			return first, fmt.Sprintf("exited on its own: %v", p.err)
		case <-ctx.Done():
			return first, fmt.Sprintf("upgrade cancelled with %d connections", conns)
		case <-deadline.C:
			return first, fmt.Sprintf("drain timeout with %d connections", conns)
		case <-tick.C:
		}
	}
}

// rollback stops a failed new epoch; the old one keeps serving.
func (m *Manager) rollback(res UpgradeResult, r *relay, child *process, ports map[int]bool, accepting bool, cause error) (UpgradeResult, error) {
	m.setPhase(PhaseRollingBack)
	// A child that sent DrainListeners has started its workers, LIVE seen or not; one that
	// hands off by reuseport accepts once it listens on the ports.
	accepting = accepting || r != nil && r.saw(reqDrainListeners) || r == nil && listening(child.pid(), ports)
	if accepting && child.alive() {
		// The child shares the listen sockets with the parent, which never got
		// DrainListeners. Stop the child's listeners (the parent keeps the sockets and their
		// queues), ask its clients to reconnect, and wait for its connections to end.
		ctx, cancel := context.WithTimeout(context.Background(), m.cfg.DrainTimeout)
		_, err1 := admin(ctx, http.MethodPost, child.adminAddr, "/drain_listeners")
		_, err2 := admin(ctx, http.MethodPost, child.adminAddr, "/healthcheck/fail")
		if err := errors.Join(err1, err2); err != nil {
			m.cfg.Logger.Warn("rollback: drain the new epoch", "epoch", child.epoch, "error", err)
		}
		m.awaitDrained(ctx, child, ports, adminIdle(child.adminAddr), m.cfg.DrainTimeout)
		cancel()
	}
	// A child that never accepted holds nothing worth a grace period, and one wedged in a
	// blocking hot-restart call does not act on SIGTERM at all.
	grace := time.Second
	if accepting {
		grace = 5 * time.Second
	}
	_ = child.stop(grace)
	if r != nil {
		r.childExited()
	}
	m.mu.Lock()
	m.child, m.ports, m.handoff = nil, nil, ""
	base := m.baseID
	m.mu.Unlock()
	if child.baseID != base {
		// A reuseport hand-off's Envoy had shared memory of its own.
		if err := removeShm(child.baseID); err != nil {
			m.cfg.Logger.Warn("rollback: remove the new Envoy's shared memory", "error", err)
		}
	} else if cleared, err := clearInitializing(base); err != nil {
		m.cfg.Logger.Warn("rollback: clear the hot-restart initializing flag", "error", err)
	} else if cleared {
		res.ClearedInitializing = true
	}
	if r != nil && r.saw(reqShutdownAdmin) {
		m.mu.Lock()
		m.status.AdminClosed = true
		m.mu.Unlock()
	}
	res.Outcome, res.Error = OutcomeRolledBack, cause.Error()
	m.setPhase(PhaseServing)
	return res, fmt.Errorf("hotupgrade: upgrade to epoch %d rolled back: %w", res.ToEpoch, cause)
}

func (m *Manager) record(res UpgradeResult) {
	m.mu.Lock()
	defer m.mu.Unlock()
	switch res.Outcome {
	case OutcomeUpgraded:
		m.status.Upgrades++
	case OutcomeRolledBack:
		m.status.Rollbacks++
	case OutcomeRejected:
		m.status.Rejected++
	}
	m.status.Last = &res
	m.persistLocked()
}

// startedChild records a just started Envoy as the upgrade's child (watched, in the state
// file) and waits at most HandoffTimeout for it to be LIVE.
func (m *Manager) startedChild(ctx context.Context, child *process) (serverInfo, error) {
	m.watch(child)
	m.setChild(child)
	m.persist()
	ctx, cancel := context.WithTimeout(ctx, m.cfg.HandoffTimeout)
	defer cancel()
	return waitLive(ctx, child)
}
