package hotupgrade

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Config configures a Manager.
type Config struct {
	// Envoy is the path of the envoy binary.
	Envoy string
	// Bootstrap is the Envoy bootstrap (JSON or YAML) to run.
	Bootstrap []byte
	// AdminAddr is the admin address the bootstrap configures; the manager probes it.
	AdminAddr string
	// WorkDir holds the bootstrap files and the hot-restart base id (default: a new temp dir).
	WorkDir string
	// ExtraArgs are passed to every epoch as they are (e.g. "--concurrency", "2"; keep the
	// concurrency: listen sockets are handed over per worker).
	ExtraArgs []string
	// Output receives Envoy's log (default: discarded).
	Output io.Writer
	// ReadyTimeout bounds the wait for epoch 0 to become LIVE (default 30s).
	ReadyTimeout time.Duration
	Logger       *slog.Logger

	// HandoffTimeout bounds an upgrade from the start of the new epoch until it is LIVE
	// (default 30s). A hand-off that takes longer is wedged (e.g. the old Envoy does not
	// answer) and is rolled back.
	HandoffTimeout time.Duration
	// Probe, when set, checks the new epoch once it is LIVE, before the old one drains. It is
	// retried until it passes or ProbeTimeout (default 10s) ends; then the upgrade is rolled
	// back. While it runs, both epochs accept connections on the shared listen sockets.
	Probe        func(ctx context.Context) error
	ProbeTimeout time.Duration
	// DrainTimeout bounds how long the old epoch may keep connections after it stopped
	// listening (default 60s); then it is stopped with whatever it still has.
	DrainTimeout time.Duration
	// DrainIdle: once the old epoch's remaining connections are all HTTP connections with no
	// request in flight for this long (default 1s), it is stopped without waiting for them.
	DrainIdle time.Duration
	// EnvoyDrainTime is Envoy's --drain-time-s (default 5s), DrainStrategy its
	// --drain-strategy: "immediate" (default: the old epoch answers every request with
	// Connection: close or GOAWAY at once) or "gradual" (more of them as the drain time
	// passes).
	EnvoyDrainTime time.Duration
	DrainStrategy  string

	// Handoff is how an upgrade passes the listeners to the new Envoy (UpgradeRequest.Handoff
	// overrides it for one upgrade): HandoffAuto (default) uses Envoy's hot restart when the
	// two binaries' hot-restart versions are equal and the reuseport hand-off otherwise;
	// HandoffHotRestart always hot-restarts (an upgrade across hot-restart versions is
	// rejected); HandoffReusePort never does (see handoff.go).
	Handoff string
	// HandoffAdminAddr is the admin address of an Envoy started by a reuseport hand-off while
	// the old one still holds AdminAddr (default: a free port on AdminAddr's host, chosen at
	// each such hand-off). Status.AdminAddr tells where the serving Envoy's admin is.
	HandoffAdminAddr string

	hooks testHooks
}

// testHooks let tests inject faults at exact points of a hand-off.
type testHooks struct {
	// relayRequest is called, on the relay's goroutine, when the new epoch sends a
	// hot-restart request, before the relay acts on it.
	relayRequest func(child *process, kind hrKind)
}

func (c *Config) validate() error {
	if err := checkBinary(c.Envoy); err != nil {
		return err
	}
	if len(c.Bootstrap) == 0 {
		return errors.New("hotupgrade: Config.Bootstrap is empty")
	}
	if _, _, err := net.SplitHostPort(c.AdminAddr); err != nil {
		return fmt.Errorf("hotupgrade: AdminAddr %q: %w", c.AdminAddr, err)
	}
	switch c.Handoff {
	case "":
		c.Handoff = HandoffAuto
	case HandoffAuto, HandoffHotRestart, HandoffReusePort:
	default:
		return fmt.Errorf("hotupgrade: Handoff %q is not %s, %s or %s", c.Handoff, HandoffAuto, HandoffHotRestart, HandoffReusePort)
	}
	if c.HandoffAdminAddr != "" {
		if _, _, err := net.SplitHostPort(c.HandoffAdminAddr); err != nil {
			return fmt.Errorf("hotupgrade: HandoffAdminAddr %q: %w", c.HandoffAdminAddr, err)
		}
		if c.HandoffAdminAddr == c.AdminAddr {
			return fmt.Errorf("hotupgrade: HandoffAdminAddr %q must differ from AdminAddr", c.HandoffAdminAddr)
		}
	}
	switch c.DrainStrategy {
	case "":
		c.DrainStrategy = "immediate"
	case "immediate", "gradual":
	default:
		return fmt.Errorf("hotupgrade: DrainStrategy %q is not immediate or gradual", c.DrainStrategy)
	}
	if c.Output == nil {
		c.Output = io.Discard
	}
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	def(&c.ReadyTimeout, 30*time.Second)
	def(&c.HandoffTimeout, 30*time.Second)
	def(&c.ProbeTimeout, 10*time.Second)
	def(&c.DrainTimeout, 60*time.Second)
	def(&c.DrainIdle, time.Second)
	def(&c.EnvoyDrainTime, 5*time.Second)
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	return nil
}

func (c *Config) drainArgs() drainArgs {
	// The child's Terminate never reaches the parent (the relay keeps it); the timer only
	// ends the child's merging of the parent's stats, which it does once the old epoch has
	// drained.
	return drainArgs{drainTime: c.EnvoyDrainTime, strategy: c.DrainStrategy, parentShutdown: c.EnvoyDrainTime + time.Second}
}

// Phases of the manager.
const (
	PhaseStarting    = "starting"
	PhaseServing     = "serving"
	PhasePrechecking = "prechecking"
	PhaseHandingOff  = "handing_off"
	PhaseProbing     = "probing"
	PhaseDraining    = "draining"
	PhaseRollingBack = "rolling_back"
	PhaseExited      = "exited"
	PhaseStopped     = "stopped"
)

// Status is what the manager reports about its Envoy.
type Status struct {
	Epoch             int    `json:"epoch"`
	Version           string `json:"version"`
	Binary            string `json:"binary"`
	HotRestartVersion string `json:"hot_restart_version"`
	PID               int    `json:"pid"`
	// AdminAddr is where the serving Envoy's admin listens: the configured address, or
	// HandoffAdminAddr after a reuseport hand-off from an Envoy that held it.
	AdminAddr string    `json:"admin_addr"`
	Started   time.Time `json:"started"`
	Phase     string    `json:"phase"`
	BaseID    int       `json:"base_id"`
	// AdminClosed: a rolled-back hand-off got as far as the new epoch's ShutdownAdmin, on
	// which Envoy closes its admin listener for good; the running Envoy serves traffic but
	// its admin is back only after the next upgrade.
	AdminClosed bool `json:"admin_closed,omitempty"`
	// Adopted: this manager took over Envoys an earlier run of it started (see state.go).
	Adopted   bool           `json:"adopted,omitempty"`
	Upgrades  int            `json:"upgrades"`
	Rollbacks int            `json:"rollbacks"`
	Rejected  int            `json:"rejected"`
	Last      *UpgradeResult `json:"last_upgrade,omitempty"`
}

// Manager owns one pod's Envoy.
type Manager struct {
	cfg     Config
	tempDir string
	baseID  int    // hot-restart base id of the serving Envoy
	admin   string // the admin address the serving Envoy's bootstrap configures

	life    context.Context // ends at Close; cancels a running upgrade
	stop    context.CancelFunc
	sem     chan struct{} // one upgrade at a time
	closeMu sync.Once
	closeEr error
	wg      sync.WaitGroup // process watchers

	mu            sync.Mutex
	current       *process
	bootstrap     []byte
	child         *process // the epoch an upgrade is starting
	draining      *process // the old epoch an upgrade told to drain, until it is stopped
	drainDeadline time.Time
	ports         map[int]bool // listener ports of the upgrade in progress
	handoff       string       // how the upgrade in progress hands off, "" when none runs
	relay         *relay       // the relay whose parent is current, once an upgrade started
	standins      []*relay     // relays answering for a stopped parent until its child lets go
	status        Status
	exited        chan struct{}
	exitDone      bool
}

// New writes the bootstrap, starts Envoy at epoch 0 and waits until it is LIVE. Close stops it.
func New(ctx context.Context, cfg Config) (*Manager, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	m := &Manager{cfg: cfg, sem: make(chan struct{}, 1), exited: make(chan struct{}), bootstrap: cfg.Bootstrap}
	m.life, m.stop = context.WithCancel(context.Background())
	fail := func(err error) (*Manager, error) {
		m.stop()
		m.cleanup()
		return nil, err
	}
	if m.cfg.WorkDir == "" {
		dir, err := os.MkdirTemp("", "meshturbo-envoy-")
		if err != nil {
			return nil, fmt.Errorf("hotupgrade: work dir: %w", err)
		}
		m.cfg.WorkDir, m.tempDir = dir, dir
	} else if st, err := loadState(m.cfg.WorkDir); err == nil {
		// An earlier run of the manager left Envoy running: adopt it.
		adopted, err := m.recover(ctx, st)
		if err != nil {
			return fail(fmt.Errorf("hotupgrade: adopt the running Envoy: %w", err))
		}
		if adopted {
			return m, nil
		}
	} else if !errors.Is(err, fs.ErrNotExist) {
		return fail(fmt.Errorf("hotupgrade: %w", err))
	}
	version, err := Version(ctx, cfg.Envoy)
	if err != nil {
		return fail(err)
	}
	if m.baseID, err = m.chooseBaseID(); err != nil {
		return fail(err)
	}
	configPath, err := m.writeBootstrap(0, cfg.Bootstrap)
	if err != nil {
		return fail(err)
	}
	p, err := startProcess(processConfig{
		binary: cfg.Envoy, version: version, configPath: configPath, adminAddr: cfg.AdminAddr,
		epoch: 0, baseID: m.baseID, restartEpoch: 0, drain: m.cfg.drainArgs(), extraArgs: cfg.ExtraArgs, stdout: cfg.Output,
	})
	if err != nil {
		return fail(err)
	}
	m.mu.Lock()
	m.current, m.admin = p, cfg.AdminAddr
	m.status = Status{Epoch: 0, Version: version, Binary: cfg.Envoy, PID: p.pid(), AdminAddr: p.adminAddr, Started: p.started, Phase: PhaseStarting, BaseID: m.baseID}
	m.persistLocked()
	m.mu.Unlock()
	m.watch(p)
	rctx, cancel := context.WithTimeout(ctx, m.cfg.ReadyTimeout)
	defer cancel()
	si, err := waitLive(rctx, p)
	if err != nil {
		_ = p.stop(5 * time.Second)
		m.wg.Wait()
		_ = removeShm(m.baseID)
		_ = os.Remove(filepath.Join(m.cfg.WorkDir, stateFileName))
		return fail(fmt.Errorf("hotupgrade: %w", err))
	}
	m.mu.Lock()
	m.status.HotRestartVersion = si.HotRestartVersion
	m.status.Phase = PhaseServing
	m.persistLocked()
	m.mu.Unlock()
	cfg.Logger.Info("envoy serving", "epoch", 0, "version", version, "pid", p.pid(), "admin", cfg.AdminAddr, "base_id", m.baseID)
	return m, nil
}

// chooseBaseID picks a hot-restart base id no Envoy on this host uses and records it in
// <WorkDir>/base-id. Envoy's --use-dynamic-base-id cannot be used: it finds a free id by
// binding the default socket path, and every epoch here has a socket path of its own (see
// relay), so it would always pick 0 and share another Envoy's shared memory. A random id
// far above the ones the dynamic search hands out avoids both.
func (m *Manager) chooseBaseID() (int, error) {
	for range 20 {
		id := 1<<20 + rand.IntN(200_000_000-1<<20)
		if _, err := os.Stat(shmPath(id)); errors.Is(err, os.ErrNotExist) {
			if err := os.WriteFile(filepath.Join(m.cfg.WorkDir, "base-id"), []byte(strconv.Itoa(id)), 0o600); err != nil {
				return 0, fmt.Errorf("hotupgrade: write base id: %w", err)
			}
			return id, nil
		}
	}
	return 0, errors.New("hotupgrade: no free hot-restart base id")
}

func (m *Manager) writeBootstrap(epoch int, b []byte) (string, error) {
	ext := ".json"
	if s := strings.TrimSpace(string(b)); !strings.HasPrefix(s, "{") {
		ext = ".yaml"
	}
	path := filepath.Join(m.cfg.WorkDir, "bootstrap-"+strconv.Itoa(epoch)+ext)
	if err := os.WriteFile(path, b, 0o600); err != nil {
		return "", fmt.Errorf("hotupgrade: write bootstrap: %w", err)
	}
	return path, nil
}

// watch closes Exited when p exits while it is the serving epoch (not when an upgrade
// retires it).
func (m *Manager) watch(p *process) {
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		<-p.exited
		m.mu.Lock()
		defer m.mu.Unlock()
		if m.current == p && !m.exitDone {
			m.exitDone = true
			if m.status.Phase != PhaseStopped {
				m.status.Phase = PhaseExited
			}
			close(m.exited)
		}
	}()
}

// setPhase records the phase, and with it what runs, in the state file.
func (m *Manager) setPhase(phase string) {
	m.mu.Lock()
	if !m.exitDone {
		m.status.Phase = phase
	}
	m.persistLocked()
	m.mu.Unlock()
}

// Bootstrap returns the bootstrap the serving Envoy runs.
func (m *Manager) Bootstrap() []byte {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.bootstrap
}

// Status returns the current status.
func (m *Manager) Status() Status {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.status
}

// Exited is closed when the serving Envoy exits: on its own, or stopped by Close. An old
// epoch retired by an upgrade does not count.
func (m *Manager) Exited() <-chan struct{} {
	return m.exited
}

// Close cancels a running upgrade (which rolls back or finishes its drain at once), stops
// Envoy (SIGTERM, then SIGKILL after 10s), removes its hot-restart shared memory and a work
// dir it created.
func (m *Manager) Close() error {
	m.closeMu.Do(func() {
		m.stop()
		m.sem <- struct{}{} // wait for a running upgrade to unwind; none starts after stop
		m.mu.Lock()
		p := m.current
		m.status.Phase = PhaseStopped
		relays := append([]*relay{m.relay}, m.standins...)
		m.relay, m.standins = nil, nil
		m.mu.Unlock()
		errs := []error{p.stop(10 * time.Second)}
		m.wg.Wait()
		for _, r := range relays {
			if r != nil {
				errs = append(errs, r.Close())
			}
		}
		if err := os.Remove(filepath.Join(m.cfg.WorkDir, stateFileName)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, err)
		}
		errs = append(errs, removeShm(m.baseID), m.cleanup())
		m.closeEr = errors.Join(errs...)
	})
	return m.closeEr
}

func (m *Manager) cleanup() error {
	if m.tempDir == "" {
		return nil
	}
	return os.RemoveAll(m.tempDir)
}
