// Command meshturbo-upgrade runs a pod's Envoy sidecar: it generates the bootstrap that points
// Envoy at istiod (or runs the one given with -bootstrap), starts Envoy and owns its lifecycle
// until it is told to stop.
//
// An upgrade to a new Envoy epoch (hot restart, see package hotupgrade) is triggered by
//
//   - SIGHUP: the -envoy binary and the bootstrap are read again (the -bootstrap file, or the
//     one generated from the flags), so replacing either file and sending SIGHUP upgrades;
//   - POST /v1/upgrade on the admin API with {"binary": ..., "bootstrap_path": ...,
//     "handoff": ...} (handoff overrides -handoff for that upgrade);
//   - a changed -envoy binary or -bootstrap file, polled every -watch-interval (a file
//     renamed over, or swapped behind a symbolic link as in a Kubernetes ConfigMap volume).
//
// SIGHUP and file changes share one queue: a trigger while an upgrade runs queues exactly
// one more, which reads the files when it starts.
//
// With -work-dir set, a meshturbo-upgrade that dies (even SIGKILL, mid-upgrade) leaves
// Envoy serving, and the next one started on the same -work-dir adopts it and finishes or
// rolls back the interrupted upgrade (see package hotupgrade). SIGTERM stops Envoy.
//
// -handoff chooses how the listeners move to the new Envoy: Envoy's hot restart, or (when the
// two binaries' hot-restart versions differ, or always with -handoff reuseport) a second,
// independent Envoy bound to the same ports with SO_REUSEPORT: new connections are steered
// to its sockets (a sk_reuseport BPF program) until the old one has accepted what it had
// queued, and only then does the old one stop accepting (net.ipv4.tcp_migrate_req=1 moves
// anything left, should steering be unavailable). The new Envoy's
// admin then listens on -handoff-admin until the next reuseport hand-off moves it back.
//
// GET /v1/upgrade reports the epoch, versions, phase, admin address and the last upgrade's
// result, which names the hand-off used.
package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/http"
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
	tokenFile    string
	ip           string
	pod          string
	namespace    string
	labels       string
	interception string
	concurrency  int
	workDir      string
	caDir        string
	serviceAcct  string
	vclDir       string
	vclWait      time.Duration
	bootstrap    string
	drainTimeout time.Duration
	probeURL     string
	watchEvery   time.Duration
	handoff      string
	handoffAdmin string
}

func main() {
	var a args
	flag.StringVar(&a.envoy, "envoy", "envoy", "path of the envoy binary")
	flag.StringVar(&a.istiod, "istiod", "127.0.0.1:15010", "istiod plaintext xDS address")
	flag.StringVar(&a.envoyAdmin, "envoy-admin", "127.0.0.1:15000", "Envoy admin address (loopback)")
	flag.StringVar(&a.adminAddr, "admin", "127.0.0.1:15052", "meshturbo-upgrade admin API address: loopback host:port or unix:///path; elsewhere it needs -admin-token-file")
	flag.StringVar(&a.tokenFile, "admin-token-file", "", "file with the admin API bearer token")
	flag.StringVar(&a.ip, "ip", "127.0.0.1", "workload IP")
	flag.StringVar(&a.pod, "pod", "client", "pod name")
	flag.StringVar(&a.namespace, "namespace", "default", "pod namespace")
	flag.StringVar(&a.labels, "labels", "", "workload labels, k=v,k=v")
	flag.StringVar(&a.interception, "interception", "REDIRECT", "REDIRECT (iptables/BPF send app traffic to Envoy) or NONE (Envoy binds each service port on 127.0.0.1)")
	flag.IntVar(&a.concurrency, "concurrency", 2, "Envoy worker threads")
	flag.StringVar(&a.workDir, "work-dir", "", "directory for the bootstrap, SDS socket and hot-restart state (default: a temp dir)")
	flag.StringVar(&a.caDir, "ca-dir", "", "directory with the mesh CA (ca-cert.pem, ca-key.pem); default: a CA of this sidecar's own, so only plaintext peers work")
	flag.StringVar(&a.vclDir, "vcl-dir", "", "VPP mode: the directory where meshturbo-agent writes this pod's vcl.conf; Envoy then uses VPP's host stack (needs a contrib Envoy)")
	flag.DurationVar(&a.vclWait, "vcl-wait", 2*time.Minute, "VPP mode: how long to wait for vcl.conf to appear")
	flag.StringVar(&a.serviceAcct, "service-account", "default", "service account in the workload's SPIFFE id")
	flag.StringVar(&a.bootstrap, "bootstrap", "", "Envoy bootstrap file to run instead of the generated sidecar bootstrap (read again on SIGHUP)")
	flag.DurationVar(&a.drainTimeout, "drain-timeout", time.Minute, "on an upgrade, how long the old Envoy may keep connections before it is stopped")
	flag.StringVar(&a.probeURL, "probe-url", "", "on an upgrade, the new Envoy must answer a GET of this URL with 2xx before the old one drains (e.g. a route through its listener)")
	flag.StringVar(&a.handoff, "handoff", hotupgrade.HandoffAuto, "how an upgrade hands the listeners over: auto (Envoy's hot restart when the hot-restart versions match, reuseport otherwise), hotrestart, or reuseport (a second Envoy on the same ports with SO_REUSEPORT; sets net.ipv4.tcp_migrate_req=1)")
	flag.StringVar(&a.handoffAdmin, "handoff-admin", "", "Envoy admin address for an Envoy started by a reuseport hand-off while the old one holds -envoy-admin (default: a free port on its host; GET /v1/upgrade shows it as admin_addr)")
	flag.DurationVar(&a.watchEvery, "watch-interval", 2*time.Second, "how often to check the -envoy binary and -bootstrap file for changes, which start an upgrade (0: never)")
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
	} else if err := os.MkdirAll(a.workDir, 0o700); err != nil {
		return fmt.Errorf("-work-dir: %w", err)
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

	mergeVCL := func(bs []byte) ([]byte, error) { return bs, nil }
	if a.vclDir != "" {
		if mergeVCL, err = vclHandOff(ctx, a.vclDir, a.envoy, a.vclWait, log); err != nil {
			return err
		}
	}
	readBootstrap := func() ([]byte, error) {
		bs, err := readBootstrapFile(a, labels)
		if err != nil {
			return nil, err
		}
		return mergeVCL(bs)
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
		Probe:        httpProbe(a.probeURL),

		Handoff:          a.handoff,
		HandoffAdminAddr: a.handoffAdmin,
	})
	if err != nil {
		return err
	}
	defer func() { err = errors.Join(err, m.Close()) }()

	// Every trigger but the admin API goes through one queue.
	trigger := hotupgrade.NewTrigger(func(ctx context.Context, reason string) {
		bs, err := readBootstrap()
		if err != nil {
			log.Error("no upgrade: read the bootstrap", "trigger", reason, "error", err)
			return
		}
		log.Info("upgrade", "trigger", reason)
		// Upgrade waits for one started over the admin API; it logs its outcome.
		_, _ = m.Upgrade(ctx, hotupgrade.UpgradeRequest{Binary: a.envoy, Bootstrap: bs})
	})
	defer func() { err = errors.Join(err, trigger.Close()) }()
	if a.watchEvery > 0 {
		paths := []string{a.envoy}
		if a.bootstrap != "" {
			paths = append(paths, a.bootstrap)
		}
		w, err := hotupgrade.NewFileWatcher(hotupgrade.WatchConfig{Paths: paths, Interval: a.watchEvery, Logger: log,
			OnChange: func(path string) { trigger.Kick("changed " + path) }})
		if err != nil {
			return err
		}
		defer func() { err = errors.Join(err, w.Close()) }()
		// The bootstrap may have changed before the watcher looked (or while an adopted
		// Envoy ran without a manager).
		if bs, err := readBootstrap(); err == nil && !bytes.Equal(bs, m.Bootstrap()) {
			trigger.Kick("bootstrap differs from the running one")
		}
	}

	adm, err := admin.New(admin.Config{Addr: a.adminAddr, TokenFile: a.tokenFile, Name: "meshturbo-upgrade", Logger: log})
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
			trigger.Kick("SIGHUP")
		}
	}
}

// httpProbe checks that a GET of url answers 2xx; nil for no url.
func httpProbe(url string) func(ctx context.Context) error {
	if url == "" {
		return nil
	}
	client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
	return func(ctx context.Context) error {
		ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if err != nil {
			return err
		}
		resp, err := client.Do(req)
		if err != nil {
			return fmt.Errorf("probe %s: %w", url, err)
		}
		defer resp.Body.Close()
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<16))
		if resp.StatusCode/100 != 2 {
			return fmt.Errorf("probe %s: status %d", url, resp.StatusCode)
		}
		return nil
	}
}

// readBootstrapFile is the -bootstrap file, or the generated sidecar bootstrap.
func readBootstrapFile(a args, labels map[string]string) ([]byte, error) {
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
