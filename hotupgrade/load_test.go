package hotupgrade

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/meshturbo/meshturbo/internal/testenv"
)

// backend is the upstream behind the test Envoy: a Go HTTP server answering "ok".
func startBackend(t testing.TB) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		_, _ = io.WriteString(w, "ok")
	})}
	done := make(chan struct{})
	go func() { defer close(done); _ = srv.Serve(lis) }()
	t.Cleanup(func() { srv.Close(); <-done })
	return lis.Addr().String()
}

// staticBootstrap is an Envoy config with one HTTP listener routing everything to the
// backend; tag comes back in the x-config response header.
func staticBootstrap(admin, listen, backend, tag string) []byte {
	host := func(a string) (string, string) { h, p, _ := net.SplitHostPort(a); return h, p }
	ah, ap := host(admin)
	lh, lp := host(listen)
	bh, bp := host(backend)
	// Stats are flushed every second, so the new epoch asks the old one (through the relay)
	// for its stats often, and the relay answers for it once it is gone.
	return fmt.Appendf(nil, `stats_flush_interval: 1s
admin:
  address: {socket_address: {address: %s, port_value: %s}}
static_resources:
  listeners:
  - name: ingress
    address: {socket_address: {address: %s, port_value: %s}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          codec_type: AUTO
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              response_headers_to_add:
              - header: {key: x-config, value: %q}
              routes:
              - match: {prefix: "/"}
                route: {cluster: backend}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
  clusters:
  - name: backend
    type: STATIC
    # As a sidecar's (Istio: connectTimeout 10s, circuit breakers at the maximum): the fault
    # tests stop an Envoy for seconds under load, and the burst it then sends (over a
    # thousand upstream connects in one event-loop pass, on two shared CPUs) must neither
    # outlast a 1s connect timer nor trip the default limit of 1024.
    connect_timeout: 10s
    circuit_breakers: {thresholds: [{max_connections: 100000, max_pending_requests: 100000, max_requests: 100000}]}
    load_assignment:
      cluster_name: backend
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: %s, port_value: %s}}}
`, ah, ap, lh, lp, tag, bh, bp)
}

// Load modes: how the generator's client talks to Envoy.
const (
	modeKeepAlive = "http1-keepalive"
	modeClose     = "http1-close"
	modeH2C       = "http2"
)

// load sends requests at a constant rate (open loop: a slow answer does not slow the
// sender) and counts answers that are not 200 "ok". Requests are POSTs: Go's transport
// resends one only when the server cannot have seen it (HTTP/1: nothing was written on a
// reused connection; HTTP/2: the stream was refused, or the connection was going away before
// the stream was sent), as browsers, gRPC and Envoy itself do. Those resends are counted
// apart (retried); a POST is never resent after it may have reached Envoy.
type load struct {
	mode   string
	client *http.Client
	url    string

	testenv.Tally
	retried atomic.Int64

	stop chan struct{}
	wg   sync.WaitGroup
}

func startLoad(t testing.TB, mode, addr string, rps int) *load {
	t.Helper()
	tr := &http.Transport{MaxIdleConnsPerHost: 64}
	switch mode {
	case modeClose:
		tr.DisableKeepAlives = true
	case modeH2C:
		var p http.Protocols
		p.SetUnencryptedHTTP2(true)
		tr.Protocols = &p
	}
	l := &load{mode: mode, client: &http.Client{Transport: tr, Timeout: 15 * time.Second}, url: "http://" + addr + "/", stop: make(chan struct{})}
	l.wg.Add(1)
	go l.run(time.Second / time.Duration(rps))
	t.Cleanup(func() { l.finish() })
	return l
}

func (l *load) run(every time.Duration) {
	defer l.wg.Done()
	tick := time.NewTicker(every)
	defer tick.Stop()
	for {
		select {
		case <-l.stop:
			return
		case <-tick.C:
			l.wg.Add(1)
			go func() { defer l.wg.Done(); l.one() }()
		}
	}
}

func (l *load) one() {
	var conns atomic.Int32
	ctx := httptrace.WithClientTrace(context.Background(), &httptrace.ClientTrace{GotConn: func(httptrace.GotConnInfo) { conns.Add(1) }})
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, l.url, strings.NewReader("x"))
	resp, err := l.client.Do(req)
	if conns.Load() > 1 {
		l.retried.Add(1)
	}
	if err == nil {
		body, rerr := io.ReadAll(resp.Body)
		resp.Body.Close()
		switch {
		case rerr != nil:
			err = rerr
		case resp.StatusCode != http.StatusOK || string(body) != "ok":
			err = fmt.Errorf("status %d, flags %q: %.100s", resp.StatusCode, resp.Header.Get("x-envoy-response-flags"), body)
		}
	}
	l.Record(err)
}

// finish stops sending, waits for the answers and returns the counts.
func (l *load) finish() (ok, failed, retried int64, errs []string) {
	select {
	case <-l.stop:
	default:
		close(l.stop)
	}
	l.wg.Wait()
	l.client.CloseIdleConnections()
	ok, failed = l.Counts()
	return ok, failed, l.retried.Load(), l.Errors()
}

// loads runs one load per mode against addr.
type loads []*load

func startLoads(t testing.TB, addr string, rps int, modes ...string) loads {
	var ls loads
	for _, m := range modes {
		ls = append(ls, startLoad(t, m, addr, rps))
	}
	return ls
}

// check stops the loads and fails the test if any request failed or none succeeded.
func (ls loads) check(t testing.TB) {
	t.Helper()
	for _, l := range ls {
		ok, failed, retried, errs := l.finish()
		t.Logf("load %-16s ok=%d failed=%d (retried unseen by Envoy: %d)", l.mode, ok, failed, retried)
		if failed > 0 || ok == 0 {
			t.Errorf("load %s: %d ok, %d failed; first errors:\n  %s", l.mode, ok, failed, strings.Join(errs, "\n  "))
		}
	}
}

// get makes one request through Envoy on a new connection and returns x-config.
func get(ctx context.Context, addr string) (string, error) {
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+"/", nil)
	req.Close = true
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, resp.Body)
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("status %d", resp.StatusCode)
	}
	return resp.Header.Get("x-config"), nil
}
