// Package hotupgrade owns the Envoy process of a pod: it writes the bootstrap, starts Envoy
// (epoch 0, hot restart enabled), watches it, replaces it by the next epoch on an upgrade
// (new binary or new bootstrap), rolls back when the new epoch fails, and stops it. The
// listeners reach the new Envoy through Envoy's hot restart (upgrade.go) or, when the two
// binaries' hot-restart versions differ, through a reuseport hand-off between two
// independent Envoys (handoff.go).
//
// Idle keep-alive connections. Envoy's drain asks clients to reconnect only on a response
// (HTTP/1 Connection: close, HTTP/2 GOAWAY); a connection the client keeps idle in its pool
// gets nothing, and Envoy 1.39/1.40 leave such HTTP/1 connections open however long they
// drain. So the manager closes them: once the old Envoy's remaining connections have been
// HTTP connections with no request in flight for DrainIdle, it shuts down those with
// nothing queued either way (closeQuiet), while Envoy runs on. The client gets a FIN and
// drops the connection from its pool; Envoy reads end-of-stream and closes its side; the
// old Envoy is stopped once its connections reach zero. (Stopping Envoy with the
// connections instead, as earlier versions did, leaves a window of Envoy's whole shutdown in
// which a request a client sends on one of them is reset: seen as a failed POST in 2 of 6
// runs of TestFaultsDuringTheHandOff.) What remains is the race every HTTP/1.1 server has
// when it closes an idle keep-alive connection (RFC 9112 section 9.3.1): a request the
// client sends in the instant between the FIN leaving and the client seeing it fails before
// any byte of the response; the request never reached the backend, and clients retry such
// requests only when they are idempotent (RFC 9110 section 9.2.2: Go's transport, browsers).
// No server-side signal can close that window for HTTP/1.1; HTTP/2 closes it with GOAWAY.
//
// Envoy outlives the manager on purpose, so that a manager that crashes or is SIGKILLed
// (mid-upgrade too) leaves every Envoy serving. Envoy sets a parent-death signal on itself,
// which Linux delivers when the *thread* that forked it exits (and Go may end an idle thread
// at any time); so the manager does not fork Envoy itself: it starts a small /bin/sh keeper
// that forks Envoy, waits for it and ignores the signals that would end it early
// (keeperScript). Envoy's parent is the keeper, which lives exactly as long as Envoy,
// whatever happens to the manager's threads or to the manager. The manager records what
// runs in a state file in its work dir (see state.go); a manager started again on the same
// work dir adopts the running Envoys and finishes or rolls back the upgrade that was
// interrupted.
package hotupgrade

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// process is one running Envoy. Its epoch counts the manager's upgrades; its hot-restart
// identity is (baseID, restartEpoch): a hot restart keeps the base id and takes the next
// restart epoch, a reuseport hand-off starts a new base id at restart epoch 0 (see handoff.go).
type process struct {
	epoch        int
	baseID       int
	restartEpoch int
	binary       string
	version      string
	configPath   string
	adminAddr    string
	started      time.Time
	pidNum       int
	startTicks   uint64      // /proc/<pid>/stat start time: tells a reused pid apart
	proc         *os.Process // signals go through its pidfd
	adopted      bool        // started by an earlier run of the manager
	exited       chan struct{}
	err          error // set before exited is closed
}

func (p *process) pid() int { return p.pidNum }

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
	// restartEpoch is Envoy's --restart-epoch: 0 creates the hot-restart shared memory of
	// baseID, N takes the listen sockets from N-1 of the same base id.
	restartEpoch int
	// adminOverride, when set, replaces the bootstrap's admin address (--config-yaml): an
	// Envoy started next to one that holds the configured admin address (reuseport hand-off).
	adminOverride string
	drain         drainArgs
	extraArgs     []string
	stdout        io.Writer
	// inherit are passed to Envoy as extra file descriptors (the hot-restart relay's sockets:
	// Envoy never touches them, they only keep the sockets bound if the manager dies).
	inherit []*os.File
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

// keeperScript runs Envoy ("$@") as the child of a /bin/sh that outlives the manager.
// Envoy sets a parent-death signal on itself (prctl(PR_SET_PDEATHSIG, SIGTERM), seen with
// strace in 1.39 and 1.40), so it would die with whatever process started it; the keeper
// is that process, and it dies only with Envoy: it ignores the signals a process group
// gets (HUP, INT, TERM) and SIGPIPE (Envoy gets them back, and installs its own handlers),
// and writes nothing. It tells the manager Envoy's pid
// on fd 3, waits for Envoy, and exits as Envoy did (with the same signal, re-raised, or
// the same code), so the manager's wait sees Envoy's end.
const keeperScript = `trap '' HUP INT TERM PIPE
(trap - HUP INT TERM PIPE; exec "$@") 3>&- &
pid=$!
echo "$pid" >&3
exec 3>&-
wait "$pid"
st=$?
if [ "$st" -gt 128 ]; then
	trap - HUP INT TERM PIPE
	kill -s "$(kill -l "$st")" $$
fi
exit "$st"`

// startProcess starts Envoy under its keeper (keeperScript).
func startProcess(cfg processConfig) (*process, error) {
	args := []string{
		"-c", keeperScript, "meshturbo-envoy-keeper", cfg.binary,
		"-c", cfg.configPath,
		"--restart-epoch", strconv.Itoa(cfg.restartEpoch),
		"--base-id", strconv.Itoa(cfg.baseID),
		"--socket-path", socketPath(cfg.baseID, cfg.restartEpoch),
		"--drain-time-s", seconds(cfg.drain.drainTime),
		"--drain-strategy", cfg.drain.strategy,
		"--parent-shutdown-time-s", seconds(cfg.drain.parentShutdown),
	}
	args = append(args, adminOverrideArgs(cfg.adminOverride)...)
	args = append(args, cfg.extraArgs...)
	pidR, pidW, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("start envoy %s: %w", cfg.binary, err)
	}
	defer pidR.Close()
	cmd := exec.Command("/bin/sh", args...)
	cmd.Stdout, cmd.Stderr = cfg.stdout, cfg.stdout
	// fd 3 carries Envoy's pid; the relay sockets follow.
	cmd.ExtraFiles = append([]*os.File{pidW}, cfg.inherit...)
	// No Pdeathsig: Envoy and its keeper outlive a manager that dies (see the package doc).
	p := &process{epoch: cfg.epoch, baseID: cfg.baseID, restartEpoch: cfg.restartEpoch, binary: cfg.binary,
		version: cfg.version, configPath: cfg.configPath, adminAddr: cfg.adminAddr, exited: make(chan struct{})}
	if cfg.adminOverride != "" {
		p.adminAddr = cfg.adminOverride
	}
	err = cmd.Start()
	pidW.Close()
	if err != nil {
		return nil, fmt.Errorf("start envoy %s: %w", cfg.binary, err)
	}
	// Owned by the process: it ends when the keeper, so Envoy, has exited.
	ready := make(chan struct{})
	go func() {
		err := cmd.Wait()
		<-ready
		if p.proc != nil {
			_ = p.proc.Release() // its pidfd
		}
		p.err = err
		close(p.exited)
	}()
	line, err := bufio.NewReader(pidR).ReadString('\n')
	pid, perr := strconv.Atoi(strings.TrimSpace(line))
	if err == nil && perr == nil && pid > 0 {
		p.pidNum = pid
		p.proc, err = os.FindProcess(pid)
	} else if err == nil {
		err = fmt.Errorf("pid %q", line)
	}
	close(ready)
	if err != nil {
		_ = cmd.Process.Kill()
		<-p.exited
		return nil, fmt.Errorf("start envoy %s: no pid from its keeper (%v): %v", cfg.binary, err, p.err)
	}
	p.started = time.Now()
	p.startTicks, _ = procStartTicks(pid)
	return p, nil
}

// signal sends sig unless the process has exited.
func (p *process) signal(sig syscall.Signal) {
	if p.alive() {
		_ = p.proc.Signal(sig)
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
		_ = p.proc.Kill()
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
			case si.Options.RestartEpoch != p.restartEpoch:
				last = fmt.Sprintf("admin answered for restart epoch %d", si.Options.RestartEpoch)
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

// adminOverrideArgs are the flags that make Envoy bind its admin on addr instead of the
// bootstrap's: --config-yaml is merged over the -c file.
func adminOverrideArgs(addr string) []string {
	if addr == "" {
		return nil
	}
	host, port, _ := net.SplitHostPort(addr)
	return []string{"--config-yaml", fmt.Sprintf(`{admin: {address: {socket_address: {address: %q, port_value: %s}}}}`, host, port)}
}

// validateBootstrap runs `envoy --mode validate` on a bootstrap file (with the admin address
// adminOverride, if set).
func validateBootstrap(ctx context.Context, binary, path, adminOverride string) error {
	args := append([]string{"--mode", "validate", "-c", path, "--log-level", "error"}, adminOverrideArgs(adminOverride)...)
	out, err := exec.CommandContext(ctx, binary, args...).CombinedOutput()
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
