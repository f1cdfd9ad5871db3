// Package vpp is the node agent's control of VPP's host stack. It connects to VPP's binary
// API socket with govpp (generated binapi for VPP 25.02, Connection plus generated RPC
// clients), checks that VPP knows every message the agent uses with the same CRC and that
// its version is supported, and then reconciles the node's desired state into VPP: the uplink
// interface (an SR-IOV VF through VPP's device API or rdma, or a host interface through
// af_packet) with its MAC, MTU, rx mode, state and addresses, static routes, the session
// layer, and one app namespace per sidecar. For each sidecar it writes the vcl.conf and the
// Envoy bootstrap fragment (package vcl). When VPP restarts it reconnects and applies
// everything again.
//
// Sub-packages: sriov finds VFs in sysfs and reads the device plugin's and Multus's hand-off;
// vcl renders the sidecar files and checks an Envoy binary for the VCL socket interface.
package vpp

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	"go.fd.io/govpp/adapter"
	"go.fd.io/govpp/binapi/memclnt"
	"go.fd.io/govpp/core"
)

// Agent owns the connection to VPP and keeps VPP at the desired state. Create it with New,
// feed it with Reconcile, stop it with Close.
type Agent struct {
	cfg        Config
	log        *slog.Logger
	driver     linkDriver
	handoff    *handoff
	secretKey  []byte
	newAdapter func(socket string) adapter.VppAPI
	applyHook  func(reason string, err error)
	// sleep waits between connection attempts; tests replace it to see the backoff.
	sleep func(ctx context.Context, d time.Duration) bool

	// The stats segment connection (interface counters), see stats.go.
	newStats        func(socket string) adapter.StatsAPI
	usesStatsSocket bool // newStats is govpp's socket client: check the socket file first
	statsMu         sync.Mutex
	stats           *core.StatsConnection

	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{}

	applyMu sync.Mutex // one apply at a time; held while a connection is torn down

	mu      sync.Mutex
	conn    *vppConn
	desired *Desired
	fatal   error
	changed chan struct{} // closed and replaced whenever conn or fatal changes
	status  Status
	// After a failed apply (whoever asked for it), the supervisor retries at retryAt;
	// retryDelay doubles up to Backoff.Max and resets on success.
	retryAt    time.Time
	retryDelay time.Duration
}

// Status is a snapshot of the agent's view, for the admin API and metrics.
type Status struct {
	Connected bool `json:"connected"`
	// Version is VPP's show_version of the current (or last) connection.
	Version string `json:"version"`
	// Connects counts successful connections; more than one means VPP restarted or the
	// connection was re-established.
	Connects int `json:"connects"`
	// ConnectError is why the last connection attempt failed (VPP not running, socket not
	// mounted, …), with the socket and the fix; empty once connected.
	ConnectError string `json:"connectError"`
	// Uplink is the owned uplink interface as last applied.
	Uplink *UplinkStatus `json:"uplink"`
	// Namespaces are the app namespaces applied through the current connection.
	Namespaces []string `json:"namespaces"`
	// LastApply is when the desired state was last applied, LastApplyError its outcome.
	LastApply      time.Time `json:"lastApply"`
	LastApplyError string    `json:"lastApplyError"`
	// StatsError is why interface counters are not available (no stats segment socket).
	StatsError string `json:"statsError"`
	// Fatal is set when the agent gave up (VPP incompatible).
	Fatal string `json:"fatal"`
}

// UplinkStatus describes the owned uplink interface.
type UplinkStatus struct {
	SwIfIndex uint32 `json:"swIfIndex"`
	Name      string `json:"name"`
	Driver    Driver `json:"driver"`
	Device    string `json:"device"`
}

// New validates cfg and starts the agent: it connects to VPP in the background (retrying
// with backoff while VPP is not there) and applies the desired state as soon as Reconcile has
// given one. An incompatible VPP stops the agent: see WaitConnected and Done.
func New(cfg Config, opts ...Option) (*Agent, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	cfg.Routes = slices.Clone(cfg.Routes)
	for i := range cfg.Routes {
		cfg.Routes[i].Prefix = cfg.Routes[i].Prefix.Masked()
	}
	a := &Agent{
		cfg:     cfg,
		log:     cfg.Logger,
		driver:  newDriver(cfg.Uplink),
		handoff: &handoff{dir: cfg.HandoffDir, sizes: cfg.VCL},
		changed: make(chan struct{}),
		done:    make(chan struct{}),
	}
	a.retryDelay = cfg.Backoff.Min
	a.sleep = sleep
	a.newAdapter = newSocketAdapter(&a.cfg)
	a.newStats, a.usesStatsSocket = newStatsSocketAdapter, true
	for _, o := range opts {
		o(a)
	}
	a.secretKey = slices.Clone(cfg.SecretKey)
	if len(a.secretKey) == 0 {
		a.secretKey = make([]byte, 32)
		if _, err := rand.Read(a.secretKey); err != nil {
			return nil, fmt.Errorf("vpp: namespace secret key: %w", err)
		}
	}
	a.ctx, a.cancel = context.WithCancel(context.Background())
	go a.run()
	return a, nil
}

// Close disconnects from VPP and stops the agent. It leaves VPP as configured: sidecars keep
// working while the agent restarts.
func (a *Agent) Close() error {
	a.cancel()
	<-a.done
	return nil
}

// Done is closed when the agent stopped: after Close, or when VPP turned out incompatible
// (then Err says why).
func (a *Agent) Done() <-chan struct{} { return a.done }

// Err is the reason the agent stopped on its own (an *IncompatibleError), or nil.
func (a *Agent) Err() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.fatal
}

// WaitConnected blocks until the agent is connected to a compatible VPP, VPP proved
// incompatible (the *IncompatibleError is returned), or ctx ends.
func (a *Agent) WaitConnected(ctx context.Context) error {
	for {
		a.mu.Lock()
		conn, fatal, changed := a.conn, a.fatal, a.changed
		a.mu.Unlock()
		switch {
		case fatal != nil:
			return fatal
		case conn != nil:
			return nil
		}
		select {
		case <-changed:
		case <-a.done:
			if err := a.Err(); err != nil {
				return err
			}
			return errors.New("vpp: agent closed")
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// Reconcile makes d the desired state and applies it now if the agent is connected. The
// state is kept either way: it is applied again whenever the agent (re)connects. Errors name
// the request VPP refused (*APIError); ErrNotConnected means it will be applied later.
func (a *Agent) Reconcile(ctx context.Context, d Desired) error {
	if err := d.validate(); err != nil {
		return err
	}
	d.Sidecars = slices.Clone(d.Sidecars)
	a.mu.Lock()
	a.desired = &d
	fatal := a.fatal
	a.mu.Unlock()
	if fatal != nil {
		return fatal
	}
	if a.ctx.Err() != nil {
		return errors.New("vpp: agent closed")
	}
	return a.applyCurrent(ctx, nil, "reconcile")
}

// Config returns the agent's configuration with the defaults filled in (without the secret key).
func (a *Agent) Config() Config {
	c := a.cfg
	c.SecretKey = nil
	c.Routes = slices.Clone(c.Routes)
	return c
}

// Status returns a snapshot of the agent's state.
func (a *Agent) Status() Status {
	a.mu.Lock()
	defer a.mu.Unlock()
	s := a.status
	s.Connected = a.conn != nil
	if s.Uplink != nil {
		u := *s.Uplink
		s.Uplink = &u
	}
	s.Namespaces = slices.Clone(s.Namespaces)
	if a.fatal != nil {
		s.Fatal = a.fatal.Error()
	}
	return s
}

// applyCurrent applies the latest desired state through the current connection (or through
// only, when set: a supervisor re-applying on the connection it watches).
func (a *Agent) applyCurrent(ctx context.Context, only *vppConn, reason string) error {
	a.applyMu.Lock()
	defer a.applyMu.Unlock()
	a.mu.Lock()
	c, d := a.conn, a.desired
	a.mu.Unlock()
	return a.applyLocked(ctx, c, d, only, reason)
}

// applyLocked applies d through c; the caller holds applyMu.
func (a *Agent) applyLocked(ctx context.Context, c *vppConn, d *Desired, only *vppConn, reason string) error {
	if d == nil {
		return nil // nothing to apply before the first Reconcile
	}
	if c == nil || (only != nil && c != only) {
		return fmt.Errorf("vpp: %w; the desired state is applied when VPP is back", ErrNotConnected)
	}
	err := a.apply(ctx, c, *d)
	a.mu.Lock()
	a.status.LastApply = time.Now()
	a.status.LastApplyError = ""
	a.retryAt, a.retryDelay = time.Time{}, a.cfg.Backoff.Min
	if err != nil {
		a.status.LastApplyError = err.Error()
		a.retryAt = time.Now().Add(a.retryDelay)
		a.retryDelay = min(2*a.retryDelay, a.cfg.Backoff.Max)
	}
	a.status.Namespaces = a.status.Namespaces[:0]
	for id := range c.namespaces {
		a.status.Namespaces = append(a.status.Namespaces, id)
	}
	slices.Sort(a.status.Namespaces)
	a.mu.Unlock()
	switch {
	case err != nil && a.ctx.Err() != nil:
		// Closing: the failure is ours.
	case err != nil:
		a.log.Warn("vpp: applying the desired state failed", "reason", reason, "err", err)
	default:
		a.log.Debug("vpp: desired state applied", "reason", reason, "sidecars", len(d.Sidecars))
	}
	if a.applyHook != nil {
		a.applyHook(reason, err)
	}
	return err
}

func (a *Agent) setUplink(o *ownedIf) {
	a.mu.Lock()
	a.status.Uplink = &UplinkStatus{SwIfIndex: o.swIfIndex, Name: o.details.InterfaceName, Driver: o.kind, Device: o.key}
	a.mu.Unlock()
}

func (a *Agent) secret(namespaceID string) uint64 { return namespaceSecret(a.secretKey, namespaceID) }

func (a *Agent) notifyLocked() {
	close(a.changed)
	a.changed = make(chan struct{})
}

// run connects, supervises the connection and reconnects with backoff until Close, or until
// VPP proves incompatible.
func (a *Agent) run() {
	defer close(a.done)
	delay := a.cfg.Backoff.Min
	for a.ctx.Err() == nil {
		c, err := a.dial(a.ctx)
		if err != nil {
			var inc *IncompatibleError
			if errors.As(err, &inc) {
				a.log.Error("vpp: giving up: VPP is not compatible with this agent", "err", err)
				a.mu.Lock()
				a.fatal = err
				a.notifyLocked()
				a.mu.Unlock()
				return
			}
			if a.ctx.Err() != nil {
				return
			}
			msg := fmt.Sprintf("%v (is VPP running with `socksvr { socket-name %s }` in its startup.conf, and is that socket mounted into the agent? "+
				"retrying in %v)", err, a.cfg.APISocket, delay)
			a.mu.Lock()
			first := a.status.ConnectError == ""
			a.status.ConnectError = msg
			a.mu.Unlock()
			if first {
				a.log.Warn("vpp: cannot connect; retrying with backoff", "socket", a.cfg.APISocket, "err", msg)
			} else {
				a.log.Debug("vpp: cannot connect; retrying", "socket", a.cfg.APISocket, "err", err, "in", delay)
			}
			if !a.sleep(a.ctx, delay) {
				return
			}
			delay = min(2*delay, a.cfg.Backoff.Max)
			continue
		}
		delay = a.cfg.Backoff.Min
		a.connectStats() // before the connection is published: Status then says whether counters work
		// The connection is published with the apply lock held, so that the first apply
		// through it (of the state desired so far) comes before any Reconcile's.
		a.applyMu.Lock()
		a.mu.Lock()
		desired := a.desired
		a.conn = c
		a.status.Version = c.version
		a.status.Connects++
		a.status.ConnectError = ""
		a.status.Namespaces = nil
		a.notifyLocked()
		a.mu.Unlock()
		a.log.Info("vpp: connected", "socket", a.cfg.APISocket, "version", c.version)
		// A new connection may be a new VPP (first start, restart): apply everything. The
		// dump makes this send only differences when VPP kept its state.
		_ = a.applyLocked(a.ctx, c, desired, c, "connected")
		a.applyMu.Unlock()

		a.supervise(c)
		a.disconnectStats()

		a.mu.Lock()
		a.conn = nil
		a.notifyLocked()
		a.mu.Unlock()
		a.applyMu.Lock() // let an apply through c finish (its requests fail fast now) first
		c.close()
		a.applyMu.Unlock()
	}
}

// supervise probes VPP until the connection fails, a request on it went unanswered, or the
// agent closes. A failed apply is retried with backoff; ResyncInterval re-applies anyway.
func (a *Agent) supervise(c *vppConn) {
	probe := time.NewTicker(a.cfg.ProbeInterval)
	defer probe.Stop()
	var resync <-chan time.Time
	if a.cfg.ResyncInterval > 0 {
		t := time.NewTicker(a.cfg.ResyncInterval)
		defer t.Stop()
		resync = t.C
	}
	for {
		select {
		case <-a.ctx.Done():
			return
		case <-c.dead:
			a.log.Warn("vpp: a request went unanswered; reconnecting")
			return
		case <-probe.C:
			if _, err := invoke(a.ctx, c, &memclnt.ControlPing{}, c.mem.ControlPing); err != nil {
				if a.ctx.Err() == nil {
					a.log.Warn("vpp: lost the connection to VPP; reconnecting", "err", err)
				}
				return
			}
			a.connectStats() // no-op while connected
			a.mu.Lock()
			retry := !a.retryAt.IsZero() && !time.Now().Before(a.retryAt)
			a.mu.Unlock()
			if retry {
				_ = a.applyCurrent(a.ctx, c, "retry")
			}
		case <-resync:
			_ = a.applyCurrent(a.ctx, c, "resync")
		}
	}
}

func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
