package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/meshturbo/meshturbo/bpf"
	"github.com/meshturbo/meshturbo/internal/testenv"
)

func TestMain(m *testing.M) {
	// The agent loads meshturbo's BPF objects: not while the bpf package checks for leftovers.
	unlock, err := testenv.LockBPF()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	defer unlock()
	goleak.VerifyTestMain(m,
		// govpp's core returns API channels to its pool from a goroutine of its own (VPP mode);
		// they finish on their own.
		goleak.IgnoreAnyFunction("go.fd.io/govpp/core/genericpool.(*Pool[...]).Put"),
	)
}

func TestParseArgs(t *testing.T) {
	for _, tc := range []struct {
		argv    []string
		wantErr bool
		check   func(args) bool
	}{
		{[]string{"-cgroup", "/x", "-mesh-ips", "10.0.0.1, fd00::2", "-sidecar-ports", "15001"}, false,
			func(a args) bool {
				m, err := a.flagMesh()
				return err == nil && len(m.IPs) == 2 && m.SidecarPorts[0] == 15001
			}},
		{[]string{"-mesh-ips", "10.0.0.300"}, false, func(a args) bool { _, err := a.flagMesh(); return err != nil }},
		{[]string{"-sidecar-ports", "0"}, false, func(a args) bool { _, err := a.flagMesh(); return err != nil }},
		{[]string{"extra"}, true, nil},
		{[]string{"-max-conns", "99999999999"}, true, nil},
		{[]string{"-nope"}, true, nil},
		{[]string{"-redirect", "-redirect-sidecar-cgroups", "/a,/b", "-redirect-outbound", "127.0.0.1:15001",
			"-redirect-exclude-ports", "22, 15020", "-redirect-exclude-cidrs", "169.254.0.0/16"}, false,
			func(a args) bool {
				rc, err := a.redirectConfig()
				return err == nil && rc.Enabled && len(rc.SidecarCgroups) == 2 && rc.OutboundPort == 15001 &&
					len(rc.ExcludePorts) == 2 && rc.ExcludeCIDRs[0].String() == "169.254.0.0/16"
			}},
		{[]string{"-redirect"}, false, func(a args) bool {
			_, err := a.redirectConfig()
			return err != nil && strings.Contains(err.Error(), "-redirect-sidecar-cgroups")
		}},
		{[]string{"-redirect", "-redirect-sidecar-cgroups", "/a", "-redirect-exclude-cidrs", "10.0.0.0/33"}, false,
			func(a args) bool { _, err := a.redirectConfig(); return err != nil }},
		{[]string{"-redirect-sidecar-cgroups", "/a"}, false, func(a args) bool {
			rc, err := a.redirectConfig()
			return err == nil && !rc.Enabled
		}},
	} {
		a, err := parseArgs(tc.argv, io.Discard)
		if (err != nil) != tc.wantErr {
			t.Errorf("%v: err %v", tc.argv, err)
			continue
		}
		if tc.check != nil && !tc.check(a) {
			t.Errorf("%v: parsed %+v", tc.argv, a)
		}
	}
}

func TestReadMeshFile(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		body string
		ok   bool
	}{
		{`{"ips": ["10.0.0.1", "fd00::1"], "sidecar_ports": [15001]}`, true},
		{`{"ips": ["nope"]}`, false},
		{`{"ips": [], "ports": [1]}`, false}, // unknown field
		{`{"sidecar_ports": [0]}`, false},
	} {
		p := filepath.Join(dir, "mesh.json")
		if err := os.WriteFile(p, []byte(tc.body), 0o600); err != nil {
			t.Fatal(err)
		}
		_, err := readMeshFile(p)
		if (err == nil) != tc.ok {
			t.Errorf("%s: err %v", tc.body, err)
		}
	}
}

func requireRoot(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: loads BPF programs and attaches them to a cgroup")
	}
	if !isCgroup2(defaultCgroup()) {
		t.Skipf("needs cgroup v2 at %s", defaultCgroup())
	}
}

func suffix() string {
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

func freeAddr(t *testing.T) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// startRun runs the agent until the test ends and returns its admin address.
func startRun(t *testing.T, a args) string {
	t.Helper()
	a.adminAddr = freeAddr(t)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	log := slog.New(slog.NewTextHandler(tWriter{t}, nil))
	go func() { done <- run(ctx, a, log) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("run: %v", err)
		}
	})
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if resp, err := http.Get("http://" + a.adminAddr + "/healthz"); err == nil {
			resp.Body.Close()
			return a.adminAddr
		}
		select {
		case err := <-done:
			t.Fatalf("run ended: %v", err)
		case <-time.After(20 * time.Millisecond):
		}
	}
	t.Fatal("admin API not up")
	return ""
}

type tWriter struct{ t *testing.T }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

func get(t *testing.T, url string) string {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		t.Fatalf("%s: %s %s", url, resp.Status, b)
	}
	return string(b)
}

func testCgroup(t *testing.T) string {
	dir := filepath.Join(defaultCgroup(), "meshturbo-agent-test-"+suffix())
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.Remove(dir) })
	return dir
}

// TestRunServesStatusAndUninstalls: the agent runs, serves state and counters, restarts
// onto its pins, and the uninstall subcommand removes them.
func TestRunServesStatusAndUninstalls(t *testing.T) {
	requireRoot(t)
	cg := testCgroup(t)
	pin := filepath.Join(bpf.DefaultBPFFS, "meshturbo-agent-test-"+suffix())
	meshFile := filepath.Join(t.TempDir(), "mesh.json")
	if err := os.WriteFile(meshFile, []byte(`{"ips": ["10.9.0.1"], "sidecar_ports": [15001]}`), 0o600); err != nil {
		t.Fatal(err)
	}
	a := args{cgroup: cg, pinPath: pin, meshFile: meshFile, meshPoll: 10 * time.Millisecond, maxConns: 1024}
	for round := range 2 { // the second run adopts the first one's pins
		t.Run("run", func(t *testing.T) {
			addr := startRun(t, a)
			var st status
			if err := json.Unmarshal([]byte(get(t, "http://"+addr+"/v1/accel")), &st); err != nil {
				t.Fatal(err)
			}
			if !st.Accelerating || st.State == nil || st.Stats == nil || len(st.State.Programs) != 2 {
				t.Fatalf("status: %+v", st)
			}
			for _, p := range st.State.Programs {
				if p.Adopted != (round == 1) {
					t.Errorf("round %d: %s adopted=%v", round, p.Program, p.Adopted)
				}
			}
			if len(st.State.MeshIPs) != 1 || st.State.MeshIPs[0] != netip.MustParseAddr("10.9.0.1") {
				t.Errorf("mesh IPs %v", st.State.MeshIPs)
			}
			// A changed mesh file is applied.
			if err := os.WriteFile(meshFile, []byte(`{"ips": ["10.9.0.1", "10.9.0.2"], "sidecar_ports": [15001]}`), 0o600); err != nil {
				t.Fatal(err)
			}
			deadline := time.Now().Add(5 * time.Second)
			for {
				_ = json.Unmarshal([]byte(get(t, "http://"+addr+"/v1/accel")), &st)
				if len(st.State.MeshIPs) == 2 {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("mesh file change not applied: %v", st.State.MeshIPs)
				}
				time.Sleep(10 * time.Millisecond)
			}
			_ = os.WriteFile(meshFile, []byte(`{"ips": ["10.9.0.1"], "sidecar_ports": [15001]}`), 0o600)
			metrics := get(t, "http://"+addr+"/metrics")
			for _, want := range []string{"meshturbo_accel_enabled 1", "meshturbo_accel_sockets_inserted_total", `meshturbo_accel_insert_failed_total{reason="busy"} 0`} {
				if !strings.Contains(metrics, want) {
					t.Errorf("metrics lack %q:\n%s", want, metrics)
				}
			}
		})
	}
	if _, err := os.Stat(filepath.Join(pin, "link_sockops")); err != nil {
		t.Fatalf("pins gone after the agent stopped: %v", err)
	}
	var out strings.Builder
	if err := uninstall([]string{"-pin-path", pin}, &out); err != nil {
		t.Fatalf("uninstall: %v", err)
	}
	t.Log(out.String())
	if _, err := os.Stat(pin); !os.IsNotExist(err) {
		t.Fatalf("pin path after uninstall: %v", err)
	}
}

// TestRunFallsBackWhenAFeatureIsMissing: with a probe forced to fail the agent keeps running,
// accelerates nothing, and says which feature is missing.
func TestRunFallsBackWhenAFeatureIsMissing(t *testing.T) {
	requireRoot(t)
	cg := testCgroup(t)
	pin := filepath.Join(bpf.DefaultBPFFS, "meshturbo-agent-test-"+suffix())
	addr := startRun(t, args{cgroup: cg, pinPath: pin, sidecarPorts: "15001", probeFailure: bpf.FeatureSockMapLink})
	var st status
	if err := json.Unmarshal([]byte(get(t, "http://"+addr+"/v1/accel")), &st); err != nil {
		t.Fatal(err)
	}
	if st.Accelerating || !strings.Contains(st.FallbackReason, string(bpf.FeatureSockMapLink)) {
		t.Fatalf("status: %+v", st)
	}
	if !strings.Contains(get(t, "http://"+addr+"/metrics"), "meshturbo_accel_enabled 0") {
		t.Fatal("metrics do not say acceleration is off")
	}
	if _, err := os.Stat(pin); !os.IsNotExist(err) {
		t.Fatalf("pin path created in fallback: %v", err)
	}
}

// TestRunRedirectModeSwitch: -redirect attaches connect4 and getsockopt and reports them; the
// next run without it (same pins) detaches them again.
func TestRunRedirectModeSwitch(t *testing.T) {
	requireRoot(t)
	cg := testCgroup(t)
	sidecarCg := filepath.Join(cg, "sidecar")
	if err := os.Mkdir(sidecarCg, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.Remove(sidecarCg) }) // runs before the parent's removal
	pin := filepath.Join(bpf.DefaultBPFFS, "meshturbo-agent-test-"+suffix())
	t.Cleanup(func() {
		if err := bpf.Uninstall(pin); err != nil {
			t.Errorf("uninstall: %v", err)
		}
	})
	a := args{cgroup: cg, pinPath: pin, sidecarPorts: "15001", maxConns: 1024, meshPoll: time.Second,
		redirect: true, redirectOutbound: "127.0.0.1:15001", redirectSidecars: sidecarCg, redirectExclPort: "22"}
	t.Run("on", func(t *testing.T) {
		addr := startRun(t, a)
		var st status
		if err := json.Unmarshal([]byte(get(t, "http://"+addr+"/v1/accel")), &st); err != nil {
			t.Fatal(err)
		}
		if !st.State.Redirect.On || st.State.Redirect.SidecarAddr.String() != "127.0.0.1:15001" || len(st.State.Programs) != 4 {
			t.Fatalf("redirect state %+v, %d programs", st.State.Redirect, len(st.State.Programs))
		}
		if !st.State.Unhook.On {
			t.Fatalf("unhook off: %s", st.State.Unhook.Off)
		}
		metrics := get(t, "http://"+addr+"/metrics")
		for _, want := range []string{`meshturbo_accel_redirect_connects_total{outcome="redirected"}`, "meshturbo_accel_sockets_unhooked_total", `meshturbo_accel_queue_events_total{event="backoff"}`} {
			if !strings.Contains(metrics, want) {
				t.Errorf("metrics lack %q", want)
			}
		}
	})
	if _, err := os.Stat(filepath.Join(pin, "link_connect4")); err != nil {
		t.Fatalf("connect4 link not pinned: %v", err)
	}
	a.redirect = false
	t.Run("off", func(t *testing.T) {
		addr := startRun(t, a)
		var st status
		if err := json.Unmarshal([]byte(get(t, "http://"+addr+"/v1/accel")), &st); err != nil {
			t.Fatal(err)
		}
		if st.State.Redirect.On || len(st.State.Programs) != 2 {
			t.Fatalf("redirect state %+v, %d programs", st.State.Redirect, len(st.State.Programs))
		}
	})
	if _, err := os.Stat(filepath.Join(pin, "link_connect4")); !os.IsNotExist(err) {
		t.Fatalf("connect4 link still pinned: %v", err)
	}
}
