package zookeeper

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"strings"
	"time"

	"github.com/go-zookeeper/zk"

	"github.com/meshturbo/meshturbo/registry-bridge/internal/keeper"
)

// ReverseParam marks provider URLs meshturbo registered; the watcher never imports them back.
const ReverseParam = "meshturbo-reverse"

// MeshService is a mesh service to publish as a Dubbo provider for non-mesh Dubbo consumers.
type MeshService struct {
	// Interface is the Dubbo interface, e.g. org.example.GreeterService.
	Interface string
	// Protocol is the provider URL scheme (dubbo, tri, rest, …).
	Protocol string
	Address  string
	Port     int
	// Params are extra URL parameters (group, version, application, …).
	Params map[string]string
}

// RegistrarConfig configures a Registrar.
type RegistrarConfig struct {
	Servers        []string
	SessionTimeout time.Duration
	DubboRoot      string // default "/dubbo"
	Services       []MeshService
	// Check is how often the registrar makes sure its nodes exist (default 2s).
	Check  time.Duration
	Logger *slog.Logger
}

// Registrar publishes mesh services as ephemeral Dubbo provider nodes. They vanish with the
// registrar's session — on Close, and also when it crashes — and are created again after a
// session expiry.
type Registrar struct {
	cfg  RegistrarConfig
	conn *zk.Conn
	loop *keeper.Loop // keeps the services registered; stopped by Close
}

// NewRegistrar validates cfg, connects and starts registering in the background.
func NewRegistrar(cfg RegistrarConfig) (*Registrar, error) {
	if len(cfg.Servers) == 0 {
		return nil, errors.New("zookeeper registrar: no servers")
	}
	var errs []error
	for i, s := range cfg.Services {
		if s.Interface == "" || net.ParseIP(s.Address) == nil || s.Port <= 0 || s.Port > 65535 {
			errs = append(errs, fmt.Errorf("zookeeper registrar: services[%d] (%q): interface, an IP address and a port 1-65535 are required", i, s.Interface))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	if cfg.DubboRoot == "" {
		cfg.DubboRoot = "/dubbo"
	}
	if cfg.SessionTimeout <= 0 {
		cfg.SessionTimeout = 15 * time.Second
	}
	if cfg.Check <= 0 {
		cfg.Check = 2 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	conn, _, err := zk.Connect(cfg.Servers, cfg.SessionTimeout, zk.WithLogInfo(false))
	if err != nil {
		return nil, fmt.Errorf("zookeeper registrar: connect %v: %w", cfg.Servers, err)
	}
	r := &Registrar{cfg: cfg, conn: conn}
	// Every Check: a session that expired took the ephemeral nodes with it.
	r.loop = keeper.Start(cfg.Check, func(context.Context) error { return r.ensure() }, func(err error) {
		r.cfg.Logger.Warn("zookeeper reverse registration failed; retrying", "servers", r.cfg.Servers, "error", err, "retry_in", r.cfg.Check)
	})
	return r, nil
}

// providerPath is the znode of s: <root>/<iface>/providers/<url-encoded provider URL>.
func (r *Registrar) providerPath(s MeshService) string {
	proto := s.Protocol
	if proto == "" {
		proto = "dubbo"
	}
	q := url.Values{}
	for k, v := range s.Params {
		q.Set(k, v)
	}
	q.Set("interface", s.Interface)
	q.Set("side", "provider")
	q.Set(ReverseParam, "true")
	u := fmt.Sprintf("%s://%s/%s?%s", proto, net.JoinHostPort(s.Address, fmt.Sprint(s.Port)), s.Interface, q.Encode())
	return r.providersDir(s) + "/" + url.QueryEscape(u)
}

func (r *Registrar) providersDir(s MeshService) string {
	return strings.TrimSuffix(r.cfg.DubboRoot, "/") + "/" + s.Interface + "/providers"
}

func (r *Registrar) ensure() error {
	if r.conn.State() != zk.StateHasSession {
		return fmt.Errorf("no session (state %s)", r.conn.State())
	}
	for _, s := range r.cfg.Services {
		node := r.providerPath(s)
		if ok, _, err := r.conn.Exists(node); err != nil {
			return err
		} else if ok {
			continue
		}
		path := ""
		for _, p := range strings.Split(strings.TrimPrefix(r.providersDir(s), "/"), "/") {
			path += "/" + p
			if _, err := r.conn.Create(path, nil, 0, zk.WorldACL(zk.PermAll)); err != nil && !errors.Is(err, zk.ErrNodeExists) {
				return fmt.Errorf("create %s: %w", path, err)
			}
		}
		if _, err := r.conn.Create(node, nil, zk.FlagEphemeral, zk.WorldACL(zk.PermAll)); err != nil && !errors.Is(err, zk.ErrNodeExists) {
			return fmt.Errorf("register %s: %w", s.Interface, err)
		}
		r.cfg.Logger.Info("registered mesh service in zookeeper", "interface", s.Interface)
	}
	return nil
}

// Registered reports whether every service has been registered at least once.
func (r *Registrar) Registered() bool { return r.loop.Registered() }

// Close deletes the provider nodes and ends the session (which would remove them anyway).
func (r *Registrar) Close() error {
	r.loop.Stop()
	var errs []error
	for _, s := range r.cfg.Services {
		if err := r.conn.Delete(r.providerPath(s), -1); err != nil && !errors.Is(err, zk.ErrNoNode) {
			errs = append(errs, fmt.Errorf("deregister %s from zookeeper: %w", s.Interface, err))
		}
	}
	r.conn.Close()
	return errors.Join(errs...)
}
