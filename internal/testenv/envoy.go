package testenv

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// Envoy is an Envoy proxy run from a caller-provided bootstrap.
type Envoy struct {
	*Process
	AdminAddr string // "127.0.0.1:port" of the admin interface

	addrPath string
	addr     *string // set by the readiness probe
}

// StartEnvoy runs binary (Deps.Envoy or Deps.EnvoyOld) with the bootstrap file and extra
// arguments, and returns once GET /ready on its admin interface answers 200 "LIVE".
//
// The bootstrap must configure an admin listener; give it port 0: Envoy writes the address it
// bound to a file (--admin-address-path) that StartEnvoy reads. Unless extraArgs choose
// otherwise (--base-id, --use-dynamic-base-id or --disable-hot-restart), Envoy runs with
// --use-dynamic-base-id so that several Envoys can run at once.
func StartEnvoy(t testing.TB, binary, bootstrapPath string, extraArgs ...string) *Envoy {
	t.Helper()
	e, err := StartEnvoyIn(testEnv(t), binary, bootstrapPath, extraArgs...)
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	return e
}

// StartEnvoyIn is StartEnvoy outside a test.
func StartEnvoyIn(env *Env, binary, bootstrapPath string, extraArgs ...string) (*Envoy, error) {
	dir, err := env.workDir("envoy")
	if err != nil {
		return nil, fmt.Errorf("start envoy: %w", err)
	}
	addrPath := filepath.Join(dir, "admin-address")
	args := []string{"-c", bootstrapPath, "--admin-address-path", addrPath}
	if !slices.ContainsFunc(extraArgs, func(a string) bool {
		return strings.HasPrefix(a, "--base-id") || a == "--use-dynamic-base-id" || a == "--disable-hot-restart"
	}) {
		args = append(args, "--use-dynamic-base-id")
	}
	args = append(args, extraArgs...)
	cmd := exec.Command(binary, args...)
	cmd.Dir = dir

	var adminAddr string
	ready := func(ctx context.Context) error {
		addr, err := os.ReadFile(addrPath)
		if err != nil || len(strings.TrimSpace(string(addr))) == 0 {
			return fmt.Errorf("envoy has not written its admin address to %s yet", addrPath)
		}
		a := strings.TrimSpace(string(addr))
		probe := HTTPProbe("http://"+a+"/ready", func(status int, body []byte) error {
			if status != http.StatusOK || strings.TrimSpace(string(body)) != "LIVE" {
				return fmt.Errorf("status %d %q, want 200 LIVE", status, strings.TrimSpace(string(body)))
			}
			return nil
		})
		if err := probe(ctx); err != nil {
			return err
		}
		adminAddr = a
		return nil
	}
	p, err := StartIn(env, "envoy", cmd, ready, time.Minute)
	if err != nil {
		return nil, err
	}
	return &Envoy{Process: p, AdminAddr: adminAddr, addrPath: addrPath, addr: &adminAddr}, nil
}

// Restart stops Envoy and starts it again with the same arguments (a cold restart, not a hot
// restart). AdminAddr is updated: with admin port 0 the new admin address differs.
func (e *Envoy) Restart(t testing.TB) {
	t.Helper()
	if err := os.Remove(e.addrPath); err != nil && !os.IsNotExist(err) {
		t.Fatalf("testenv: restart envoy: %v", err)
	}
	e.Process.Restart(t)
	e.AdminAddr = *e.addr
}

// AdminURL is the admin interface's URL for path, e.g. AdminURL("/config_dump").
func (e *Envoy) AdminURL(path string) string { return "http://" + e.AdminAddr + path }
