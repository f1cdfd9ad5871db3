package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/signal"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/cilium/ebpf"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/sys/unix"

	"github.com/meshturbo/meshturbo/bpf"
	"github.com/meshturbo/meshturbo/internal/admin"
)

// mesh is the mesh set: from flags or from the mesh file.
type mesh struct {
	IPs          []netip.Addr `json:"ips"`
	SidecarPorts []uint16     `json:"sidecar_ports"`
	Pods         []meshPod    `json:"pods,omitempty"` // VPP mode's sidecars (vpp.go)
}

func (a args) flagMesh() (mesh, error) {
	var m mesh
	for _, s := range splitList(a.meshIPs) {
		ip, err := netip.ParseAddr(s)
		if err != nil {
			return mesh{}, fmt.Errorf("-mesh-ips: %w", err)
		}
		m.IPs = append(m.IPs, ip)
	}
	for _, s := range splitList(a.sidecarPorts) {
		p, err := strconv.ParseUint(s, 10, 16)
		if err != nil || p == 0 {
			return mesh{}, fmt.Errorf("-sidecar-ports: %q is not a port", s)
		}
		m.SidecarPorts = append(m.SidecarPorts, uint16(p))
	}
	return m, nil
}

// redirectConfig is the redirect mode from the flags.
func (a args) redirectConfig() (bpf.RedirectConfig, error) {
	if !a.redirect {
		return bpf.RedirectConfig{}, nil
	}
	rc := bpf.RedirectConfig{Enabled: true, SidecarCgroups: splitList(a.redirectSidecars)}
	out, err := netip.ParseAddrPort(a.redirectOutbound)
	if err != nil {
		return rc, fmt.Errorf("-redirect-outbound: %w", err)
	}
	rc.SidecarIP, rc.OutboundPort = out.Addr(), out.Port()
	if len(rc.SidecarCgroups) == 0 {
		return rc, errors.New("-redirect needs -redirect-sidecar-cgroups: the sidecar's own connects must not be redirected back to it")
	}
	for _, s := range splitList(a.redirectExclPort) {
		p, err := strconv.ParseUint(s, 10, 16)
		if err != nil || p == 0 {
			return rc, fmt.Errorf("-redirect-exclude-ports: %q is not a port", s)
		}
		rc.ExcludePorts = append(rc.ExcludePorts, uint16(p))
	}
	for _, s := range splitList(a.redirectExclCIDR) {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return rc, fmt.Errorf("-redirect-exclude-cidrs: %w", err)
		}
		rc.ExcludeCIDRs = append(rc.ExcludeCIDRs, p)
	}
	return rc, nil
}

func splitList(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

func readMeshFile(path string) (mesh, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return mesh{}, fmt.Errorf("mesh file: %w", err)
	}
	var m mesh
	dec := json.NewDecoder(strings.NewReader(string(b)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&m); err != nil {
		return mesh{}, fmt.Errorf("mesh file %s: %w", path, err)
	}
	if slices.Contains(m.SidecarPorts, 0) {
		return mesh{}, fmt.Errorf("mesh file %s: sidecar port 0", path)
	}
	return m, nil
}

func isCgroup2(path string) bool {
	var st unix.Statfs_t
	return unix.Statfs(path, &st) == nil && st.Type == unix.CGROUP2_SUPER_MAGIC
}

// status is served on /v1/accel.
type status struct {
	Accelerating bool `json:"accelerating"`
	// FallbackReason says why acceleration is off; traffic then takes the normal path.
	FallbackReason string              `json:"fallback_reason,omitempty"`
	Features       []bpf.FeatureStatus `json:"features"`
	State          *bpf.State          `json:"state,omitempty"`
	Stats          *bpf.Stats          `json:"stats,omitempty"`
	Sockets        int                 `json:"accelerated_sockets"`
	Error          string              `json:"error,omitempty"`
}

// node is the running agent, or its fallback when the kernel can't accelerate.
type node struct {
	agent    *bpf.Agent // nil when acceleration is off
	fallback string
	features []bpf.FeatureStatus
	mu       sync.Mutex
	meshErr  string
}

func (n *node) status() status {
	st := status{Accelerating: n.agent != nil, FallbackReason: n.fallback, Features: n.features}
	if n.agent == nil {
		return st
	}
	s := n.agent.State()
	st.State = &s
	var errs []string
	if stats, err := n.agent.Stats(); err == nil {
		st.Stats = &stats
	} else {
		errs = append(errs, err.Error())
	}
	if keys, err := n.agent.Sockets(); err == nil {
		st.Sockets = len(keys)
	} else {
		errs = append(errs, err.Error())
	}
	n.mu.Lock()
	if n.meshErr != "" {
		errs = append(errs, n.meshErr)
	}
	n.mu.Unlock()
	st.Error = strings.Join(errs, "; ")
	return st
}

func run(ctx context.Context, a args, log *slog.Logger) (err error) {
	m, err := a.flagMesh()
	if err != nil {
		return err
	}
	meshStamp := "" // the mesh file as first read: a change from then on is applied
	if a.meshFile != "" {
		meshStamp = fileStamp(a.meshFile)
		if m, err = readMeshFile(a.meshFile); err != nil {
			return err
		}
	}
	rc, err := a.redirectConfig()
	if err != nil {
		return err
	}
	vn, err := startVPP(a, m.Pods, log)
	if err != nil {
		return err
	}
	if vn != nil {
		defer func() { err = errors.Join(err, vn.Close()) }() // VPP keeps its state
	}
	var opts []bpf.Option
	if a.probeFailure != "" {
		opts = append(opts, bpf.WithProbeFailure(a.probeFailure))
	}
	n := &node{}
	n.features, _ = bpf.Probe(opts...)
	n.agent, err = bpf.New(bpf.Config{
		CgroupPath:             a.cgroup,
		PinPath:                a.pinPath,
		MeshIPs:                m.IPs,
		SidecarPorts:           m.SidecarPorts,
		MaxConns:               uint32(a.maxConns),
		SmallMsg:               uint32(a.smallMsg),
		SmallRun:               uint32(a.smallRun),
		QueueLimit:             uint32(a.queueLimit),
		NaiveRedirect:          a.naive,
		KeepDemoted:            a.keepDemoted,
		CoexistWithOtherOwners: a.coexist,
		Redirect:               rc,
	}, opts...)
	switch {
	case errors.Is(err, ebpf.ErrNotSupported):
		// Keep running without acceleration: traffic is untouched, the status says why.
		n.fallback = err.Error()
		log.Warn("acceleration off: the kernel lacks a feature; traffic takes the normal path", "error", err)
	case err != nil:
		return err
	default:
		defer func() { err = errors.Join(err, n.agent.Close()) }() // pins stay: acceleration goes on
		st := n.agent.State()
		log.Info("acceleration on", "cgroup", st.CgroupPath, "pin_path", st.PinPath,
			"adopted", adoptedCount(st), "replaced_maps", len(st.ReplacedMaps),
			"mesh_ips", len(m.IPs), "sidecar_ports", m.SidecarPorts)
		if !st.Unhook.On {
			log.Warn("sockets moved to TCP stay hooked (slower than plain TCP for small writes)", "reason", st.Unhook.Off)
		}
		switch {
		case st.Redirect.On:
			log.Info("iptables-free redirection on", "outbound", st.Redirect.SidecarAddr, "sidecar_cgroups", st.Redirect.SidecarCgroups,
				"exclude_ports", st.Redirect.ExcludePorts, "exclude_cidrs", st.Redirect.ExcludeCIDRs)
		case rc.Enabled:
			log.Warn("iptables-free redirection off: the kernel lacks a feature; connects are not redirected", "reason", st.Redirect.Off)
		}
		for _, r := range st.ReplacedMaps {
			log.Warn("pinned map replaced: its layout changed; its live connections drain", "map", r.Name, "reason", r.Reason)
		}
		if len(st.OtherOwners) > 0 {
			log.Warn("another sockmap owner runs on this cgroup; the sockets it holds are not accelerated (insert_failed{reason=\"busy\"})",
				"owners", st.OtherOwners)
		}
		if len(st.OtherSockOps) > 0 {
			log.Warn("other sockops programs run on this cgroup; sockets they claim are not accelerated (insert_busy)",
				"program_ids", st.OtherSockOps)
		}
	}

	adm, err := admin.New(admin.Config{Addr: a.adminAddr, TokenFile: a.tokenFile, Name: "meshturbo-agent", Logger: log})
	if err != nil {
		return err
	}
	adm.HandleJSON("/v1/accel", func() any { return n.status() })
	reg := prometheus.NewRegistry()
	reg.MustRegister(newCollector(n))
	if vn != nil {
		adm.HandleJSON("/v1/vpp", func() any { return vn.status() })
		reg.MustRegister(newVPPCollector(vn))
	}
	adm.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	adm.Serve()
	defer func() { err = errors.Join(err, adm.Close()) }()
	log.Info("meshturbo-agent running", "admin", adm.Addr(), "accelerating", n.agent != nil, "vpp", vn != nil)

	var appliers []func(mesh, error)
	if n.agent != nil {
		appliers = append(appliers, func(m mesh, err error) { n.applyMesh(m, err, log) })
	}
	if vn != nil {
		appliers = append(appliers, vn.applyMesh)
	}
	if a.meshFile != "" && len(appliers) > 0 {
		var wg sync.WaitGroup
		wg.Add(1)
		wctx, cancel := context.WithCancel(ctx)
		go func() {
			defer wg.Done()
			watchMeshFile(wctx, a.meshFile, meshStamp, a.meshPoll, appliers...)
		}()
		defer func() { cancel(); wg.Wait() }()
	}
	<-ctx.Done()
	log.Info("shutting down; acceleration stays (use 'meshturbo-agent uninstall' to remove it)")
	return nil
}

func adoptedCount(st bpf.State) int {
	n := 0
	for _, p := range st.Programs {
		if p.Adopted {
			n++
		}
	}
	return n
}

// watchMeshFile re-reads the mesh file when its modification time or size changes, and on
// SIGHUP, and hands each read (or why it failed) to every applier: the BPF side takes the
// mesh IPs and sidecar ports, VPP mode the pods. A bad file leaves each side's last good set.
func watchMeshFile(ctx context.Context, path, last string, every time.Duration, appliers ...func(mesh, error)) {
	if every <= 0 {
		every = 2 * time.Second
	}
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	tick := time.NewTicker(every)
	defer tick.Stop()
	for {
		force := false
		select {
		case <-ctx.Done():
			return
		case <-hup:
			force = true
		case <-tick.C:
		}
		stamp := fileStamp(path)
		if !force && stamp == last {
			continue
		}
		last = stamp
		m, err := readMeshFile(path)
		for _, apply := range appliers {
			apply(m, err)
		}
	}
}

// applyMesh gives the BPF side the mesh IPs and sidecar ports of a new read of the mesh file.
func (n *node) applyMesh(m mesh, err error, log *slog.Logger) {
	if err == nil {
		err = n.agent.SetMesh(m.IPs, m.SidecarPorts)
	}
	n.mu.Lock()
	n.meshErr = ""
	if err != nil {
		n.meshErr = err.Error()
	}
	n.mu.Unlock()
	if err != nil {
		log.Error("mesh file not applied; the previous mesh set stays", "error", err)
	} else {
		log.Info("mesh set updated from file")
	}
}

func fileStamp(path string) string {
	fi, err := os.Stat(path)
	if err != nil {
		return "missing"
	}
	return fmt.Sprintf("%d/%d", fi.ModTime().UnixNano(), fi.Size())
}
