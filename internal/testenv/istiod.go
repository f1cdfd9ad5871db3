package testenv

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

// Istiod is istiod (pilot-discovery) without Kubernetes: its only config source is an
// MCP-over-xDS server, and it serves xDS in plaintext. See
// shared/notes/istiod-without-kubernetes.md.
type Istiod struct {
	*Process
	XDSAddr        string // "127.0.0.1:port": plaintext gRPC xDS for proxies
	DebugAddr      string // "127.0.0.1:port": HTTP, /debug/configz, /debug/syncz, ...
	MonitoringAddr string // "127.0.0.1:port": /metrics
	MeshConfigPath string
}

// StartIstiod runs istiod with mcpAddr (host:port of a running MCP-over-xDS server) as its
// only config source, and returns once its xDS port accepts connections. The MCP server must
// already listen: istiod exits when it cannot connect, and so the test fails at once.
func StartIstiod(t testing.TB, mcpAddr string) *Istiod {
	t.Helper()
	i, err := StartIstiodIn(testEnv(t), RequireDeps(t), mcpAddr)
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	return i
}

// StartIstiodIn is StartIstiod outside a test.
func StartIstiodIn(env *Env, d Deps, mcpAddr string) (*Istiod, error) {
	dir, err := env.workDir("istiod")
	if err != nil {
		return nil, fmt.Errorf("start istiod: %w", err)
	}
	meshPath := filepath.Join(dir, "mesh.yaml")
	mesh := fmt.Sprintf("configSources:\n- address: xds://%s\n", mcpAddr)
	if err := os.WriteFile(meshPath, []byte(mesh), 0o644); err != nil {
		return nil, fmt.Errorf("start istiod: %w", err)
	}
	ports, err := FreeLoopbackPorts(3)
	if err != nil {
		return nil, err
	}
	xds, debug, monitoring := Addr(ports[0]), Addr(ports[1]), Addr(ports[2])
	// No k8s:// config source, empty --registries and no --kubeconfig: any of them brings
	// Kubernetes back.
	cmd := exec.Command(d.PilotDiscovery, "discovery",
		"--registries=",
		"--meshConfig="+meshPath,
		"--networksConfig="+filepath.Join(dir, "no-networks.yaml"),
		"--grpcAddr="+xds,
		"--secureGRPCAddr=",
		"--httpAddr="+debug,
		"--httpsAddr=", // webhooks on the debug port, not on :15017 of every interface
		"--monitoringAddr="+monitoring,
		"--ctrlz_port=0",
		"--ctrlz_address=127.0.0.1",
	)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(),
		"POD_NAMESPACE=istio-system",
		"ENABLE_CA_SERVER=false",
		"PILOT_CERT_PROVIDER=none",
		// Upstream Envoy (the one `make deps` installs) lacks Istio's own extensions; without
		// these, istiod's listeners and clusters carry istio.metadata_exchange and istio.alpn
		// filters that Envoy rejects.
		"PILOT_ENABLE_METADATA_EXCHANGE=false",
		"PILOT_ENABLE_ALPN_FILTER=false",
	)
	// /ready stays 503 without Kubernetes: the xDS port accepting is the readiness signal.
	p, err := StartIn(env, "istiod", cmd, DialProbe(xds), time.Minute)
	if err != nil {
		return nil, err
	}
	return &Istiod{Process: p, XDSAddr: xds, DebugAddr: debug, MonitoringAddr: monitoring, MeshConfigPath: meshPath}, nil
}
