package main

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
	"go.yaml.in/yaml/v3"

	"github.com/meshturbo/meshturbo/internal/admin"
)

var update = flag.Bool("update", false, "rewrite testdata/*.golden from the current output")

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// now is the fixed clock of these tests; the fixtures' times are relative to it.
var now = time.Date(2026, 9, 1, 12, 0, 0, 0, time.UTC)

type result struct {
	stdout, stderr string
	code           int
}

// meshctl runs meshctl in-process with env as its environment.
func meshctl(t *testing.T, env map[string]string, args ...string) result {
	t.Helper()
	var stdout, stderr bytes.Buffer
	code := execute(context.Background(), args, &environment{
		stdout: &stdout, stderr: &stderr,
		getenv: func(k string) string { return env[k] },
		now:    func() time.Time { return now },
	})
	return result{stdout.String(), stderr.String(), code}
}

func (r result) String() string {
	return fmt.Sprintf("exit %d\nstdout:\n%s\nstderr:\n%s", r.code, r.stdout, r.stderr)
}

func golden(t *testing.T, name, got string) {
	t.Helper()
	path := filepath.Join("testdata", name+".golden")
	if *update {
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run go test -update to create it)", err)
	}
	if got != string(want) {
		t.Errorf("%s differs from %s (go test -update rewrites it)\n--- got:\n%s\n--- want:\n%s", name, path, got, want)
	}
}

func fixture(t *testing.T, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", "fixtures", name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// fake is a daemon's admin API serving fixtures.
type fake struct {
	*httptest.Server
	mux *http.ServeMux
}

func newFake(t *testing.T, daemon, token string, routes map[string]string) *fake {
	t.Helper()
	f := &fake{mux: http.NewServeMux()}
	f.mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	f.mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ready") })
	f.json("/v1/version", admin.VersionInfo{Daemon: daemon, Version: "v0.1.0", Revision: "0123456789abcdef",
		GoVersion: "go1.26.7", Platform: "linux/amd64"})
	for path, file := range routes {
		body := fixture(t, file)
		f.mux.HandleFunc("GET "+path, func(w http.ResponseWriter, _ *http.Request) {
			w.Header().Set("Content-Type", "application/json")
			w.Write(body)
		})
	}
	var h http.Handler = f.mux
	if token != "" {
		h = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path != "/healthz" && r.URL.Path != "/readyz" && r.Header.Get("Authorization") != "Bearer "+token {
				http.Error(w, "missing or wrong bearer token", http.StatusUnauthorized)
				return
			}
			f.mux.ServeHTTP(w, r)
		})
	}
	f.Server = httptest.NewServer(h)
	t.Cleanup(f.Close)
	return f
}

func (f *fake) json(path string, v any) {
	f.mux.HandleFunc("GET "+path, func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(v)
	})
}

func (f *fake) addr() string { return strings.TrimPrefix(f.URL, "http://") }

// serveLazyload serves meshturbo-xds's lazy-loading contract (GET /v1/lazyload/edges[?workload=],
// /v1/lazyload/scopes, /v1/lazyload/scopes/{ns}/{name} with a JSON 404 for an unknown workload)
// from fixtures. It was written against the contract before xds/lazyload landed; it stays for
// the golden tables, which need fixed times. e2e/meshctl_test.go drives the real one.
func (f *fake) serveLazyload(t *testing.T) {
	var edges edgeList
	var scopes scopeList
	var rawEdges []json.RawMessage
	var rawScopes []json.RawMessage
	for _, x := range []struct {
		file string
		v    any
		raw  *[]json.RawMessage
		key  string
	}{{"lazyload-edges.json", &edges, &rawEdges, "edges"}, {"lazyload-scopes.json", &scopes, &rawScopes, "scopes"}} {
		b := fixture(t, x.file)
		if err := json.Unmarshal(b, x.v); err != nil {
			t.Fatal(err)
		}
		var m map[string][]json.RawMessage
		if err := json.Unmarshal(b, &m); err != nil {
			t.Fatal(err)
		}
		*x.raw = m[x.key]
	}
	writeJSON := func(w http.ResponseWriter, code int, v any) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(code)
		json.NewEncoder(w).Encode(v)
	}
	f.mux.HandleFunc("GET /v1/lazyload/edges", func(w http.ResponseWriter, r *http.Request) {
		out := []json.RawMessage{}
		for i, e := range edges.Edges {
			if wl := r.URL.Query().Get("workload"); wl == "" || wl == e.Workload {
				out = append(out, rawEdges[i])
			}
		}
		writeJSON(w, 200, map[string]any{"edges": out})
	})
	f.mux.HandleFunc("GET /v1/lazyload/scopes", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, 200, map[string]any{"scopes": rawScopes})
	})
	f.mux.HandleFunc("GET /v1/lazyload/scopes/{namespace}/{name}", func(w http.ResponseWriter, r *http.Request) {
		wl := r.PathValue("namespace") + "/" + r.PathValue("name")
		for i, s := range scopes.Scopes {
			if s.Workload == wl {
				writeJSON(w, 200, rawScopes[i])
				return
			}
		}
		writeJSON(w, 404, map[string]string{"error": "no scope for workload " + wl})
	})
}

// fakes are the three daemons, healthy, with every fixture.
type fakes struct{ xds, upgrade, agent *fake }

func newFakes(t *testing.T) *fakes {
	fs := &fakes{
		xds: newFake(t, "meshturbo-xds", "", map[string]string{
			"/v1/registries": "registries.json", "/v1/services": "services.json", "/v1/xds/clients": "xds-clients.json"}),
		upgrade: newFake(t, "meshturbo-upgrade", "", map[string]string{"/v1/upgrade": "upgrade.json"}),
		agent:   newFake(t, "meshturbo-agent", "", map[string]string{"/v1/accel": "accel.json", "/v1/vpp": "vpp.json"}),
	}
	fs.xds.serveLazyload(t)
	return fs
}

func (fs *fakes) env() map[string]string {
	return map[string]string{
		"MESHTURBO_XDS_ADMIN":     fs.xds.addr(),
		"MESHTURBO_UPGRADE_ADMIN": fs.upgrade.addr(),
		"MESHTURBO_AGENT_ADMIN":   fs.agent.addr(),
	}
}

// normalize replaces the fakes' addresses with the daemons' default ones. Both are
// 127.0.0.1 with a five-digit port (ephemeral ports are 32768-60999), so the columns the
// tab writer aligned stay aligned.
func (fs *fakes) normalize(s string) string {
	r := strings.NewReplacer(fs.xds.addr(), "127.0.0.1:15051", fs.upgrade.addr(), "127.0.0.1:15052", fs.agent.addr(), "127.0.0.1:15055")
	return r.Replace(s)
}

// TestTables checks the table output of every read command against golden files, and that
// -o json and -o yaml carry the same data.
func TestTables(t *testing.T) {
	fs := newFakes(t)
	for _, tc := range []struct {
		name string
		args []string
		code int
	}{
		{"status", []string{"status"}, exitUnhealthy}, // the eureka registry is stale
		{"registry-list", []string{"registry", "list"}, 0},
		{"registry-get", []string{"registry", "get", "consul"}, 0},
		{"registry-get-service", []string{"registry", "get", "consul", "orders.service.consul"}, 0},
		{"lazyload-edges", []string{"lazyload", "edges"}, 0},
		{"lazyload-edges-workload", []string{"lazyload", "edges", "client"}, 0},
		{"lazyload-scopes", []string{"lazyload", "scope"}, 0},
		{"lazyload-scope", []string{"lazyload", "scope", "default/client"}, 0},
		{"accel-status", []string{"accel", "status"}, 0},
		{"vpp-status", []string{"vpp", "status"}, 0},
		{"upgrade-status", []string{"upgrade", "status"}, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := meshctl(t, fs.env(), tc.args...)
			if r.code != tc.code {
				t.Fatalf("want exit %d, got %v", tc.code, r)
			}
			golden(t, tc.name, fs.normalize(r.stdout))

			js := meshctl(t, fs.env(), append(tc.args, "-o", "json")...)
			ym := meshctl(t, fs.env(), append(tc.args, "-o", "yaml")...)
			if js.code != tc.code || ym.code != tc.code {
				t.Fatalf("-o json: %v\n-o yaml: %v", js, ym)
			}
			var fromJSON, fromYAML any
			if err := json.Unmarshal([]byte(js.stdout), &fromJSON); err != nil {
				t.Fatalf("-o json is not JSON: %v\n%s", err, js.stdout)
			}
			if err := yaml.Unmarshal([]byte(ym.stdout), &fromYAML); err != nil {
				t.Fatalf("-o yaml is not YAML: %v\n%s", err, ym.stdout)
			}
			// YAML reads RFC 3339 times as strings and numbers as ints; compare via JSON.
			a, _ := json.Marshal(fromJSON)
			b, _ := json.Marshal(fromYAML)
			if !bytes.Equal(a, b) {
				t.Errorf("-o json and -o yaml differ:\n%s\n%s", a, b)
			}
		})
	}
}

// TestJSONIsTheDaemonsAnswer: for a single daemon endpoint, -o json prints what the daemon
// served, every field included.
func TestJSONIsTheDaemonsAnswer(t *testing.T) {
	fs := newFakes(t)
	for _, tc := range []struct {
		args    []string
		fixture string
	}{
		{[]string{"registry", "list"}, "registries.json"},
		{[]string{"accel", "status"}, "accel.json"},
		{[]string{"upgrade", "status"}, "upgrade.json"},
		{[]string{"vpp", "status"}, "vpp.json"},
		{[]string{"lazyload", "scope"}, "lazyload-scopes.json"},
	} {
		r := meshctl(t, fs.env(), append(tc.args, "-o", "json")...)
		var got, want any
		if err := json.Unmarshal([]byte(r.stdout), &got); err != nil {
			t.Fatalf("%v: %v", tc.args, r)
		}
		if err := json.Unmarshal(fixture(t, tc.fixture), &want); err != nil {
			t.Fatal(err)
		}
		a, _ := json.Marshal(got)
		b, _ := json.Marshal(want)
		if !bytes.Equal(a, b) {
			t.Errorf("%v -o json:\n%s\nwant the daemon's answer:\n%s", tc.args, a, b)
		}
	}

	// registry get: the registry's status and only its own services.
	r := meshctl(t, fs.env(), "registry", "get", "consul", "-o", "json")
	var view struct {
		Registry sourceStatus `json:"registry"`
		Services []service    `json:"services"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &view); err != nil || r.code != 0 {
		t.Fatalf("%v", r)
	}
	if view.Registry.Source != "consul" || len(view.Services) != 2 || len(view.Registry.Skipped) != 2 {
		t.Errorf("registry get consul -o json = %+v", view)
	}
	for _, s := range view.Services {
		if s.Source != "consul" {
			t.Errorf("service %s of %s listed under consul", s.Hostname, s.Source)
		}
	}

	// lazyload edges <workload> asks the daemon for that workload's edges only.
	r = meshctl(t, fs.env(), "lazyload", "edges", "shop/cart", "-o", "json")
	var edges edgeList
	if err := json.Unmarshal([]byte(r.stdout), &edges); err != nil || len(edges.Edges) != 1 || edges.Edges[0].Host != "payments.eureka" {
		t.Errorf("lazyload edges shop/cart: %v", r)
	}

	// status -o json: one object per daemon, with versions and summaries.
	r = meshctl(t, fs.env(), "status", "-o", "json")
	var rep statusReport
	if err := json.Unmarshal([]byte(r.stdout), &rep); err != nil || len(rep.Daemons) != 3 {
		t.Fatalf("status -o json: %v", r)
	}
	for _, d := range rep.Daemons {
		if !d.Reachable || !d.Ready || d.Version == nil || d.Version.Daemon != d.Daemon {
			t.Errorf("status of %s: %+v", d.Daemon, d)
		}
	}
	if rep.Daemons[0].Degraded != "stale: eureka" {
		t.Errorf("xds degraded = %q, want the stale registry named", rep.Daemons[0].Degraded)
	}
}

func TestNotFoundAndMissingAPIs(t *testing.T) {
	fs := newFakes(t)
	bare := newFake(t, "meshturbo-xds", "", map[string]string{"/v1/registries": "registries.json"})
	noVPP := newFake(t, "meshturbo-agent", "", map[string]string{"/v1/accel": "accel-off.json"})
	vppAbsent := newFake(t, "meshturbo-agent", "", map[string]string{"/v1/accel": "accel.json", "/v1/vpp": "vpp-absent.json"})
	for _, tc := range []struct {
		env  map[string]string
		args []string
		code int
		want string
	}{
		{fs.env(), []string{"lazyload", "scope", "nobody", "-n", "shop"}, exitNotFound, "no lazyload scope for workload shop/nobody: no scope for workload shop/nobody"},
		{fs.env(), []string{"registry", "get", "zookeeper"}, exitNotFound, `bridges no registry "zookeeper" (it bridges: consul, eureka)`},
		{fs.env(), []string{"registry", "get", "consul", "nope.service.consul"}, exitNotFound, `registry consul has no service "nope.service.consul"`},
		{fs.env(), []string{"registry", "get", "consul", "bad_name.service.consul"}, exitNotFound, "it was skipped (invalid_hostname"},
		{map[string]string{"MESHTURBO_XDS_ADMIN": bare.addr()}, []string{"lazyload", "edges"}, exitNotFound, "does not serve lazy loading"},
		{map[string]string{"MESHTURBO_AGENT_ADMIN": noVPP.addr()}, []string{"vpp", "status"}, exitNotFound,
			"the agent at " + noVPP.addr() + " does not run VPP (404"},
		{map[string]string{"MESHTURBO_AGENT_ADMIN": noVPP.addr()}, []string{"accel", "status"}, exitUnhealthy, "acceleration is off: bpf: kernel lacks sk_msg"},
		{map[string]string{"MESHTURBO_AGENT_ADMIN": vppAbsent.addr()}, []string{"vpp", "status"}, exitUnhealthy,
			"is not connected to VPP: vpp: connect /run/vpp/api.sock: VPP API socket file /run/vpp/api.sock does not exist (is VPP running with `socksvr { socket-name /run/vpp/api.sock }`"},
		{fs.env(), []string{"lazyload", "scope", "a/b/c"}, exitUsage, "want <namespace>/<name>"},
		{fs.env(), []string{"registry", "get"}, exitUsage, "takes a registry name"},
		{fs.env(), []string{"status", "-o", "xml"}, exitUsage, `--output "xml"`},
		{fs.env(), []string{"status", "--daemons", "xds,nope"}, exitUsage, `--daemons "nope"`},
		{fs.env(), []string{"frobnicate"}, exitUsage, `unknown command "frobnicate"`},
		{fs.env(), []string{"status", "--no-such-flag"}, exitUsage, "unknown flag: --no-such-flag"},
		{fs.env(), []string{"upgrade", "status", "pod/.shop"}, exitUsage, `address "pod/.shop": want pod/<name>[.<namespace>][:<port>]`},
		{map[string]string{"MESHTURBO_AGENT_ADMIN": bare.addr()}, []string{"accel", "status"}, exitError,
			"GET /v1/accel: 404 Not Found: 404 page not found — is " + bare.addr() + " a meshturbo-agent? set --agent-admin or MESHTURBO_AGENT_ADMIN"},
	} {
		r := meshctl(t, tc.env, tc.args...)
		if r.code != tc.code || !strings.Contains(r.stderr, tc.want) {
			t.Errorf("meshctl %s: want exit %d and %q in stderr, got %v", strings.Join(tc.args, " "), tc.code, tc.want, r)
		}
	}
	if r := meshctl(t, fs.env(), "accel", "status", "--agent-admin", noVPP.addr()); !strings.Contains(r.stdout, "Fallback reason:") {
		t.Errorf("accel status with acceleration off shows no reason: %v", r)
	}
}

// closedAddr returns a 127.0.0.1 address nothing listens on.
func closedAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	return addr
}

// TestStatusWithNothingRunning: meshctl status prints every address it tried and how to
// change it, and exits 3 within 2 s.
func TestStatusWithNothingRunning(t *testing.T) {
	env := map[string]string{
		"MESHTURBO_XDS_ADMIN":     closedAddr(t),
		"MESHTURBO_UPGRADE_ADMIN": closedAddr(t),
		"MESHTURBO_AGENT_ADMIN":   "unix://" + filepath.Join(t.TempDir(), "agent.sock"),
	}
	start := time.Now()
	r := meshctl(t, env, "status")
	if took := time.Since(start); took > 2*time.Second {
		t.Errorf("took %s, want under 2s", took)
	}
	if r.code != exitUnreachable {
		t.Fatalf("want exit 3, got %v", r)
	}
	for _, want := range []string{
		"meshturbo-xds admin at " + env["MESHTURBO_XDS_ADMIN"] + ": connection refused — is meshturbo-xds running there? set --xds-admin or MESHTURBO_XDS_ADMIN",
		"meshturbo-upgrade admin at " + env["MESHTURBO_UPGRADE_ADMIN"] + ": connection refused",
		"meshturbo-agent admin at " + env["MESHTURBO_AGENT_ADMIN"] + ": no such socket — is meshturbo-agent running there? set --agent-admin or MESHTURBO_AGENT_ADMIN",
		"error: no meshturbo daemon answered (tried meshturbo-xds at " + env["MESHTURBO_XDS_ADMIN"],
	} {
		if !strings.Contains(r.stderr, want) {
			t.Errorf("stderr lacks %q:\n%s", want, r.stderr)
		}
	}
	for _, a := range []string{env["MESHTURBO_XDS_ADMIN"], env["MESHTURBO_UPGRADE_ADMIN"], env["MESHTURBO_AGENT_ADMIN"]} {
		if !strings.Contains(r.stdout, a) {
			t.Errorf("the table does not show the address tried, %s:\n%s", a, r.stdout)
		}
	}
}

// TestStatusBlackholed: a daemon that accepts connections but never answers costs at most
// --timeout, and is reported unreachable.
func TestStatusBlackholed(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var conns []net.Conn
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		l.Close()
		<-done
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
	})
	start := time.Now()
	r := meshctl(t, map[string]string{"MESHTURBO_XDS_ADMIN": l.Addr().String()}, "status", "--daemons", "xds", "--timeout", "500ms")
	if took := time.Since(start); took > 2*time.Second {
		t.Errorf("took %s", took)
	}
	if r.code != exitUnreachable || !strings.Contains(r.stderr, "no answer in time") {
		t.Errorf("want exit 3 with 'no answer in time', got %v", r)
	}
}

func TestToken(t *testing.T) {
	f := newFake(t, "meshturbo-xds", "s3cret", map[string]string{"/v1/registries": "registries.json"})
	env := map[string]string{"MESHTURBO_XDS_ADMIN": f.addr()}
	r := meshctl(t, env, "registry", "list")
	if r.code != exitError || !strings.Contains(r.stderr, "401 Unauthorized: missing or wrong bearer token — pass the admin token with --token-file or MESHTURBO_TOKEN_FILE") {
		t.Errorf("without the token: %v", r)
	}
	tokenFile := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(tokenFile, []byte("s3cret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if r := meshctl(t, env, "registry", "list", "--token-file", tokenFile); r.code != 0 || !strings.Contains(r.stdout, "consul") {
		t.Errorf("with --token-file: %v", r)
	}
	env["MESHTURBO_TOKEN_FILE"] = tokenFile
	if r := meshctl(t, env, "registry", "list"); r.code != 0 {
		t.Errorf("with MESHTURBO_TOKEN_FILE: %v", r)
	}
	if r := meshctl(t, env, "registry", "list", "--token-file", tokenFile+".missing"); r.code != exitUsage || !strings.Contains(r.stderr, "--token-file") {
		t.Errorf("missing token file: %v", r)
	}
}

// TestUnixSocketAndRealAdmin drives meshctl against the real admin server on a unix socket,
// with the token it requires read from a file.
func TestUnixSocketAndRealAdmin(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "xds.sock")
	s, err := admin.New(admin.Config{Addr: "unix://" + sock, Name: "meshturbo-xds"})
	if err != nil {
		t.Fatal(err)
	}
	s.HandleJSON("/v1/registries", func() any { return json.RawMessage(fixture(t, "registries.json")) })
	s.HandleJSON("/v1/xds/clients", func() any { return []any{} })
	s.Serve()
	t.Cleanup(func() { s.Close() })
	r := meshctl(t, map[string]string{"MESHTURBO_XDS_ADMIN": s.Addr()}, "status", "--daemons", "xds", "-o", "json")
	var rep statusReport
	if err := json.Unmarshal([]byte(r.stdout), &rep); err != nil {
		t.Fatalf("%v", r)
	}
	d := rep.Daemons[0]
	if !d.Reachable || !d.Ready || d.Version == nil || d.Version.Daemon != "meshturbo-xds" || d.Address != "unix://"+sock {
		t.Errorf("status over the unix socket: %+v", d)
	}
	if r.code != exitUnhealthy { // the fixture's eureka is stale
		t.Errorf("want exit 5 for the stale registry, got %v", r)
	}
}

func TestVersion(t *testing.T) {
	fs := newFakes(t)
	env := fs.env()
	env["MESHTURBO_AGENT_ADMIN"] = closedAddr(t)
	r := meshctl(t, env, "version", "-o", "json")
	var rep versionReport
	if err := json.Unmarshal([]byte(r.stdout), &rep); err != nil || r.code != 0 {
		t.Fatalf("%v", r)
	}
	if rep.Client.Daemon != "meshctl" || rep.Client.Version == "" || len(rep.Daemons) != 3 {
		t.Fatalf("version: %+v", rep)
	}
	if v := rep.Daemons[0].Version; v == nil || v.Version != "v0.1.0" {
		t.Errorf("meshturbo-xds version %+v", rep.Daemons[0])
	}
	if rep.Daemons[2].Version != nil || !strings.Contains(rep.Daemons[2].Error, "connection refused") {
		t.Errorf("unreachable agent: %+v", rep.Daemons[2])
	}
	if !strings.Contains(r.stderr, "meshturbo-agent admin at "+env["MESHTURBO_AGENT_ADMIN"]+": connection refused — is meshturbo-agent running there?") {
		t.Errorf("version does not say why the agent's version is missing: %v", r)
	}
	r = meshctl(t, env, "version", "--client")
	if r.code != 0 || !strings.HasPrefix(r.stdout, "COMPONENT") || strings.Contains(r.stdout, "meshturbo-xds") {
		t.Errorf("version --client: %v", r)
	}
}

func TestHelpAndCompletion(t *testing.T) {
	r := meshctl(t, nil, "--help")
	for _, want := range []string{"Exit codes:", "3  unreachable", "Examples:", "meshctl status", "MESHTURBO_XDS_ADMIN"} {
		if !strings.Contains(r.stdout, want) {
			t.Errorf("--help lacks %q", want)
		}
	}
	for _, cmd := range [][]string{{"status"}, {"registry", "get"}, {"lazyload", "edges"}, {"upgrade", "start"}, {"accel", "status"}, {"vpp", "status"}} {
		r := meshctl(t, nil, append(cmd, "--help")...)
		if r.code != 0 || !strings.Contains(r.stdout, "Examples:") {
			t.Errorf("meshctl %s --help has no examples: %v", strings.Join(cmd, " "), r)
		}
	}
	for _, shell := range []string{"bash", "zsh", "fish", "powershell"} {
		if r := meshctl(t, nil, "completion", shell); r.code != 0 || !strings.Contains(r.stdout, "meshctl") {
			t.Errorf("completion %s: %v", shell, r)
		}
	}
	if r := meshctl(t, nil, "completion", "tcsh"); r.code != exitUsage {
		t.Errorf("completion tcsh: %v", r)
	}
	// Dynamic completion asks meshturbo-xds for its registries.
	fs := newFakes(t)
	r = meshctl(t, fs.env(), "__complete", "registry", "get", "")
	if !strings.Contains(r.stdout, "consul\neureka\n") {
		t.Errorf("registry names not completed: %v", r)
	}
	r = meshctl(t, fs.env(), "__complete", "lazyload", "scope", "")
	if !strings.Contains(r.stdout, "default/client\nshop/cart\n") {
		t.Errorf("workloads not completed: %v", r)
	}
}
