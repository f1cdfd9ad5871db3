package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/meshturbo/meshturbo/hotupgrade"
	"github.com/meshturbo/meshturbo/internal/admin"
	"github.com/meshturbo/meshturbo/xds"
	"github.com/meshturbo/meshturbo/xds/lazyload"
)

// fallbackCertTTL is the life of the fallback's certificate; it is renewed at half of it.
const fallbackCertTTL = 24 * time.Hour

// lazyLoad is lazy loading as meshturbo-xds runs it: the controller, the CA the fallback's
// certificate comes from, and (optionally) the fallback Envoy itself.
type lazyLoad struct {
	cfg      *LazyLoadConfig
	ctrl     *lazyload.Controller
	ca       *hotupgrade.CA
	fallback *hotupgrade.Manager
	stop     chan struct{}
	done     chan struct{}
}

func (l *LazyLoadConfig) controllerConfig(store *xds.Store, id lazyload.Identity, log *slog.Logger) lazyload.Config {
	c := lazyload.Config{
		Store: store,
		Fallback: lazyload.Fallback{
			Host: l.Fallback.Host, Address: l.Fallback.Address, HTTPPort: l.Fallback.HTTPPort,
			ServiceAccount: l.Fallback.ServiceAccount,
		},
		Identity:      id,
		TrustDomain:   l.TrustDomain,
		AlwaysInclude: l.AlwaysInclude,
		EdgeTTL:       l.EdgeTTL.Duration,
		StateFile:     l.StateFile,
		Peers:         l.Peers,
		Logger:        log,
	}
	for _, w := range l.Workloads {
		c.Workloads = append(c.Workloads, lazyload.Workload{
			Namespace: w.Namespace, Name: w.Name, Selector: w.Selector, ServiceAccount: w.ServiceAccount,
			Dependencies: w.Dependencies,
		})
	}
	return c
}

// newLazyLoad loads the mesh CA, issues the fallback's certificate and starts the controller.
func newLazyLoad(cfg *LazyLoadConfig, namespace string, store *xds.Store, log *slog.Logger) (*lazyLoad, error) {
	ca, err := hotupgrade.LoadCA(cfg.CADir)
	if err != nil {
		return nil, fmt.Errorf("lazyload.caDir %s: %w", cfg.CADir, err)
	}
	l := &lazyLoad{cfg: cfg, ca: ca, stop: make(chan struct{}), done: make(chan struct{})}
	ccfg := cfg.controllerConfig(store, lazyload.Identity{}, log.With("component", "lazyload"))
	if ccfg.Fallback.Namespace == "" {
		ccfg.Fallback.Namespace = namespace
	}
	id, err := l.issue(ccfg.TrustDomain, ccfg.Fallback.Namespace, ccfg.Fallback.ServiceAccount)
	if err != nil {
		return nil, err
	}
	ccfg.Identity = id
	if l.ctrl, err = lazyload.New(ccfg); err != nil {
		return nil, err
	}
	go l.renew(ccfg.TrustDomain, ccfg.Fallback.Namespace, ccfg.Fallback.ServiceAccount, log)
	return l, nil
}

func (l *lazyLoad) issue(trustDomain, namespace, sa string) (lazyload.Identity, error) {
	if trustDomain == "" {
		trustDomain = "cluster.local"
	}
	if sa == "" {
		sa = "meshturbo-fallback"
	}
	id, err := l.ca.Issue(trustDomain, namespace, sa, fallbackCertTTL)
	if err != nil {
		return lazyload.Identity{}, fmt.Errorf("lazyload: fallback certificate: %w", err)
	}
	return lazyload.Identity{CertChain: id.CertChain, Key: id.Key, Roots: id.Roots}, nil
}

// renew re-issues the fallback's certificate at half its life.
func (l *lazyLoad) renew(trustDomain, namespace, sa string, log *slog.Logger) {
	defer close(l.done)
	t := time.NewTicker(fallbackCertTTL / 2)
	defer t.Stop()
	for {
		select {
		case <-l.stop:
			return
		case <-t.C:
			id, err := l.issue(trustDomain, namespace, sa)
			if err != nil {
				log.Error("fallback certificate not renewed; the current one stays until it expires", "error", err)
				continue
			}
			l.ctrl.SetIdentity(id)
		}
	}
}

// startFallback runs the fallback Envoy when the config names its binary.
func (l *lazyLoad) startFallback(ctx context.Context, xdsAddr string, log *slog.Logger) error {
	if l.cfg.Fallback.Envoy == "" {
		log.Info("lazy loading on; the fallback Envoy runs elsewhere", "bootstrap", "meshturbo-xds -config <file> -fallback-bootstrap <this xDS address>")
		return nil
	}
	bs, err := lazyload.FallbackBootstrap(xdsAddr, l.cfg.Fallback.Admin)
	if err != nil {
		return err
	}
	m, err := hotupgrade.New(ctx, hotupgrade.Config{
		Envoy: l.cfg.Fallback.Envoy, Bootstrap: bs, AdminAddr: l.cfg.Fallback.Admin,
		ExtraArgs: []string{"--concurrency", "2"}, Output: os.Stderr, Logger: log.With("component", "fallback-envoy"),
	})
	if err != nil {
		return fmt.Errorf("start the lazy-load fallback Envoy: %w", err)
	}
	l.fallback = m
	log.Info("lazy-load fallback Envoy running", "admin", l.cfg.Fallback.Admin, "address", l.cfg.Fallback.Address)
	return nil
}

func (l *lazyLoad) Close() error {
	close(l.stop)
	<-l.done
	var err error
	if l.fallback != nil {
		err = l.fallback.Close()
	}
	return errors.Join(err, l.ctrl.Close())
}

// handle serves the lazy-load admin API.
func (l *lazyLoad) handle(adm *admin.Server) {
	adm.Handle("GET /v1/lazyload/edges", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, map[string]any{"edges": l.ctrl.Edges(r.URL.Query().Get("workload"))})
	}))
	adm.Handle("GET /v1/lazyload/scopes", http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, http.StatusOK, map[string]any{"scopes": l.ctrl.Scopes()})
	}))
	adm.Handle("GET /v1/lazyload/scopes/{namespace}/{name}", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		id := r.PathValue("namespace") + "/" + r.PathValue("name")
		s, ok := l.ctrl.Scope(id)
		if !ok {
			writeJSON(w, http.StatusNotFound, map[string]string{"error": fmt.Sprintf("workload %s is not a lazy-load workload; see GET /v1/lazyload/scopes", id)})
			return
		}
		writeJSON(w, http.StatusOK, s)
	}))
}

func writeJSON(w http.ResponseWriter, code int, v any) { _ = admin.WriteJSON(w, code, v) }

// lazyCollector exports lazy loading's counters.
type lazyCollector struct {
	ctrl                                         *lazyload.Controller
	edges, scope, hits, unknown, lag, unroutable *prometheus.Desc
}

func newLazyCollector(ctrl *lazyload.Controller) *lazyCollector {
	wl := []string{"workload"}
	return &lazyCollector{
		ctrl:       ctrl,
		edges:      prometheus.NewDesc("meshturbo_lazyload_edges", "Known edges (learned and static) of the workload.", wl, nil),
		scope:      prometheus.NewDesc("meshturbo_lazyload_scope_services", "Bridged services in the workload's served scope.", wl, nil),
		hits:       prometheus.NewDesc("meshturbo_lazyload_fallback_hits_total", "Calls of the workload that went through the fallback.", wl, nil),
		unknown:    prometheus.NewDesc("meshturbo_lazyload_unknown_caller_calls_total", "Fallback calls from callers that are no lazy-load workload.", nil, nil),
		lag:        prometheus.NewDesc("meshturbo_lazyload_direct_path_seconds", "Time from a first call to the last call through the fallback, over settled edges.", nil, nil),
		unroutable: prometheus.NewDesc("meshturbo_lazyload_unroutable_tcp_ports", "TCP ports the fallback cannot forward (shared by several services).", nil, nil),
	}
}

func (c *lazyCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.edges, c.scope, c.hits, c.unknown, c.lag, c.unroutable} {
		ch <- d
	}
}

func (c *lazyCollector) Collect(ch chan<- prometheus.Metric) {
	st := c.ctrl.Stats()
	for w, n := range st.Edges {
		ch <- prometheus.MustNewConstMetric(c.edges, prometheus.GaugeValue, float64(n), w)
	}
	for w, n := range st.ScopeSizes {
		ch <- prometheus.MustNewConstMetric(c.scope, prometheus.GaugeValue, float64(n), w)
	}
	for w, n := range st.FallbackHits {
		ch <- prometheus.MustNewConstMetric(c.hits, prometheus.CounterValue, float64(n), w)
	}
	ch <- prometheus.MustNewConstMetric(c.unknown, prometheus.CounterValue, float64(st.UnknownCalls))
	buckets := map[float64]uint64{}
	var sum float64
	for _, b := range []float64{0.5, 1, 2, 5, 10, 30} {
		for _, d := range st.DirectLag {
			if d.Seconds() <= b {
				buckets[b]++
			}
		}
	}
	for _, d := range st.DirectLag {
		sum += d.Seconds()
	}
	ch <- prometheus.MustNewConstHistogram(c.lag, uint64(len(st.DirectLag)), sum, buckets)
	ch <- prometheus.MustNewConstMetric(c.unroutable, prometheus.GaugeValue, float64(len(st.Unroutable)))
}

// printFallbackBootstrap writes the bootstrap of a fallback Envoy that is run outside
// meshturbo-xds (lazyload.fallback.envoy unset): ADS and access logs to a.fallbackBootstrap,
// admin on lazyload.fallback.admin.
func printFallbackBootstrap(a args, w io.Writer) error {
	cfg, err := a.loadConfig()
	if err != nil {
		return err
	}
	if cfg.LazyLoad == nil {
		return errors.New("-fallback-bootstrap: the config has no lazyload section")
	}
	bs, err := lazyload.FallbackBootstrap(a.fallbackBootstrap, cfg.LazyLoad.Fallback.Admin)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(w, "%s\n", bs)
	return err
}
