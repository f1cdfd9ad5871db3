// Package hotupgrade owns the Envoy process of a pod: it writes the bootstrap, starts Envoy
// (epoch 0, hot restart enabled), watches it, and stops it. Upgrades to a new epoch build on
// this.
//
// Envoy sets a parent-death signal, which Linux delivers when the *thread* that forked it
// exits. Go may end an idle thread at any time, so Envoy is started from a goroutine locked
// to its OS thread, and that goroutine lives exactly as long as the child.
package hotupgrade

import (
	"context"
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
	epoch  int
	cmd    *exec.Cmd
	exited chan struct{}
	err    error // set before exited is closed
}

type processConfig struct {
	binary     string
	configPath string
	epoch      int
	baseIDArgs []string
	extraArgs  []string
	stdout     io.Writer
}

// startProcess starts Envoy from a goroutine locked to its OS thread for the life of the child.
func startProcess(cfg processConfig) (*process, error) {
	args := []string{
		"-c", cfg.configPath,
		"--restart-epoch", strconv.Itoa(cfg.epoch),
		"--drain-time-s", "5",
		"--parent-shutdown-time-s", "10",
	}
	args = append(args, cfg.baseIDArgs...)
	args = append(args, cfg.extraArgs...)
	cmd := exec.Command(cfg.binary, args...)
	cmd.Stdout, cmd.Stderr = cfg.stdout, cfg.stdout
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
	p := &process{epoch: cfg.epoch, cmd: cmd, exited: make(chan struct{})}
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
	return p, nil
}

// stop asks Envoy to exit and kills it after grace.
func (p *process) stop(grace time.Duration) error {
	select {
	case <-p.exited:
		return nil
	default:
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
	case <-time.After(grace):
		_ = p.cmd.Process.Kill()
		<-p.exited
	}
	return nil
}

// waitLive polls Envoy's admin /ready until it answers LIVE, the process exits, or ctx ends.
func waitLive(ctx context.Context, p *process, adminAddr string) error {
	client := &http.Client{Timeout: time.Second}
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	var last string
	for {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+adminAddr+"/ready", nil)
		if resp, err := client.Do(req); err == nil {
			body, _ := io.ReadAll(io.LimitReader(resp.Body, 256))
			resp.Body.Close()
			last = strings.TrimSpace(string(body))
			if resp.StatusCode == http.StatusOK && last == "LIVE" {
				return nil
			}
		} else {
			last = err.Error()
		}
		select {
		case <-p.exited:
			return fmt.Errorf("envoy epoch %d exited before it was ready: %v", p.epoch, p.err)
		case <-ctx.Done():
			return fmt.Errorf("envoy epoch %d not ready (last answer %q): %w", p.epoch, last, ctx.Err())
		case <-tick.C:
		}
	}
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
