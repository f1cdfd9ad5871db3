package hotupgrade

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"time"
)

// adoptQuiet is how long an adopted relay lets replies owed to the dead manager arrive (and
// passes them to the child, which reads Stats replies in order) before it asks the parent
// anything itself.
const adoptQuiet = time.Second

// recover adopts the Envoys a state file names (see state.go). It returns false, having
// cleaned up, when the serving Envoy is gone, so that New starts a fresh epoch 0.
func (m *Manager) recover(ctx context.Context, st savedState) (bool, error) {
	log := m.cfg.Logger
	adopt := func(rec *procRecord) *process {
		if rec == nil {
			return nil
		}
		if rec.BaseID == 0 { // written before reuseport hand-offs
			rec.BaseID, rec.RestartEpoch = st.BaseID, rec.Epoch
		}
		p, err := adoptProcess(*rec)
		if err != nil {
			log.Info("hotupgrade: recorded Envoy not adopted", "error", err)
			return nil
		}
		return p
	}
	serving, next, draining := adopt(&st.Serving), adopt(st.Next), adopt(st.Draining)
	ports := map[int]bool{}
	for _, p := range st.Ports {
		ports[p] = true
	}
	reusePort := st.Handoff == HandoffReusePort
	m.admin = st.AdminAddr
	if m.admin == "" {
		m.admin = m.cfg.AdminAddr
	}
	res := UpgradeResult{Handoff: st.Handoff, Started: time.Now(), FromEpoch: st.Serving.Epoch, ToEpoch: st.Serving.Epoch + 1, FromVersion: st.Serving.Version}
	if st.Next != nil {
		res.ToVersion = st.Next.Version
	}
	if st.Draining != nil {
		res.FromEpoch, res.ToEpoch, res.FromVersion, res.ToVersion = st.Draining.Epoch, st.Serving.Epoch, st.Draining.Version, st.Serving.Version
	}

	// The old epoch got DrainListeners just before the manager died if it no longer
	// listens: that upgrade is finished, not rolled back.
	if next != nil && serving != nil && len(ports) > 0 && stoppedListening(ctx, serving, ports, time.Second) {
		draining, serving, next = serving, next, nil
		st.DrainDeadline = time.Now().Add(m.cfg.DrainTimeout)
		log.Info("hotupgrade: the interrupted upgrade had told the old epoch to drain; finishing it", "epoch", serving.epoch)
	}
	if serving != nil && st.Phase == PhaseStarting {
		// The manager died before epoch 0 was ready: it serves only if it becomes LIVE.
		wctx, cancel := context.WithTimeout(ctx, m.cfg.ReadyTimeout)
		si, err := waitLive(wctx, serving)
		cancel()
		if err != nil {
			log.Warn("hotupgrade: the adopted epoch never became ready; stopping it", "error", err)
			_ = serving.stop(5 * time.Second)
			serving = nil
		} else {
			st.HotRestartVersion = si.HotRestartVersion
		}
	}
	if serving == nil && next != nil {
		// The serving epoch died too; the next one serves if it is LIVE.
		wctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		_, err := waitLive(wctx, next)
		cancel()
		if err == nil {
			if st.Next.BaseID != st.Serving.BaseID {
				_ = removeShm(st.Serving.BaseID) // a reuseport hand-off's old Envoy, gone
			}
			serving, next = next, nil
		}
	}
	if serving == nil {
		for _, p := range []*process{next, draining} {
			if p != nil {
				_ = p.stop(5 * time.Second)
			}
		}
		log.Warn("hotupgrade: the Envoy the state file names is gone; starting a new one", "state", filepath.Join(m.cfg.WorkDir, stateFileName))
		for _, rec := range []*procRecord{&st.Serving, st.Next, st.Draining} {
			if rec != nil {
				if err := removeShm(rec.BaseID); err != nil {
					return false, err
				}
			}
		}
		if err := os.Remove(filepath.Join(m.cfg.WorkDir, stateFileName)); err != nil {
			return false, fmt.Errorf("remove the stale state file: %w", err)
		}
		return false, nil
	}
	if draining != nil && serving.epoch != draining.epoch+1 {
		return false, fmt.Errorf("state file: draining epoch %d is not the parent of serving epoch %d", draining.epoch, serving.epoch)
	}

	bootstrap, err := os.ReadFile(serving.configPath)
	if err != nil {
		log.Warn("hotupgrade: the adopted Envoy's bootstrap is gone; the next upgrade uses the configured one", "error", err)
		bootstrap = m.cfg.Bootstrap
	}
	m.mu.Lock()
	m.current, m.bootstrap, m.baseID = serving, bootstrap, serving.baseID
	m.status = Status{Epoch: serving.epoch, Version: serving.version, Binary: serving.binary, HotRestartVersion: st.HotRestartVersion,
		PID: serving.pid(), AdminAddr: serving.adminAddr, Started: serving.started, Phase: PhaseServing, BaseID: serving.baseID, Adopted: true,
		Upgrades: st.Upgrades, Rollbacks: st.Rollbacks, Rejected: st.Rejected, Last: st.Last}
	m.mu.Unlock()
	m.watch(serving)
	log.Info("hotupgrade: adopted the running Envoy", "epoch", serving.epoch, "pid", serving.pid(), "version", serving.version,
		"base_id", serving.baseID, "interrupted_phase", st.Phase, "handoff", st.Handoff)

	switch {
	case next != nil:
		// Roll back: the old epoch never stopped listening.
		var r *relay
		if !reusePort {
			var err error
			if r, err = adoptRelay(next, serving.baseID, serving.restartEpoch, log, m.relayHook()); err != nil {
				log.Warn("hotupgrade: rollback without the hot-restart relay", "error", err)
			}
		}
		m.mu.Lock()
		m.child, m.ports, m.handoff = next, ports, st.Handoff
		if r != nil {
			m.relay = r
		}
		m.status.Phase = PhaseRollingBack
		m.persistLocked()
		m.mu.Unlock()
		m.watch(next)
		m.background(func(ctx context.Context) {
			// A next epoch that answers LIVE has started its workers: it accepts connections.
			lctx, cancel := context.WithTimeout(ctx, 2*time.Second)
			_, lerr := waitLive(lctx, next)
			cancel()
			res.Started = time.Now()
			cause := errors.New("the manager restarted mid-upgrade, before the old epoch was told to drain")
			if reusePort { // steer back first: the dead manager may have steered to next
				res, _ = m.rollbackReusePort(res, next, serving, ports, lerr == nil, cause, nil)
			} else {
				res, _ = m.rollback(res, r, next, ports, lerr == nil, cause)
			}
			res.TotalMS = time.Since(res.Started).Milliseconds()
			m.checkAdmin(serving)
			m.record(res)
			log.Info("hotupgrade: rolled back the interrupted upgrade", "epoch", serving.epoch)
		})
	case draining != nil:
		// Finish: the new epoch serves, the old one drains until its connections are gone.
		var r *relay
		var idle idleFunc
		if reusePort {
			// The manager may have died between its two drain requests (see stopAccepting).
			actx, cancel := context.WithTimeout(ctx, 5*time.Second)
			if _, err := admin(actx, http.MethodPost, draining.adminAddr, "/drain_listeners?graceful"); err != nil {
				log.Warn("hotupgrade: start the drain of the old Envoy", "epoch", draining.epoch, "error", err)
			}
			cancel()
			idle = adminIdle(draining.adminAddr)
		} else {
			var err error
			if r, err = adoptRelay(serving, serving.baseID, draining.restartEpoch, log, m.relayHook()); err != nil {
				log.Warn("hotupgrade: draining without the hot-restart relay (idle connections wait for the drain deadline)", "error", err)
			}
		}
		if r != nil {
			r.mu.Lock()
			r.releaseDrain = true
			close(r.drainSent)
			r.mu.Unlock()
			idle = relayIdle(r)
		}
		deadline := st.DrainDeadline
		if deadline.IsZero() {
			deadline = time.Now().Add(m.cfg.DrainTimeout)
		}
		m.mu.Lock()
		m.draining, m.drainDeadline, m.ports, m.handoff = draining, deadline, ports, st.Handoff
		if r != nil {
			m.standins = append(m.standins, r)
		}
		m.status.Phase = PhaseDraining
		m.persistLocked()
		m.mu.Unlock()
		m.background(func(ctx context.Context) {
			start := time.Now()
			res.OldConnections, res.OldStopped = m.awaitDrained(ctx, draining, ports, idle, max(time.Until(deadline), time.Second))
			_ = draining.stop(5 * time.Second)
			if r != nil {
				r.parentExited()
			}
			if draining.baseID != serving.baseID {
				if err := removeShm(draining.baseID); err != nil {
					log.Warn("hotupgrade: remove the old Envoy's shared memory", "error", err)
				}
			}
			res.DrainMS = time.Since(start).Milliseconds()
			res.TotalMS = time.Since(res.Started).Milliseconds()
			res.Outcome = OutcomeUpgraded
			res.Error = "finished by a restarted manager"
			m.mu.Lock()
			m.draining, m.ports, m.handoff = nil, nil, ""
			m.mu.Unlock()
			m.setPhase(PhaseServing)
			m.record(res)
			log.Info("hotupgrade: finished the interrupted upgrade", "epoch", serving.epoch, "old_stopped", res.OldStopped)
		})
	default:
		if serving.restartEpoch > 0 {
			// Its parent is gone; it may still ask it for stats until its
			// --parent-shutdown-time-s passes. Answer in the parent's place.
			if r, err := adoptRelay(serving, serving.baseID, serving.restartEpoch-1, log, m.relayHook()); err == nil {
				r.parentExited()
				m.mu.Lock()
				m.standins = append(m.standins, r)
				m.mu.Unlock()
			} else {
				log.Info("hotupgrade: no relay for the adopted epoch's parent", "error", err)
			}
		}
		m.checkAdmin(serving)
		m.persist()
	}
	return true, nil
}

// checkAdmin notes whether the adopted serving epoch still has its admin listener: a
// hand-off that got as far as ShutdownAdmin closed it for good.
func (m *Manager) checkAdmin(p *process) {
	_, port, err := net.SplitHostPort(p.adminAddr)
	if err != nil {
		return
	}
	n, _ := strconv.Atoi(port)
	ps, err := sockets(p.pid())
	if err != nil {
		return
	}
	m.mu.Lock()
	m.status.AdminClosed = !ps.listenPorts[n]
	m.mu.Unlock()
}

// background runs the rest of an interrupted upgrade as if it were an upgrade: others wait
// for it, and Close cancels it.
func (m *Manager) background(fn func(ctx context.Context)) {
	m.sem <- struct{}{}
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		defer func() { <-m.sem }()
		fn(m.life)
	}()
}

// stoppedListening waits up to d for process p to hold no listen socket on ports.
func stoppedListening(ctx context.Context, p *process, ports map[int]bool, d time.Duration) bool {
	deadline := time.Now().Add(d)
	for {
		if !listening(p.pid(), ports) {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		select {
		case <-ctx.Done():
			return false
		case <-p.exited:
			return false
		case <-time.After(20 * time.Millisecond):
		}
	}
}
