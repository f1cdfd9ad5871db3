// Command meshturbo-demo is `make demo`: on one machine, with no Kubernetes, it starts Consul,
// meshturbo-xds, istiod and one Envoy sidecar (run by meshturbo-upgrade), registers two sample
// HTTP services in Consul, calls them through the sidecar and prints what was called and how.
// It stops everything it started when done or on Ctrl-C.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/meshturbo/meshturbo/internal/testenv"
)

func main() {
	outDir := flag.String("out", "out/demo", "directory for the logs of every process")
	calls := flag.Int("calls", 5, "calls per service")
	flag.Parse()

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	env, err := testenv.NewEnv(*outDir)
	if err != nil {
		fmt.Fprintln(os.Stderr, "meshturbo-demo:", err)
		os.Exit(1)
	}
	err = run(ctx, env, *calls)
	env.Close() // stops every process, in reverse order of start
	if err != nil {
		fmt.Fprintln(os.Stderr, "meshturbo-demo:", err)
		fmt.Fprintln(os.Stderr, "logs:", env.Dir())
		os.Exit(1)
	}
	fmt.Println("logs:", env.Dir())
}

// step prints what is being done; the returned func prints how long it took and reports
// whether the demo was interrupted meanwhile (Ctrl-C), so the caller stops there.
func step(ctx context.Context, format string, args ...any) func() error {
	start := time.Now()
	fmt.Printf("• "+format+" ... ", args...)
	return func() error {
		fmt.Printf("ok (%s)\n", time.Since(start).Round(time.Millisecond))
		return ctx.Err()
	}
}

// sample is a demo service: a tiny HTTP server on its own loopback address, known only to Consul.
type sample struct {
	name, ip, greeting string
	port               int
	srv                *http.Server
}

func (s *sample) start() error {
	lis, err := net.Listen("tcp", net.JoinHostPort(s.ip, "0"))
	if err != nil {
		return fmt.Errorf("sample %s: %w", s.name, err)
	}
	s.port = lis.Addr().(*net.TCPAddr).Port
	s.srv = &http.Server{ReadHeaderTimeout: 5 * time.Second, Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintf(w, "%s (served by %s)\n", s.greeting, lis.Addr())
	})}
	go func() { _ = s.srv.Serve(lis) }()
	return nil
}

func run(ctx context.Context, env *testenv.Env, callsPerService int) error {
	deps, err := testenv.LoadDeps()
	if err != nil {
		return fmt.Errorf("%w (run 'make deps')", err)
	}

	done := step(ctx, "building meshturbo daemons")
	binDir := filepath.Join(env.Dir(), "bin")
	build := exec.CommandContext(ctx, "go", "build", "-o", binDir+"/", "./cmd/meshturbo-xds", "./cmd/meshturbo-upgrade")
	if out, err := build.CombinedOutput(); err != nil {
		return fmt.Errorf("build: %w\n%s", err, out)
	}
	if err := done(); err != nil {
		return err
	}

	done = step(ctx, "starting Consul")
	consul, err := testenv.StartConsulIn(env, deps)
	if err != nil {
		return err
	}
	if err := done(); err != nil {
		return err
	}

	samples := []*sample{
		{name: "catalog", ip: "127.0.0.2", greeting: "catalog: 3 books in stock"},
		{name: "reviews", ip: "127.0.0.3", greeting: "reviews: 5 stars"},
	}
	cfg := api.DefaultConfig()
	cfg.Address = consul.HTTPAddr
	cc, err := api.NewClient(cfg)
	if err != nil {
		return err
	}
	done = step(ctx, "registering %d sample HTTP services in Consul", len(samples))
	for _, s := range samples {
		if err := s.start(); err != nil {
			return err
		}
		defer s.srv.Close()
		if err := cc.Agent().ServiceRegister(&api.AgentServiceRegistration{
			ID: s.name + "-1", Name: s.name, Address: s.ip, Port: s.port, Meta: map[string]string{"protocol": "http"},
		}); err != nil {
			return fmt.Errorf("register %s in consul: %w", s.name, err)
		}
	}
	if err := done(); err != nil {
		return err
	}

	done = step(ctx, "starting meshturbo-xds (Consul → ServiceEntry over MCP)")
	addrs, err := freeAddrs(4)
	if err != nil {
		return err
	}
	mcp, admin, envoyAdmin, upAdmin := addrs[0], addrs[1], addrs[2], addrs[3]
	if _, err := testenv.StartIn(env, "meshturbo-xds", exec.Command(filepath.Join(binDir, "meshturbo-xds"),
		"-listen", mcp, "-admin", admin, "-consul", consul.HTTPAddr),
		testenv.HTTPProbe("http://"+admin+"/readyz", nil), 30*time.Second); err != nil {
		return err
	}
	if err := done(); err != nil {
		return err
	}

	done = step(ctx, "starting istiod (config source xds://%s)", mcp)
	istiod, err := testenv.StartIstiodIn(env, deps, mcp)
	if err != nil {
		return err
	}
	if err := done(); err != nil {
		return err
	}

	done = step(ctx, "starting the Envoy sidecar through meshturbo-upgrade")
	if _, err := testenv.StartIn(env, "meshturbo-upgrade", exec.Command(filepath.Join(binDir, "meshturbo-upgrade"),
		"-envoy", deps.Envoy, "-istiod", istiod.XDSAddr, "-envoy-admin", envoyAdmin, "-admin", upAdmin,
		"-pod", "demo-client", "-namespace", "default", "-labels", "app=demo-client", "-interception", "none"),
		testenv.HTTPProbe("http://"+upAdmin+"/healthz", nil), time.Minute); err != nil {
		return err
	}
	if err := done(); err != nil {
		return err
	}

	fmt.Println()
	var rows []row
	for _, s := range samples {
		host := s.name + ".service.consul"
		for i := range callsPerService {
			r := call(ctx, host, s.port)
			r.endpoint = fmt.Sprintf("%s:%d", s.ip, s.port)
			if i == 0 && r.err != nil {
				// The first call may race istiod's first push; wait for it on a deadline.
				r = awaitFirst(ctx, host, s.port, 30*time.Second)
				r.endpoint = fmt.Sprintf("%s:%d", s.ip, s.port)
			}
			rows = append(rows, r)
		}
	}
	printTable(os.Stdout, rows)
	for _, r := range rows {
		if r.err != nil {
			return fmt.Errorf("call to %s failed: %w", r.service, r.err)
		}
	}
	return ctx.Err()
}

type row struct {
	service, endpoint, body string
	status                  int
	latency                 time.Duration
	err                     error
}

// call makes one request the way an app with no interception does: to the service port on
// 127.0.0.1, where the sidecar listens, with the service's host name.
func call(ctx context.Context, host string, port int) row {
	r := row{service: host}
	client := &http.Client{Timeout: 3 * time.Second, Transport: &http.Transport{
		DisableKeepAlives: true,
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, network, fmt.Sprintf("127.0.0.1:%d", port))
		},
	}}
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, fmt.Sprintf("http://%s:%d/", host, port), nil)
	start := time.Now()
	resp, err := client.Do(req)
	r.latency = time.Since(start)
	if err != nil {
		r.err = err
		return r
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 1024))
	r.status, r.body = resp.StatusCode, strings.TrimSpace(string(b))
	if resp.StatusCode != http.StatusOK {
		r.err = fmt.Errorf("HTTP %d: %s", resp.StatusCode, r.body)
	}
	return r
}

func awaitFirst(ctx context.Context, host string, port int, within time.Duration) row {
	deadline := time.Now().Add(within)
	for {
		r := call(ctx, host, port)
		if r.err == nil || time.Now().After(deadline) || ctx.Err() != nil {
			return r
		}
		select {
		case <-ctx.Done():
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func printTable(w io.Writer, rows []row) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "SERVICE\tREGISTRY\tVIA\tENDPOINT\tSTATUS\tLATENCY\tRESPONSE")
	for _, r := range rows {
		status := fmt.Sprint(r.status)
		if r.err != nil && r.status == 0 {
			status = "error"
		}
		body := r.body
		if r.err != nil && body == "" {
			body = r.err.Error()
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", r.service, "consul", "envoy sidecar (istiod)", r.endpoint, status,
			r.latency.Round(10*time.Microsecond), body)
	}
	tw.Flush()
	lat := map[string][]time.Duration{}
	for _, r := range rows {
		if r.err == nil {
			lat[r.service] = append(lat[r.service], r.latency)
		}
	}
	names := make([]string, 0, len(lat))
	for n := range lat {
		names = append(names, n)
	}
	sort.Strings(names)
	fmt.Fprintln(w)
	for _, n := range names {
		l := lat[n]
		sort.Slice(l, func(i, j int) bool { return l[i] < l[j] })
		fmt.Fprintf(w, "%s: %d/%d calls ok, median latency %s\n", n, len(l), countFor(rows, n), l[len(l)/2].Round(10*time.Microsecond))
	}
}

func countFor(rows []row, service string) int {
	n := 0
	for _, r := range rows {
		if r.service == service {
			n++
		}
	}
	return n
}

// freeAddrs returns n loopback addresses with free ports.
func freeAddrs(n int) ([]string, error) {
	out := make([]string, 0, n)
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("no free port on 127.0.0.1: %w", err)
		}
		defer l.Close() // held until all are picked, so none repeats
		out = append(out, l.Addr().String())
	}
	return out, nil
}
