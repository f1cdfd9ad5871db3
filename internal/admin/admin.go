// Package admin is the admin HTTP server every meshturbo daemon runs: /healthz, /readyz,
// /v1/version and JSON status under /v1/. It listens on loopback or a unix socket by default;
// bound anywhere else it requires a bearer token and refuses to start without one.
package admin

import (
	"context"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// UnixPrefix starts an Addr that names a unix socket: "unix:///run/meshturbo/xds.sock".
const UnixPrefix = "unix://"

// Config configures a Server.
type Config struct {
	// Addr is host:port or unix:///path/to/socket. A TCP host must be a loopback address
	// unless a token is set; a unix socket is protected by its file mode (0660) instead.
	Addr string
	// Token, when set, is required as "Authorization: Bearer <token>" on every request
	// except /healthz and /readyz.
	Token string
	// TokenFile names a file holding the token (surrounding white space is ignored). It is
	// read once by New; set Token or TokenFile, not both.
	TokenFile string
	// Name is the daemon's name, served on /v1/version; default: the executable's base name.
	Name string
	// Ready reports readiness for /readyz; nil means always ready.
	Ready  func() error
	Logger *slog.Logger
}

// IsUnix reports whether addr names a unix socket, and its path.
func IsUnix(addr string) (path string, ok bool) {
	return strings.CutPrefix(addr, UnixPrefix)
}

func (c *Config) validate() error {
	if c.Token != "" && c.TokenFile != "" {
		return errors.New("admin: set a token or a token file, not both")
	}
	if c.TokenFile != "" {
		b, err := os.ReadFile(c.TokenFile)
		if err != nil {
			return fmt.Errorf("admin: token file: %w", err)
		}
		if c.Token = strings.TrimSpace(string(b)); c.Token == "" {
			return fmt.Errorf("admin: token file %s is empty; write a random token into it (e.g. openssl rand -hex 32)", c.TokenFile)
		}
	}
	if path, ok := IsUnix(c.Addr); ok {
		if path == "" {
			return fmt.Errorf("admin: address %q names no socket path; use unix:///path/to/admin.sock", c.Addr)
		}
	} else {
		host, _, err := net.SplitHostPort(c.Addr)
		if err != nil {
			return fmt.Errorf("admin: address %q: %w (want host:port or unix:///path)", c.Addr, err)
		}
		if ip := net.ParseIP(host); (ip == nil || !ip.IsLoopback()) && host != "localhost" && c.Token == "" {
			return fmt.Errorf("admin: address %q is not loopback; set a token to expose the admin API "+
				"(a token file: admin.tokenFile in the config or -admin-token-file), "+
				"or listen on 127.0.0.1:<port> or unix:///path", c.Addr)
		}
	}
	if c.Name == "" {
		c.Name = filepath.Base(os.Args[0])
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
	lis, err := listen(cfg.Addr)
	if err != nil {
		return nil, err
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
	info := BuildInfo(cfg.Name)
	s.HandleJSON("/v1/version", func() any { return info })
	s.http = &http.Server{Handler: s.auth(s.mux), ReadHeaderTimeout: 5 * time.Second}
	return s, nil
}

func listen(addr string) (net.Listener, error) {
	path, ok := IsUnix(addr)
	if !ok {
		lis, err := net.Listen("tcp", addr)
		if err != nil {
			return nil, fmt.Errorf("admin: listen on %s: %w", addr, err)
		}
		return lis, nil
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("admin: socket directory: %w", err)
	}
	if err := removeStaleSocket(path); err != nil {
		return nil, err
	}
	lis, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("admin: listen on %s: %w", addr, err)
	}
	// The socket's mode is its access control: owner and group only.
	if err := os.Chmod(path, 0o660); err != nil {
		lis.Close()
		return nil, fmt.Errorf("admin: socket mode: %w", err)
	}
	return lis, nil
}

// removeStaleSocket removes a socket file left by a daemon that died without closing it. A
// socket someone still answers on, or a file that is not a socket, is left alone.
func removeStaleSocket(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("admin: socket %s: %w", path, err)
	}
	if fi.Mode()&fs.ModeSocket == 0 {
		return fmt.Errorf("admin: %s exists and is not a socket; remove it or choose another path", path)
	}
	c, err := net.DialTimeout("unix", path, time.Second)
	if err == nil {
		c.Close()
		return fmt.Errorf("admin: %s is in use by another process; stop it or choose another path", path)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		return fmt.Errorf("admin: socket %s: %w", path, err)
	}
	if err := os.Remove(path); err != nil {
		return fmt.Errorf("admin: remove stale socket: %w", err)
	}
	return nil
}

// Addr returns the listen address: host:port, or unix:///path for a unix socket.
func (s *Server) Addr() string {
	if a, ok := s.lis.Addr().(*net.UnixAddr); ok {
		return UnixPrefix + a.Name
	}
	return s.lis.Addr().String()
}

// HandleJSON serves the value returned by f as JSON on GET path.
func (s *Server) HandleJSON(path string, f func() any) {
	s.mux.HandleFunc("GET "+path, func(w http.ResponseWriter, _ *http.Request) {
		if err := WriteJSON(w, http.StatusOK, f()); err != nil {
			s.cfg.Logger.Warn("admin: encode response", "path", path, "error", err)
		}
	})
}

// WriteJSON answers with status code and v as indented JSON, as every admin API does.
func WriteJSON(w http.ResponseWriter, code int, v any) error {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
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

// Close shuts the server down (a unix socket file is removed).
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
