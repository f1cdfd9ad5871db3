package main

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"sigs.k8s.io/yaml"

	"github.com/meshturbo/meshturbo/vpp/vcl"
)

// vclHandOff prepares Envoy for VPP's host stack (VPP mode of meshturbo-agent): it waits for
// the vcl.conf the agent writes for this pod into dir, checks that the Envoy binary has the VCL
// socket interface (a contrib build), points Envoy at the file through VCL_CONFIG (Envoy
// inherits the environment), and returns the function that merges the socket-interface
// fragment into every bootstrap, at start and at each upgrade.
func vclHandOff(ctx context.Context, dir, envoy string, wait time.Duration, log *slog.Logger) (func([]byte) ([]byte, error), error) {
	path := filepath.Join(dir, "vcl.conf")
	deadline := time.Now().Add(wait)
	for {
		_, err := os.Stat(path)
		if err == nil {
			break
		}
		if !errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("-vcl-dir: %w", err)
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("-vcl-dir: %s did not appear within %s; is meshturbo-agent running with -vpp-config, with this pod in its mesh file, and is its hand-off directory mounted here?", path, wait)
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
	if err := vcl.CheckEnvoy(ctx, envoy); err != nil {
		return nil, fmt.Errorf("-vcl-dir: %w", err)
	}
	if err := os.Setenv(vcl.ConfigEnv, path); err != nil {
		return nil, err
	}
	log.Info("VPP host stack: Envoy's sockets go through VCL", "vcl.conf", path)
	return func(bs []byte) ([]byte, error) {
		j, err := yaml.YAMLToJSON(bs) // the bootstrap may be YAML; JSON passes through
		if err != nil {
			return nil, fmt.Errorf("bootstrap: %w", err)
		}
		return vcl.Merge(j)
	}, nil
}
