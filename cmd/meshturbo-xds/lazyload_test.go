package main

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/meshturbo/meshturbo/internal/testenv"
)

// TestFallbackBootstrapValidates: the bootstrap printed for a fallback Envoy run outside
// meshturbo-xds is one the real Envoy accepts, pointed at the given xDS address.
func TestFallbackBootstrapValidates(t *testing.T) {
	deps := testenv.RequireDeps(t)
	dir := t.TempDir()
	cfg := filepath.Join(dir, "meshturbo-xds.yaml")
	if err := os.WriteFile(cfg, []byte(`sources:
- consul: {address: 127.0.0.1:8500}
lazyload:
  caDir: /etc/meshturbo/ca
  fallback: {address: 10.0.0.9, admin: 127.0.0.1:15082}
  workloads:
  - {namespace: shop, name: frontend, selector: {app: frontend}}
`), 0o644); err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	if err := printFallbackBootstrap(args{config: cfg, fallbackBootstrap: "10.1.2.3:15050", set: map[string]bool{}}, &out); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), `"10.1.2.3"`) || !strings.Contains(out.String(), "15050") {
		t.Fatalf("bootstrap does not point at the given xDS address:\n%s", out.String())
	}
	bs := filepath.Join(dir, "fallback.json")
	if err := os.WriteFile(bs, out.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if b, err := exec.CommandContext(ctx, deps.Envoy, "--mode", "validate", "-c", bs).CombinedOutput(); err != nil {
		t.Fatalf("envoy --mode validate: %v\n%s", err, b)
	}

	// Without a lazyload section there is nothing to print, and the error says so.
	if err := os.WriteFile(cfg, []byte("sources:\n- consul: {address: 127.0.0.1:8500}\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	err := printFallbackBootstrap(args{config: cfg, fallbackBootstrap: "10.1.2.3:15050", set: map[string]bool{}}, &out)
	if err == nil || !strings.Contains(err.Error(), "no lazyload section") {
		t.Fatalf("config without lazyload: error %v", err)
	}
}
