package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
)

// fakeUpgrader behaves like meshturbo-upgrade's admin API: POST /v1/upgrade runs an upgrade
// and answers when it is over; GET /v1/upgrade shows its phase. Each GET during an upgrade
// moves it to the next phase, so the test sees every phase without depending on timing.
type fakeUpgrader struct {
	mu      sync.Mutex
	st      upgradeStatus
	steps   []string
	outcome string // upgraded, rolled_back, rejected, busy
	over    chan struct{}
	body    map[string]string
}

func newFakeUpgrader(t *testing.T, outcome string, steps ...string) (*fakeUpgrader, string) {
	f := &fakeUpgrader{outcome: outcome, steps: steps, over: make(chan struct{}),
		st: upgradeStatus{Epoch: 0, Version: "1.39.3", Binary: "/usr/bin/envoy-1.39", Phase: phaseServing, PID: 10}}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/upgrade", func(w http.ResponseWriter, _ *http.Request) {
		f.mu.Lock()
		defer f.mu.Unlock()
		if f.body != nil && len(f.steps) > 0 { // an upgrade runs: on to its next phase
			f.st.Phase, f.steps = f.steps[0], f.steps[1:]
			if len(f.steps) == 0 {
				close(f.over)
			}
		}
		json.NewEncoder(w).Encode(f.st)
	})
	mux.HandleFunc("POST /v1/upgrade", func(w http.ResponseWriter, r *http.Request) {
		var body map[string]string
		json.NewDecoder(r.Body).Decode(&body)
		w.Header().Set("Content-Type", "application/json")
		if f.outcome == "busy" {
			w.WriteHeader(http.StatusConflict)
			json.NewEncoder(w).Encode(map[string]string{"error": "hotupgrade: an upgrade is in progress"})
			return
		}
		f.mu.Lock()
		f.body = body
		f.mu.Unlock()
		select {
		case <-f.over:
		case <-r.Context().Done():
			return
		}
		res := upgradeResult{Outcome: f.outcome, FromEpoch: 0, ToEpoch: 1, FromVersion: "1.39.3", Started: now,
			PrecheckMS: 100, HandoffMS: 700, ProbeMS: 200, DrainMS: 1000, TotalMS: 2000, OldConnections: 2, OldStopped: "drained"}
		code := http.StatusOK
		switch f.outcome {
		case outcomeUpgraded:
			res.ToVersion = "1.40.0"
		case "rolled_back":
			res.Error = "new epoch not LIVE within 30s"
			code = http.StatusInternalServerError
		case "rejected":
			res.Error = "hot-restart versions differ"
			code = http.StatusUnprocessableEntity
		}
		w.WriteHeader(code)
		json.NewEncoder(w).Encode(res)
	})
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	return f, strings.TrimPrefix(srv.URL, "http://")
}

func TestUpgradeStartFollowsPhases(t *testing.T) {
	f, addr := newFakeUpgrader(t, outcomeUpgraded, phasePrechecking, phaseHandingOff, phaseProbing, phaseDraining, phaseServing)
	r := meshctl(t, nil, "upgrade", "start", addr, "--binary", "/usr/bin/envoy-1.40")
	if r.code != 0 {
		t.Fatalf("%v", r)
	}
	if f.body["binary"] != "/usr/bin/envoy-1.40" {
		t.Errorf("POST body %v, want the binary", f.body)
	}
	// Not a terminal: one line per phase, in order, then the result on stdout.
	var order []int
	for _, step := range []string{"[1/4] prechecking", "[2/4] handing the listen sockets", "[3/4] probing", "[4/4] draining", "done after"} {
		i := strings.Index(r.stderr, step)
		if i < 0 {
			t.Fatalf("progress lacks %q:\n%s", step, r.stderr)
		}
		order = append(order, i)
	}
	for i := 1; i < len(order); i++ {
		if order[i] < order[i-1] {
			t.Errorf("phases out of order:\n%s", r.stderr)
		}
	}
	if strings.Contains(r.stderr, "\r") {
		t.Errorf("plain progress draws in place:\n%q", r.stderr)
	}
	golden(t, "upgrade-start", r.stdout)
}

func TestUpgradeStartProgressOnATerminal(t *testing.T) {
	_, addr := newFakeUpgrader(t, outcomeUpgraded, phasePrechecking, phaseHandingOff, phaseServing)
	r := meshctl(t, nil, "upgrade", "start", addr, "--progress", "tty", "-o", "json")
	if r.code != 0 {
		t.Fatalf("%v", r)
	}
	if !strings.Contains(r.stderr, "\r"+spinner[0]+" [1/4] prechecking") || !strings.Contains(r.stderr, "\r"+spinner[1]+" [2/4]") {
		t.Errorf("no in-place progress with a spinner:\n%q", r.stderr)
	}
	var res upgradeResult
	if err := json.Unmarshal([]byte(r.stdout), &res); err != nil || res.Outcome != outcomeUpgraded || res.ToVersion != "1.40.0" {
		t.Errorf("-o json result: %v", r)
	}
}

func TestUpgradeStartFailures(t *testing.T) {
	for _, tc := range []struct {
		outcome string
		code    int
		want    string
	}{
		{"rolled_back", exitUnhealthy, "rolled_back: new epoch not LIVE within 30s; the old Envoy (epoch 0) serves on"},
		{"rejected", exitUnhealthy, "rejected: hot-restart versions differ"},
		{"busy", exitError, "another upgrade is running at"},
	} {
		_, addr := newFakeUpgrader(t, tc.outcome, phasePrechecking, phaseRollingBack, phaseServing)
		r := meshctl(t, nil, "upgrade", "start", addr)
		if r.code != tc.code || !strings.Contains(r.stderr, tc.want) {
			t.Errorf("%s: want exit %d and %q, got %v", tc.outcome, tc.code, tc.want, r)
		}
	}
	if r := meshctl(t, nil, "upgrade", "start", closedAddr(t)); r.code != exitUnreachable ||
		!strings.Contains(r.stderr, "meshturbo-upgrade admin at") || !strings.Contains(r.stderr, "--upgrade-admin") {
		t.Errorf("unreachable: %v", r)
	}
}

func TestUpgradeStatusWatch(t *testing.T) {
	f, addr := newFakeUpgrader(t, outcomeUpgraded, phaseProbing, phaseDraining, phaseServing)
	f.mu.Lock()
	f.st.Phase = phaseHandingOff // an upgrade someone else started
	f.body = map[string]string{}
	f.mu.Unlock()
	r := meshctl(t, nil, "upgrade", "status", addr, "--watch", "-o", "json")
	if r.code != 0 {
		t.Fatalf("%v", r)
	}
	var st upgradeStatus
	if err := json.Unmarshal([]byte(r.stdout), &st); err != nil || st.Phase != phaseServing {
		t.Errorf("--watch did not follow the upgrade to its end: %v", r)
	}
	if !strings.Contains(r.stderr, "[3/4] probing") || !strings.Contains(r.stderr, "[4/4] draining") {
		t.Errorf("--watch progress:\n%s", r.stderr)
	}
}

// fakeKubectl writes a kubectl stand-in: it records its arguments and pid, and behaves as
// `kubectl port-forward` does, printing the local port and running until it is killed — or,
// with fail set, failing as kubectl does for an unknown pod.
func fakeKubectl(t *testing.T, localPort string, fail bool) (path, argsFile, pidFile string) {
	dir := t.TempDir()
	path, argsFile, pidFile = filepath.Join(dir, "kubectl"), filepath.Join(dir, "args"), filepath.Join(dir, "pid")
	body := fmt.Sprintf("#!/bin/sh\nprintf '%%s\\n' \"$*\" > %q\necho $$ > %q\n", argsFile, pidFile)
	if fail {
		body += "echo 'error: pods \"nope\" not found' >&2\nexit 1\n"
	} else {
		body += fmt.Sprintf("echo 'Forwarding from 127.0.0.1:%s -> 15052'\nexec sleep 300\n", localPort)
	}
	if err := os.WriteFile(path, []byte(body), 0o755); err != nil {
		t.Fatal(err)
	}
	return path, argsFile, pidFile
}

// TestPodAddress: pod/<name>.<namespace> is reached through kubectl port-forward to the
// daemon's default admin port, which ends with the command.
func TestPodAddress(t *testing.T) {
	_, addr := newFakeUpgrader(t, outcomeUpgraded)
	_, port, _ := net.SplitHostPort(addr)
	kubectl, argsFile, pidFile := fakeKubectl(t, port, false)
	r := meshctl(t, nil, "upgrade", "status", "pod/cart-7d9f.shop", "--kubectl", kubectl, "-o", "json")
	var st upgradeStatus
	if err := json.Unmarshal([]byte(r.stdout), &st); err != nil || r.code != 0 || st.Version != "1.39.3" {
		t.Fatalf("upgrade status through the port-forward: %v", r)
	}
	args, _ := os.ReadFile(argsFile)
	if got := strings.TrimSpace(string(args)); got != "-n shop port-forward --address 127.0.0.1 pod/cart-7d9f :15052" {
		t.Errorf("kubectl ran with %q", got)
	}
	pidText, _ := os.ReadFile(pidFile)
	pid, err := strconv.Atoi(strings.TrimSpace(string(pidText)))
	if err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
		t.Errorf("kubectl port-forward (pid %d) still runs after meshctl returned: %v", pid, err)
	}

	// pod/<name>:<port> forwards that port; no namespace leaves kubectl's current one.
	kubectl, argsFile, _ = fakeKubectl(t, port, false)
	if r := meshctl(t, nil, "upgrade", "status", "pod/cart-7d9f:16000", "--kubectl", kubectl); r.code != 0 {
		t.Errorf("%v", r)
	}
	if args, _ := os.ReadFile(argsFile); strings.TrimSpace(string(args)) != "port-forward --address 127.0.0.1 pod/cart-7d9f :16000" {
		t.Errorf("kubectl ran with %q", args)
	}

	kubectl, _, _ = fakeKubectl(t, "", true)
	r = meshctl(t, nil, "upgrade", "status", "pod/nope.shop", "--kubectl", kubectl)
	if r.code != exitUnreachable || !strings.Contains(r.stderr, `pods "nope" not found`) || !strings.Contains(r.stderr, "check the pod and namespace") {
		t.Errorf("unknown pod: %v", r)
	}
	r = meshctl(t, nil, "status", "--daemons", "xds", "--xds-admin", "pod/x.y", "--kubectl", filepath.Join(t.TempDir(), "no-kubectl"))
	if r.code != exitUnreachable || !strings.Contains(r.stderr, "install it or pass --kubectl") {
		t.Errorf("no kubectl: %v", r)
	}
}
