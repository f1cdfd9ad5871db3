package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/meshturbo/meshturbo/hotupgrade"
	"github.com/meshturbo/meshturbo/internal/testenv"
)

// lazyService is one service of the lazy-load test: its Consul name, protocol and port, and
// how to call it through the client's sidecar.
type lazyService struct {
	name, protocol string
	port           int
	call           func(ctx context.Context) error
}

func (s *lazyService) host() string { return s.name + ".service.consul" }

// TestLazyLoadFirstCallThroughFallbackThenDirect runs lazy loading against real istiod and
// Envoy: a client sidecar narrowed to what it calls reaches four never-seen services (HTTP/1,
// HTTP/2, gRPC, raw TCP) through the fallback on the very first call; the edges are learned
// from the fallback's access logs; the client's own Envoy gets the direct path within 5 s and
// later calls no longer touch the fallback; a restart of meshturbo-xds keeps every edge.
func TestLazyLoadFirstCallThroughFallbackThenDirect(t *testing.T) {
	deps := testenv.RequireDeps(t)
	consul := testenv.StartConsul(t)
	cc := consulClient(t, consul.HTTPAddr)

	svcs := []*lazyService{
		startLazyHTTP(t, "lazy-http1", "http", false),
		startLazyHTTP(t, "lazy-h2", "http2", true),
		startLazyGRPC(t, "lazy-grpc"),
		startLazyTCP(t, "lazy-tcp"),
	}
	for _, s := range svcs {
		err := cc.Agent().ServiceRegister(&api.AgentServiceRegistration{
			ID: s.name + "-1", Name: s.name, Address: "127.0.0.2", Port: s.port, Meta: map[string]string{"protocol": s.protocol},
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	// Services the client never calls: they must stay out of its scope.
	for i := range 3 {
		_, port := startHTTPServer(t, "unrelated")
		register(t, cc, fmt.Sprintf("lazy-unrelated-%d", i), fmt.Sprintf("lazy-unrelated-%d", i), "127.0.0.2", port)
	}

	caDir := t.TempDir()
	ca, err := hotupgrade.NewCA("cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	if err := ca.Write(caDir); err != nil {
		t.Fatal(err)
	}
	lz := startLazyXDS(t, consul.HTTPAddr, caDir, deps.Envoy)
	istiod := testenv.StartIstiod(t, lz.MCPAddr)
	sc := startLazySidecar(t, deps.Envoy, istiod.XDSAddr, caDir)

	// The scoped sidecar is ready when it holds a listener for each service port (the
	// fallback's stand-ins) and the fallback cluster; nothing else.
	awaitEnvoy(t, sc.EnvoyAdmin, 60*time.Second, "the client's scoped config (fallback stand-ins)", func(clusters, listeners string) error {
		if !strings.Contains(clusters, "||meshturbo-fallback.meshturbo.internal::") {
			return errors.New("no fallback cluster yet")
		}
		for _, s := range svcs {
			if !strings.Contains(listeners, fmt.Sprintf("127.0.0.1:%d", s.port)) {
				return fmt.Errorf("no listener on port %d (%s) yet; listeners: %s", s.port, s.protocol, strings.ReplaceAll(listeners, "\n", " "))
			}
			if strings.Contains(clusters, "||"+s.host()+"::") {
				return fmt.Errorf("%s is in the scope before any call", s.host())
			}
		}
		return nil
	})

	for _, s := range svcs {
		before := fallbackCalls(t, lz.FallbackAdmin, s)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		err := s.call(ctx) // exactly one attempt: the first call must not fail
		cancel()
		if err != nil {
			t.Fatalf("first call to never-seen %s (%s) failed: %v", s.host(), s.protocol, err)
		}
		if after := fallbackCalls(t, lz.FallbackAdmin, s); after <= before {
			t.Fatalf("first call to %s did not go through the fallback (fallback calls %d → %d)", s.host(), before, after)
		}
		start := time.Now()
		awaitEnvoy(t, sc.EnvoyAdmin, 5*time.Second, "the direct path to "+s.host(), func(clusters, _ string) error {
			if !strings.Contains(clusters, fmt.Sprintf("outbound|%d||%s::127.0.0.2:%d::", s.port, s.host(), s.port)) {
				return errors.New("no direct cluster yet")
			}
			return nil
		})
		t.Logf("%s (%s): first call through the fallback, direct path in the client's Envoy %s later", s.host(), s.protocol, time.Since(start).Round(time.Millisecond))
	}
	assertDirect := func(when string) {
		t.Helper()
		for _, s := range svcs {
			// Calls made while a listener update is still settling may yet take the fallback;
			// wait until a call no longer moves the fallback's counter, then check three more.
			awaitCondition(t, 10*time.Second, when+": calls to "+s.host()+" bypass the fallback", func() error {
				before, err := fallbackCallsErr(lz.FallbackAdmin, s) // a restarted fallback needs its config first
				if err != nil {
					return err
				}
				ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
				defer cancel()
				if err := s.call(ctx); err != nil {
					return err
				}
				if after, err := fallbackCallsErr(lz.FallbackAdmin, s); err != nil || after != before {
					return fmt.Errorf("the call went through the fallback (%d → %d, %v)", before, after, err)
				}
				return nil
			})
			before := fallbackCalls(t, lz.FallbackAdmin, s)
			for range 3 {
				ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
				err := s.call(ctx)
				cancel()
				if err != nil {
					t.Fatalf("%s: direct call to %s failed: %v", when, s.host(), err)
				}
			}
			if after := fallbackCalls(t, lz.FallbackAdmin, s); after != before {
				t.Fatalf("%s: calls to %s still go through the fallback (%d → %d)", when, s.host(), before, after)
			}
		}
	}
	assertDirect("after learning")

	edges := lazyEdges(t, lz.AdminAddr)
	for _, s := range svcs {
		if !edges[fmt.Sprintf("default/client→%s:%d", s.host(), s.port)] {
			t.Fatalf("edge to %s:%d not reported by the admin API; have %v", s.host(), s.port, edges)
		}
	}
	if len(edges) != len(svcs) {
		t.Fatalf("want exactly %d edges, have %v", len(svcs), edges)
	}

	// Restart meshturbo-xds (and so the fallback it runs): every learned edge survives, and
	// the client keeps its direct paths.
	lz.Restart(t)
	after := lazyEdges(t, lz.AdminAddr)
	for e := range edges {
		if !after[e] {
			t.Fatalf("edge %s lost across a restart of meshturbo-xds; have %v", e, after)
		}
	}
	awaitEnvoy(t, sc.EnvoyAdmin, 30*time.Second, "the client's scope after the restart", func(clusters, _ string) error {
		for _, s := range svcs {
			if !strings.Contains(clusters, fmt.Sprintf("outbound|%d||%s::", s.port, s.host())) {
				return fmt.Errorf("no direct cluster for %s", s.host())
			}
		}
		if strings.Contains(clusters, "lazy-unrelated-") {
			return errors.New("an unrelated service entered the scope")
		}
		return nil
	})
	assertDirect("after a restart of meshturbo-xds")
}

// lazyXDS is meshturbo-xds with lazy loading, running the fallback Envoy.
type lazyXDS struct {
	*xdsDaemon
	FallbackAdmin string
}

func startLazyXDS(t *testing.T, consulAddr, caDir, envoy string) *lazyXDS {
	t.Helper()
	fbPort := testenv.FreePort(t)
	d := &lazyXDS{FallbackAdmin: freeAddr(t)}
	cfg := fmt.Sprintf(`sources:
- consul: {address: %q}
lazyload:
  caDir: %q
  stateFile: %q
  edgeTTL: 1h
  fallback: {address: 127.0.0.3, httpPort: %d, envoy: %q, admin: %q}
  workloads:
  - {namespace: default, name: client, selector: {app: client}, serviceAccount: client}
`, consulAddr, caDir, filepath.Join(t.TempDir(), "edges.json"), fbPort, envoy, d.FallbackAdmin)
	path := filepath.Join(t.TempDir(), "meshturbo-xds.yaml")
	if err := os.WriteFile(path, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	d.xdsDaemon = startXDSWith(t, "-config", path)
	return d
}

func startLazySidecar(t *testing.T, envoy, istiodXDS, caDir string) *sidecar {
	t.Helper()
	s := &sidecar{EnvoyAdmin: freeAddr(t)}
	admin := freeAddr(t)
	cmd := exec.Command(filepath.Join(binDir, "meshturbo-upgrade"),
		"-envoy", envoy, "-istiod", istiodXDS, "-envoy-admin", s.EnvoyAdmin, "-admin", admin,
		"-pod", "client", "-namespace", "default", "-labels", "app=client", "-service-account", "client",
		"-ca-dir", caDir, "-interception", "none", "-concurrency", "1", "-work-dir", t.TempDir())
	s.Process = testenv.Start(t, "meshturbo-upgrade", cmd, testenv.HTTPProbe("http://"+admin+"/healthz", nil), 60*time.Second)
	return s
}

// awaitCondition retries check until it passes or within ends.
func awaitCondition(t *testing.T, within time.Duration, what string, check func() error) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		err := check()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not reached within %s: %v", what, within, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// awaitEnvoy waits until check accepts the Envoy's /clusters and /listeners.
func awaitEnvoy(t *testing.T, adminAddr string, within time.Duration, what string, check func(clusters, listeners string) error) {
	t.Helper()
	awaitCondition(t, within, what, func() error {
		clusters, err := envoyAdmin(adminAddr, "/clusters")
		if err != nil {
			return err
		}
		listeners, err := envoyAdmin(adminAddr, "/listeners")
		if err != nil {
			return err
		}
		return check(clusters, listeners)
	})
}

func envoyAdmin(addr, path string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	return testenv.AdminGet(ctx, addr, path)
}

// fallbackCalls counts the calls the fallback Envoy forwarded to s (requests for HTTP
// services, connections for TCP ones), from its own stats.
func fallbackCalls(t *testing.T, adminAddr string, s *lazyService) uint64 {
	t.Helper()
	n, err := fallbackCallsErr(adminAddr, s)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func fallbackCallsErr(adminAddr string, s *lazyService) (uint64, error) {
	stat := "upstream_rq_total"
	if s.protocol == "tcp" {
		stat = "upstream_cx_total"
	}
	name := fmt.Sprintf("cluster.lazy|%d|%s.%s", s.port, s.host(), stat)
	body, err := envoyAdmin(adminAddr, "/stats?format=json&filter="+strings.ReplaceAll(strings.ReplaceAll(name, "|", "%7C"), ".", "\\."))
	if err != nil {
		return 0, fmt.Errorf("fallback stats: %w", err)
	}
	var st struct {
		Stats []struct {
			Name  string `json:"name"`
			Value uint64 `json:"value"`
		} `json:"stats"`
	}
	if err := json.Unmarshal([]byte(body), &st); err != nil {
		return 0, fmt.Errorf("fallback stats %q: %w", body, err)
	}
	for _, s := range st.Stats {
		if s.Name == name {
			return s.Value, nil
		}
	}
	return 0, fmt.Errorf("fallback has no stat %s (yet): %s", name, body)
}

// lazyEdges returns the edges meshturbo-xds reports, as "workload→host:port".
func lazyEdges(t *testing.T, adminAddr string) map[string]bool {
	t.Helper()
	body, err := envoyAdmin(adminAddr, "/v1/lazyload/edges")
	if err != nil {
		t.Fatal(err)
	}
	var resp struct {
		Edges []struct {
			Workload string `json:"workload"`
			Host     string `json:"host"`
			Port     int    `json:"port"`
			Origin   string `json:"origin"`
		} `json:"edges"`
	}
	if err := json.Unmarshal([]byte(body), &resp); err != nil {
		t.Fatalf("edges %q: %v", body, err)
	}
	out := map[string]bool{}
	for _, e := range resp.Edges {
		out[fmt.Sprintf("%s→%s:%d", e.Workload, e.Host, e.Port)] = true
	}
	return out
}

// lazyListener listens on a free port of 127.0.0.2 whose number is also free on 127.0.0.1
// (the client's sidecar) and 127.0.0.3 (the fallback), since both bind the service port.
func lazyListener(t *testing.T) net.Listener {
	t.Helper()
	lis, err := testenv.ListenSharedPort("127.0.0.2", "127.0.0.1", "127.0.0.3")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lis.Close() })
	return lis
}

func serveHTTP(t *testing.T, lis net.Listener, srv *http.Server) {
	done := make(chan struct{})
	go func() { defer close(done); _ = srv.Serve(lis) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_ = srv.Shutdown(ctx)
		<-done
	})
}

func startLazyHTTP(t *testing.T, name, protocol string, h2 bool) *lazyService {
	lis := lazyListener(t)
	s := &lazyService{name: name, protocol: protocol, port: lis.Addr().(*net.TCPAddr).Port}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "%s %s\n", name, r.Proto)
	}), ReadHeaderTimeout: 5 * time.Second}
	tr := &http.Transport{DisableKeepAlives: true}
	if h2 {
		srv.Protocols = new(http.Protocols)
		srv.Protocols.SetHTTP1(true)
		srv.Protocols.SetUnencryptedHTTP2(true)
		tr.Protocols = new(http.Protocols)
		tr.Protocols.SetUnencryptedHTTP2(true)
	}
	serveHTTP(t, lis, srv)
	tr.DialContext = func(ctx context.Context, network, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, network, fmt.Sprintf("127.0.0.1:%d", s.port))
	}
	client := &http.Client{Transport: tr}
	s.call = func(ctx context.Context) error {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, fmt.Sprintf("http://%s:%d/", s.host(), s.port), nil)
		resp, err := client.Do(req)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		want := name + " HTTP/1.1"
		if h2 {
			want = name + " HTTP/2.0"
		}
		if resp.StatusCode != 200 || strings.TrimSpace(string(b)) != want {
			return fmt.Errorf("HTTP %d %q, want 200 %q", resp.StatusCode, strings.TrimSpace(string(b)), want)
		}
		if h2 && resp.ProtoMajor != 2 {
			return fmt.Errorf("answered over %s, want HTTP/2", resp.Proto)
		}
		return nil
	}
	return s
}

func startLazyGRPC(t *testing.T, name string) *lazyService {
	lis := lazyListener(t)
	s := &lazyService{name: name, protocol: "grpc", port: lis.Addr().(*net.TCPAddr).Port}
	gs := grpc.NewServer()
	hs := health.NewServer()
	hs.SetServingStatus(name, healthpb.HealthCheckResponse_SERVING)
	healthpb.RegisterHealthServer(gs, hs)
	done := make(chan struct{})
	go func() { defer close(done); _ = gs.Serve(lis) }()
	t.Cleanup(func() { gs.Stop(); <-done })
	s.call = func(ctx context.Context) error {
		conn, err := grpc.NewClient(fmt.Sprintf("127.0.0.1:%d", s.port),
			grpc.WithTransportCredentials(insecure.NewCredentials()),
			grpc.WithAuthority(fmt.Sprintf("%s:%d", s.host(), s.port)))
		if err != nil {
			return err
		}
		defer conn.Close()
		resp, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{Service: name})
		if err != nil {
			return err
		}
		if resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
			return fmt.Errorf("health %v", resp.GetStatus())
		}
		return nil
	}
	return s
}

func startLazyTCP(t *testing.T, name string) *lazyService {
	lis := lazyListener(t)
	s := &lazyService{name: name, protocol: "tcp", port: lis.Addr().(*net.TCPAddr).Port}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := lis.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(10 * time.Second))
				line, err := bufio.NewReader(c).ReadString('\n')
				if err != nil {
					return
				}
				fmt.Fprintf(c, "%s echo %s", name, line)
			}()
		}
	}()
	t.Cleanup(func() { lis.Close(); <-done })
	s.call = func(ctx context.Context) error {
		c, err := (&net.Dialer{}).DialContext(ctx, "tcp", fmt.Sprintf("127.0.0.1:%d", s.port))
		if err != nil {
			return err
		}
		defer c.Close()
		if dl, ok := ctx.Deadline(); ok {
			_ = c.SetDeadline(dl)
		}
		if _, err := io.WriteString(c, "ping\n"); err != nil {
			return err
		}
		line, err := bufio.NewReader(c).ReadString('\n')
		if err != nil {
			return fmt.Errorf("read the echo: %w", err)
		}
		if want := name + " echo ping\n"; line != want {
			return fmt.Errorf("echo %q, want %q", line, want)
		}
		return nil
	}
	return s
}
