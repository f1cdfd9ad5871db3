package admin

import (
	"errors"
	"io"
	"net/http"
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
