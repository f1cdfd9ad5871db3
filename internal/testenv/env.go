package testenv

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sync"
	"testing"
)

// Env is where components run: the directory that holds their logs and files, and the owner
// that stops them. Tests don't need one: Start and the StartX helpers make one per call from
// the test (files in t.TempDir, processes stopped by t.Cleanup). Programs that are not tests,
// such as the demo, use NewEnv and the StartXIn functions, and Close the Env when done.
type Env struct {
	dir string
	tb  testing.TB // nil outside tests

	mu     sync.Mutex
	names  map[string]int // how often each name was used, to keep files apart
	procs  []*Process     // started outside tests, for Close
	closed bool
}

// NewEnv returns an Env whose processes keep their logs in dir (<name>.log) and their files in
// dir/<name>/, both emptied at the first use of each name. dir is created if needed.
func NewEnv(dir string) (*Env, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, fmt.Errorf("new env: %w", err)
	}
	if err := os.MkdirAll(abs, 0o755); err != nil {
		return nil, fmt.Errorf("new env: %w", err)
	}
	return &Env{dir: abs, names: map[string]int{}}, nil
}

// testEnv is the Env of one Start call in a test.
func testEnv(t testing.TB) *Env {
	return &Env{dir: t.TempDir(), tb: t, names: map[string]int{}}
}

// Dir is the directory holding the logs.
func (e *Env) Dir() string { return e.dir }

// Close stops every process started in the Env, the last started first, and returns what
// went wrong stopping them. Processes started by tests are stopped by their tests instead.
func (e *Env) Close() error {
	e.mu.Lock()
	procs := e.procs
	e.procs = nil
	e.closed = true
	e.mu.Unlock()
	var errs []error
	for i := len(procs) - 1; i >= 0; i-- {
		errs = append(errs, procs[i].Stop())
		procs[i].logFile.Close()
	}
	return errors.Join(errs...)
}

var unsafeFileChars = regexp.MustCompile(`[^A-Za-z0-9._-]+`)

// uniqueName turns a component name into a file name not used before in this Env.
func (e *Env) uniqueName(name string) string {
	base := unsafeFileChars.ReplaceAllString(name, "_")
	e.mu.Lock()
	defer e.mu.Unlock()
	e.names[base]++
	if n := e.names[base]; n > 1 {
		return fmt.Sprintf("%s-%d", base, n)
	}
	return base
}

// workDir returns an empty directory for a component's files.
func (e *Env) workDir(name string) (string, error) {
	if e.tb != nil {
		return e.tb.TempDir(), nil
	}
	dir := filepath.Join(e.dir, e.uniqueName(name))
	if err := os.RemoveAll(dir); err != nil {
		return "", err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	return dir, nil
}

// logPath returns the path of a new log file for a component.
func (e *Env) logPath(name string) string {
	if e.tb != nil {
		return filepath.Join(e.tb.TempDir(), unsafeFileChars.ReplaceAllString(name, "_")+".log")
	}
	return filepath.Join(e.dir, e.uniqueName(name)+".log")
}

func (e *Env) logf(format string, args ...any) {
	if e.tb != nil {
		e.tb.Helper()
		e.tb.Logf(format, args...)
	}
}

// track makes the Env responsible for stopping p: in a test, through t.Cleanup (registered
// after t.TempDir, so it runs before the temporary directory is removed).
func (e *Env) track(p *Process) error {
	if e.tb != nil {
		e.tb.Cleanup(p.cleanup)
		return nil
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.closed {
		return fmt.Errorf("start %s: the env is closed", p.Name)
	}
	e.procs = append(e.procs, p)
	return nil
}
