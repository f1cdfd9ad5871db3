// Package admin is the admin HTTP server every meshturbo daemon runs: /healthz, /readyz and
// JSON status under /v1/. It listens on loopback by default; bound anywhere else it requires
// a bearer token.
package admin

import (
	"context"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"time"
)

// Config configures a Server.
type Config struct {
	// Addr is host:port; the host must be a loopback address unless Token is set.
	Addr string
	// Token, when set, is required as "Authorization: Bearer <token>" on every request
	// except /healthz and /readyz.
	Token string
	// Ready reports readiness for /readyz; nil means always ready.
	Ready  func() error
	Logger *slog.Logger
}

func (c *Config) validate() error {
	host, _, err := net.SplitHostPort(c.Addr)
	if err != nil {
		return fmt.Errorf("admin: address %q: %w", c.Addr, err)
	}
	if ip := net.ParseIP(host); (ip == nil || !ip.IsLoopback()) && host != "localhost" && c.Token == "" {
		return fmt.Errorf("admin: address %q is not loopback; set a token to expose the admin API", c.Addr)
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	return nil
}

// Server is a running admin server.
type Server struct {
	cfg  Config
	mux  *http.ServeMux
	lis  net.Listener
	http *http.Server
	done chan error
}

// New validates cfg and listens. Register handlers with Handle/HandleJSON, then call Serve.
func New(cfg Config) (*Server, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	lis, err := net.Listen("tcp", cfg.Addr)
	if err != nil {
		return nil, fmt.Errorf("admin: listen on %s: %w", cfg.Addr, err)
	}
	s := &Server{cfg: cfg, mux: http.NewServeMux(), lis: lis, done: make(chan error, 1)}
	s.mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	s.mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		if cfg.Ready != nil {
			if err := cfg.Ready(); err != nil {
				http.Error(w, "not ready: "+err.Error(), http.StatusServiceUnavailable)
				return
			}
		}
		fmt.Fprintln(w, "ready")
	})
	s.http = &http.Server{Handler: s.auth(s.mux), ReadHeaderTimeout: 5 * time.Second}
	return s, nil
}

// Addr returns the listen address.
func (s *Server) Addr() string { return s.lis.Addr().String() }

// HandleJSON serves the value returned by f as JSON on GET path.
func (s *Server) HandleJSON(path string, f func() any) {
	s.mux.HandleFunc("GET "+path, func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		if err := enc.Encode(f()); err != nil {
			s.cfg.Logger.Warn("admin: encode response", "path", path, "error", err)
		}
	})
}

// Handle registers a handler for a ServeMux pattern.
func (s *Server) Handle(pattern string, h http.Handler) { s.mux.Handle(pattern, h) }

// Serve starts serving in the background.
func (s *Server) Serve() {
	go func() { s.done <- s.http.Serve(s.lis) }()
}

func (s *Server) auth(next http.Handler) http.Handler {
	if s.cfg.Token == "" {
		return next
	}
	want := []byte("Bearer " + s.cfg.Token)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/healthz" || r.URL.Path == "/readyz" ||
			subtle.ConstantTimeCompare([]byte(r.Header.Get("Authorization")), want) == 1 {
			next.ServeHTTP(w, r)
			return
		}
		http.Error(w, "missing or wrong bearer token", http.StatusUnauthorized)
	})
}

// Close shuts the server down.
func (s *Server) Close() error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	err := s.http.Shutdown(ctx)
	select {
	case serr := <-s.done:
		if !errors.Is(serr, http.ErrServerClosed) {
			err = errors.Join(err, serr)
		}
	default:
		_ = s.lis.Close() // Serve was never called
	}
	if err != nil && !strings.Contains(err.Error(), "use of closed") {
		return fmt.Errorf("admin: close: %w", err)
	}
	return nil
}
