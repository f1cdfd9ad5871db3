// Package e2e runs meshturbo's daemons as processes against the real Envoy, istiod and
// registries that `make deps` installs.
package e2e

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/meshturbo/meshturbo/internal/testenv"
)

// binDir holds the daemons built once for the whole package.
var binDir string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "meshturbo-e2e-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binDir = dir
	build := exec.Command("go", "build", "-o", dir+"/", "../cmd/meshturbo-xds", "../cmd/meshturbo-upgrade", "../cmd/meshturbo-agent", "../cmd/meshctl")
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "e2e: building the daemons failed:", err)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

func freeAddr(t *testing.T) string {
	t.Helper()
	return fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(t))
}

// xdsDaemon is a running meshturbo-xds.
type xdsDaemon struct {
	*testenv.Process
	MCPAddr, AdminAddr string
}

func startXDS(t *testing.T, consulAddr string) *xdsDaemon {
	t.Helper()
	return startXDSWith(t, "-consul", consulAddr)
}

// startXDSWith runs meshturbo-xds with the given source flags (-consul, -zookeeper, -eureka, -config).
func startXDSWith(t *testing.T, sourceFlags ...string) *xdsDaemon {
	t.Helper()
	d := &xdsDaemon{MCPAddr: freeAddr(t), AdminAddr: freeAddr(t)}
	args := append([]string{"-listen", d.MCPAddr, "-admin", d.AdminAddr, "-log-level", "debug"}, sourceFlags...)
	cmd := exec.Command(filepath.Join(binDir, "meshturbo-xds"), args...)
	d.Process = testenv.Start(t, "meshturbo-xds", cmd, testenv.HTTPProbe("http://"+d.AdminAddr+"/readyz", nil), 30*time.Second)
	return d
}

// sidecar is a running meshturbo-upgrade with its Envoy. It runs with interception NONE:
// istiod makes Envoy listen on 127.0.0.1:<service port> for every service, and apps call
// there with the service's host name.
type sidecar struct {
	*testenv.Process
	EnvoyAdmin string
}

func startSidecar(t *testing.T, envoy, istiodXDS string) *sidecar {
	t.Helper()
	s := &sidecar{EnvoyAdmin: freeAddr(t)}
	admin := freeAddr(t)
	cmd := exec.Command(filepath.Join(binDir, "meshturbo-upgrade"),
		"-envoy", envoy, "-istiod", istiodXDS, "-envoy-admin", s.EnvoyAdmin, "-admin", admin,
		"-pod", "client", "-namespace", "default", "-labels", "app=client",
		"-interception", "none", "-concurrency", "1", "-work-dir", t.TempDir())
	s.Process = testenv.Start(t, "meshturbo-upgrade", cmd, testenv.HTTPProbe("http://"+admin+"/healthz", nil), 60*time.Second)
	return s
}

// call makes one request through the sidecar: target is http://<host>:<port>/, sent to the
// sidecar's listener on 127.0.0.1:<port>.
func (s *sidecar) call(ctx context.Context, target string) (int, string, error) {
	u, err := url.Parse(target)
	if err != nil {
		return 0, "", err
	}
	client := &http.Client{
		Transport: &http.Transport{
			DisableKeepAlives: true,
			DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
				return (&net.Dialer{}).DialContext(ctx, network, net.JoinHostPort("127.0.0.1", u.Port()))
			},
		},
		Timeout: 3 * time.Second,
	}
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, target, nil)
	resp, err := client.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	return resp.StatusCode, strings.TrimSpace(string(b)), nil
}

// awaitCall calls target through the sidecar until check accepts the answer or within passes.
// The error names the target and the last answer seen, so a cut link reads plainly.
func (s *sidecar) awaitCall(target string, within time.Duration, what string, check func(code int, body string) bool) (time.Duration, error) {
	ctx, cancel := context.WithTimeout(context.Background(), within)
	defer cancel()
	start := time.Now()
	last := "no answer yet"
	for {
		code, body, err := s.call(ctx, target)
		if err == nil && check(code, body) {
			return time.Since(start), nil
		}
		if err != nil {
			last = err.Error()
		} else {
			last = fmt.Sprintf("HTTP %d %q", code, body)
		}
		select {
		case <-ctx.Done():
			return 0, fmt.Errorf("%s: not seen through Envoy within %s for %s (last answer: %s)", what, within, target, last)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// startHTTPServer serves a fixed greeting on a free port of 127.0.0.2: the sidecar takes the
// same port on 127.0.0.1, as it would on another host.
func startHTTPServer(t *testing.T, greeting string) (host string, port int) {
	t.Helper()
	// Free on 127.0.0.1 too: Envoy listens with SO_REUSEPORT, so a sidecar binding a port some
	// other test's Envoy holds would silently share its connections.
	lis, err := testenv.ListenSharedPort("127.0.0.2", "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintln(w, greeting)
	}), ReadHeaderTimeout: 5 * time.Second}
	done := make(chan struct{})
	go func() { defer close(done); _ = srv.Serve(lis) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil && !errors.Is(err, context.DeadlineExceeded) {
			t.Error(err)
		}
		<-done
	})
	a := lis.Addr().(*net.TCPAddr)
	return a.IP.String(), a.Port
}
