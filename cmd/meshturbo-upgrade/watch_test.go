package main

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/meshturbo/meshturbo/hotupgrade"
	"github.com/meshturbo/meshturbo/internal/testenv"
)

// A changed bootstrap (a ConfigMap-style symlink swap) and a changed binary (a symlink
// moved from Envoy 1.39 to 1.40) each upgrade the running Envoy, with no signal or API call.
func TestChangedFilesTriggerUpgrades(t *testing.T) {
	deps := testenv.RequireDeps(t)
	ports := testenv.FreePorts(t, 3)
	dir := t.TempDir()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	// The ConfigMap volume: bootstrap.yaml -> ..data/bootstrap.yaml, ..data -> ..<version>.
	cm := filepath.Join(dir, "config")
	must(os.Mkdir(cm, 0o755))
	version := func(name, body string) {
		t.Helper()
		must(os.Mkdir(filepath.Join(cm, name), 0o755))
		must(os.WriteFile(filepath.Join(cm, name, "bootstrap.yaml"), []byte(bootstrap(ports[0], ports[1], body)), 0o644))
	}
	swap := func(name string) { // kubelet's atomic update
		t.Helper()
		must(os.Symlink(name, filepath.Join(cm, "..data_tmp")))
		must(os.Rename(filepath.Join(cm, "..data_tmp"), filepath.Join(cm, "..data")))
	}
	version("..v1", "one")
	must(os.Symlink("..v1", filepath.Join(cm, "..data")))
	must(os.Symlink("..data/bootstrap.yaml", filepath.Join(cm, "bootstrap.yaml")))
	envoy := filepath.Join(dir, "envoy")
	must(os.Symlink(deps.EnvoyOld, envoy))

	a := args{envoy: envoy, envoyAdmin: testenv.Addr(ports[0]), adminAddr: testenv.Addr(ports[2]), ip: "127.0.0.1",
		pod: "p", namespace: "default", interception: "NONE", concurrency: 1, workDir: filepath.Join(dir, "work"),
		serviceAcct: "default", bootstrap: filepath.Join(cm, "bootstrap.yaml"), drainTimeout: 10 * time.Second,
		watchEvery: 20 * time.Millisecond}
	must(os.Mkdir(a.workDir, 0o700))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- run(ctx, a, testenv.Logger(t)) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("run: %v", err)
		}
	}()
	m := &managerProc{admin: a.adminAddr, done: make(chan struct{})}
	url := "http://" + testenv.Addr(ports[1]) + "/"
	m.await(t, "epoch 0 serving", func(s hotupgrade.Status) bool {
		return s.Epoch == 0 && s.Phase == hotupgrade.PhaseServing && s.Version == deps.EnvoyOldVersion
	})
	if b := body(t, url); b != "one" {
		t.Fatalf("Envoy answers %q, want one", b)
	}

	version("..v2", "two")
	swap("..v2")
	m.await(t, "upgrade on the ConfigMap update", func(s hotupgrade.Status) bool {
		return s.Epoch == 1 && s.Phase == hotupgrade.PhaseServing && s.Last != nil && s.Last.Outcome == hotupgrade.OutcomeUpgraded
	})
	if b := body(t, url); b != "two" {
		t.Fatalf("after the ConfigMap update Envoy answers %q, want two", b)
	}

	// A new Envoy release behind the same path.
	must(os.Symlink(deps.Envoy, envoy+".new"))
	must(os.Rename(envoy+".new", envoy))
	st := m.await(t, "upgrade on the new binary", func(s hotupgrade.Status) bool {
		return s.Epoch == 2 && s.Phase == hotupgrade.PhaseServing && s.Last != nil && s.Last.Outcome == hotupgrade.OutcomeUpgraded
	})
	if st.Version != deps.EnvoyVersion || st.Last.FromVersion != deps.EnvoyOldVersion {
		t.Fatalf("after the binary changed: status %+v, last %+v; want %s -> %s", st, st.Last, deps.EnvoyOldVersion, deps.EnvoyVersion)
	}
	if b := body(t, url); b != "two" {
		t.Fatalf("after the binary upgrade Envoy answers %q, want two", b)
	}
	// Nothing else changed: no further upgrade happens (the watcher keeps polling; a
	// touched file is no change).
	now := time.Now()
	must(os.Chtimes(filepath.Join(cm, "..v2", "bootstrap.yaml"), now, now))
	deadline := time.Now().Add(500 * time.Millisecond)
	for time.Now().Before(deadline) {
		if s, err := m.status(); err == nil && s.Epoch != 2 {
			t.Fatalf("an upgrade without a change: %+v", s)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
