// Command meshturbo-xds runs the registry bridge and the xDS server that feeds istiod over
// MCP-over-xDS (list it in istiod's meshConfig.configSources as xds://<listen address>).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/meshturbo/meshturbo/internal/admin"
	"github.com/meshturbo/meshturbo/model"
	bridge "github.com/meshturbo/meshturbo/registry-bridge"
	"github.com/meshturbo/meshturbo/registry-bridge/consul"
	"github.com/meshturbo/meshturbo/xds"
)

type args struct {
	listen    string
	adminAddr string
	consul    string
	namespace string
	logLevel  string
}

func main() {
	var a args
	flag.StringVar(&a.listen, "listen", "127.0.0.1:15050", "xDS (MCP) listen address istiod connects to")
	flag.StringVar(&a.adminAddr, "admin", "127.0.0.1:15051", "admin API address (loopback)")
	flag.StringVar(&a.consul, "consul", "", "Consul HTTP address to bridge, e.g. 127.0.0.1:8500")
	flag.StringVar(&a.namespace, "namespace", "meshturbo-system", "Istio namespace of the generated ServiceEntries")
	flag.StringVar(&a.logLevel, "log-level", "info", "debug, info, warn or error")
	flag.Parse()

	var level slog.Level
	if err := level.UnmarshalText([]byte(a.logLevel)); err != nil {
		fmt.Fprintf(os.Stderr, "meshturbo-xds: -log-level %q: %v\n", a.logLevel, err)
		os.Exit(2)
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, a, log); err != nil {
		log.Error("meshturbo-xds failed", "error", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, a args, log *slog.Logger) (err error) {
	var watchers []bridge.Watcher
	if a.consul != "" {
		w, err := consul.New(consul.Config{Address: a.consul, Logger: log.With("source", "consul")})
		if err != nil {
			return err
		}
		watchers = append(watchers, w)
	}
	if len(watchers) == 0 {
		return errors.New("no registry configured: pass -consul <host:port>")
	}

	store := xds.NewStore()
	srv, err := xds.New(xds.Config{Addr: a.listen, Store: store, Logger: log.With("component", "xds")})
	if err != nil {
		return err
	}
	defer func() { err = errors.Join(err, srv.Close()) }()

	br, err := bridge.New(bridge.Config{
		Watchers: watchers,
		Logger:   log.With("component", "bridge"),
		OnCatalog: func(cat *model.Catalog) {
			res, err := bridge.Translate(cat, bridge.TranslateOptions{Namespace: a.namespace})
			if err != nil {
				log.Error("catalog not served; the previous one stays in force", "error", err)
				return
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

	adm, err := admin.New(admin.Config{
		Addr:   a.adminAddr,
		Logger: log,
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
	reg := prometheus.NewRegistry()
	reg.MustRegister(newCollector(br, srv), collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
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
