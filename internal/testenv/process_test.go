package testenv

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

func TestStartCapturesLogAndStops(t *testing.T) {
	marker := filepath.Join(t.TempDir(), "ready")
	cmd := exec.Command("/bin/sh", "-c", `echo hello stdout; echo hello stderr >&2; touch "$0"; exec sleep 300`, marker)
	p := Start(t, "sleeper", cmd, func(context.Context) error {
		_, err := os.Stat(marker)
		return err
	}, 10*time.Second)

	if p.Exited() {
		t.Fatal("Exited() = true for a running process")
	}
	tail := p.Tail(10)
	for _, want := range []string{"hello stdout", "hello stderr"} {
		if !strings.Contains(tail, want) {
			t.Errorf("Tail() = %q, want it to contain %q", tail, want)
		}
	}
	if err := p.Stop(); err != nil {
		t.Fatalf("Stop() = %v", err)
	}
	if !p.Exited() {
		t.Fatal("Exited() = false after Stop")
	}
	var exitErr *exec.ExitError
	if err := p.Wait(); !errors.As(err, &exitErr) {
		t.Fatalf("Wait() = %v, want the exit error of a process ended by SIGTERM", err)
	}
	if err := p.Stop(); err != nil {
		t.Fatalf("second Stop() = %v, want nil", err)
	}
}

func TestStartFailsFastWhenProcessExits(t *testing.T) {
	cmd := exec.Command("/bin/sh", "-c", `echo "fatal: cannot bind" >&2; exit 3`)
	begin := time.Now()
	_, err := StartIn(testEnv(t), "crasher", cmd, func(context.Context) error {
		return errors.New("never ready")
	}, time.Minute)
	if err == nil {
		t.Fatal("StartIn() = nil error for a process that exits at once")
	}
	if d := time.Since(begin); d > 5*time.Second {
		t.Errorf("StartIn() took %v to notice the exit, want well under the 1m timeout", d)
	}
	for _, want := range []string{"crasher exited before it was ready", "exit status 3", "fatal: cannot bind"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not contain %q", err, want)
		}
	}
}

func TestStartTimesOut(t *testing.T) {
	cmd := exec.Command("/bin/sh", "-c", `echo still booting; exec sleep 300`)
	_, err := StartIn(testEnv(t), "slowpoke", cmd, func(context.Context) error {
		return errors.New("port 1234 refused")
	}, 500*time.Millisecond)
	if err == nil {
		t.Fatal("StartIn() = nil error, want a timeout")
	}
	for _, want := range []string{"slowpoke not ready after 500ms", "port 1234 refused", "still booting"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not contain %q", err, want)
		}
	}
}

// A process that ignores SIGTERM is killed, and so is whatever it left in its process group.
func TestStopKillsStubbornProcessAndGroup(t *testing.T) {
	pidFile := filepath.Join(t.TempDir(), "child.pid")
	// The shell starts a child that ignores SIGTERM, then ignores SIGTERM itself.
	script := `(trap '' TERM; exec sleep 300) & echo $! > "$0"; trap '' TERM; while :; do sleep 0.1; done`
	cmd := exec.Command("/bin/sh", "-c", script, pidFile)
	p := Start(t, "stubborn", cmd, func(context.Context) error {
		b, err := os.ReadFile(pidFile)
		if err != nil || !strings.HasSuffix(string(b), "\n") {
			return errors.New("no pid file yet")
		}
		return nil
	}, 10*time.Second)
	b, _ := os.ReadFile(pidFile)
	child, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatal(err)
	}

	p.stopTimeout = 300 * time.Millisecond
	begin := time.Now()
	err = p.Stop()
	if err == nil || !strings.Contains(err.Error(), "killed") {
		t.Errorf("Stop() = %v, want an error saying it had to kill", err)
	}
	if d := time.Since(begin); d > 5*time.Second {
		t.Errorf("Stop() took %v", d)
	}
	waitGone(t, child)
}

// waitGone waits until pid no longer runs (gone, or a zombie nobody reaped yet).
func waitGone(t *testing.T, pid int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			return
		}
		// Field 3, after "(comm)", is the state.
		if i := strings.LastIndexByte(string(stat), ')'); i > 0 && strings.HasPrefix(string(stat[i+1:]), " Z") {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Errorf("process %d still runs after its group was stopped", pid)
}

func TestRestartAppendsToLog(t *testing.T) {
	count := filepath.Join(t.TempDir(), "count")
	// Print first, then count the run: once the count file exists, the line is in the log.
	script := `echo "run $(($(cat "$0" 2>/dev/null | wc -l) + 1))"; echo run >> "$0"; exec sleep 300`
	cmd := exec.Command("/bin/sh", "-c", script, count)
	ready := func(context.Context) error {
		if _, err := os.Stat(count); err != nil {
			return err
		}
		return nil
	}
	p := Start(t, "restarter", cmd, ready, 10*time.Second)
	firstPid := p.Pid()
	p.Restart(t)
	if p.Pid() == firstPid {
		t.Errorf("Pid() = %d after Restart, want a new process", firstPid)
	}
	deadline := time.Now().Add(5 * time.Second)
	for !strings.Contains(p.Tail(10), "run 2") && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	tail := p.Tail(10)
	for _, want := range []string{"run 1", "restarting restarter", "run 2"} {
		if !strings.Contains(tail, want) {
			t.Errorf("log %q does not contain %q", tail, want)
		}
	}
}

func TestStartRejectsOwnOutput(t *testing.T) {
	cmd := exec.Command("/bin/true")
	cmd.Stdout = os.Stdout
	if _, err := StartIn(testEnv(t), "true", cmd, nil, time.Second); err == nil {
		t.Fatal("StartIn() accepted a command with its own Stdout")
	}
}

func TestTail(t *testing.T) {
	path := filepath.Join(t.TempDir(), "log")
	var b strings.Builder
	for i := 1; i <= 100; i++ {
		fmt.Fprintf(&b, "line %d\n", i)
	}
	if err := os.WriteFile(path, []byte(b.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	if got, want := tailFile(path, 3), "line 98\nline 99\nline 100"; got != want {
		t.Errorf("tailFile(3) = %q, want %q", got, want)
	}
	if got := tailFile(path, 1000); !strings.HasPrefix(got, "line 1\n") {
		t.Errorf("tailFile(1000) starts %q, want the whole file", got[:20])
	}
}

func TestFreePortsAreDistinct(t *testing.T) {
	ports := FreePorts(t, 20)
	seen := map[int]bool{}
	for _, p := range ports {
		if p <= 0 || seen[p] {
			t.Fatalf("FreePorts() = %v: want 20 distinct positive ports", ports)
		}
		seen[p] = true
	}
}

func TestEnvOutsideTests(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "demo")
	env, err := NewEnv(dir)
	if err != nil {
		t.Fatal(err)
	}
	var procs []*Process
	for range 2 {
		p, err := StartIn(env, "sleeper", exec.Command("/bin/sh", "-c", "echo up; exec sleep 300"), nil, time.Second)
		if err != nil {
			t.Fatal(err)
		}
		procs = append(procs, p)
	}
	if got, want := procs[0].LogPath, filepath.Join(dir, "sleeper.log"); got != want {
		t.Errorf("first LogPath = %s, want %s", got, want)
	}
	if got, want := procs[1].LogPath, filepath.Join(dir, "sleeper-2.log"); got != want {
		t.Errorf("second LogPath = %s, want %s", got, want)
	}
	if err := env.Close(); err != nil {
		t.Fatalf("Close() = %v", err)
	}
	for _, p := range procs {
		if !p.Exited() {
			t.Errorf("%s (pid %d) still runs after Close", p.LogPath, p.Pid())
		}
	}
	if _, err := StartIn(env, "late", exec.Command("/bin/true"), nil, time.Second); err == nil {
		t.Error("StartIn() after Close succeeded")
	}
}
