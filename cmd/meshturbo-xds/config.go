package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"net/url"
	"os"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/meshturbo/meshturbo/model"
	bridge "github.com/meshturbo/meshturbo/registry-bridge"
	"github.com/meshturbo/meshturbo/registry-bridge/consul"
	"github.com/meshturbo/meshturbo/registry-bridge/eureka"
	"github.com/meshturbo/meshturbo/registry-bridge/zookeeper"
)

// Config is meshturbo-xds's configuration file. Example:
//
//	listen: 127.0.0.1:15050          # MCP-over-xDS for istiod
//	admin: {listen: 127.0.0.1:15051, tokenFile: ""}
//	istio: {namespace: meshturbo-system, vipRange: 240.250.0.0/16}
//	retention: 10m                    # how long a vanished service is kept with no endpoints
//	sources:                          # in priority order: the first wins a host name conflict
//	- consul:
//	    address: 127.0.0.1:8500
//	    tokenFile: /etc/meshturbo/consul-token
//	  include: ["*.service.consul"]
//	  istioNamespace: legacy
//	  registerMeshServices: true      # register meshServices here for non-mesh callers
//	meshServices:
//	- {name: greeter, address: 10.0.0.5, port: 8080, protocol: http}
type Config struct {
	Listen    string      `yaml:"listen"`
	Admin     AdminConfig `yaml:"admin"`
	Istio     IstioConfig `yaml:"istio"`
	Retention Duration    `yaml:"retention"`
	// Merge is "priority" (default: the first source wins a host name) or "union".
	Merge    string         `yaml:"merge"`
	Debounce Duration       `yaml:"debounce"`
	Sources  []SourceConfig `yaml:"sources"`
	// MeshServices are registered into every source with registerMeshServices: true, so
	// non-mesh callers that only read that registry find them.
	MeshServices []MeshServiceConfig `yaml:"meshServices"`
	// LazyLoad narrows chosen workloads' sidecars to the services they call.
	LazyLoad *LazyLoadConfig `yaml:"lazyload"`
}

// LazyLoadConfig configures lazy loading (package xds/lazyload). Example:
//
//	lazyload:
//	  caDir: /etc/meshturbo/ca             # mesh CA: the fallback's certificate comes from it
//	  stateFile: /var/lib/meshturbo/lazyload.json
//	  edgeTTL: 24h
//	  alwaysInclude: ["istio-system/*"]
//	  fallback: {address: 10.0.0.9, httpPort: 15081, envoy: /usr/local/bin/envoy, admin: 127.0.0.1:15082}
//	  workloads:
//	  - {namespace: shop, name: frontend, selector: {app: frontend}, dependencies: [cart.service.consul]}
type LazyLoadConfig struct {
	CADir       string `yaml:"caDir"`
	TrustDomain string `yaml:"trustDomain"`
	StateFile   string `yaml:"stateFile"`
	// Peers are the xDS addresses of the other meshturbo-xds replicas: learned edges are
	// shared so every replica serves istiod the same Sidecars.
	Peers         []string                 `yaml:"peers"`
	EdgeTTL       Duration                 `yaml:"edgeTTL"`
	AlwaysInclude []string                 `yaml:"alwaysInclude"`
	Fallback      FallbackConfig           `yaml:"fallback"`
	Workloads     []LazyLoadWorkloadConfig `yaml:"workloads"`
}

// FallbackConfig is the lazy-load fallback proxy.
type FallbackConfig struct {
	Host           string `yaml:"host"`
	Address        string `yaml:"address"`
	HTTPPort       uint32 `yaml:"httpPort"`
	ServiceAccount string `yaml:"serviceAccount"`
	// Envoy, when set, is the Envoy binary meshturbo-xds runs as the fallback; otherwise an
	// Envoy started elsewhere with the bootstrap from `meshturbo-xds -fallback-bootstrap`.
	Envoy string `yaml:"envoy"`
	// Admin is the fallback Envoy's admin address (default 127.0.0.1:15082).
	Admin string `yaml:"admin"`
}

// LazyLoadWorkloadConfig is one narrowed workload.
type LazyLoadWorkloadConfig struct {
	Namespace      string            `yaml:"namespace"`
	Name           string            `yaml:"name"`
	Selector       map[string]string `yaml:"selector"`
	ServiceAccount string            `yaml:"serviceAccount"`
	Dependencies   []string          `yaml:"dependencies"`
}

// MeshServiceConfig is a mesh service to register into registries (reverse registration).
type MeshServiceConfig struct {
	Name       string            `yaml:"name"`
	Address    string            `yaml:"address"`
	Port       int               `yaml:"port"`
	Protocol   string            `yaml:"protocol"`
	HealthHTTP string            `yaml:"healthHTTP"`
	Meta       map[string]string `yaml:"meta"`
	// DubboInterface names the service in ZooKeeper's Dubbo layout (default: name).
	DubboInterface string `yaml:"dubboInterface"`
}

// dubboProtocol is the Dubbo URL scheme for a mesh service's protocol.
func dubboProtocol(p string) string {
	switch strings.ToLower(p) {
	case "http", "http2":
		return "rest"
	case "grpc":
		return "tri"
	default:
		return "dubbo"
	}
}

// AdminConfig configures the admin API.
type AdminConfig struct {
	Listen    string `yaml:"listen"`
	TokenFile string `yaml:"tokenFile"`
}

// IstioConfig shapes the generated Istio resources.
type IstioConfig struct {
	Namespace string `yaml:"namespace"`
	VIPRange  string `yaml:"vipRange"`
}

// SourceConfig is one registry. Exactly one registry block is set.
type SourceConfig struct {
	Consul         *ConsulConfig    `yaml:"consul"`
	ZooKeeper      *ZooKeeperConfig `yaml:"zookeeper"`
	Eureka         *EurekaConfig    `yaml:"eureka"`
	Include        []string         `yaml:"include"`
	Exclude        []string         `yaml:"exclude"`
	IstioNamespace string           `yaml:"istioNamespace"`
	// RegisterMeshServices registers the top-level meshServices into this registry.
	RegisterMeshServices bool `yaml:"registerMeshServices"`
}

// ConsulConfig is a Consul source.
type ConsulConfig struct {
	Address       string     `yaml:"address"`
	Datacenter    string     `yaml:"datacenter"`
	Namespace     string     `yaml:"namespace"`
	Partition     string     `yaml:"partition"`
	TokenFile     string     `yaml:"tokenFile"`
	Domain        string     `yaml:"domain"`
	MeshedMetaKey string     `yaml:"meshedMetaKey"`
	TLS           *TLSConfig `yaml:"tls"`
}

// ZooKeeperConfig is a ZooKeeper source (Dubbo and Curator layouts).
type ZooKeeperConfig struct {
	Servers        []string          `yaml:"servers"`
	SessionTimeout Duration          `yaml:"sessionTimeout"`
	DubboRoot      string            `yaml:"dubboRoot"`
	DubboDomain    string            `yaml:"dubboDomain"`
	DisableDubbo   bool              `yaml:"disableDubbo"`
	CuratorRoot    string            `yaml:"curatorRoot"`
	CuratorDomain  string            `yaml:"curatorDomain"`
	DisableCurator bool              `yaml:"disableCurator"`
	Protocols      map[string]string `yaml:"protocols"` // Dubbo URL protocol → http, grpc, tcp, …
	MeshedKey      string            `yaml:"meshedKey"`
	Resync         Duration          `yaml:"resync"`
}

// EurekaConfig is a Eureka source.
type EurekaConfig struct {
	// URLs are Eureka base URLs, e.g. http://eureka:8761/eureka; tried in turn.
	URLs          []string `yaml:"urls"`
	Domain        string   `yaml:"domain"`
	MeshedMetaKey string   `yaml:"meshedMetaKey"`
	PollInterval  Duration `yaml:"pollInterval"`
	// RequestTimeout bounds one fetch, the answer read included (default 10s).
	RequestTimeout Duration `yaml:"requestTimeout"`
	// MaxResponseBytes bounds one answer (default 256 MiB: GET /apps for 100,000 instances is
	// about 75 MB).
	MaxResponseBytes int64 `yaml:"maxResponseBytes"`
}

// TLSConfig is client TLS to a registry.
type TLSConfig struct {
	CAFile             string `yaml:"caFile"`
	CertFile           string `yaml:"certFile"`
	KeyFile            string `yaml:"keyFile"`
	ServerName         string `yaml:"serverName"`
	InsecureSkipVerify bool   `yaml:"insecureSkipVerify"`
}

// Duration reads "10m", "250ms" and the like.
type Duration struct{ time.Duration }

// UnmarshalYAML parses a Go duration string.
func (d *Duration) UnmarshalYAML(n *yaml.Node) error {
	v, err := time.ParseDuration(n.Value)
	if err != nil {
		return fmt.Errorf("line %d: %q is not a duration like 10m or 250ms", n.Line, n.Value)
	}
	d.Duration = v
	return nil
}

// LoadConfig reads and validates a config file. Unknown fields are errors, so a typo never
// silently falls back to a default.
func LoadConfig(path string) (*Config, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	return ParseConfig(raw, path)
}

// ParseConfig decodes and validates config bytes; name is used in error messages.
func ParseConfig(raw []byte, name string) (*Config, error) {
	var c Config
	dec := yaml.NewDecoder(bytes.NewReader(raw))
	dec.KnownFields(true)
	if err := dec.Decode(&c); err != nil {
		return nil, fmt.Errorf("config %s: %w", name, err)
	}
	c.defaults()
	if err := c.validate(); err != nil {
		return nil, fmt.Errorf("config %s: %w", name, err)
	}
	return &c, nil
}

func (c *Config) defaults() {
	if c.Listen == "" {
		c.Listen = "127.0.0.1:15050"
	}
	if c.Admin.Listen == "" {
		c.Admin.Listen = "127.0.0.1:15051"
	}
	if c.Istio.Namespace == "" {
		c.Istio.Namespace = "meshturbo-system"
	}
	if l := c.LazyLoad; l != nil && l.Fallback.Admin == "" {
		l.Fallback.Admin = "127.0.0.1:15082"
	}
}

func (c *Config) validate() error {
	var errs []error
	field := func(name string, err error) {
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", name, err))
		}
	}
	field("listen", checkHostPort(c.Listen))
	field("admin.listen", checkHostPort(c.Admin.Listen))
	if c.Admin.TokenFile != "" {
		_, err := os.Stat(c.Admin.TokenFile)
		field("admin.tokenFile", err)
	}
	if c.Istio.VIPRange != "" {
		if _, err := netip.ParsePrefix(c.Istio.VIPRange); err != nil {
			field("istio.vipRange", err)
		}
	}
	if _, err := c.merge(); err != nil {
		field("merge", err)
	}
	for i, m := range c.MeshServices {
		if m.Name == "" || net.ParseIP(m.Address) == nil || m.Port <= 0 || m.Port > 65535 {
			errs = append(errs, fmt.Errorf("meshServices[%d] (%q): name, an IP address and a port 1-65535 are required", i, m.Name))
		}
	}
	if len(c.Sources) == 0 {
		errs = append(errs, errors.New("sources: at least one registry is required"))
	}
	if l := c.LazyLoad; l != nil {
		if l.CADir == "" {
			errs = append(errs, errors.New("lazyload.caDir: required; the fallback needs a certificate from the mesh CA (ca-cert.pem, ca-key.pem)"))
		}
		if net.ParseIP(l.Fallback.Address) == nil {
			errs = append(errs, fmt.Errorf("lazyload.fallback.address: %q is not an IP address; set the IP the fallback Envoy listens on", l.Fallback.Address))
		}
		field("lazyload.fallback.admin", checkHostPort(l.Fallback.Admin))
		if l.Fallback.Envoy != "" {
			_, err := os.Stat(l.Fallback.Envoy)
			field("lazyload.fallback.envoy", err)
		}
		if len(l.Workloads) == 0 {
			errs = append(errs, errors.New("lazyload.workloads: at least one workload is required"))
		}
		for i, p := range l.Peers {
			field(fmt.Sprintf("lazyload.peers[%d]", i), checkHostPort(p))
		}
	}
	for i, s := range c.Sources {
		at := fmt.Sprintf("sources[%d]", i)
		blocks := 0
		for _, set := range []bool{s.Consul != nil, s.ZooKeeper != nil, s.Eureka != nil} {
			if set {
				blocks++
			}
		}
		if blocks != 1 {
			errs = append(errs, fmt.Errorf("%s: needs exactly one registry block (consul, zookeeper or eureka)", at))
			continue
		}
		switch {
		case s.Consul != nil:
			field(at+".consul.address", checkHostPort(s.Consul.Address))
			if s.Consul.TokenFile != "" {
				_, err := os.Stat(s.Consul.TokenFile)
				field(at+".consul.tokenFile", err)
			}
		case s.ZooKeeper != nil:
			if len(s.ZooKeeper.Servers) == 0 {
				errs = append(errs, fmt.Errorf("%s.zookeeper.servers: at least one host:port is required", at))
			}
		case s.Eureka != nil:
			if len(s.Eureka.URLs) == 0 {
				errs = append(errs, fmt.Errorf("%s.eureka.urls: at least one URL is required", at))
			}
			for j, u := range s.Eureka.URLs {
				if pu, err := url.Parse(u); err != nil || (pu.Scheme != "http" && pu.Scheme != "https") || pu.Host == "" {
					errs = append(errs, fmt.Errorf("%s.eureka.urls[%d]: %q is not an http(s) URL", at, j, u))
				}
			}
			if s.Eureka.MaxResponseBytes < 0 {
				errs = append(errs, fmt.Errorf("%s.eureka.maxResponseBytes: %d is negative; leave it out for the default (256 MiB)", at, s.Eureka.MaxResponseBytes))
			}
		}
	}
	return errors.Join(errs...)
}

func (c *Config) merge() (model.Merge, error) {
	switch c.Merge {
	case "", "priority":
		return model.MergePriority, nil
	case "union":
		return model.MergeUnion, nil
	}
	return 0, fmt.Errorf("%q is not priority or union", c.Merge)
}

func checkHostPort(s string) error {
	if s == "" {
		return errors.New("required (host:port)")
	}
	if _, _, err := net.SplitHostPort(s); err != nil {
		return err
	}
	return nil
}

func readSecret(path string) (string, error) {
	if path == "" {
		return "", nil
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	return strings.TrimSpace(string(b)), nil
}

// watchers builds the configured watchers, in priority order.
func (c *Config) watchers(log *slog.Logger) ([]bridge.Watcher, error) {
	var out []bridge.Watcher
	for i, s := range c.Sources {
		at := fmt.Sprintf("sources[%d]", i)
		var w bridge.Watcher
		var err error
		switch {
		case s.Consul != nil:
			w, err = s.Consul.watcher(log)
		case s.ZooKeeper != nil:
			w, err = s.ZooKeeper.watcher(log)
		case s.Eureka != nil:
			w, err = eureka.New(eureka.Config{URLs: s.Eureka.URLs, Domain: s.Eureka.Domain,
				MeshedMetaKey: s.Eureka.MeshedMetaKey, PollInterval: s.Eureka.PollInterval.Duration,
				RequestTimeout: s.Eureka.RequestTimeout.Duration, MaxResponseBytes: s.Eureka.MaxResponseBytes,
				Logger: log.With("source", "eureka")})
		}
		if err != nil {
			return nil, fmt.Errorf("%s: %w", at, err)
		}
		shaped, err := bridge.WithOptions(w, bridge.SourceOptions{Include: s.Include, Exclude: s.Exclude, IstioNamespace: s.IstioNamespace})
		if err != nil {
			return nil, fmt.Errorf("%s: %w", at, err)
		}
		out = append(out, shaped)
	}
	return out, nil
}

func (c *ConsulConfig) watcher(log *slog.Logger) (bridge.Watcher, error) {
	token, err := readSecret(c.TokenFile)
	if err != nil {
		return nil, fmt.Errorf("consul.tokenFile: %w", err)
	}
	cc := consul.Config{
		Address: c.Address, Datacenter: c.Datacenter, Namespace: c.Namespace,
		Partition: c.Partition, Token: token, Domain: c.Domain,
		MeshedMetaKey: c.MeshedMetaKey, Logger: log.With("source", "consul"),
	}
	if t := c.TLS; t != nil {
		cc.TLS = &consul.TLS{CAFile: t.CAFile, CertFile: t.CertFile, KeyFile: t.KeyFile,
			ServerName: t.ServerName, InsecureSkipVerify: t.InsecureSkipVerify}
	}
	return consul.New(cc)
}

func (c *ZooKeeperConfig) watcher(log *slog.Logger) (bridge.Watcher, error) {
	protos := map[string]model.Protocol{}
	for k, v := range c.Protocols {
		protos[k] = model.ParseProtocol(v)
	}
	return zookeeper.New(zookeeper.Config{
		Servers: c.Servers, SessionTimeout: c.SessionTimeout.Duration,
		DubboRoot: c.DubboRoot, DubboDomain: c.DubboDomain, DisableDubbo: c.DisableDubbo,
		CuratorRoot: c.CuratorRoot, CuratorDomain: c.CuratorDomain, DisableCurator: c.DisableCurator,
		Protocols: protos, MeshedKey: c.MeshedKey, Resync: c.Resync.Duration,
		Logger: log.With("source", "zookeeper"),
	})
}

// registrars builds the reverse registrations of mesh services into the sources that ask for them.
func (c *Config) registrars(log *slog.Logger) ([]io.Closer, error) {
	var out []io.Closer
	for i, s := range c.Sources {
		if !s.RegisterMeshServices || len(c.MeshServices) == 0 {
			continue
		}
		var r io.Closer
		var err error
		switch {
		case s.Consul != nil:
			var token string
			if token, err = readSecret(s.Consul.TokenFile); err != nil {
				return out, fmt.Errorf("sources[%d].consul.tokenFile: %w", i, err)
			}
			var svcs []consul.MeshService
			for _, m := range c.MeshServices {
				svcs = append(svcs, consul.MeshService{Name: m.Name, Address: m.Address, Port: m.Port,
					Protocol: m.Protocol, HealthHTTP: m.HealthHTTP, Meta: m.Meta})
			}
			r, err = consul.NewRegistrar(consul.RegistrarConfig{Address: s.Consul.Address, Datacenter: s.Consul.Datacenter,
				Token: token, Services: svcs, Logger: log.With("source", "consul", "component", "reverse")})
		case s.ZooKeeper != nil:
			var svcs []zookeeper.MeshService
			for _, m := range c.MeshServices {
				iface := m.DubboInterface
				if iface == "" {
					iface = m.Name
				}
				svcs = append(svcs, zookeeper.MeshService{Interface: iface, Protocol: dubboProtocol(m.Protocol), Address: m.Address,
					Port: m.Port, Params: m.Meta})
			}
			r, err = zookeeper.NewRegistrar(zookeeper.RegistrarConfig{Servers: s.ZooKeeper.Servers, DubboRoot: s.ZooKeeper.DubboRoot,
				Services: svcs, Logger: log.With("source", "zookeeper", "component", "reverse")})
		case s.Eureka != nil:
			var svcs []eureka.MeshService
			for _, m := range c.MeshServices {
				svcs = append(svcs, eureka.MeshService{App: m.Name, Address: m.Address, Port: m.Port, Protocol: m.Protocol, Meta: m.Meta})
			}
			r, err = eureka.NewRegistrar(eureka.RegistrarConfig{URL: s.Eureka.URLs[0], Services: svcs,
				Logger: log.With("source", "eureka", "component", "reverse")})
		}
		if err != nil {
			return out, fmt.Errorf("sources[%d]: %w", i, err)
		}
		out = append(out, r)
	}
	return out, nil
}
