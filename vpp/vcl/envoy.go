package vcl

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// ErrNoSocketInterface is returned (wrapped) by CheckEnvoy when the Envoy binary does not
// have the VCL socket interface compiled in.
var ErrNoSocketInterface = errors.New("this Envoy build lacks the VCL socket interface (contrib build needed)")

// validateBootstrap is the smallest bootstrap Envoy validates: an admin listener on a
// loopback port Envoy never binds in validate mode.
const validateBootstrap = `{"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}}}`

// CheckEnvoy runs envoyPath in --mode validate on a bootstrap that holds the VCL fragment. It
// returns nil when Envoy accepts it, an error wrapping ErrNoSocketInterface (whose message
// says so) when Envoy does not know the extension, and another error for anything else.
// Validation parses the configuration and builds it without opening listeners, so it is safe
// on a node with Envoys running.
func CheckEnvoy(ctx context.Context, envoyPath string) error {
	bs, err := Merge([]byte(validateBootstrap))
	if err != nil {
		return err
	}
	dir, err := os.MkdirTemp("", "meshturbo-vcl-check-")
	if err != nil {
		return fmt.Errorf("vcl: check envoy: %w", err)
	}
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "bootstrap.json")
	if err := os.WriteFile(path, bs, 0o600); err != nil {
		return fmt.Errorf("vcl: check envoy: %w", err)
	}
	cmd := exec.CommandContext(ctx, envoyPath, "--mode", "validate", "-c", path, "--log-level", "error")
	cmd.Dir = dir
	out, runErr := cmd.CombinedOutput()
	if runErr == nil {
		return nil
	}
	if ctx.Err() != nil {
		return fmt.Errorf("vcl: check envoy %s: %w", envoyPath, ctx.Err())
	}
	if line, ok := missingExtension(out); ok {
		return fmt.Errorf("%w: %s --mode validate: %s", ErrNoSocketInterface, envoyPath, line)
	}
	return fmt.Errorf("vcl: check envoy %s --mode validate: %w: %s", envoyPath, runErr, firstLine(out))
}

// missingExtension finds Envoy's complaint about the VCL extension: the JSON parser's "could not
// find @type '…VclSocketInterface'" (the type is not linked in) or the extension registry's
// "Didn't find a registered implementation for '…'".
func missingExtension(out []byte) (string, bool) {
	for _, line := range strings.Split(string(out), "\n") {
		mentions := strings.Contains(line, "VclSocketInterface") || strings.Contains(line, SocketInterfaceName)
		missing := strings.Contains(line, "could not find") || strings.Contains(line, "Didn't find a registered") ||
			strings.Contains(line, "Unknown type") || strings.Contains(line, "Unable to find")
		if mentions && missing {
			return trimEnvoyLog(line), true
		}
	}
	return "", false
}

// trimEnvoyLog drops Envoy's "[time][pid][level][logger] [file:line] " prefix and the JSON
// Envoy appends after the error.
func trimEnvoyLog(line string) string {
	if i := strings.Index(line, "] "); i >= 0 && strings.HasPrefix(line, "[") {
		rest := line[i+2:]
		if j := strings.Index(rest, "] "); j >= 0 && strings.HasPrefix(rest, "[") {
			rest = rest[j+2:]
		}
		line = rest
	}
	line = strings.TrimSuffix(strings.TrimSpace(line), "{")
	return strings.TrimSuffix(strings.TrimSpace(line), ":")
}

func firstLine(out []byte) string {
	out = bytes.TrimSpace(out)
	if i := bytes.IndexByte(out, '\n'); i >= 0 {
		out = out[:i]
	}
	return trimEnvoyLog(string(out))
}
