package hotupgrade

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"

	"github.com/meshturbo/meshturbo/internal/testenv"
)

// Connections opened before an upgrade: what their clients see while the old Envoy drains
// and when it is stopped.

// awaitPhase polls the manager's phase until it is phase.
func awaitPhase(t *testing.T, m *Manager, phase string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for m.Status().Phase != phase {
		if time.Now().After(deadline) {
			t.Fatalf("manager never reached phase %s: %+v", phase, m.Status())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// upgradeAsync runs an upgrade on its own goroutine; the result arrives on the channel.
func (f *fixture) upgradeAsync(t *testing.T, tag string) <-chan UpgradeResult {
	ch := make(chan UpgradeResult, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		res, err := f.m.Upgrade(ctx, UpgradeRequest{Bootstrap: f.bootstrap(tag)})
		if err != nil {
			t.Errorf("upgrade to %s: %v", tag, err)
		}
		ch <- res
	}()
	return ch
}

// expectFIN checks that the peer closed c with a FIN: a read ends in EOF, not a reset.
func expectFIN(t *testing.T, r io.Reader, c net.Conn, what string) {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, err := r.Read(make([]byte, 1))
	switch {
	case n > 0:
		t.Errorf("%s: unexpected data instead of the end of the connection", what)
	case errors.Is(err, syscall.ECONNRESET):
		t.Errorf("%s: reset (RST), want a FIN", what)
	case !errors.Is(err, io.EOF):
		t.Errorf("%s: %v, want EOF (FIN)", what, err)
	}
}

// h1conn is a raw HTTP/1.1 keep-alive connection.
type h1conn struct {
	c net.Conn
	r *bufio.Reader
}

func dialH1(addr string) (*h1conn, error) {
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		return nil, err
	}
	return &h1conn{c: c, r: bufio.NewReader(c)}, nil
}

// get sends one request and reads the whole response: its x-config, and whether Envoy
// asked to close the connection.
func (h *h1conn) get() (tag string, closing bool, err error) {
	_ = h.c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(h.c, "GET / HTTP/1.1\r\nHost: test\r\n\r\n"); err != nil {
		return "", false, err
	}
	resp, err := http.ReadResponse(h.r, nil)
	if err != nil {
		return "", false, err
	}
	defer resp.Body.Close()
	if _, err := io.Copy(io.Discard, resp.Body); err != nil {
		return "", false, err
	}
	if resp.StatusCode != http.StatusOK {
		return "", false, fmt.Errorf("status %d", resp.StatusCode)
	}
	return resp.Header.Get("x-config"), resp.Close, nil
}

// An idle HTTP/1.1 keep-alive connection opened before the upgrade ends with a FIN when the
// old Envoy goes; a busy one gets Connection: close on a response, and its client
// reconnects to the new Envoy. No request is lost or reset.
func TestKeepAliveConnectionsEndGracefully(t *testing.T) {
	f := newFixture(t, "", nil)
	idle, err := dialH1(f.listen)
	if err != nil {
		t.Fatal(err)
	}
	defer idle.c.Close()
	if tag, _, err := idle.get(); err != nil || tag != "v0" {
		t.Fatalf("first request: %q, %v", tag, err)
	}

	// The busy client: one request every 20 ms on one connection; it reconnects when a
	// response says Connection: close (after reading the connection's end).
	var (
		mu      sync.Mutex
		tags    []string
		closes  int
		errs    []string
		stop    = make(chan struct{})
		stopped = make(chan struct{})
	)
	go func() {
		defer close(stopped)
		var h *h1conn
		defer func() {
			if h != nil {
				h.c.Close()
			}
		}()
		tick := time.NewTicker(20 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
			}
			if h == nil {
				var err error
				if h, err = dialH1(f.listen); err != nil {
					mu.Lock()
					errs = append(errs, "dial: "+err.Error())
					mu.Unlock()
					continue
				}
			}
			tag, closing, err := h.get()
			mu.Lock()
			if err != nil {
				errs = append(errs, err.Error())
			} else if len(tags) == 0 || tags[len(tags)-1] != tag {
				tags = append(tags, tag)
			}
			mu.Unlock()
			if err != nil || closing {
				if closing {
					_ = h.c.SetReadDeadline(time.Now().Add(5 * time.Second))
					_, rerr := h.r.ReadByte()
					mu.Lock()
					closes++
					if !errors.Is(rerr, io.EOF) {
						errs = append(errs, fmt.Sprintf("after Connection: close: %v, want EOF", rerr))
					}
					mu.Unlock()
				}
				h.c.Close()
				h = nil
			}
		}
	}()

	res := f.upgrade(t, UpgradeRequest{Bootstrap: f.bootstrap("v1")})
	expectFIN(t, idle.r, idle.c, "idle keep-alive connection to the old Envoy")
	// The busy client carries on with the new Envoy.
	deadline := time.Now().Add(5 * time.Second)
	for {
		mu.Lock()
		n := len(tags)
		last := ""
		if n > 0 {
			last = tags[n-1]
		}
		mu.Unlock()
		if last == "v1" || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	close(stop)
	<-stopped
	mu.Lock()
	defer mu.Unlock()
	t.Logf("old Envoy stopped: %s; busy client saw configs %v, %d Connection: close", res.OldStopped, tags, closes)
	if len(errs) > 0 {
		t.Errorf("busy keep-alive client errors: %v", errs)
	}
	if closes == 0 || len(tags) != 2 || tags[0] != "v0" || tags[1] != "v1" {
		t.Errorf("busy client: configs %v, %d Connection: close; want v0 then v1 after a Connection: close", tags, closes)
	}
}

// grpcBootstrap routes gRPC (HTTP/2, no route timeout: streams last) to an HTTP/2 backend.
func grpcBootstrap(admin, listen, backend, tag string) []byte {
	host := func(a string) (string, string) { h, p, _ := net.SplitHostPort(a); return h, p }
	ah, ap := host(admin)
	lh, lp := host(listen)
	bh, bp := host(backend)
	return fmt.Appendf(nil, `admin:
  address: {socket_address: {address: %s, port_value: %s}}
static_resources:
  listeners:
  - name: grpc
    address: {socket_address: {address: %s, port_value: %s}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: grpc
          codec_type: HTTP2
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              response_headers_to_add: [{header: {key: x-config, value: %q}}]
              routes: [{match: {prefix: "/"}, route: {cluster: backend, timeout: 0s}}]
          http_filters:
          - {name: envoy.filters.http.router, typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  clusters:
  - name: backend
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {http2_protocol_options: {}}
    load_assignment:
      cluster_name: backend
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: %s, port_value: %s}}}}]}]
`, ah, ap, lh, lp, tag, bh, bp)
}

// echoService answers EmptyCall and echoes every FullDuplexCall message.
type echoService struct {
	testgrpc.UnimplementedTestServiceServer
}

func (echoService) EmptyCall(context.Context, *testgrpc.Empty) (*testgrpc.Empty, error) {
	return &testgrpc.Empty{}, nil
}

func (echoService) FullDuplexCall(s grpc.BidiStreamingServer[testgrpc.StreamingOutputCallRequest, testgrpc.StreamingOutputCallResponse]) error {
	for {
		req, err := s.Recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		if err := s.Send(&testgrpc.StreamingOutputCallResponse{Payload: req.GetPayload()}); err != nil {
			return err
		}
	}
}

func startGRPCBackend(t *testing.T) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	testgrpc.RegisterTestServiceServer(srv, echoService{})
	done := make(chan struct{})
	go func() { defer close(done); _ = srv.Serve(lis) }()
	t.Cleanup(func() { srv.Stop(); <-done })
	return lis.Addr().String()
}

// A gRPC stream opened before the upgrade keeps working while the old Envoy drains; the
// client got GOAWAY (its new RPCs go to the new Envoy on a new connection) and ends the
// stream normally; the old Envoy goes once its last connection is closed.
func TestGRPCStreamsEndGracefully(t *testing.T) {
	f := newFixtureWith(t, "", startGRPCBackend(t), grpcBootstrap, func(c *Config) { c.DrainTimeout = 20 * time.Second })
	cc, err := grpc.NewClient(f.listen, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	client := testgrpc.NewTestServiceClient(cc)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	configOf := func(md metadata.MD) string {
		if v := md.Get("x-config"); len(v) > 0 {
			return v[0]
		}
		return ""
	}
	stream, err := client.FullDuplexCall(ctx)
	if err != nil {
		t.Fatal(err)
	}
	roundTrip := func(msg string) error {
		if err := stream.Send(&testgrpc.StreamingOutputCallRequest{Payload: &testgrpc.Payload{Body: []byte(msg)}}); err != nil {
			return fmt.Errorf("send %q: %w", msg, err)
		}
		resp, err := stream.Recv()
		if err != nil {
			return fmt.Errorf("receive %q: %w", msg, err)
		}
		if got := string(resp.GetPayload().GetBody()); got != msg {
			return fmt.Errorf("echo %q, got %q", msg, got)
		}
		return nil
	}
	if err := roundTrip("before"); err != nil {
		t.Fatal(err)
	}
	if md, err := stream.Header(); err != nil || configOf(md) != "v0" {
		t.Fatalf("stream headers %v, %v; want x-config v0", md, err)
	}

	done := f.upgradeAsync(t, "v1")
	awaitPhase(t, f.m, PhaseDraining)
	// The stream lives on through the old Envoy, across its whole --drain-time-s.
	drainEnd := time.Now().Add(f.m.cfg.EnvoyDrainTime + 500*time.Millisecond)
	for i := 0; time.Now().Before(drainEnd); i++ {
		if err := roundTrip(fmt.Sprint("draining ", i)); err != nil {
			t.Fatalf("stream opened before the upgrade, during the drain: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	// The draining Envoy answers the next request on the connection and sends GOAWAY with it
	// (Envoy starts an HTTP/2 drain on a response, not on an idle connection); from then on
	// the client's new RPCs go to the new Envoy on a new connection, while the old stream
	// carries on.
	var seen []string
	for deadline := time.Now().Add(5 * time.Second); ; {
		var hdr metadata.MD
		if _, err := client.EmptyCall(ctx, &testgrpc.Empty{}, grpc.Header(&hdr)); err != nil {
			t.Fatalf("new RPC during the drain: %v", err)
		}
		seen = append(seen, configOf(hdr))
		if configOf(hdr) == "v1" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("new RPCs during the drain all went to the old Envoy: %v", seen)
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Logf("new RPCs during the drain went to %v", seen)
	if err := roundTrip("after GOAWAY"); err != nil {
		t.Fatalf("stream opened before the upgrade, after GOAWAY: %v", err)
	}
	select {
	case res := <-done:
		t.Fatalf("the old Envoy was stopped with a stream open: %+v", res)
	default:
	}
	// The client ends the stream: it finishes with status OK.
	if err := stream.CloseSend(); err != nil {
		t.Fatal(err)
	}
	if _, err := stream.Recv(); !errors.Is(err, io.EOF) {
		t.Fatalf("stream end: %v, want EOF with status OK", err)
	}
	res := <-done
	t.Logf("old Envoy stopped: %s after %dms of drain", res.OldStopped, res.DrainMS)
	if !strings.Contains(res.OldStopped, "zero") && !strings.Contains(res.OldStopped, "idle") {
		t.Errorf("old Envoy stopped because %q, want its connections gone (or idle) after the stream ended", res.OldStopped)
	}
	stream2, err := client.FullDuplexCall(ctx)
	if err != nil {
		t.Fatal(err)
	}
	stream = stream2
	if err := roundTrip("after"); err != nil {
		t.Fatal(err)
	}
	if md, _ := stream.Header(); configOf(md) != "v1" {
		t.Errorf("new stream after the upgrade: x-config %q, want v1", configOf(md))
	}
	_ = stream.CloseSend()
	_, _ = stream.Recv()
}

// tcpBootstrap proxies raw TCP (tcp_proxy) to backend; tag names the stats prefix, so each
// upgrade runs a new config.
func tcpBootstrap(admin, listen, backend, tag string) []byte {
	host := func(a string) (string, string) { h, p, _ := net.SplitHostPort(a); return h, p }
	ah, ap := host(admin)
	lh, lp := host(listen)
	bh, bp := host(backend)
	return fmt.Appendf(nil, `admin:
  address: {socket_address: {address: %s, port_value: %s}}
static_resources:
  listeners:
  - name: tcp
    address: {socket_address: {address: %s, port_value: %s}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: tcp_%s
          cluster: echo
  clusters:
  - name: echo
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: echo
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: %s, port_value: %s}}}}]}]
`, ah, ap, lh, lp, tag, bh, bp)
}

func echoOnce(c net.Conn, msg string) error {
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, msg); err != nil {
		return err
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(c, buf); err != nil {
		return err
	}
	if string(buf) != msg {
		return fmt.Errorf("echo %q, got %q", msg, buf)
	}
	return nil
}

// A raw TCP connection through a tcp_proxy listener, opened before the upgrade, carries data
// for the whole drain window (TCP has no way to ask a client to reconnect), then ends with a
// FIN when the old Envoy is stopped at the drain deadline; new connections reach the new one.
func TestRawTCPConnectionsSurviveTheDrainAndEndWithFIN(t *testing.T) {
	const drain = 4 * time.Second
	f := newFixtureWith(t, "", testenv.StartTCPEcho(t), tcpBootstrap, func(c *Config) { c.DrainTimeout = drain })
	c, err := net.Dial("tcp", f.listen)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := echoOnce(c, "before"); err != nil {
		t.Fatal(err)
	}
	done := f.upgradeAsync(t, "v1")
	awaitPhase(t, f.m, PhaseDraining)
	draining := time.Now()
	var res UpgradeResult
	n := 0
loop:
	for {
		select {
		case res = <-done:
			break loop
		case <-time.After(100 * time.Millisecond):
		}
		if err := echoOnce(c, fmt.Sprint("draining ", n)); err != nil {
			// Only the old Envoy's stop may end it, and only with a FIN (checked below).
			res = <-done
			if !errors.Is(err, io.EOF) {
				t.Fatalf("raw TCP connection during the drain, after %s: %v", time.Since(draining).Round(time.Millisecond), err)
			}
			break loop
		}
		n++
	}
	lasted := time.Since(draining)
	t.Logf("raw TCP connection carried %d echoes over %s of drain; old Envoy stopped: %s", n, lasted.Round(time.Millisecond), res.OldStopped)
	if lasted < drain-500*time.Millisecond || !strings.HasPrefix(res.OldStopped, "drain timeout with 1 connections") {
		t.Errorf("the old Envoy let the connection go after %s (%q); want it kept until the drain deadline (%s)", lasted, res.OldStopped, drain)
	}
	expectFIN(t, c, c, "raw TCP connection when the old Envoy stopped")
	c2, err := net.Dial("tcp", f.listen)
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	if err := echoOnce(c2, "after"); err != nil {
		t.Fatalf("new raw TCP connection after the upgrade: %v", err)
	}
	if conns, _, err := downstream(f.m.Status().PID, map[int]bool{portOf(f.listen): true}); err != nil || conns != 1 {
		t.Errorf("the new Envoy holds %d connections on the listener (%v), want the new one", conns, err)
	}
}

func portOf(addr string) int {
	_, p, _ := net.SplitHostPort(addr)
	var n int
	fmt.Sscan(p, &n)
	return n
}
