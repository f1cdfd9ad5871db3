package hotupgrade

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
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
	// WorkDir holds the bootstrap file and the hot-restart base id (default: a new temp dir).
	WorkDir string
	// ExtraArgs are passed to Envoy as they are (e.g. "--concurrency", "2").
	ExtraArgs []string
	// Output receives Envoy's log (default: discarded).
	Output io.Writer
	// ReadyTimeout bounds the wait for Envoy to become LIVE (default 30s).
	ReadyTimeout time.Duration
	Logger       *slog.Logger
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
	if c.Output == nil {
		c.Output = io.Discard
	}
	if c.ReadyTimeout <= 0 {
		c.ReadyTimeout = 30 * time.Second
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	return nil
}

// Status is what the manager reports about its Envoy.
type Status struct {
	Epoch   int       `json:"epoch"`
	Version string    `json:"version"`
	PID     int       `json:"pid"`
	Started time.Time `json:"started"`
	Phase   string    `json:"phase"`
}

// Manager owns one pod's Envoy.
type Manager struct {
	cfg     Config
	tempDir string

	mu      sync.Mutex
	current *process
	status  Status
}

// New writes the bootstrap, starts Envoy at epoch 0 and waits until it is LIVE. Close stops it.
func New(ctx context.Context, cfg Config) (*Manager, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	m := &Manager{cfg: cfg}
	if m.cfg.WorkDir == "" {
		dir, err := os.MkdirTemp("", "meshturbo-envoy-")
		if err != nil {
			return nil, fmt.Errorf("hotupgrade: work dir: %w", err)
		}
		m.cfg.WorkDir, m.tempDir = dir, dir
	}
	version, err := Version(ctx, cfg.Envoy)
	if err != nil {
		m.cleanup()
		return nil, err
	}
	ext := ".json"
	if b := strings.TrimSpace(string(cfg.Bootstrap)); !strings.HasPrefix(b, "{") {
		ext = ".yaml"
	}
	configPath := filepath.Join(m.cfg.WorkDir, "bootstrap-0"+ext)
	if err := os.WriteFile(configPath, cfg.Bootstrap, 0o600); err != nil {
		m.cleanup()
		return nil, fmt.Errorf("hotupgrade: write bootstrap: %w", err)
	}
	p, err := startProcess(processConfig{
		binary:     cfg.Envoy,
		configPath: configPath,
		epoch:      0,
		// A dynamic base id keeps two Envoys on one host (or in one pod) from sharing
		// hot-restart shared memory; the id is kept for the next epoch.
		baseIDArgs: []string{"--use-dynamic-base-id", "--base-id-path", filepath.Join(m.cfg.WorkDir, "base-id")},
		extraArgs:  cfg.ExtraArgs,
		stdout:     cfg.Output,
	})
	if err != nil {
		m.cleanup()
		return nil, err
	}
	m.current = p
	m.status = Status{Epoch: 0, Version: version, PID: p.cmd.Process.Pid, Started: time.Now(), Phase: "starting"}
	rctx, cancel := context.WithTimeout(ctx, cfg.ReadyTimeout)
	defer cancel()
	if err := waitLive(rctx, p, cfg.AdminAddr); err != nil {
		_ = p.stop(5 * time.Second)
		m.cleanup()
		return nil, fmt.Errorf("hotupgrade: %w", err)
	}
	m.setPhase("serving")
	cfg.Logger.Info("envoy serving", "epoch", 0, "version", version, "pid", m.status.PID, "admin", cfg.AdminAddr)
	return m, nil
}

func (m *Manager) setPhase(phase string) {
	m.mu.Lock()
	m.status.Phase = phase
	m.mu.Unlock()
}

// Status returns the current status.
func (m *Manager) Status() Status {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.status
}

// Exited is closed when the current Envoy exits.
func (m *Manager) Exited() <-chan struct{} {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.current.exited
}

// Close stops Envoy (SIGTERM, then SIGKILL after 10s) and removes a work dir it created.
func (m *Manager) Close() error {
	m.mu.Lock()
	p := m.current
	m.mu.Unlock()
	err := p.stop(10 * time.Second)
	m.setPhase("stopped")
	return errors.Join(err, m.cleanup())
}

func (m *Manager) cleanup() error {
	if m.tempDir == "" {
		return nil
	}
	return os.RemoveAll(m.tempDir)
}
