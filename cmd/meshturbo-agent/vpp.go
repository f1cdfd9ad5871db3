package main

// VPP mode: with -vpp-config the agent also drives VPP's host stack (package vpp): it
// connects to VPP's API socket, keeps the uplink, routes, session layer and one app namespace
// per meshed pod's sidecar in place, and writes each sidecar's vcl.conf and Envoy bootstrap
// fragment under the hand-off directory (<handoffDir>/<pod UID>/). The meshed pods come from
// the mesh file's "pods" list (the same file that feeds the BPF mesh set). VPP being absent or
// incompatible never stops the agent: BPF acceleration runs on, /v1/vpp and the metrics say
// what is wrong and how to fix it.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.yaml.in/yaml/v3"

	"github.com/meshturbo/meshturbo/vpp"
	"github.com/meshturbo/meshturbo/vpp/sriov"
)

// meshPod is a meshed pod on the node, as listed under "pods" in the mesh file: in VPP mode
// its sidecar gets an app namespace and a hand-off directory named after the UID.
type meshPod struct {
	UID  string `json:"uid"`
	Name string `json:"name"` // namespace/name, for humans
}

// vppFile is the -vpp-config file (YAML or JSON): the node's part of VPP's desired state.
type vppFile struct {
	APISocket   string `yaml:"apiSocket"`
	StatsSocket string `yaml:"statsSocket"`
	Uplink      struct {
		Driver string `yaml:"driver"` // dev | rdma | af_packet
		// PCIAddress is the VF (dev); Resource instead names the SR-IOV device plugin
		// resource whose PCIDEVICE_<RESOURCE> variable holds it.
		PCIAddress  string   `yaml:"pciAddress"`
		Resource    string   `yaml:"resource"`
		DevDriver   string   `yaml:"devDriver"`
		HostIf      string   `yaml:"hostIf"`
		Name        string   `yaml:"name"`
		MAC         string   `yaml:"mac"`
		MTU         uint16   `yaml:"mtu"`
		RxQueues    uint16   `yaml:"rxQueues"`
		TxQueues    uint16   `yaml:"txQueues"`
		RxQueueSize uint16   `yaml:"rxQueueSize"`
		TxQueueSize uint16   `yaml:"txQueueSize"`
		RxMode      string   `yaml:"rxMode"`
		Addresses   []string `yaml:"addresses"`
		// NetworkStatus takes the addresses from the Multus network-status annotation of the
		// pod the VF was allocated to, instead of Addresses.
		NetworkStatus *networkStatusSource `yaml:"networkStatus"`
	} `yaml:"uplink"`
	// SysfsRoot is where sysfs is mounted (default /sys). With uplink.resource the agent reads
	// the VF there: for rdma its netdev and MAC, for dev its driver.
	SysfsRoot string `yaml:"sysfsRoot"`
	Routes    []struct {
		Prefix string `yaml:"prefix"`
		Via    string `yaml:"via"`
	} `yaml:"routes"`
	AppSocketDir  string `yaml:"appSocketDir"`
	HandoffDir    string `yaml:"handoffDir"`
	SecretKeyFile string `yaml:"secretKeyFile"`
	VCL           struct {
		SegmentSize    uint64 `yaml:"segmentSize"`
		AddSegmentSize uint64 `yaml:"addSegmentSize"`
		RxFifoSize     uint32 `yaml:"rxFifoSize"`
		TxFifoSize     uint32 `yaml:"txFifoSize"`
		EventQueueSize uint32 `yaml:"eventQueueSize"`
	} `yaml:"vcl"`
	MinVersion     string        `yaml:"minVersion"`
	MaxVersion     string        `yaml:"maxVersion"`
	RequestTimeout time.Duration `yaml:"requestTimeout"`
	ResyncInterval time.Duration `yaml:"resyncInterval"`
}

// networkStatusSource points at the network-status annotation in a downward API file
// (metadata.annotations). Multus reports addresses without their prefix length, so it is
// given here.
type networkStatusSource struct {
	AnnotationsFile string `yaml:"annotationsFile"`
	// Network is the NetworkAttachmentDefinition ("ns/name" or "name") to take when no entry
	// names the VF's PCI address (older SR-IOV CNI); optional otherwise.
	Network       string `yaml:"network"`
	PrefixLength  int    `yaml:"prefixLength"`  // of the IPv4 address(es), required for them
	PrefixLength6 int    `yaml:"prefixLength6"` // of the IPv6 address(es), default 64
}

// loadVPPConfig reads the -vpp-config file into a vpp.Config. environ is os.Environ() (the
// device plugin's PCIDEVICE_* variables). Every error names the file and the field.
func loadVPPConfig(path, apiSocket string, environ []string, log *slog.Logger) (vpp.Config, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return vpp.Config{}, fmt.Errorf("-vpp-config: %w", err)
	}
	var f vppFile
	dec := yaml.NewDecoder(bytes.NewReader(raw))
	dec.KnownFields(true)
	if err := dec.Decode(&f); err != nil {
		return vpp.Config{}, fmt.Errorf("-vpp-config %s: %w", path, err)
	}
	bad := func(field string, err error) error { return fmt.Errorf("-vpp-config %s: %s: %w", path, field, err) }
	cfg := vpp.Config{
		APISocket:      f.APISocket,
		StatsSocket:    f.StatsSocket,
		AppSocketDir:   f.AppSocketDir,
		HandoffDir:     f.HandoffDir,
		VCL:            vpp.VCLSizes(f.VCL),
		MinVersion:     f.MinVersion,
		MaxVersion:     f.MaxVersion,
		RequestTimeout: f.RequestTimeout,
		ResyncInterval: f.ResyncInterval,
		Logger:         log,
	}
	if apiSocket != "" {
		cfg.APISocket = apiSocket
	}
	u := f.Uplink
	cfg.Uplink = vpp.Uplink{
		Driver: vpp.Driver(u.Driver), PCIAddress: u.PCIAddress, DevDriver: u.DevDriver, HostIf: u.HostIf, Name: u.Name,
		MTU: u.MTU, RxQueues: u.RxQueues, TxQueues: u.TxQueues, RxQueueSize: u.RxQueueSize, TxQueueSize: u.TxQueueSize,
		RxMode: vpp.RxMode(u.RxMode),
	}
	if u.Resource != "" {
		if u.PCIAddress != "" {
			return vpp.Config{}, bad("uplink.resource", errors.New("give pciAddress or resource, not both"))
		}
		vfs, err := sriov.AllocatedVFs(environ, u.Resource)
		if err != nil {
			return vpp.Config{}, bad("uplink.resource", err)
		}
		if len(vfs) != 1 {
			return vpp.Config{}, bad("uplink.resource", fmt.Errorf("%s lists %d VFs %v; request exactly one for VPP",
				sriov.ResourceEnvName(u.Resource), len(vfs), vfs))
		}
		cfg.Uplink.PCIAddress = vfs[0]
	}
	if u.MAC != "" {
		if cfg.Uplink.MAC, err = net.ParseMAC(u.MAC); err != nil {
			return vpp.Config{}, bad("uplink.mac", err)
		}
	}
	if u.Resource != "" {
		if err := fillFromSysfs(&cfg.Uplink, orDefault(f.SysfsRoot, "/sys"), log); err != nil {
			return vpp.Config{}, bad("uplink.resource", err)
		}
	}
	for i, s := range u.Addresses {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return vpp.Config{}, bad(fmt.Sprintf("uplink.addresses[%d]", i), err)
		}
		cfg.Uplink.Addresses = append(cfg.Uplink.Addresses, p)
	}
	if ns := u.NetworkStatus; ns != nil {
		if len(u.Addresses) > 0 {
			return vpp.Config{}, bad("uplink.networkStatus", errors.New("give addresses or networkStatus, not both"))
		}
		if cfg.Uplink.Addresses, err = addressesFromNetworkStatus(*ns, cfg.Uplink.PCIAddress); err != nil {
			return vpp.Config{}, bad("uplink.networkStatus", err)
		}
	}
	for i, r := range f.Routes {
		p, err1 := netip.ParsePrefix(r.Prefix)
		via, err2 := netip.ParseAddr(r.Via)
		if err := errors.Join(err1, err2); err != nil {
			return vpp.Config{}, bad(fmt.Sprintf("routes[%d]", i), err)
		}
		cfg.Routes = append(cfg.Routes, vpp.Route{Prefix: p, Via: via})
	}
	if f.SecretKeyFile != "" {
		key, err := os.ReadFile(f.SecretKeyFile)
		if err != nil {
			return vpp.Config{}, bad("secretKeyFile", err)
		}
		if cfg.SecretKey = bytes.TrimSpace(key); len(cfg.SecretKey) < 16 {
			return vpp.Config{}, bad("secretKeyFile", fmt.Errorf("%s holds %d bytes; want at least 16 (e.g. head -c 32 /dev/urandom | base64)",
				f.SecretKeyFile, len(cfg.SecretKey)))
		}
	}
	return cfg, nil
}

// fillFromSysfs completes an uplink whose VF came from the device plugin with what sysfs says
// about it. rdma: VPP opens the VF through its netdev and must use the VF's own MAC (the NIC
// delivers nothing else to it), so both come from sysfs and a configured value must agree.
// dev: VPP's device API needs the VF on vfio-pci; another driver is logged (the bind may
// still happen before VPP attaches it). Without a sysfs view of the VF (not mounted), dev
// goes on and rdma needs hostIf and mac in the file.
func fillFromSysfs(u *vpp.Uplink, root string, log *slog.Logger) error {
	vf, err := sriov.LookupVF(root, u.PCIAddress)
	switch {
	case err != nil && u.Driver == vpp.DriverRDMA && (u.HostIf == "" || u.MAC == nil):
		return fmt.Errorf("%w (set hostIf and mac, or mount sysfs at sysfsRoot)", err)
	case err != nil:
		if log != nil {
			log.Warn("VPP uplink: cannot read the VF in sysfs; using the configuration as it is", "error", err)
		}
		return nil
	}
	switch u.Driver {
	case vpp.DriverRDMA:
		if vf.Netdev == "" {
			return fmt.Errorf("VF %s has no netdev (driver %q): rdma needs it on mlx5_core", vf.PCIAddress, vf.Driver)
		}
		if u.HostIf != "" && u.HostIf != vf.Netdev {
			return fmt.Errorf("hostIf %s is not VF %s's netdev %s", u.HostIf, vf.PCIAddress, vf.Netdev)
		}
		if u.MAC != nil && u.MAC.String() != vf.MAC.String() {
			return fmt.Errorf("mac %s is not VF %s's MAC %s: the NIC would deliver nothing to VPP", u.MAC, vf.PCIAddress, vf.MAC)
		}
		u.HostIf, u.MAC = vf.Netdev, vf.MAC
	case vpp.DriverDev:
		if vf.Driver != "vfio-pci" && log != nil {
			log.Warn("VPP uplink: the VF is not bound to vfio-pci; VPP's device API will fail to attach it (see vpp/README.md)",
				"vf", vf.PCIAddress, "driver", vf.Driver)
		}
	}
	return nil
}

// addressesFromNetworkStatus reads the VF's attachment from the network-status annotation
// and returns its addresses with the configured prefix lengths.
func addressesFromNetworkStatus(src networkStatusSource, pci string) ([]netip.Prefix, error) {
	if src.AnnotationsFile == "" {
		return nil, errors.New("annotationsFile is not set (a downward API volume of metadata.annotations)")
	}
	raw, err := os.ReadFile(src.AnnotationsFile)
	if err != nil {
		return nil, err
	}
	val, err := sriov.DownwardAnnotation(raw, sriov.NetworkStatusAnnotation)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", src.AnnotationsFile, err)
	}
	atts, err := sriov.ParseNetworkStatus([]byte(val))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", src.AnnotationsFile, err)
	}
	att, err := sriov.FindAttachment(atts, pci, src.Network)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", src.AnnotationsFile, err)
	}
	bits6 := orDefault(src.PrefixLength6, 64)
	var out []netip.Prefix
	for _, ip := range att.IPs {
		bits := bits6
		if ip.Is4() {
			if src.PrefixLength <= 0 {
				return nil, fmt.Errorf("prefixLength is not set for %s (Multus reports addresses without it)", ip)
			}
			bits = src.PrefixLength
		}
		if _, err := ip.Prefix(bits); err != nil {
			return nil, fmt.Errorf("%s/%d: %w", ip, bits, err)
		}
		out = append(out, netip.PrefixFrom(ip, bits)) // the interface's address, not masked
	}
	return out, nil
}

func orDefault[T comparable](v, def T) T {
	var zero T
	if v == zero {
		return def
	}
	return v
}

// vppNode owns VPP mode: the vpp.Agent and the loop that feeds it the meshed pods.
type vppNode struct {
	agent *vpp.Agent
	cfg   vpp.Config
	log   *slog.Logger

	ctx    context.Context // ends with Close
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu       sync.Mutex
	sidecars int    // desired, as last given to the agent
	meshErr  string // the mesh file's pods could not be used
}

// startVPP starts VPP mode when -vpp-config is set (nil, nil otherwise). A bad config file is
// an error; VPP itself being absent or incompatible is not: the agent retries (absent) or
// gives up on VPP alone (incompatible), and /v1/vpp says so.
func startVPP(a args, pods []meshPod, log *slog.Logger) (*vppNode, error) {
	if a.vppConfig == "" {
		return nil, nil
	}
	cfg, err := loadVPPConfig(a.vppConfig, a.vppAPISocket, os.Environ(), log)
	if err != nil {
		return nil, err
	}
	ag, err := vpp.New(cfg, a.vppOpts...)
	if err != nil {
		return nil, fmt.Errorf("-vpp-config %s: %w", a.vppConfig, err)
	}
	v := &vppNode{agent: ag, cfg: ag.Config(), log: log}
	v.ctx, v.cancel = context.WithCancel(context.Background())
	v.reconcile(v.ctx, pods)
	v.wg.Add(1)
	go func() {
		defer v.wg.Done()
		v.reportGivingUp()
	}()
	log.Info("VPP mode on", "api_socket", v.cfg.APISocket, "uplink_driver", v.cfg.Uplink.Driver, "handoff_dir", v.cfg.HandoffDir, "sidecars", len(pods))
	return v, nil
}

// Close stops feeding the agent and disconnects from VPP; VPP keeps its state, so sidecars
// keep working while the agent restarts.
func (v *vppNode) Close() error {
	v.cancel()
	v.wg.Wait()
	return v.agent.Close()
}

// reconcile gives the agent the pods as its desired sidecars. Not being connected is fine:
// the agent applies the state when VPP is there; a failed apply is retried by the agent.
func (v *vppNode) reconcile(ctx context.Context, pods []meshPod) {
	d := vpp.Desired{}
	for _, p := range pods {
		d.Sidecars = append(d.Sidecars, vpp.Sidecar{ID: p.UID, Name: p.Name})
	}
	err := v.agent.Reconcile(ctx, d)
	var inc *vpp.IncompatibleError
	switch {
	case err == nil:
		v.setMesh(len(pods), "")
	case errors.Is(err, vpp.ErrNotConnected), errors.As(err, &inc), ctx.Err() != nil:
		v.setMesh(len(pods), "") // kept for later, or VPP mode is off (status says why)
	case errors.Is(err, vpp.ErrInvalidDesired):
		// The pods themselves are invalid (bad UID): the previous sidecars stay.
		v.setMesh(-1, err.Error())
		v.log.Error("meshed pods not given to VPP; the previous set stays", "error", err)
	default:
		v.setMesh(len(pods), "")
		v.log.Warn("VPP apply failed; the agent retries with backoff", "error", err)
	}
}

func (v *vppNode) setMesh(sidecars int, meshErr string) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if sidecars >= 0 {
		v.sidecars = sidecars
	}
	v.meshErr = meshErr
}

// applyMesh gives the agent the pods of a new read of the mesh file (watchMeshFile in
// run.go); a bad file leaves the previous sidecars in place.
func (v *vppNode) applyMesh(m mesh, err error) {
	if err != nil {
		v.setMesh(-1, err.Error())
		v.log.Error("mesh file not given to VPP; the previous sidecars stay", "error", err)
		return
	}
	v.reconcile(v.ctx, m.Pods)
}

// reportGivingUp logs, once, that the agent gave up on VPP (incompatible); the status says
// why as well. Mesh changes after that are kept as desired state only.
func (v *vppNode) reportGivingUp() {
	select {
	case <-v.ctx.Done():
	case <-v.agent.Done():
		if err := v.agent.Err(); err != nil {
			v.log.Error("VPP mode off: VPP is not compatible with this agent; BPF acceleration is unaffected. "+
				"Run a VPP 25.02 with the af_packet, rdma and dev plugins loaded, or restart the agent without -vpp-config", "error", err)
		}
	}
}

// vppStatus is served on GET /v1/vpp (meshctl vpp status).
type vppStatus struct {
	vpp.Status
	APISocket   string `json:"apiSocket"`
	StatsSocket string `json:"statsSocket"`
	HandoffDir  string `json:"handoffDir"`
	// Sidecars is how many meshed pods the agent was given (each gets a namespace once
	// applied: compare with namespaces).
	Sidecars   int                     `json:"sidecars"`
	Interfaces []vpp.InterfaceCounters `json:"interfaces"`
	MeshError  string                  `json:"meshError,omitempty"`
}

func (v *vppNode) status() vppStatus {
	st := vppStatus{Status: v.agent.Status(), APISocket: v.cfg.APISocket, StatsSocket: v.cfg.StatsSocket, HandoffDir: v.cfg.HandoffDir,
		Interfaces: []vpp.InterfaceCounters{}}
	if st.Namespaces == nil {
		st.Namespaces = []string{}
	}
	if st.Connected {
		if cs, err := v.agent.Counters(); err == nil && cs != nil {
			st.Interfaces = cs
		}
	}
	v.mu.Lock()
	st.Sidecars, st.MeshError = v.sidecars, v.meshErr
	v.mu.Unlock()
	return st
}

// vppCollector exports VPP mode's state at scrape time.
type vppCollector struct {
	v *vppNode

	connected, info, connects, incompatible, lastApply, lastApplyOK, owned, namespaces, sidecars, statsUp *prometheus.Desc
	rxPackets, rxBytes, txPackets, txBytes, drops, rxErrors, txErrors                                     *prometheus.Desc
}

func newVPPCollector(v *vppNode) *vppCollector {
	d := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc("meshturbo_vpp_"+name, help, labels, nil)
	}
	ifl := []string{"interface", "sw_if_index"}
	return &vppCollector{
		v:            v,
		connected:    d("connected", "1 while the agent is connected to a compatible VPP."),
		info:         d("info", "VPP's version (show_version) of the current or last connection.", "version"),
		connects:     d("connects_total", "Connections made to VPP; a rise means VPP restarted (everything was re-applied)."),
		incompatible: d("incompatible", "1 when the agent gave up on VPP: its binary API or version is not one the agent can drive."),
		lastApply:    d("last_apply_timestamp_seconds", "When the desired state was last applied (0: never)."),
		lastApplyOK:  d("last_apply_success", "1 if the last apply succeeded, 0 if VPP refused a request or did not answer (retried with backoff)."),
		owned:        d("interfaces_owned", "Interfaces the agent owns in VPP (tagged meshturbo/…): the uplink."),
		namespaces:   d("app_namespaces", "App namespaces the agent applied (one per sidecar)."),
		sidecars:     d("sidecars_desired", "Meshed pods given to VPP mode (from the mesh file's pods)."),
		statsUp:      d("stats_up", "1 while VPP's stats segment is connected (interface counters)."),
		rxPackets:    d("interface_rx_packets_total", "Packets received on an owned interface (VPP stats segment /if/rx).", ifl...),
		rxBytes:      d("interface_rx_bytes_total", "Bytes received on an owned interface.", ifl...),
		txPackets:    d("interface_tx_packets_total", "Packets sent on an owned interface (/if/tx).", ifl...),
		txBytes:      d("interface_tx_bytes_total", "Bytes sent on an owned interface.", ifl...),
		drops:        d("interface_drops_total", "Packets VPP dropped on an owned interface (/if/drops).", ifl...),
		rxErrors:     d("interface_rx_errors_total", "Receive errors on an owned interface (/if/rx-error).", ifl...),
		txErrors:     d("interface_tx_errors_total", "Transmit errors on an owned interface (/if/tx-error).", ifl...),
	}
}

func (c *vppCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.connected, c.info, c.connects, c.incompatible, c.lastApply, c.lastApplyOK, c.owned,
		c.namespaces, c.sidecars, c.statsUp, c.rxPackets, c.rxBytes, c.txPackets, c.txBytes, c.drops, c.rxErrors, c.txErrors} {
		ch <- d
	}
}

func (c *vppCollector) Collect(ch chan<- prometheus.Metric) {
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	counter := func(d *prometheus.Desc, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	b := func(ok bool) float64 {
		if ok {
			return 1
		}
		return 0
	}
	st := c.v.status()
	gauge(c.connected, b(st.Connected))
	if st.Version != "" {
		gauge(c.info, 1, st.Version)
	}
	counter(c.connects, uint64(st.Connects))
	gauge(c.incompatible, b(st.Fatal != ""))
	if !st.LastApply.IsZero() {
		gauge(c.lastApply, float64(st.LastApply.UnixNano())/1e9)
		gauge(c.lastApplyOK, b(st.LastApplyError == ""))
	} else {
		gauge(c.lastApply, 0)
	}
	owned := 0
	if st.Uplink != nil && st.Connected {
		owned = 1
	}
	gauge(c.owned, float64(owned))
	gauge(c.namespaces, float64(len(st.Namespaces)))
	gauge(c.sidecars, float64(st.Sidecars))
	gauge(c.statsUp, b(st.Connected && st.StatsError == ""))
	for _, i := range st.Interfaces {
		l := []string{i.Name, strconv.FormatUint(uint64(i.SwIfIndex), 10)}
		counter(c.rxPackets, i.RxPackets, l...)
		counter(c.rxBytes, i.RxBytes, l...)
		counter(c.txPackets, i.TxPackets, l...)
		counter(c.txBytes, i.TxBytes, l...)
		counter(c.drops, i.Drops, l...)
		counter(c.rxErrors, i.RxErrors, l...)
		counter(c.txErrors, i.TxErrors, l...)
	}
}
