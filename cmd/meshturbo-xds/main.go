// Command meshturbo-xds runs the registry bridge and the xDS server that feeds istiod over
// MCP-over-xDS (list it in istiod's meshConfig.configSources as xds://<listen address>).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/meshturbo/meshturbo/internal/admin"
	"github.com/meshturbo/meshturbo/model"
	bridge "github.com/meshturbo/meshturbo/registry-bridge"
	"github.com/meshturbo/meshturbo/xds"
)

type args struct {
	set       map[string]bool // flags given on the command line; they override the file
	config    string
	listen    string
	adminAddr string
	tokenFile string
	consul    string
	zookeeper string
	eureka    string
	namespace string
	logLevel  string
	// fallbackBootstrap, when set, is meshturbo-xds's xDS address as the lazy-load fallback
	// Envoy reaches it: print that Envoy's bootstrap and exit.
	fallbackBootstrap string
}

func main() {
	var a args
	flag.StringVar(&a.config, "config", "", "config file (YAML); without it the flags below describe a single Consul source")
	flag.StringVar(&a.listen, "listen", "127.0.0.1:15050", "xDS (MCP) listen address istiod connects to")
	flag.StringVar(&a.adminAddr, "admin", "127.0.0.1:15051", "admin API address: loopback host:port or unix:///path; elsewhere it needs -admin-token-file")
	flag.StringVar(&a.tokenFile, "admin-token-file", "", "file with the admin API bearer token (overrides admin.tokenFile)")
	flag.StringVar(&a.consul, "consul", "", "Consul HTTP address to bridge, e.g. 127.0.0.1:8500")
	flag.StringVar(&a.zookeeper, "zookeeper", "", "ZooKeeper servers to bridge (Dubbo and Curator layouts), host:port[,host:port]")
	flag.StringVar(&a.eureka, "eureka", "", "Eureka base URL to bridge, e.g. http://127.0.0.1:8761/eureka")
	flag.StringVar(&a.namespace, "namespace", "meshturbo-system", "Istio namespace of the generated ServiceEntries")
	flag.StringVar(&a.logLevel, "log-level", "info", "debug, info, warn or error")
	flag.StringVar(&a.fallbackBootstrap, "fallback-bootstrap", "", "print the bootstrap of a lazy-load fallback Envoy run elsewhere, which reaches meshturbo-xds at this host:port, and exit (needs -config with lazyload)")
	flag.Parse()
	a.set = map[string]bool{}
	flag.Visit(func(f *flag.Flag) { a.set[f.Name] = true })

	var level slog.Level
	if err := level.UnmarshalText([]byte(a.logLevel)); err != nil {
		fmt.Fprintf(os.Stderr, "meshturbo-xds: -log-level %q: %v\n", a.logLevel, err)
		os.Exit(2)
	}
	if a.fallbackBootstrap != "" {
		if err := printFallbackBootstrap(a, os.Stdout); err != nil {
			fmt.Fprintln(os.Stderr, "meshturbo-xds:", err)
			os.Exit(1)
		}
		return
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, a, log); err != nil {
		log.Error("meshturbo-xds failed", "error", err)
		os.Exit(1)
	}
}

// config returns the configuration: the file when -config is given, else one built from flags.
func (a args) loadConfig() (*Config, error) {
	if a.config != "" {
		c, err := LoadConfig(a.config)
		if err != nil {
			return nil, err
		}
		if a.set["listen"] {
			c.Listen = a.listen
		}
		if a.set["admin"] {
			c.Admin.Listen = a.adminAddr
		}
		if a.set["admin-token-file"] {
			c.Admin.TokenFile = a.tokenFile
		}
		return c, nil
	}
	c := &Config{Listen: a.listen, Admin: AdminConfig{Listen: a.adminAddr, TokenFile: a.tokenFile}, Istio: IstioConfig{Namespace: a.namespace}}
	if a.consul != "" {
		c.Sources = append(c.Sources, SourceConfig{Consul: &ConsulConfig{Address: a.consul}})
	}
	if a.zookeeper != "" {
		c.Sources = append(c.Sources, SourceConfig{ZooKeeper: &ZooKeeperConfig{Servers: strings.Split(a.zookeeper, ",")}})
	}
	if a.eureka != "" {
		c.Sources = append(c.Sources, SourceConfig{Eureka: &EurekaConfig{URLs: []string{a.eureka}}})
	}
	if len(c.Sources) == 0 {
		return nil, errors.New("no registry configured: pass -config <file>, or -consul, -zookeeper and/or -eureka")
	}
	c.defaults()
	if err := c.validate(); err != nil {
		return nil, fmt.Errorf("flags: %w", err)
	}
	return c, nil
}

func run(ctx context.Context, a args, log *slog.Logger) (err error) {
	cfg, err := a.loadConfig()
	if err != nil {
		return err
	}
	watchers, err := cfg.watchers(log)
	if err != nil {
		return err
	}
	var vipRange netip.Prefix
	if cfg.Istio.VIPRange != "" {
		vipRange = netip.MustParsePrefix(cfg.Istio.VIPRange) // validated
	}
	merge, _ := cfg.merge() // validated
	topts := bridge.TranslateOptions{Namespace: cfg.Istio.Namespace, VIPRange: vipRange}

	store := xds.NewStore()
	var lazy *lazyLoad
	xcfg := xds.Config{Addr: cfg.Listen, Store: store, Logger: log.With("component", "xds")}
	if cfg.LazyLoad != nil {
		if lazy, err = newLazyLoad(cfg.LazyLoad, cfg.Istio.Namespace, store, log); err != nil {
			return err
		}
		defer func() { err = errors.Join(err, lazy.Close()) }()
		xcfg.Register = lazy.ctrl.RegisterALS
	}
	srv, err := xds.New(xcfg)
	if err != nil {
		return err
	}
	defer func() { err = errors.Join(err, srv.Close()) }()
	if lazy != nil {
		if err := lazy.startFallback(ctx, srv.Addr(), log); err != nil {
			return err
		}
	}

	br, err := bridge.New(bridge.Config{
		Watchers:  watchers,
		Retention: cfg.Retention.Duration,
		Merge:     merge,
		Debounce:  cfg.Debounce.Duration,
		Logger:    log.With("component", "bridge"),
		OnCatalog: func(cat *model.Catalog) {
			res, err := bridge.Translate(cat, topts)
			if err != nil {
				log.Error("catalog not served; the previous one stays in force", "error", err)
				return
			}
			if lazy != nil {
				res = append(res, lazy.ctrl.ServiceEntries(cat)...)
				defer lazy.ctrl.SetCatalog(cat) // after the ServiceEntries are served
			}
			changed, err := store.Set(xds.TypeServiceEntry, res)
			if err != nil {
				log.Error("catalog not served; the previous one stays in force", "error", err)
				return
			}
			if changed {
				log.Info("catalog updated", "services", len(cat.Services), "version", store.Version(xds.TypeServiceEntry))
			}
		},
	})
	if err != nil {
		return err
	}
	defer func() { err = errors.Join(err, br.Close()) }()

	regs, err := cfg.registrars(log)
	defer func() {
		for _, r := range regs {
			err = errors.Join(err, r.Close()) // deregister on shutdown
		}
	}()
	if err != nil {
		return err
	}

	adm, err := admin.New(admin.Config{
		Addr:      cfg.Admin.Listen,
		TokenFile: cfg.Admin.TokenFile,
		Name:      "meshturbo-xds",
		Logger:    log,
		Ready: func() error {
			for _, s := range br.Status() {
				if !s.Synced {
					return fmt.Errorf("registry %s not synced yet", s.Source)
				}
			}
			return nil
		},
	})
	if err != nil {
		return err
	}
	adm.HandleJSON("/v1/registries", func() any { return br.Status() })
	adm.HandleJSON("/v1/services", func() any {
		if c := br.Catalog(); c != nil {
			return c.Services
		}
		return []model.Service{}
	})
	adm.HandleJSON("/v1/xds/clients", func() any { return srv.Clients() })
	adm.HandleJSON("/v1/xds/serviceentries", func() any {
		return map[string]any{"version": store.Version(xds.TypeServiceEntry), "resources": store.ResourceVersions(xds.TypeServiceEntry)}
	})
	reg := prometheus.NewRegistry()
	reg.MustRegister(newCollector(br, srv), collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	if lazy != nil {
		lazy.handle(adm)
		reg.MustRegister(newLazyCollector(lazy.ctrl))
	}
	adm.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	adm.Serve()
	defer func() { err = errors.Join(err, adm.Close()) }()

	log.Info("meshturbo-xds running", "xds", srv.Addr(), "admin", adm.Addr())
	<-ctx.Done()
	log.Info("shutting down")
	shutdownStart := time.Now()
	defer func() { log.Info("stopped", "took", time.Since(shutdownStart).Round(time.Millisecond)) }()
	return nil
}
