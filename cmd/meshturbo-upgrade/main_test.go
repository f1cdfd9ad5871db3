package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/meshturbo/meshturbo/hotupgrade"
	"github.com/meshturbo/meshturbo/internal/testenv"
)

func bootstrap(admin, listen int, body string) string {
	return fmt.Sprintf(`admin: {address: {socket_address: {address: 127.0.0.1, port_value: %d}}}
static_resources:
  listeners:
  - name: l
    address: {socket_address: {address: 127.0.0.1, port_value: %d}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: l
          route_config:
            virtual_hosts:
            - {name: all, domains: ["*"], routes: [{match: {prefix: "/"}, direct_response: {status: 200, body: {inline_string: %q}}}]}
          http_filters:
          - {name: envoy.filters.http.router, typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
`, admin, listen, body)
}

// SIGHUP re-reads the bootstrap file and upgrades; POST /v1/upgrade does too.
func TestSIGHUPAndAdminAPIUpgrade(t *testing.T) {
	deps := testenv.RequireDeps(t)
	ports := testenv.FreePorts(t, 3)
	dir := t.TempDir()
	bsPath := filepath.Join(dir, "bootstrap.yaml")
	write := func(body string) {
		if err := os.WriteFile(bsPath, []byte(bootstrap(ports[0], ports[1], body)), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write("one")
	a := args{envoy: deps.Envoy, envoyAdmin: testenv.Addr(ports[0]), adminAddr: testenv.Addr(ports[2]), ip: "127.0.0.1",
		pod: "p", namespace: "default", interception: "NONE", concurrency: 1, workDir: filepath.Join(dir, "work"),
		serviceAcct: "default", bootstrap: bsPath, drainTimeout: 10 * time.Second}
	if err := os.Mkdir(a.workDir, 0o700); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- run(ctx, a, testenv.Logger(t)) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("run: %v", err)
		}
	}()

	base := "http://" + a.adminAddr + "/v1/upgrade"
	status := func() (hotupgrade.Status, error) {
		resp, err := http.Get(base)
		if err != nil {
			return hotupgrade.Status{}, err
		}
		defer resp.Body.Close()
		var st hotupgrade.Status
		return st, json.NewDecoder(resp.Body).Decode(&st)
	}
	await := func(what string, ok func(hotupgrade.Status) bool) {
		t.Helper()
		deadline := time.Now().Add(30 * time.Second)
		for {
			st, err := status()
			if err == nil && ok(st) {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: last status %+v, error %v", what, st, err)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	await("epoch 0 serving", func(s hotupgrade.Status) bool { return s.Epoch == 0 && s.Phase == hotupgrade.PhaseServing })

	write("two")
	if err := syscall.Kill(os.Getpid(), syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	await("upgrade on SIGHUP", func(s hotupgrade.Status) bool {
		return s.Epoch == 1 && s.Phase == hotupgrade.PhaseServing && s.Last != nil && s.Last.Outcome == hotupgrade.OutcomeUpgraded
	})

	write("three")
	resp, err := http.Post(base, "application/json", strings.NewReader(`{"bootstrap_path": "`+bsPath+`"}`))
	if err != nil {
		t.Fatal(err)
	}
	var res hotupgrade.UpgradeResult
	_ = json.NewDecoder(resp.Body).Decode(&res)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || res.ToEpoch != 2 {
		t.Fatalf("POST /v1/upgrade: status %d, result %+v", resp.StatusCode, res)
	}
	r, err := http.Get("http://" + testenv.Addr(ports[1]) + "/")
	if err != nil {
		t.Fatal(err)
	}
	var body [16]byte
	n, _ := r.Body.Read(body[:])
	r.Body.Close()
	if got := string(body[:n]); got != "three" {
		t.Errorf("Envoy answers %q after the upgrades, want \"three\"", got)
	}

	mr, err := http.Get("http://" + a.adminAddr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	metrics, _ := io.ReadAll(mr.Body)
	mr.Body.Close()
	for _, want := range []string{"meshturbo_upgrade_epoch 2", "meshturbo_upgrade_upgrades_total 2", "meshturbo_upgrade_rollbacks_total 0",
		`meshturbo_upgrade_last_duration_seconds{outcome="upgraded"}`} {
		if !strings.Contains(string(metrics), want) {
			t.Errorf("/metrics lacks %q:\n%s", want, metrics)
		}
	}
}
