package testenv

import (
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
)

func writeDeps(t *testing.T, dir string, override map[string]string) {
	t.Helper()
	bin := filepath.Join(dir, "bin")
	if err := os.WriteFile(bin, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	jar := filepath.Join(dir, "server.jar")
	if err := os.WriteFile(jar, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	values := map[string]string{
		"ENVOY": bin, "ENVOY_VERSION": "1.40.0", "ENVOY_OLD": bin, "ENVOY_OLD_VERSION": "1.39.3",
		"PILOT_DISCOVERY": bin, "ISTIOCTL": bin, "CONSUL": bin,
		"ZOOKEEPER_CLASSPATH": dir + ":" + jar, "JAVA": bin, "EUREKA_JAR": jar, "FORTIO": bin,
	}
	for k, v := range override {
		if v == "server.jar" {
			v = jar
		}
		if v == "" {
			delete(values, k)
		} else {
			values[k] = v
		}
	}
	var b strings.Builder
	b.WriteString("# comment\n\n")
	for k, v := range values {
		fmt.Fprintf(&b, "%s=%s\n", k, v)
	}
	if err := os.WriteFile(filepath.Join(dir, "deps.env"), []byte(b.String()), 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestLoadDeps(t *testing.T) {
	dir := t.TempDir()
	t.Setenv("MESHTURBO_CACHE", dir)
	writeDeps(t, dir, nil)
	d, err := LoadDeps()
	if err != nil {
		t.Fatalf("LoadDeps() = %v", err)
	}
	if d.EnvoyVersion != "1.40.0" || d.EnvoyOldVersion != "1.39.3" || d.Consul != filepath.Join(dir, "bin") {
		t.Errorf("LoadDeps() = %+v", d)
	}
}

func TestLoadDepsErrors(t *testing.T) {
	for _, tc := range []struct {
		name     string
		override map[string]string
		want     string
	}{
		{"missing key", map[string]string{"CONSUL": ""}, "CONSUL is not set"},
		{"missing binary", map[string]string{"ENVOY": "/nonexistent/envoy"}, "ENVOY: stat /nonexistent/envoy"},
		{"not executable", map[string]string{"FORTIO": "server.jar"}, "server.jar is not executable"},
		{"missing class path entry", map[string]string{"ZOOKEEPER_CLASSPATH": "/nonexistent/zk.jar"}, "ZOOKEEPER_CLASSPATH: stat /nonexistent/zk.jar"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			t.Setenv("MESHTURBO_CACHE", dir)
			writeDeps(t, dir, tc.override)
			_, err := LoadDeps()
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("LoadDeps() = %v, want an error containing %q", err, tc.want)
			}
		})
	}
	t.Run("relative cache", func(t *testing.T) {
		t.Setenv("MESHTURBO_CACHE", "relative/dir")
		if _, err := LoadDeps(); err == nil || !strings.Contains(err.Error(), "not an absolute path") {
			t.Fatalf("LoadDeps() = %v", err)
		}
	})
}

// recordingTB records how a test would have ended, instead of ending it.
type recordingTB struct {
	testing.TB
	mu      sync.Mutex
	skipped string
	fatal   string
}

func (r *recordingTB) Helper() {}

func (r *recordingTB) Skipf(format string, args ...any) {
	r.mu.Lock()
	r.skipped = fmt.Sprintf(format, args...)
	r.mu.Unlock()
	runtime.Goexit()
}

func (r *recordingTB) Fatalf(format string, args ...any) {
	r.mu.Lock()
	r.fatal = fmt.Sprintf(format, args...)
	r.mu.Unlock()
	runtime.Goexit()
}

// run calls f with r on a goroutine of its own, which Skipf and Fatalf end.
func (r *recordingTB) run(f func(testing.TB)) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		f(r)
	}()
	<-done
}

func TestRequireDepsSkipsOrFails(t *testing.T) {
	t.Setenv("MESHTURBO_CACHE", t.TempDir()) // no deps.env there

	t.Setenv("CI", "")
	r := &recordingTB{TB: t}
	r.run(func(tb testing.TB) { RequireDeps(tb) })
	if r.fatal != "" || !strings.Contains(r.skipped, "run 'make deps'") {
		t.Errorf("without CI: skipped %q, fatal %q; want a skip with the hint", r.skipped, r.fatal)
	}

	t.Setenv("CI", "true")
	r = &recordingTB{TB: t}
	r.run(func(tb testing.TB) { RequireDeps(tb) })
	if r.skipped != "" || !strings.Contains(r.fatal, "run 'make deps'") {
		t.Errorf("with CI=true: skipped %q, fatal %q; want a failure with the hint", r.skipped, r.fatal)
	}
}

func TestLogger(t *testing.T) {
	log := Logger(t)
	log.Info("hello", "component", "testenv")
	log.Debug("debug is on")
}

// logTB records t.Log lines and cleanups.
type logTB struct {
	testing.TB
	lines    []string
	cleanups []func()
}

func (l *logTB) Log(args ...any)  { l.lines = append(l.lines, fmt.Sprint(args...)) }
func (l *logTB) Cleanup(f func()) { l.cleanups = append(l.cleanups, f) }

func TestWriterSplitsLines(t *testing.T) {
	tb := &logTB{TB: t}
	w := Writer(tb)
	fmt.Fprint(w, "one\ntw")
	fmt.Fprint(w, "o\nthree\nfou")
	fmt.Fprint(w, "r")
	for _, f := range tb.cleanups {
		f()
	}
	fmt.Fprint(w, "after the test\n")
	if got, want := strings.Join(tb.lines, "|"), "one|two|three|four"; got != want {
		t.Errorf("logged %q, want %q", got, want)
	}
}
