package main

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/meshturbo/meshturbo/internal/testenv"
	"github.com/meshturbo/meshturbo/vpp/vcl"
)

// TestVCLHandOff: VPP mode waits for the agent's vcl.conf and refuses an Envoy build without
// the VCL socket interface (the installed Envoy is not a contrib build) with the message that
// says so, instead of starting an Envoy that cannot reach VPP.
func TestVCLHandOff(t *testing.T) {
	deps := testenv.RequireDeps(t)
	dir := t.TempDir()
	ctx := context.Background()
	_, err := vclHandOff(ctx, dir, deps.Envoy, 300*time.Millisecond, testenv.Logger(t))
	if err == nil || !strings.Contains(err.Error(), filepath.Join(dir, "vcl.conf")) || !strings.Contains(err.Error(), "meshturbo-agent") {
		t.Fatalf("missing vcl.conf: error %v must name the file and the agent", err)
	}
	if err := os.WriteFile(filepath.Join(dir, "vcl.conf"), []byte("vcl {\n}\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err = vclHandOff(ctx, dir, deps.Envoy, time.Second, testenv.Logger(t))
	if !errors.Is(err, vcl.ErrNoSocketInterface) || !strings.Contains(err.Error(), "contrib build needed") {
		t.Fatalf("non-contrib Envoy: error %v, want %v", err, vcl.ErrNoSocketInterface)
	}
	if os.Getenv(vcl.ConfigEnv) != "" {
		t.Fatalf("%s set although the hand-off was refused", vcl.ConfigEnv)
	}
}
