// Command meshturbo-upgrade runs a pod's Envoy sidecar: it generates the bootstrap that points
// Envoy at istiod (or runs the one given with -bootstrap), starts Envoy and owns its lifecycle
// until it is told to stop.
//
// An upgrade to a new Envoy epoch (hot restart, see package hotupgrade) is triggered by
//
//   - SIGHUP: the -envoy binary and the bootstrap are read again (the -bootstrap file, or the
//     one generated from the flags), so replacing either file and sending SIGHUP upgrades;
//   - POST /v1/upgrade on the admin API with {"binary": ..., "bootstrap_path": ...}.
//
// GET /v1/upgrade reports the epoch, versions, phase and the last upgrade's result.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/meshturbo/meshturbo/hotupgrade"
	"github.com/meshturbo/meshturbo/internal/admin"
)

type args struct {
	envoy        string
	istiod       string
	envoyAdmin   string
	adminAddr    string
	ip           string
	pod          string
	namespace    string
	labels       string
	interception string
	concurrency  int
	workDir      string
	caDir        string
	serviceAcct  string
	bootstrap    string
	drainTimeout time.Duration
}

func main() {
	var a args
	flag.StringVar(&a.envoy, "envoy", "envoy", "path of the envoy binary")
	flag.StringVar(&a.istiod, "istiod", "127.0.0.1:15010", "istiod plaintext xDS address")
	flag.StringVar(&a.envoyAdmin, "envoy-admin", "127.0.0.1:15000", "Envoy admin address (loopback)")
	flag.StringVar(&a.adminAddr, "admin", "127.0.0.1:15052", "meshturbo-upgrade admin API address (loopback)")
	flag.StringVar(&a.ip, "ip", "127.0.0.1", "workload IP")
	flag.StringVar(&a.pod, "pod", "client", "pod name")
	flag.StringVar(&a.namespace, "namespace", "default", "pod namespace")
	flag.StringVar(&a.labels, "labels", "", "workload labels, k=v,k=v")
	flag.StringVar(&a.interception, "interception", "REDIRECT", "REDIRECT (iptables/BPF send app traffic to Envoy) or NONE (Envoy binds each service port on 127.0.0.1)")
	flag.IntVar(&a.concurrency, "concurrency", 2, "Envoy worker threads")
	flag.StringVar(&a.workDir, "work-dir", "", "directory for the bootstrap, SDS socket and hot-restart state (default: a temp dir)")
	flag.StringVar(&a.caDir, "ca-dir", "", "directory with the mesh CA (ca-cert.pem, ca-key.pem); default: a CA of this sidecar's own, so only plaintext peers work")
	flag.StringVar(&a.serviceAcct, "service-account", "default", "service account in the workload's SPIFFE id")
	flag.StringVar(&a.bootstrap, "bootstrap", "", "Envoy bootstrap file to run instead of the generated sidecar bootstrap (read again on SIGHUP)")
	flag.DurationVar(&a.drainTimeout, "drain-timeout", time.Minute, "on an upgrade, how long the old Envoy may keep connections before it is stopped")
	flag.Parse()

	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, a, log); err != nil {
		log.Error("meshturbo-upgrade failed", "error", err)
		os.Exit(1)
	}
}

func parseLabels(s string) (map[string]string, error) {
	out := map[string]string{}
	if s == "" {
		return out, nil
	}
	for _, kv := range strings.Split(s, ",") {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || k == "" {
			return nil, fmt.Errorf("-labels: %q is not key=value", kv)
		}
		out[k] = v
	}
	return out, nil
}

func run(ctx context.Context, a args, log *slog.Logger) (err error) {
	labels, err := parseLabels(a.labels)
	if err != nil {
		return err
	}
	if a.workDir == "" {
		dir, err := os.MkdirTemp("", "meshturbo-upgrade-")
		if err != nil {
			return err
		}
		a.workDir = dir
		defer os.RemoveAll(dir)
	}
	var ca *hotupgrade.CA
	if a.caDir != "" {
		if ca, err = hotupgrade.LoadCA(a.caDir); err != nil {
			return err
		}
	} else {
		log.Warn("no -ca-dir: this sidecar's certificates come from a CA of its own; mTLS to other sidecars will fail")
		if ca, err = hotupgrade.NewCA("cluster.local"); err != nil {
			return err
		}
	}
	sds, err := hotupgrade.NewSDSServer(hotupgrade.SDSConfig{
		Socket: filepath.Join(a.workDir, "sds.sock"), CA: ca,
		Namespace: a.namespace, ServiceAccount: a.serviceAcct, Logger: log,
	})
	if err != nil {
		return err
	}
	defer func() { err = errors.Join(err, sds.Close()) }()

	readBootstrap := func() ([]byte, error) {
		if a.bootstrap != "" {
			return os.ReadFile(a.bootstrap)
		}
		return hotupgrade.SidecarBootstrap{
			IstiodAddr:       a.istiod,
			AdminAddr:        a.envoyAdmin,
			IP:               a.ip,
			PodName:          a.pod,
			Namespace:        a.namespace,
			Labels:           labels,
			InterceptionMode: strings.ToUpper(a.interception),
			SDSSocket:        filepath.Join(a.workDir, "sds.sock"),
		}.JSON()
	}
	bs, err := readBootstrap()
	if err != nil {
		return err
	}
	m, err := hotupgrade.New(ctx, hotupgrade.Config{
		Envoy:        a.envoy,
		Bootstrap:    bs,
		AdminAddr:    a.envoyAdmin,
		WorkDir:      a.workDir,
		ExtraArgs:    []string{"--concurrency", fmt.Sprint(a.concurrency), "--log-level", "warn"},
		Output:       os.Stderr,
		Logger:       log,
		DrainTimeout: a.drainTimeout,
	})
	if err != nil {
		return err
	}
	defer func() { err = errors.Join(err, m.Close()) }()

	adm, err := admin.New(admin.Config{Addr: a.adminAddr, Logger: log})
	if err != nil {
		return err
	}
	adm.HandleJSON("/v1/upgrade", func() any { return m.Status() })
	adm.Handle("POST /v1/upgrade", m.UpgradeHandler())
	reg := prometheus.NewRegistry()
	reg.MustRegister(newCollector(m))
	adm.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	adm.Serve()
	defer func() { err = errors.Join(err, adm.Close()) }()

	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-m.Exited():
			return errors.New("envoy exited on its own; see its log above")
		case <-hup:
			bs, err := readBootstrap()
			if err != nil {
				log.Error("SIGHUP: no upgrade", "error", err)
				continue
			}
			// Upgrade waits for one started over the admin API; it logs its outcome.
			_, _ = m.Upgrade(ctx, hotupgrade.UpgradeRequest{Binary: a.envoy, Bootstrap: bs})
		}
	}
}
