// Package hotupgrade owns the Envoy process of a pod: it writes the bootstrap, starts Envoy
// (epoch 0, hot restart enabled), watches it, replaces it by the next epoch on an upgrade
// (new binary or new bootstrap) through Envoy's hot restart, rolls back when the new epoch
// fails, and stops it.
//
// Envoy sets a parent-death signal, which Linux delivers when the *thread* that forked it
// exits. Go may end an idle thread at any time, so Envoy is started from a goroutine locked
// to its OS thread, and that goroutine lives exactly as long as the child.
package hotupgrade

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// process is one running Envoy.
type process struct {
	epoch      int
	binary     string
	version    string
	configPath string
	adminAddr  string
	started    time.Time
	cmd        *exec.Cmd
	exited     chan struct{}
	err        error // set before exited is closed
}

func (p *process) pid() int { return p.cmd.Process.Pid }

func (p *process) alive() bool {
	select {
	case <-p.exited:
		return false
	default:
		return true
	}
}

type processConfig struct {
	binary     string
	version    string
	configPath string
	adminAddr  string
	epoch      int
	baseID     int
	drain      drainArgs
	extraArgs  []string
	stdout     io.Writer
}

// drainArgs are the flags that set Envoy's own drain timers. The manager stops an old epoch
// itself (when its connections reach zero), and the hot-restart relay keeps the child's
// Terminate from the parent, so --parent-shutdown-time-s only bounds how long the child
// merges the parent's stats.
type drainArgs struct {
	drainTime      time.Duration // --drain-time-s: how long the old epoch's drain ramps up
	strategy       string        // --drain-strategy: immediate or gradual
	parentShutdown time.Duration // --parent-shutdown-time-s
}

func seconds(d time.Duration) string {
	return strconv.Itoa(max(1, int((d+time.Second-1)/time.Second)))
}

// startProcess starts Envoy from a goroutine locked to its OS thread for the life of the child.
func startProcess(cfg processConfig) (*process, error) {
	args := []string{
		"-c", cfg.configPath,
		"--restart-epoch", strconv.Itoa(cfg.epoch),
		"--base-id", strconv.Itoa(cfg.baseID),
		"--socket-path", socketPath(cfg.baseID, cfg.epoch),
		"--drain-time-s", seconds(cfg.drain.drainTime),
		"--drain-strategy", cfg.drain.strategy,
		"--parent-shutdown-time-s", seconds(cfg.drain.parentShutdown),
	}
	args = append(args, cfg.extraArgs...)
	cmd := exec.Command(cfg.binary, args...)
	cmd.Stdout, cmd.Stderr = cfg.stdout, cfg.stdout
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
	p := &process{epoch: cfg.epoch, binary: cfg.binary, version: cfg.version, configPath: cfg.configPath,
		adminAddr: cfg.adminAddr, cmd: cmd, exited: make(chan struct{})}
	started := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		// Never unlocked: the thread ends with this goroutine, after the child has exited.
		if err := cmd.Start(); err != nil {
			started <- err
			return
		}
		started <- nil
		p.err = cmd.Wait()
		close(p.exited)
	}()
	if err := <-started; err != nil {
		return nil, fmt.Errorf("start envoy %s: %w", cfg.binary, err)
	}
	p.started = time.Now()
	return p, nil
}

// signal sends sig unless the process has exited.
func (p *process) signal(sig syscall.Signal) {
	if p.alive() {
		_ = p.cmd.Process.Signal(sig)
	}
}

// stop asks Envoy to exit and kills it after grace.
func (p *process) stop(grace time.Duration) error {
	if !p.alive() {
		return nil
	}
	p.signal(syscall.SIGCONT) // a stopped process cannot act on SIGTERM
	p.signal(syscall.SIGTERM)
	t := time.NewTimer(grace)
	defer t.Stop()
	select {
	case <-p.exited:
	case <-t.C:
		_ = p.cmd.Process.Kill()
		<-p.exited
	}
	return nil
}

// serverInfo is what the manager reads from Envoy's admin GET /server_info.
type serverInfo struct {
	State             string `json:"state"`
	HotRestartVersion string `json:"hot_restart_version"`
	Options           struct {
		RestartEpoch int `json:"restart_epoch"`
	} `json:"command_line_options"`
}

// adminClient never reuses connections: a kept-alive connection to an old epoch's admin
// outlives the admin listener it came from and would answer for the wrong Envoy.
var adminClient = &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}

func admin(ctx context.Context, method, addr, path string) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, method, "http://"+addr+path, nil)
	if err != nil {
		return nil, err
	}
	resp, err := adminClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		return body, fmt.Errorf("%s %s: status %d: %.200s", method, path, resp.StatusCode, body)
	}
	return body, nil
}

// waitLive polls Envoy's admin until the epoch of p answers LIVE, p exits, or ctx ends. It
// asks /server_info, not /ready: until the new epoch has taken over the admin port, the old
// epoch answers there, and only the restart epoch tells them apart.
func waitLive(ctx context.Context, p *process) (serverInfo, error) {
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	var last string
	for {
		body, err := admin(ctx, http.MethodGet, p.adminAddr, "/server_info")
		if err == nil {
			var si serverInfo
			switch err := json.Unmarshal(body, &si); {
			case err != nil:
				last = err.Error()
			case si.Options.RestartEpoch != p.epoch:
				last = fmt.Sprintf("admin answered for epoch %d", si.Options.RestartEpoch)
			case si.State == "LIVE":
				return si, nil
			default:
				last = si.State
			}
		} else {
			last = err.Error()
		}
		select {
		case <-p.exited:
			return serverInfo{}, fmt.Errorf("envoy epoch %d exited before it was ready: %v", p.epoch, p.err)
		case <-ctx.Done():
			return serverInfo{}, fmt.Errorf("envoy epoch %d not ready (last answer %q): %w", p.epoch, last, ctx.Err())
		case <-tick.C:
		}
	}
}

// HotRestartVersion runs `envoy --hot-restart-version`: Envoys hot-restart into each other
// only when theirs are equal.
func HotRestartVersion(ctx context.Context, binary string) (string, error) {
	out, err := exec.CommandContext(ctx, binary, "--hot-restart-version").CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("envoy --hot-restart-version (%s): %w: %s", binary, err, tail(out))
	}
	return strings.TrimSpace(string(out)), nil
}

// validateBootstrap runs `envoy --mode validate` on a bootstrap file.
func validateBootstrap(ctx context.Context, binary, path string) error {
	out, err := exec.CommandContext(ctx, binary, "--mode", "validate", "-c", path, "--log-level", "error").CombinedOutput()
	if err != nil {
		return fmt.Errorf("envoy --mode validate (%s): %w: %s", binary, err, tail(out))
	}
	return nil
}

// tail is the end of a command's output, for errors.
func tail(out []byte) string {
	s := strings.TrimSpace(string(out))
	if len(s) > 600 {
		s = "..." + s[len(s)-600:]
	}
	return s
}

// Version runs `envoy --version` and returns the version number, e.g. "1.40.0".
func Version(ctx context.Context, binary string) (string, error) {
	out, err := exec.CommandContext(ctx, binary, "--version").CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("envoy --version (%s): %w: %s", binary, err, strings.TrimSpace(string(out)))
	}
	// "envoy  version: <sha>/1.40.0/Clean/RELEASE/BoringSSL"
	for _, f := range strings.Split(string(out), "/") {
		if n := strings.Count(f, "."); n == 2 && f[0] >= '0' && f[0] <= '9' {
			return f, nil
		}
	}
	return "", fmt.Errorf("envoy --version (%s): no version in %q", binary, strings.TrimSpace(string(out)))
}

var errNoBinary = errors.New("envoy binary not found")

func checkBinary(path string) error {
	st, err := os.Stat(path)
	if err != nil {
		return fmt.Errorf("%w at %q (run 'make deps' or set the path to an envoy binary): %v", errNoBinary, path, err)
	}
	if st.IsDir() || st.Mode()&0o111 == 0 {
		return fmt.Errorf("%w: %q is not an executable file", errNoBinary, path)
	}
	return nil
}
