package eureka

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/meshturbo/meshturbo/registry-bridge/internal/keeper"
)

// ReverseMetaKey marks instances meshturbo registered into Eureka; the watcher never imports
// them back.
const ReverseMetaKey = "meshturbo-reverse"

// MeshService is a mesh service to make findable by non-mesh Eureka clients.
type MeshService struct {
	// App is the Eureka application name (upper-cased, as Eureka does).
	App      string
	Address  string
	Port     int
	Protocol string
	Meta     map[string]string
}

// RegistrarConfig configures a Registrar.
type RegistrarConfig struct {
	// URL is a Eureka base URL, e.g. http://eureka:8761/eureka.
	URL      string
	Services []MeshService
	// Heartbeat is the lease renewal period (default 30s, Eureka's); the lease lasts three.
	Heartbeat time.Duration
	Client    *http.Client
	Logger    *slog.Logger
}

// Registrar registers mesh services into Eureka as UP instances, renews their leases
// (registering again when Eureka forgot them, e.g. after a restart) and cancels them on Close.
type Registrar struct {
	cfg  RegistrarConfig
	base *url.URL
	loop *keeper.Loop // keeps the services registered; stopped by Close
}

// NewRegistrar validates cfg and starts registering in the background.
func NewRegistrar(cfg RegistrarConfig) (*Registrar, error) {
	base, err := url.Parse(strings.TrimSuffix(cfg.URL, "/"))
	if err != nil || (base.Scheme != "http" && base.Scheme != "https") || base.Host == "" {
		return nil, fmt.Errorf("eureka registrar: URL %q is not an http(s) URL", cfg.URL)
	}
	var errs []error
	for i, s := range cfg.Services {
		if s.App == "" || net.ParseIP(s.Address) == nil || s.Port <= 0 || s.Port > 65535 {
			errs = append(errs, fmt.Errorf("eureka registrar: services[%d] (%q): app, an IP address and a port 1-65535 are required", i, s.App))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	if cfg.Heartbeat <= 0 {
		cfg.Heartbeat = 30 * time.Second
	}
	if cfg.Client == nil {
		cfg.Client = &http.Client{Timeout: 10 * time.Second}
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	r := &Registrar{cfg: cfg, base: base}
	r.loop = keeper.Start(cfg.Heartbeat, r.renewAll, func(err error) {
		r.cfg.Logger.Warn("eureka reverse registration failed; retrying", "url", r.base.Redacted(), "error", err)
	})
	return r, nil
}

func instanceID(s MeshService) string {
	return "meshturbo-" + strings.ToLower(s.App) + "-" + s.Address + "-" + strconv.Itoa(s.Port)
}

// renewAll renews every service's lease (registering those Eureka does not know); the
// error names each service that failed.
func (r *Registrar) renewAll(ctx context.Context) error {
	var errs []error
	for _, s := range r.cfg.Services {
		if err := r.renew(ctx, s); err != nil {
			errs = append(errs, fmt.Errorf("app %s: %w", s.App, err))
		}
	}
	return errors.Join(errs...)
}

// renew sends a heartbeat, and registers when Eureka does not know the instance (404).
func (r *Registrar) renew(ctx context.Context, s MeshService) error {
	app := strings.ToUpper(s.App)
	code, err := r.do(ctx, http.MethodPut, "/apps/"+app+"/"+instanceID(s), nil)
	if err != nil {
		return err
	}
	if code == http.StatusOK {
		return nil
	}
	body, err := json.Marshal(r.instance(s))
	if err != nil {
		return err
	}
	code, err = r.do(ctx, http.MethodPost, "/apps/"+app, body)
	if err != nil {
		return err
	}
	if code != http.StatusNoContent && code != http.StatusOK {
		return fmt.Errorf("register %s: HTTP %d", app, code)
	}
	r.cfg.Logger.Info("registered mesh service in eureka", "app", app, "id", instanceID(s))
	return nil
}

func (r *Registrar) instance(s MeshService) map[string]any {
	meta := map[string]string{ReverseMetaKey: "true"}
	for k, v := range s.Meta {
		meta[k] = v
	}
	if s.Protocol != "" {
		meta["protocol"] = s.Protocol
	}
	return map[string]any{"instance": map[string]any{
		"instanceId":                    instanceID(s),
		"hostName":                      s.Address,
		"app":                           strings.ToUpper(s.App),
		"ipAddr":                        s.Address,
		"status":                        "UP",
		"vipAddress":                    strings.ToLower(s.App),
		"port":                          map[string]any{"$": s.Port, "@enabled": "true"},
		"securePort":                    map[string]any{"$": 443, "@enabled": "false"},
		"dataCenterInfo":                map[string]any{"@class": "com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo", "name": "MyOwn"},
		"leaseInfo":                     map[string]any{"renewalIntervalInSecs": int(r.cfg.Heartbeat.Seconds()), "durationInSecs": 3 * int(r.cfg.Heartbeat.Seconds())},
		"metadata":                      meta,
		"healthCheckUrl":                fmt.Sprintf("http://%s/", net.JoinHostPort(s.Address, strconv.Itoa(s.Port))),
		"homePageUrl":                   fmt.Sprintf("http://%s/", net.JoinHostPort(s.Address, strconv.Itoa(s.Port))),
		"statusPageUrl":                 fmt.Sprintf("http://%s/", net.JoinHostPort(s.Address, strconv.Itoa(s.Port))),
		"isCoordinatingDiscoveryServer": "false",
	}}
}

func (r *Registrar) do(ctx context.Context, method, path string, body []byte) (int, error) {
	req, err := http.NewRequestWithContext(ctx, method, r.base.String()+path, bytes.NewReader(body))
	if err != nil {
		return 0, err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "application/json")
	resp, err := r.cfg.Client.Do(req)
	if err != nil {
		return 0, err
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<20))
	resp.Body.Close()
	return resp.StatusCode, nil
}

// Registered reports whether every service has been registered at least once.
func (r *Registrar) Registered() bool { return r.loop.Registered() }

// Close stops renewing and cancels every registration.
func (r *Registrar) Close() error {
	r.loop.Stop()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var errs []error
	for _, s := range r.cfg.Services {
		code, err := r.do(ctx, http.MethodDelete, "/apps/"+strings.ToUpper(s.App)+"/"+instanceID(s), nil)
		if err != nil || (code != http.StatusOK && code != http.StatusNotFound) {
			errs = append(errs, fmt.Errorf("deregister %s from eureka: HTTP %d %v", s.App, code, err))
		}
	}
	return errors.Join(errs...)
}
