package admin

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"io/fs"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

func get(t *testing.T, url, token string) (int, string) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, url, nil)
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func TestRefusesNonLoopbackWithoutToken(t *testing.T) {
	_, err := New(Config{Addr: "0.0.0.0:0"})
	if err == nil || !strings.Contains(err.Error(), "set a token") {
		t.Fatalf("err = %v, want a refusal naming the token", err)
	}
}

func TestEndpointsAndReadiness(t *testing.T) {
	ready := errors.New("registry not synced")
	s, err := New(Config{Addr: "127.0.0.1:0", Ready: func() error { return ready }})
	if err != nil {
		t.Fatal(err)
	}
	s.HandleJSON("/v1/thing", func() any { return map[string]int{"n": 3} })
	s.Serve()
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Error(err)
		}
	})
	base := "http://" + s.Addr()
	if code, _ := get(t, base+"/healthz", ""); code != 200 {
		t.Errorf("/healthz = %d", code)
	}
	if code, body := get(t, base+"/readyz", ""); code != 503 || !strings.Contains(body, "registry not synced") {
		t.Errorf("/readyz = %d %q, want 503 with the reason", code, body)
	}
	ready = nil
	if code, _ := get(t, base+"/readyz", ""); code != 200 {
		t.Errorf("/readyz after ready = %d", code)
	}
	if code, body := get(t, base+"/v1/thing", ""); code != 200 || !strings.Contains(body, `"n": 3`) {
		t.Errorf("/v1/thing = %d %q", code, body)
	}
}

func TestTokenRequired(t *testing.T) {
	s, err := New(Config{Addr: "127.0.0.1:0", Token: "s3cret"})
	if err != nil {
		t.Fatal(err)
	}
	s.HandleJSON("/v1/thing", func() any { return 1 })
	s.Serve()
	t.Cleanup(func() { s.Close() })
	base := "http://" + s.Addr()
	if code, _ := get(t, base+"/v1/thing", ""); code != 401 {
		t.Errorf("no token: %d, want 401", code)
	}
	if code, _ := get(t, base+"/v1/thing", "wrong"); code != 401 {
		t.Errorf("wrong token: %d, want 401", code)
	}
	if code, _ := get(t, base+"/v1/thing", "s3cret"); code != 200 {
		t.Errorf("right token: %d, want 200", code)
	}
	if code, _ := get(t, base+"/healthz", ""); code != 200 {
		t.Errorf("/healthz must not need the token: %d", code)
	}
}

func serve(t *testing.T, cfg Config) *Server {
	t.Helper()
	s, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	s.Serve()
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Error(err)
		}
	})
	return s
}

func unixClient(path string) *http.Client {
	return &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", path)
	}}}
}

func TestUnixSocket(t *testing.T) {
	path := filepath.Join(t.TempDir(), "run", "admin.sock")
	s := serve(t, Config{Addr: "unix://" + path, Name: "meshturbo-test"})
	if s.Addr() != "unix://"+path {
		t.Errorf("Addr() = %q", s.Addr())
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode()&fs.ModeSocket == 0 || fi.Mode().Perm() != 0o660 {
		t.Errorf("socket mode %v, want a socket with 0660", fi.Mode())
	}
	resp, err := unixClient(path).Get("http://admin/v1/version")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var v VersionInfo
	if err := json.NewDecoder(resp.Body).Decode(&v); err != nil {
		t.Fatal(err)
	}
	if v.Daemon != "meshturbo-test" || v.Version == "" || v.GoVersion != runtime.Version() || v.Platform == "" {
		t.Errorf("/v1/version = %+v", v)
	}

	// A second server on the same live socket is refused; once the first is gone, the stale
	// file left by a crash is replaced.
	if _, err := New(Config{Addr: "unix://" + path}); err == nil || !strings.Contains(err.Error(), "in use") {
		t.Errorf("second server on a live socket: err = %v, want 'in use'", err)
	}
}

func TestUnixSocketStaleAndNonSocket(t *testing.T) {
	dir := t.TempDir()
	stale := filepath.Join(dir, "stale.sock")
	l, err := net.Listen("unix", stale)
	if err != nil {
		t.Fatal(err)
	}
	l.(*net.UnixListener).SetUnlinkOnClose(false) // as a crashed daemon leaves it
	l.Close()
	serve(t, Config{Addr: "unix://" + stale})

	plain := filepath.Join(dir, "plain")
	if err := os.WriteFile(plain, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := New(Config{Addr: "unix://" + plain}); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Errorf("err = %v, want 'not a socket'", err)
	}
	if _, err := os.Stat(plain); err != nil {
		t.Errorf("a regular file was removed: %v", err)
	}
}

func TestTokenFile(t *testing.T) {
	dir := t.TempDir()
	tokenFile := filepath.Join(dir, "token")
	if err := os.WriteFile(tokenFile, []byte("s3cret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	s := serve(t, Config{Addr: "0.0.0.0:0", TokenFile: tokenFile})
	_, port, _ := net.SplitHostPort(s.Addr())
	base := "http://127.0.0.1:" + port
	if code, _ := get(t, base+"/v1/version", ""); code != 401 {
		t.Errorf("no token: %d, want 401", code)
	}
	if code, _ := get(t, base+"/v1/version", "s3cret"); code != 200 {
		t.Errorf("token from the file (newline trimmed): %d, want 200", code)
	}
	if code, _ := get(t, base+"/readyz", ""); code != 200 {
		t.Errorf("/readyz must not need the token: %d", code)
	}

	empty := filepath.Join(dir, "empty")
	if err := os.WriteFile(empty, []byte("\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		cfg  Config
		want string
	}{
		{Config{Addr: "0.0.0.0:0", TokenFile: empty}, "is empty"},
		{Config{Addr: "0.0.0.0:0", TokenFile: filepath.Join(dir, "missing")}, "token file"},
		{Config{Addr: "127.0.0.1:0", Token: "a", TokenFile: tokenFile}, "not both"},
		{Config{Addr: ":0"}, "not loopback"},
		{Config{Addr: "unix://"}, "no socket path"},
		{Config{Addr: "nonsense"}, "host:port or unix"},
	} {
		if _, err := New(tc.cfg); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: err = %v, want %q", tc.cfg, err, tc.want)
		}
	}
}

func TestBuildInfo(t *testing.T) {
	v := BuildInfo("x")
	if v.Daemon != "x" || v.Version == "" || v.GoVersion == "" {
		t.Errorf("BuildInfo = %+v", v)
	}
	version = "v9.9.9"
	t.Cleanup(func() { version = "" })
	if v := BuildInfo("x"); v.Version != "v9.9.9" {
		t.Errorf("ldflags version not used: %+v", v)
	}
}
