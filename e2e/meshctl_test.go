package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"golang.org/x/sys/unix"

	"github.com/meshturbo/meshturbo/hotupgrade"
	"github.com/meshturbo/meshturbo/internal/testenv"
)

var updateGolden = flag.Bool("update", false, "rewrite e2e/testdata/*.golden from the current output")

// cliResult is one run of the meshctl binary.
type cliResult struct {
	stdout, stderr string
	code           int
}

func (r cliResult) String() string {
	return fmt.Sprintf("exit %d\nstdout:\n%s\nstderr:\n%s", r.code, r.stdout, r.stderr)
}

// meshctl runs the meshctl binary with env (KEY=VALUE) added to a clean environment.
func meshctl(t *testing.T, env []string, args ...string) cliResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(binDir, "meshctl"), args...)
	cmd.Env = append([]string{"PATH=" + os.Getenv("PATH"), "HOME=" + t.TempDir()}, env...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	var ee *exec.ExitError
	code := 0
	switch {
	case errors.As(err, &ee):
		code = ee.ExitCode()
	case err != nil:
		t.Fatalf("meshctl %s: %v", strings.Join(args, " "), err)
	}
	return cliResult{stdout.String(), stderr.String(), code}
}

// jsonOut runs meshctl with -o json, wants exit code want, and decodes stdout into v.
func jsonOut(t *testing.T, env []string, want int, v any, args ...string) cliResult {
	t.Helper()
	r := meshctl(t, env, append(args, "-o", "json")...)
	if r.code != want {
		t.Fatalf("meshctl %s: want exit %d, got %v", strings.Join(args, " "), want, r)
	}
	if err := json.Unmarshal([]byte(r.stdout), v); err != nil {
		t.Fatalf("meshctl %s -o json: %v\n%v", strings.Join(args, " "), err, r)
	}
	return r
}

func goldenFile(t *testing.T, name, got string) {
	t.Helper()
	path := filepath.Join("testdata", name+".golden")
	if *updateGolden {
		if err := os.MkdirAll("testdata", 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (go test ./e2e -run %s -update creates it)", err, t.Name())
	}
	if got != string(want) {
		t.Errorf("output differs from %s (-update rewrites it)\n--- got:\n%s\n--- want:\n%s", path, got, want)
	}
}

// TestMeshctlAgainstDaemons drives the meshctl binary against meshturbo-xds (a real Consul,
// lazy loading on, the admin API behind a token), meshturbo-upgrade running a real Envoy (hot
// upgrade from the old Envoy to the current one) and meshturbo-agent, and checks the JSON of
// each command, its exit code and, for the commands whose output holds no times, the table.
func TestMeshctlAgainstDaemons(t *testing.T) {
	deps := testenv.RequireDeps(t)
	consul := testenv.StartConsul(t)
	cc := consulClient(t, consul.HTTPAddr)
	for _, r := range []*api.AgentServiceRegistration{
		{ID: "orders-1", Name: "orders", Address: "127.0.0.21", Port: 8080, Meta: map[string]string{"protocol": "http"}},
		{ID: "orders-2", Name: "orders", Address: "127.0.0.22", Port: 8080, Meta: map[string]string{"protocol": "http", "mesh": "true"}},
		{ID: "bad-1", Name: "bad_name", Address: "127.0.0.23", Port: 8080},
	} {
		if err := cc.Agent().ServiceRegister(r); err != nil {
			t.Fatalf("register %s in consul: %v", r.ID, err)
		}
	}

	// meshturbo-xds with lazy loading (its fallback runs elsewhere: none is needed to serve
	// the static edges and scopes) and a token on its admin API.
	dir := t.TempDir()
	ca, err := hotupgrade.NewCA("cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	caDir := t.TempDir()
	if err := ca.Write(caDir); err != nil {
		t.Fatal(err)
	}
	tokenFile := filepath.Join(dir, "admin-token")
	if err := os.WriteFile(tokenFile, []byte("e2e-token\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := fmt.Sprintf(`sources:
- consul: {address: %q}
lazyload:
  caDir: %q
  edgeTTL: 1h
  fallback: {address: 127.0.0.3, httpPort: %d}
  workloads:
  - {namespace: default, name: client, selector: {app: client}, serviceAccount: client, dependencies: ["orders.service.consul:8080"]}
`, consul.HTTPAddr, caDir, testenv.FreePort(t))
	cfgPath := filepath.Join(dir, "meshturbo-xds.yaml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	xds := startXDSWith(t, "-config", cfgPath, "-admin-token-file", tokenFile)

	// meshturbo-upgrade running the older Envoy with a static bootstrap (no istiod needed).
	envoyAdmin := freeAddr(t)
	upgradeAdmin := freeAddr(t)
	bootstrap := filepath.Join(dir, "envoy.json")
	host, port, _ := strings.Cut(envoyAdmin, ":")
	if err := os.WriteFile(bootstrap, fmt.Appendf(nil,
		`{"node": {"id": "meshctl-e2e", "cluster": "meshctl-e2e"}, "admin": {"address": {"socket_address": {"address": %q, "port_value": %s}}}}`,
		host, port), 0o644); err != nil {
		t.Fatal(err)
	}
	upCmd := exec.Command(filepath.Join(binDir, "meshturbo-upgrade"), "-envoy", deps.EnvoyOld, "-bootstrap", bootstrap,
		"-envoy-admin", envoyAdmin, "-admin", upgradeAdmin, "-work-dir", t.TempDir(), "-drain-timeout", "5s")
	testenv.Start(t, "meshturbo-upgrade", upCmd, testenv.HTTPProbe("http://"+upgradeAdmin+"/healthz", nil), 60*time.Second)

	env := []string{
		"MESHTURBO_XDS_ADMIN=" + xds.AdminAddr,
		"MESHTURBO_UPGRADE_ADMIN=" + upgradeAdmin,
		"MESHTURBO_AGENT_ADMIN=" + freeAddr(t), // replaced below when the agent runs
		"MESHTURBO_TOKEN_FILE=" + tokenFile,
	}

	t.Run("registry", func(t *testing.T) {
		type endpoint struct {
			ID, Address string
			Meshed      bool
		}
		type service struct {
			Hostname, Source string
			Endpoints        []endpoint
		}
		awaitCondition(t, 30*time.Second, "orders in meshturbo-xds's catalog", func() error {
			r := meshctl(t, env, "registry", "get", "consul", "orders.service.consul", "-o", "json")
			var s service
			if r.code != 0 || json.Unmarshal([]byte(r.stdout), &s) != nil || len(s.Endpoints) != 2 {
				return fmt.Errorf("%v", r)
			}
			return nil
		})
		var regs []struct {
			Source   string `json:"source"`
			Synced   bool   `json:"synced"`
			Stale    bool   `json:"stale"`
			Services int    `json:"services"`
			Skipped  []struct {
				Hostname, Code, Reason string
			} `json:"skipped"`
		}
		jsonOut(t, env, 0, &regs, "registry", "list")
		if len(regs) != 1 || regs[0].Source != "consul" || !regs[0].Synced || regs[0].Stale || regs[0].Services < 1 {
			t.Errorf("registry list: %+v", regs)
		}
		if !slices.ContainsFunc(regs[0].Skipped, func(s struct{ Hostname, Code, Reason string }) bool {
			return strings.Contains(s.Hostname, "bad_name") && s.Reason != ""
		}) {
			t.Errorf("the invalid Consul service is not listed as skipped with a reason: %+v", regs[0].Skipped)
		}

		var view struct {
			Registry struct{ Source string } `json:"registry"`
			Services []service               `json:"services"`
		}
		jsonOut(t, env, 0, &view, "registry", "get", "consul")
		i := slices.IndexFunc(view.Services, func(s service) bool { return s.Hostname == "orders.service.consul" })
		if view.Registry.Source != "consul" || i < 0 || len(view.Services[i].Endpoints) != 2 {
			t.Fatalf("registry get consul: %+v", view)
		}
		eps := view.Services[i].Endpoints
		if eps[0].Address != "127.0.0.21" || eps[0].Meshed || eps[1].Address != "127.0.0.22" || !eps[1].Meshed {
			t.Errorf("orders endpoints %+v: want 127.0.0.21 (plain) and 127.0.0.22 (meshed)", eps)
		}

		// Tables: the service (no times in it) against a golden file; the list by its cells.
		r := meshctl(t, env, "registry", "get", "consul", "orders.service.consul")
		if r.code != 0 {
			t.Fatalf("%v", r)
		}
		goldenFile(t, "meshctl-registry-get-service", r.stdout)
		r = meshctl(t, env, "registry", "list")
		if !regexp.MustCompile(`(?m)^consul\s+yes\s+no\s+\d+\s+\d+\s+1\s`).MatchString(r.stdout) {
			t.Errorf("registry list table:\n%s", r.stdout)
		}

		if r := meshctl(t, env, "registry", "get", "eureka"); r.code != 4 || !strings.Contains(r.stderr, `bridges no registry "eureka" (it bridges: consul)`) {
			t.Errorf("unknown registry: %v", r)
		}
	})

	t.Run("token", func(t *testing.T) {
		noToken := slices.DeleteFunc(slices.Clone(env), func(s string) bool { return strings.HasPrefix(s, "MESHTURBO_TOKEN_FILE=") })
		r := meshctl(t, noToken, "registry", "list")
		if r.code != 1 || !strings.Contains(r.stderr, "401 Unauthorized") || !strings.Contains(r.stderr, "--token-file") {
			t.Errorf("without the token: %v", r)
		}
	})

	t.Run("lazyload", func(t *testing.T) {
		var edges struct {
			Edges []struct {
				Workload, Host, Origin string
				Port                   int
			} `json:"edges"`
		}
		jsonOut(t, env, 0, &edges, "lazyload", "edges", "default/client")
		if len(edges.Edges) != 1 || edges.Edges[0].Host != "orders.service.consul" || edges.Edges[0].Port != 8080 || edges.Edges[0].Origin != "static" {
			t.Errorf("lazyload edges default/client: %+v", edges)
		}
		type scope struct {
			Workload string            `json:"workload"`
			Selector map[string]string `json:"selector"`
			Hosts    []string          `json:"hosts"`
		}
		awaitCondition(t, 30*time.Second, "the scope of default/client names orders", func() error {
			var s scope
			r := meshctl(t, env, "lazyload", "scope", "client", "-n", "default", "-o", "json")
			if r.code != 0 || json.Unmarshal([]byte(r.stdout), &s) != nil {
				return fmt.Errorf("%v", r)
			}
			if s.Workload != "default/client" || s.Selector["app"] != "client" ||
				!slices.ContainsFunc(s.Hosts, func(h string) bool { return strings.HasSuffix(h, "/orders.service.consul") }) {
				return fmt.Errorf("scope %+v", s)
			}
			return nil
		})
		var scopes struct {
			Scopes []scope `json:"scopes"`
		}
		jsonOut(t, env, 0, &scopes, "lazyload", "scope")
		if len(scopes.Scopes) != 1 || scopes.Scopes[0].Workload != "default/client" {
			t.Errorf("lazyload scope: %+v", scopes)
		}
		r := meshctl(t, env, "lazyload", "edges")
		if !regexp.MustCompile(`(?m)^default/client\s+orders\.service\.consul\s+8080\s+\S+\s+static\s`).MatchString(r.stdout) {
			t.Errorf("lazyload edges table:\n%v", r)
		}
		if r := meshctl(t, env, "lazyload", "scope", "default/nobody"); r.code != 4 || !strings.Contains(r.stderr, "no lazyload scope for workload default/nobody") {
			t.Errorf("unknown workload: %v", r)
		}
	})

	t.Run("upgrade", func(t *testing.T) {
		var st struct {
			Epoch   int    `json:"epoch"`
			Version string `json:"version"`
			Phase   string `json:"phase"`
			Last    *struct {
				Outcome string `json:"outcome"`
			} `json:"last_upgrade"`
		}
		jsonOut(t, env, 0, &st, "upgrade", "status")
		if st.Epoch != 0 || st.Version != deps.EnvoyOldVersion || st.Phase != "serving" {
			t.Fatalf("upgrade status before: %+v", st)
		}
		var res struct {
			Outcome   string `json:"outcome"`
			ToEpoch   int    `json:"to_epoch"`
			ToVersion string `json:"to_version"`
		}
		r := jsonOut(t, env, 0, &res, "upgrade", "start", upgradeAdmin, "--binary", deps.Envoy)
		if res.Outcome != "upgraded" || res.ToEpoch != 1 || res.ToVersion != deps.EnvoyVersion {
			t.Errorf("upgrade start: %+v", res)
		}
		// Not a terminal: plain progress lines on stderr, then how long it took.
		if !strings.Contains(r.stderr, "upgrading the Envoy at "+upgradeAdmin+" (epoch 0, "+deps.EnvoyOldVersion+")") ||
			!strings.Contains(r.stderr, "done after") || strings.Contains(r.stderr, "\r") {
			t.Errorf("upgrade progress:\n%s", r.stderr)
		}
		jsonOut(t, env, 0, &st, "upgrade", "status", upgradeAdmin)
		if st.Epoch != 1 || st.Version != deps.EnvoyVersion || st.Last == nil || st.Last.Outcome != "upgraded" {
			t.Errorf("upgrade status after: %+v", st)
		}
		r = meshctl(t, env, "upgrade", "status")
		if !regexp.MustCompile(`(?m)^Phase:\s+serving$`).MatchString(r.stdout) ||
			!strings.Contains(r.stdout, deps.EnvoyOldVersion+" → "+deps.EnvoyVersion) {
			t.Errorf("upgrade status table:\n%s", r.stdout)
		}
	})

	t.Run("agent", func(t *testing.T) {
		agentAdmin := startAgent(t)
		agentEnv := append(slices.Clone(env), "MESHTURBO_AGENT_ADMIN="+agentAdmin)
		var st struct {
			Accelerating   bool   `json:"accelerating"`
			FallbackReason string `json:"fallback_reason"`
			State          *struct {
				Programs []struct{ Program string } `json:"programs"`
			} `json:"state"`
		}
		r := meshctl(t, agentEnv, "accel", "status", "-o", "json")
		if err := json.Unmarshal([]byte(r.stdout), &st); err != nil {
			t.Fatalf("%v", r)
		}
		switch {
		case st.Accelerating && (r.code != 0 || st.State == nil || len(st.State.Programs) == 0):
			t.Errorf("accelerating, yet: %v", r)
		case !st.Accelerating && (r.code != 5 || st.FallbackReason == ""):
			t.Errorf("not accelerating: want exit 5 and the reason: %v", r)
		}
		if st.Accelerating {
			// The real agent's safety state and counters reach the table.
			r = meshctl(t, agentEnv, "accel", "status")
			for _, re := range []string{`(?m)^Queue bound:\s+2\.0 MiB unread per socket`, `(?m)^Listeners at start:\s+(\d+ recorded|off: )`,
				`(?m)^Kept out:\s+\d+ blocking, \d+ without their connecting end$`, `(?m)^Queue back-offs:\s+\d+ `} {
				if !regexp.MustCompile(re).MatchString(r.stdout) {
					t.Errorf("accel status table lacks %s:\n%s", re, r.stdout)
				}
			}
		}
		r = meshctl(t, agentEnv, "vpp", "status")
		if r.code != 4 || !strings.Contains(r.stderr, "the agent at "+agentAdmin+" does not run VPP (404") {
			t.Errorf("vpp status on an agent without VPP: %v", r)
		}

		// Every daemon up: status and version see all three.
		var rep struct {
			Daemons []struct {
				Daemon           string
				Reachable, Ready bool
				Version          *struct{ Daemon string }
			}
		}
		want := 0
		if !st.Accelerating {
			want = 5
		}
		jsonOut(t, agentEnv, want, &rep, "status")
		for _, d := range rep.Daemons {
			if !d.Reachable || !d.Ready || d.Version == nil || d.Version.Daemon != d.Daemon {
				t.Errorf("status of %s: %+v", d.Daemon, d)
			}
		}
		r = meshctl(t, agentEnv, "version")
		for _, d := range []string{"meshctl", "meshturbo-xds", "meshturbo-upgrade", "meshturbo-agent"} {
			if !regexp.MustCompile(`(?m)^`+d+`\s+\S+`).MatchString(r.stdout) || strings.Contains(r.stdout, "unreachable") {
				t.Errorf("version lacks %s:\n%s", d, r.stdout)
			}
		}
	})
}

// startAgent runs meshturbo-agent on a cgroup and a pin path of its own, and uninstalls it
// when the test ends. It needs root and cgroup v2; without them it skips, naming which.
func startAgent(t *testing.T) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("meshturbo-agent needs root: it loads BPF programs and attaches them to a cgroup")
	}
	root := ""
	for _, dir := range []string{"/sys/fs/cgroup", "/sys/fs/cgroup/unified"} { // unified, or the hybrid layout
		var st unix.Statfs_t
		if unix.Statfs(dir, &st) == nil && st.Type == unix.CGROUP2_SUPER_MAGIC {
			root = dir
			break
		}
	}
	if root == "" {
		t.Skip("meshturbo-agent needs cgroup v2, at /sys/fs/cgroup or /sys/fs/cgroup/unified; neither is")
	}
	unlock, err := testenv.LockBPF() // not while the bpf package checks the kernel for mt_* objects
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(unlock) // runs last: after the agent is uninstalled
	name := fmt.Sprintf("meshctl-e2e-%d", time.Now().UnixNano())
	cg := filepath.Join(root, name)
	if err := os.Mkdir(cg, 0o755); err != nil {
		t.Fatal(err)
	}
	pin := filepath.Join("/sys/fs/bpf", name)
	agent := filepath.Join(binDir, "meshturbo-agent")
	t.Cleanup(func() {
		if out, err := exec.Command(agent, "uninstall", "-pin-path", pin).CombinedOutput(); err != nil {
			t.Errorf("meshturbo-agent uninstall: %v\n%s", err, out)
		}
		if err := os.Remove(cg); err != nil {
			t.Errorf("remove cgroup %s: %v", cg, err)
		}
	})
	admin := freeAddr(t)
	cmd := exec.Command(agent, "-cgroup", cg, "-pin-path", pin, "-admin", admin, "-sidecar-ports", "15001")
	testenv.Start(t, "meshturbo-agent", cmd, testenv.HTTPProbe("http://"+admin+"/healthz", nil), 30*time.Second)
	return admin
}

// TestMeshctlStatusNothingRunning: the binary, pointed at addresses nothing listens on,
// prints what it tried and exits 3 within 2 s.
func TestMeshctlStatusNothingRunning(t *testing.T) {
	env := []string{
		"MESHTURBO_XDS_ADMIN=" + freeAddr(t),
		"MESHTURBO_UPGRADE_ADMIN=" + freeAddr(t),
		"MESHTURBO_AGENT_ADMIN=unix://" + filepath.Join(t.TempDir(), "agent.sock"),
	}
	start := time.Now()
	r := meshctl(t, env, "status")
	if took := time.Since(start); took > 2*time.Second {
		t.Errorf("meshctl status took %s with nothing running, want under 2s", took)
	}
	if r.code != 3 {
		t.Errorf("want exit 3, got %v", r)
	}
	for _, e := range env {
		name, addr, _ := strings.Cut(e, "=")
		if !strings.Contains(r.stderr, " at "+addr+": ") || !strings.Contains(r.stderr, name) {
			t.Errorf("stderr does not name %s and %s:\n%s", addr, name, r.stderr)
		}
	}
}
