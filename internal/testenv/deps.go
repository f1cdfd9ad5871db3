// Package testenv runs the real components meshturbo talks to (Envoy, istiod, Consul,
// ZooKeeper, Eureka) as child processes of a test: each on free 127.0.0.1 ports, ready only
// once a real probe answers, its output captured in a log file whose tail is printed when the
// test fails, and stopped (with its whole process group) when the test ends.
//
// The components are installed by hack/install-deps.sh (`make deps`), which writes their paths
// to deps.env in the cache directory. Without them, tests skip with the hint "run 'make deps'";
// with CI=true they fail instead, so CI never passes by skipping.
package testenv

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// Deps are the absolute paths (and versions) of the installed components, read from deps.env.
type Deps struct {
	Envoy              string // Envoy binary, the current version
	EnvoyVersion       string // e.g. "1.40.0"
	EnvoyOld           string // an older Envoy binary, for upgrade and version-skew tests
	EnvoyOldVersion    string // e.g. "1.39.3"
	PilotDiscovery     string // istiod, patched to run without Kubernetes
	Istioctl           string
	Consul             string
	ZooKeeperClasspath string // class path for org.apache.zookeeper.server.quorum.QuorumPeerMain
	Java               string
	EurekaJar          string // our Spring Cloud Netflix Eureka server (e2e/eureka-server)
	Fortio             string
}

// depsFile binds each deps.env key to its field and says whether the value names files that
// must exist (a class path names several, separated by colons).
func (d *Deps) fields() []depField {
	return []depField{
		{"ENVOY", &d.Envoy, pathExec},
		{"ENVOY_VERSION", &d.EnvoyVersion, pathNone},
		{"ENVOY_OLD", &d.EnvoyOld, pathExec},
		{"ENVOY_OLD_VERSION", &d.EnvoyOldVersion, pathNone},
		{"PILOT_DISCOVERY", &d.PilotDiscovery, pathExec},
		{"ISTIOCTL", &d.Istioctl, pathExec},
		{"CONSUL", &d.Consul, pathExec},
		{"ZOOKEEPER_CLASSPATH", &d.ZooKeeperClasspath, pathList},
		{"JAVA", &d.Java, pathExec},
		{"EUREKA_JAR", &d.EurekaJar, pathFile},
		{"FORTIO", &d.Fortio, pathExec},
	}
}

type pathKind int

const (
	pathNone pathKind = iota // not a path
	pathFile                 // a file that must exist
	pathExec                 // an executable file
	pathList                 // colon-separated files or directories that must exist
)

type depField struct {
	key  string
	dst  *string
	kind pathKind
}

// CacheDir is where hack/install-deps.sh keeps the components: $MESHTURBO_CACHE, or
// $HOME/.cache/meshturbo.
func CacheDir() (string, error) {
	if dir := os.Getenv("MESHTURBO_CACHE"); dir != "" {
		if !filepath.IsAbs(dir) {
			return "", fmt.Errorf("MESHTURBO_CACHE=%q is not an absolute path", dir)
		}
		return dir, nil
	}
	home, err := os.UserHomeDir()
	if err != nil {
		return "", fmt.Errorf("find the deps cache: %w", err)
	}
	return filepath.Join(home, ".cache", "meshturbo"), nil
}

// LoadDeps reads deps.env from CacheDir and checks that every component it names is there.
func LoadDeps() (Deps, error) {
	dir, err := CacheDir()
	if err != nil {
		return Deps{}, err
	}
	return loadDepsFile(filepath.Join(dir, "deps.env"))
}

func loadDepsFile(path string) (Deps, error) {
	f, err := os.Open(path)
	if err != nil {
		return Deps{}, fmt.Errorf("read deps: %w", err)
	}
	defer f.Close()

	values := map[string]string{}
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		key, value, ok := strings.Cut(line, "=")
		if !ok {
			return Deps{}, fmt.Errorf("read deps %s:%d: want KEY=VALUE, got %q", path, n, line)
		}
		values[key] = value
	}
	if err := sc.Err(); err != nil {
		return Deps{}, fmt.Errorf("read deps %s: %w", path, err)
	}

	var d Deps
	var errs []error
	for _, fld := range d.fields() {
		v, ok := values[fld.key]
		if !ok || v == "" {
			errs = append(errs, fmt.Errorf("%s is not set", fld.key))
			continue
		}
		if err := checkPath(fld.kind, v); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", fld.key, err))
			continue
		}
		*fld.dst = v
	}
	if err := errors.Join(errs...); err != nil {
		return Deps{}, fmt.Errorf("deps %s: %w", path, err)
	}
	return d, nil
}

func checkPath(kind pathKind, v string) error {
	switch kind {
	case pathFile, pathExec:
		fi, err := os.Stat(v)
		if err != nil {
			return err
		}
		if fi.IsDir() {
			return fmt.Errorf("%s is a directory", v)
		}
		if kind == pathExec && fi.Mode().Perm()&0o111 == 0 {
			return fmt.Errorf("%s is not executable", v)
		}
	case pathList:
		for _, p := range strings.Split(v, ":") {
			if _, err := os.Stat(p); err != nil {
				return err
			}
		}
	}
	return nil
}

// RequireDeps returns the installed components, or ends the test: with CI=true it fails (CI
// must not pass by skipping), elsewhere it skips with the hint to run 'make deps'.
func RequireDeps(t testing.TB) Deps {
	t.Helper()
	d, err := LoadDeps()
	if err != nil {
		missingDeps(t, err)
	}
	return d
}

func missingDeps(t testing.TB, err error) {
	t.Helper()
	if os.Getenv("CI") == "true" {
		t.Fatalf("testenv: components missing (CI=true, so this fails instead of skipping): %v; run 'make deps'", err)
	}
	t.Skipf("testenv: components missing: %v; run 'make deps'", err)
}
