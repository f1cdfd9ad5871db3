package testenv

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

const (
	// StopTimeout is how long Stop waits after SIGTERM before it sends SIGKILL.
	StopTimeout = 10 * time.Second
	// TailLines is how many lines of a component's log are shown when a test fails.
	TailLines = 60

	probeInterval = 100 * time.Millisecond
	probeTimeout  = 2 * time.Second
)

// Process is a component running as a child process, in its own process group. Create it with
// Start or a StartX helper (stopped when the test ends), or StartIn and the StartXIn functions
// (stopped by Env.Close).
type Process struct {
	Name    string
	LogPath string // stdout and stderr of every run of the process, appended
	// Cmd is the command of the current run. Restart replaces it.
	Cmd *exec.Cmd

	env         *Env
	ready       func(context.Context) error
	timeout     time.Duration
	stopTimeout time.Duration
	logFile     *os.File

	mu        sync.Mutex
	run       *run
	tailShown bool // a failure already showed the log's tail
}

// run is one execution of the process.
type run struct {
	cmd  *exec.Cmd
	done chan struct{} // closed once the process has exited and been reaped
	err  error         // cmd.Wait's result, valid after done

	reapGroup sync.Once // kill what is left of the group, once, after the leader exited
}

// killRest kills whatever is left in the run's process group after its leader exited. Once
// per run: the group id is the leader's pid, which the system may reuse later.
func (r *run) killRest() {
	r.reapGroup.Do(func() { killGroup(r.cmd.Process.Pid) })
}

// Start runs cmd as component name, waits until ready succeeds, and stops it (its whole process
// group) when the test ends, showing the last TailLines lines of its log if the test failed.
//
// Start sets cmd.Stdout and cmd.Stderr to the log file (they must be nil) and puts the
// process in its own process group. ready is one probe attempt: Start calls it every 100 ms,
// each call with a context that ends after 2 s, until it returns nil, the process exits (the
// test fails at once with the exit status and the log's tail), or timeout passes. A nil ready
// means the process counts as ready once started.
func Start(t testing.TB, name string, cmd *exec.Cmd, ready func(ctx context.Context) error, timeout time.Duration) *Process {
	t.Helper()
	p, err := StartIn(testEnv(t), name, cmd, ready, timeout)
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	return p
}

// StartIn is Start outside a test: the log goes to env's directory, failures are returned,
// and env.Close stops the process.
func StartIn(env *Env, name string, cmd *exec.Cmd, ready func(ctx context.Context) error, timeout time.Duration) (*Process, error) {
	if cmd.Stdout != nil || cmd.Stderr != nil {
		return nil, fmt.Errorf("start %s: cmd.Stdout and cmd.Stderr must be nil: the log file takes both", name)
	}
	logPath := env.logPath(name)
	logFile, err := os.OpenFile(logPath, os.O_CREATE|os.O_TRUNC|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &Process{
		Name:        name,
		LogPath:     logPath,
		env:         env,
		ready:       ready,
		timeout:     timeout,
		stopTimeout: StopTimeout,
		logFile:     logFile,
	}
	if err := env.track(p); err != nil {
		logFile.Close()
		return nil, err
	}
	if err := p.launch(cmd); err != nil {
		return nil, err
	}
	return p, nil
}

// cleanup ends a test's process: stop it, and show its log's tail if the test failed.
func (p *Process) cleanup() {
	t := p.env.tb
	if err := p.Stop(); err != nil {
		t.Logf("testenv: %v", err)
	}
	p.mu.Lock()
	shown := p.tailShown
	p.mu.Unlock()
	if t.Failed() && !shown {
		t.Logf("testenv: %s log %s, last %d lines:\n%s", p.Name, p.LogPath, TailLines, p.Tail(TailLines))
	}
	p.logFile.Close()
}

// launch starts cmd and waits for readiness; on failure the process is stopped and the error
// carries the log's tail.
func (p *Process) launch(cmd *exec.Cmd) error {
	cmd.Stdout = p.logFile
	cmd.Stderr = p.logFile
	cmd.WaitDelay = time.Second
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	// Own process group, so that Stop reaches everything the component forks; and killed if the
	// test binary dies without running its cleanups (a panic, a test timeout).
	cmd.SysProcAttr.Setpgid = true
	cmd.SysProcAttr.Pgid = 0
	cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL

	r := &run{cmd: cmd, done: make(chan struct{})}
	started := make(chan error, 1)
	go func() {
		// The parent-death signal fires when the thread that forked the child exits, not the
		// process: keep this goroutine on its thread for as long as the child lives.
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		if err := cmd.Start(); err != nil {
			started <- err
			return
		}
		started <- nil
		r.err = cmd.Wait()
		close(r.done)
	}()
	if err := <-started; err != nil {
		return fmt.Errorf("start %s: %w", p.Name, err)
	}
	p.mu.Lock()
	p.run = r
	p.Cmd = cmd
	p.mu.Unlock()
	p.env.logf("testenv: started %s (pid %d), log %s", p.Name, cmd.Process.Pid, p.LogPath)

	if p.ready == nil {
		return nil
	}
	if err := p.waitReady(r); err != nil {
		stopErr := p.Stop()
		p.mu.Lock()
		p.tailShown = true
		p.mu.Unlock()
		return fmt.Errorf("%w%s\n--- last %d lines of %s ---\n%s", err, suffixErr(stopErr), TailLines, p.LogPath, p.Tail(TailLines))
	}
	return nil
}

func suffixErr(err error) string {
	if err == nil {
		return ""
	}
	return " (" + err.Error() + ")"
}

func (p *Process) waitReady(r *run) error {
	begin := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), p.timeout)
	defer cancel()
	// A probe in flight ends as soon as the process exits.
	go func() {
		select {
		case <-r.done:
			cancel()
		case <-ctx.Done():
		}
	}()

	tick := time.NewTicker(probeInterval)
	defer tick.Stop()
	var lastErr error
	for {
		pctx, pcancel := context.WithTimeout(ctx, probeTimeout)
		err := p.ready(pctx)
		pcancel()
		if err == nil {
			select {
			case <-r.done: // it answered, but it is gone: not ready.
			default:
				return nil
			}
		}
		lastErr = err
		select {
		case <-r.done:
			return fmt.Errorf("%s exited before it was ready, after %v: %s", p.Name, time.Since(begin).Round(time.Millisecond), exitDescription(r.err))
		case <-ctx.Done():
			select {
			case <-r.done:
				return fmt.Errorf("%s exited before it was ready, after %v: %s", p.Name, time.Since(begin).Round(time.Millisecond), exitDescription(r.err))
			default:
			}
			return fmt.Errorf("%s not ready after %v; last probe: %v", p.Name, p.timeout, lastErr)
		case <-tick.C:
		}
	}
}

func exitDescription(err error) string {
	if err == nil {
		return "exit status 0"
	}
	return err.Error()
}

func (p *Process) current() *run {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.run
}

// Done is closed when the current run of the process has exited.
func (p *Process) Done() <-chan struct{} { return p.current().done }

// Exited reports whether the current run of the process has exited.
func (p *Process) Exited() bool {
	select {
	case <-p.current().done:
		return true
	default:
		return false
	}
}

// Wait waits for the current run to exit and returns its exit error (nil for status 0).
func (p *Process) Wait() error {
	r := p.current()
	<-r.done
	return r.err
}

// Pid is the process id (and process group id) of the current run.
func (p *Process) Pid() int { return p.current().cmd.Process.Pid }

// Signal sends sig to the current run's process (not its group).
func (p *Process) Signal(sig os.Signal) error { return p.current().cmd.Process.Signal(sig) }

// Stop ends the current run: SIGTERM to its process group, then SIGKILL if it has not exited
// after StopTimeout. Once the process has exited, anything left in its group is killed. It is
// safe to call more than once; it returns an error only if the process had to be killed.
func (p *Process) Stop() error {
	r := p.current()
	if r == nil {
		return nil
	}
	pgid := r.cmd.Process.Pid
	select {
	case <-r.done:
		r.killRest()
		return nil
	default:
	}
	_ = syscall.Kill(-pgid, syscall.SIGTERM)
	timer := time.NewTimer(p.stopTimeout)
	defer timer.Stop()
	select {
	case <-r.done:
		r.killRest()
		return nil
	case <-timer.C:
	}
	killGroup(pgid)
	select {
	case <-r.done:
		r.killRest()
	case <-time.After(StopTimeout):
		return fmt.Errorf("stop %s (pid %d): still running %v after SIGKILL", p.Name, pgid, StopTimeout)
	}
	return fmt.Errorf("stop %s (pid %d): no exit within %v of SIGTERM; killed", p.Name, pgid, p.stopTimeout)
}

func killGroup(pgid int) {
	_ = syscall.Kill(-pgid, syscall.SIGKILL) // ESRCH: nothing left in the group
}

// Restart stops the process and starts it again with the same command line, environment and
// readiness probe, appending to the same log. The test fails if it does not become ready.
// Call it from the test's goroutine, not concurrently with other methods.
func (p *Process) Restart(t testing.TB) {
	t.Helper()
	if err := p.restart(); err != nil {
		t.Fatalf("testenv: restart: %v", err)
	}
}

func (p *Process) restart() error {
	if err := p.Stop(); err != nil {
		p.env.logf("testenv: %v", err)
	}
	old := p.current().cmd
	cmd := &exec.Cmd{
		Path: old.Path,
		Args: append([]string(nil), old.Args...),
		Env:  old.Env,
		Dir:  old.Dir,
	}
	if old.SysProcAttr != nil {
		attr := *old.SysProcAttr
		cmd.SysProcAttr = &attr
	}
	fmt.Fprintf(p.logFile, "\n--- testenv: restarting %s at %s ---\n", p.Name, time.Now().Format(time.RFC3339Nano))
	return p.launch(cmd)
}

// Tail returns the last n lines of the process's log.
func (p *Process) Tail(n int) string {
	return tailFile(p.LogPath, n)
}

func tailFile(path string, n int) string {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Sprintf("(cannot read log: %v)", err)
	}
	defer f.Close()
	const maxRead = 256 << 10
	fi, err := f.Stat()
	if err != nil {
		return fmt.Sprintf("(cannot read log: %v)", err)
	}
	off := max(fi.Size()-maxRead, 0)
	buf, err := io.ReadAll(io.NewSectionReader(f, off, fi.Size()-off))
	if err != nil {
		return fmt.Sprintf("(cannot read log: %v)", err)
	}
	lines := strings.Split(strings.TrimRight(string(buf), "\n"), "\n")
	if off > 0 && len(lines) > 1 {
		lines = lines[1:] // the first line is probably cut
	}
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// FreePort returns a TCP port on 127.0.0.1 that was free a moment ago.
func FreePort(t testing.TB) int {
	t.Helper()
	return FreePorts(t, 1)[0]
}

// FreePorts returns n distinct TCP ports on 127.0.0.1 that were free a moment ago.
func FreePorts(t testing.TB, n int) []int {
	t.Helper()
	ports, err := FreeLoopbackPorts(n)
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	return ports
}

// FreeLoopbackPorts returns n distinct free ports on 127.0.0.1, for programs that are not
// tests (the demo, benchmarks); tests use FreePorts.
func FreeLoopbackPorts(n int) ([]int, error) {
	ports := make([]int, 0, n)
	var listeners []net.Listener
	defer func() {
		for _, l := range listeners {
			l.Close()
		}
	}()
	// Hold every listener until all are chosen, so the ports are distinct.
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("find a free port: %w", err)
		}
		listeners = append(listeners, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

// Addr is "127.0.0.1:port".
func Addr(port int) string { return fmt.Sprintf("127.0.0.1:%d", port) }

// ListenSharedPort listens on a free port of ip whose number is also free on every address
// of alsoFree: for a service behind sidecars in interception mode NONE, which bind the
// service's port on their own loopback addresses.
func ListenSharedPort(ip string, alsoFree ...string) (net.Listener, error) {
	for range 50 {
		lis, err := net.Listen("tcp", net.JoinHostPort(ip, "0"))
		if err != nil {
			return nil, fmt.Errorf("listen on %s: %w", ip, err)
		}
		port := fmt.Sprint(lis.Addr().(*net.TCPAddr).Port)
		free := true
		for _, other := range alsoFree {
			l, err := net.Listen("tcp", net.JoinHostPort(other, port))
			if err != nil {
				free = false
				break
			}
			l.Close()
		}
		if free {
			return lis, nil
		}
		lis.Close()
	}
	return nil, fmt.Errorf("no port of %s is also free on %v", ip, alsoFree)
}
