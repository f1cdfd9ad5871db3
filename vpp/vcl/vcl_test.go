package vcl

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/meshturbo/meshturbo/internal/testenv"
)

var update = flag.Bool("update", false, "rewrite golden files")

func golden(t *testing.T, name string, got []byte) {
	t.Helper()
	path := filepath.Join("testdata", name)
	if *update {
		if err := os.WriteFile(path, got, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run with -update to create it)", err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("%s differs (run with -update to accept):\n--- got\n%s\n--- want\n%s", name, got, want)
	}
}

func testParams() Params {
	p := Defaults
	p.AppSocketAPI = "/run/vpp/app_ns_sockets/mt-6f1c2a9e-7d7b-4a55-9d0e-0b1e2f3a4b5c"
	p.NamespaceID = "mt-6f1c2a9e-7d7b-4a55-9d0e-0b1e2f3a4b5c"
	p.NamespaceSecret = 12795304931408230311
	return p
}

func TestConfGolden(t *testing.T) {
	got, err := Conf(testParams())
	if err != nil {
		t.Fatal(err)
	}
	golden(t, "vcl.conf.golden", got)
}

func TestConfRejects(t *testing.T) {
	for name, mut := range map[string]func(*Params){
		"no socket":      func(p *Params) { p.AppSocketAPI = "" },
		"spaced socket":  func(p *Params) { p.AppSocketAPI = "/run/a b" },
		"no namespace":   func(p *Params) { p.NamespaceID = "" },
		"long namespace": func(p *Params) { p.NamespaceID = strings.Repeat("n", 65) },
		"zero secret":    func(p *Params) { p.NamespaceSecret = 0 },
		"zero fifo":      func(p *Params) { p.RxFifoSize = 0 },
	} {
		p := testParams()
		mut(&p)
		if _, err := Conf(p); err == nil {
			t.Errorf("%s: Conf accepted %+v", name, p)
		}
	}
}

func TestFragmentGolden(t *testing.T) {
	frag := Fragment()
	if !json.Valid(frag) {
		t.Fatalf("fragment is not JSON:\n%s", frag)
	}
	golden(t, "bootstrap-fragment.json.golden", frag)
}

func TestMerge(t *testing.T) {
	in := []byte(`{"node": {"id": "sidecar~10.0.0.1~a.b~b.svc.cluster.local"}, "layered_runtime": {"layers": [{"name": "static", "static_layer": {"u64": 18446744073709551615}}]},
		"bootstrap_extensions": [{"name": "other", "typed_config": {"@type": "x"}}]}`)
	out, err := Merge(in)
	if err != nil {
		t.Fatal(err)
	}
	golden(t, "merged-bootstrap.json.golden", out)
	// Merging twice changes nothing.
	again, err := Merge(out)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(again, out) {
		t.Errorf("second merge changed the bootstrap:\n%s", again)
	}
	if _, err := Merge([]byte(`{"default_socket_interface": "envoy.extensions.network.socket_interface.default_socket_interface"}`)); err == nil {
		t.Error("merge overrode another default socket interface")
	}
	if _, err := Merge([]byte(`[]`)); err == nil {
		t.Error("merge accepted a JSON list")
	}
}

// The installed Envoy is the standard (non-contrib) build: validation of a bootstrap with the
// fragment fails, and CheckEnvoy says why in words an operator can act on.
func TestCheckEnvoyWithoutVCL(t *testing.T) {
	deps := testenv.RequireDeps(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	// Without the fragment the same bootstrap validates: the failure below is the fragment's.
	if out, err := exec.CommandContext(ctx, deps.Envoy, "--mode", "validate", "--config-yaml", validateBootstrap).CombinedOutput(); err != nil {
		t.Fatalf("envoy rejects the base bootstrap: %v\n%s", err, out)
	}
	err := CheckEnvoy(ctx, deps.Envoy)
	if !errors.Is(err, ErrNoSocketInterface) {
		t.Fatalf("CheckEnvoy(%s) = %v, want ErrNoSocketInterface", deps.Envoy, err)
	}
	if !strings.HasPrefix(err.Error(), "this Envoy build lacks the VCL socket interface (contrib build needed)") {
		t.Errorf("message %q does not lead with the diagnosis", err)
	}
	if !strings.Contains(err.Error(), "VclSocketInterface") {
		t.Errorf("message %q does not quote Envoy's complaint", err)
	}
	t.Log(err)
}

// A bootstrap Envoy rejects for another reason must not be reported as a missing contrib build;
// a build that validates passes. Both use a stand-in script, as no contrib Envoy is installed.
func TestCheckEnvoyOtherOutcomes(t *testing.T) {
	dir := t.TempDir()
	script := func(name, body string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte("#!/bin/sh\n"+body+"\n"), 0o755); err != nil {
			t.Fatal(err)
		}
		return p
	}
	ok := script("envoy-contrib", `echo "configuration '$4' OK"; exit 0`)
	if err := CheckEnvoy(context.Background(), ok); err != nil {
		t.Errorf("accepting Envoy: %v", err)
	}
	broken := script("envoy-broken", `echo "[2026-01-01][1][critical][main] [server.cc:76] error initializing configuration: bad admin" >&2; exit 1`)
	err := CheckEnvoy(context.Background(), broken)
	if err == nil || errors.Is(err, ErrNoSocketInterface) || !strings.Contains(err.Error(), "bad admin") {
		t.Errorf("other failure: %v", err)
	}
	if err := CheckEnvoy(context.Background(), filepath.Join(dir, "missing")); err == nil || errors.Is(err, ErrNoSocketInterface) {
		t.Errorf("missing binary: %v", err)
	}
}
