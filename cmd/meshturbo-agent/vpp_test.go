package main

import (
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/meshturbo/meshturbo/bpf"
	"github.com/meshturbo/meshturbo/vpp"
	"github.com/meshturbo/meshturbo/vpp/vpptest"
)

// writeVPPConfig writes a -vpp-config for an af_packet uplink on eth1 against the socket.
func writeVPPConfig(t *testing.T, socket, handoff string) string {
	t.Helper()
	dir := t.TempDir()
	key := filepath.Join(dir, "secret")
	if err := os.WriteFile(key, []byte("0123456789abcdef0123456789abcdef\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := fmt.Sprintf(`apiSocket: %s
uplink:
  driver: af_packet
  hostIf: eth1
  mtu: 1500
  rxMode: interrupt
  addresses: [192.168.50.11/24]
routes:
- {prefix: 10.96.0.0/12, via: 192.168.50.1}
appSocketDir: /run/vpp/app_ns_sockets
handoffDir: %s
secretKeyFile: %s
requestTimeout: 2s
`, socket, handoff, key)
	p := filepath.Join(dir, "vpp.yaml")
	if err := os.WriteFile(p, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func writeMesh(t *testing.T, path string, pods ...string) {
	t.Helper()
	m := mesh{SidecarPorts: []uint16{15001}}
	for _, uid := range pods {
		m.Pods = append(m.Pods, meshPod{UID: uid, Name: "default/" + uid})
	}
	b, _ := json.Marshal(m)
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		<-tick.C
	}
}

func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

func TestLoadVPPConfig(t *testing.T) {
	dir := t.TempDir()
	write := func(body string) string {
		p := filepath.Join(dir, fmt.Sprintf("c%d.yaml", time.Now().UnixNano()))
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	env := []string{"PCIDEVICE_INTEL_COM_SRIOV_VPP=0000:3b:02.1", "PCIDEVICE_INTEL_COM_TWO=0000:3b:02.1,0000:3b:02.2"}
	good := write(`uplink: {driver: dev, resource: intel.com/sriov_vpp, mac: "02:00:00:00:3b:21", addresses: [192.168.50.11/24, "fd00::11/64"]}
routes: [{prefix: 10.96.0.0/12, via: 192.168.50.1}]
handoffDir: /run/meshturbo/vpp
resyncInterval: 1m
`)
	cfg, err := loadVPPConfig(good, "/tmp/override.sock", env, nil)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Uplink.PCIAddress != "0000:3b:02.1" || cfg.APISocket != "/tmp/override.sock" || len(cfg.Uplink.Addresses) != 2 ||
		cfg.Uplink.MAC.String() != "02:00:00:00:3b:21" || len(cfg.Routes) != 1 || cfg.ResyncInterval != time.Minute {
		t.Errorf("config %+v", cfg)
	}
	for _, tc := range []struct{ body, want string }{
		{`uplink: {driver: dev, pciAdress: x}`, "field pciAdress not found"},
		{`uplink: {driver: dev, resource: intel.com/two, addresses: [10.0.0.1/24]}`, "lists 2 VFs"},
		{`uplink: {driver: dev, resource: intel.com/none}`, "uplink.resource"},
		{`uplink: {driver: dev, resource: intel.com/sriov_vpp, pciAddress: 0000:3b:02.1}`, "not both"},
		{`uplink: {driver: af_packet, hostIf: eth1, addresses: [10.0.0.1]}`, "uplink.addresses[0]"},
		{`uplink: {driver: af_packet, hostIf: eth1, mac: nope}`, "uplink.mac"},
		{`routes: [{prefix: 10.0.0.0/8, via: nope}]`, "routes[0]"},
		{`secretKeyFile: /nonexistent/key`, "secretKeyFile"},
	} {
		_, err := loadVPPConfig(write(tc.body), "", env, nil)
		if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), "-vpp-config") {
			t.Errorf("%s: err %v, want one naming the file and %q", tc.body, err, tc.want)
		}
	}
	// A config the vpp package rejects stops startVPP with the field named.
	bad := write(`uplink: {driver: dpdk}
handoffDir: /run/meshturbo/vpp
`)
	if _, err := startVPP(args{vppConfig: bad}, nil, testLogger(t)); err == nil || !strings.Contains(err.Error(), "Uplink.Driver") {
		t.Errorf("startVPP with driver dpdk: %v", err)
	}
	if v, err := startVPP(args{}, nil, testLogger(t)); v != nil || err != nil {
		t.Errorf("startVPP without -vpp-config: %v, %v", v, err)
	}
}

// TestVPPAbsent: no VPP behind the socket — the VPP part runs on, not connected, and says which
// socket and what to fix; metrics say disconnected.
func TestVPPAbsent(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "no-vpp", "api.sock")
	meshFile := filepath.Join(dir, "mesh.json")
	writeMesh(t, meshFile, "pod-a")
	v, err := startVPP(args{vppConfig: writeVPPConfig(t, sock, filepath.Join(dir, "handoff")), meshFile: meshFile, meshPoll: 10 * time.Millisecond},
		[]meshPod{{UID: "pod-a"}}, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := v.Close(); err != nil {
			t.Error(err)
		}
	}()
	waitFor(t, "a connect error in the status", func() bool { return v.status().ConnectError != "" })
	st := v.status()
	if st.Connected || !strings.Contains(st.ConnectError, sock) || !strings.Contains(st.ConnectError, "socksvr") || st.Sidecars != 1 {
		t.Fatalf("status %+v", st)
	}
	m := scrape(t, v)
	for _, want := range []string{"meshturbo_vpp_connected 0", "meshturbo_vpp_incompatible 0", "meshturbo_vpp_interfaces_owned 0", "meshturbo_vpp_sidecars_desired 1"} {
		if !strings.Contains(m, want) {
			t.Errorf("metrics lack %q:\n%s", want, m)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "handoff", "pod-a")); !os.IsNotExist(err) {
		t.Errorf("hand-off directory written without VPP: %v", err)
	}
}

// TestVPPIncompatible: a VPP of another release — the agent gives up on VPP only, and the
// status and metrics say why.
func TestVPPIncompatible(t *testing.T) {
	fake := vpptest.Start(t, vpptest.WithVersion("24.10-release"))
	dir := t.TempDir()
	v, err := startVPP(args{vppConfig: writeVPPConfig(t, fake.Path(), filepath.Join(dir, "handoff"))}, nil, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	waitFor(t, "the agent to give up", func() bool { return v.status().Fatal != "" })
	if st := v.status(); !strings.Contains(st.Fatal, "outside the supported range") || st.Version != "" && st.Connected {
		t.Fatalf("status %+v", st)
	}
	if m := scrape(t, v); !strings.Contains(m, "meshturbo_vpp_incompatible 1") {
		t.Errorf("metrics do not say VPP is incompatible:\n%s", m)
	}
}

// scrape returns the VPP collector's metrics in the text format, through a pedantic registry.
func scrape(t *testing.T, v *vppNode) string {
	t.Helper()
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(newVPPCollector(v))
	rec := httptest.NewRecorder()
	promhttp.HandlerFor(reg, promhttp.HandlerOpts{ErrorHandling: promhttp.HTTPErrorOnError}).ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	if rec.Code != 200 {
		t.Fatalf("metrics: %d %s", rec.Code, rec.Body)
	}
	return rec.Body.String()
}

// meshctlVPP is what meshctl's `vpp status` reads from GET /v1/vpp (cmd/meshctl/types.go).
type meshctlVPP struct {
	Connected bool   `json:"connected"`
	Version   string `json:"version"`
	Connects  int    `json:"connects"`
	Uplink    *struct {
		SwIfIndex uint32 `json:"swIfIndex"`
		Name      string `json:"name"`
		Driver    string `json:"driver"`
		Device    string `json:"device"`
	} `json:"uplink"`
	Namespaces     []string                `json:"namespaces"`
	LastApply      time.Time               `json:"lastApply"`
	LastApplyError string                  `json:"lastApplyError"`
	Fatal          string                  `json:"fatal"`
	ConnectError   string                  `json:"connectError"`
	Sidecars       int                     `json:"sidecars"`
	Interfaces     []vpp.InterfaceCounters `json:"interfaces"`
}

// TestRunVPPMode runs the whole agent (BPF in its fallback, forced) with VPP mode against the
// fake VPP: sidecars from the mesh file get namespaces and hand-off files, /v1/vpp and
// /metrics report them with the uplink's counters, a pod change reconciles, a VPP restart
// re-applies everything.
func TestRunVPPMode(t *testing.T) {
	requireRoot(t) // the BPF half, even in fallback, probes the kernel
	fake := vpptest.Start(t)
	stats := vpptest.NewStats()
	dir := t.TempDir()
	handoff := filepath.Join(dir, "handoff")
	meshFile := filepath.Join(dir, "mesh.json")
	writeMesh(t, meshFile, "pod-a")
	a := args{
		cgroup: testCgroup(t), pinPath: filepath.Join(bpf.DefaultBPFFS, "meshturbo-agent-test-"+suffix()),
		probeFailure: bpf.FeatureSockMapLink, meshFile: meshFile, meshPoll: 10 * time.Millisecond,
		vppConfig: writeVPPConfig(t, fake.Path(), handoff),
		vppOpts:   []vpp.Option{vpp.WithStatsAdapter(stats.Adapter)},
	}
	addr := startRun(t, a)
	status := func() meshctlVPP {
		var st meshctlVPP
		if err := json.Unmarshal([]byte(get(t, "http://"+addr+"/v1/vpp")), &st); err != nil {
			t.Fatal(err)
		}
		return st
	}
	waitFor(t, "namespace mt-pod-a", func() bool {
		st := status()
		return st.Connected && slices.Equal(st.Namespaces, []string{"mt-pod-a"}) && st.LastApplyError == ""
	})
	conf, err := os.ReadFile(filepath.Join(handoff, "pod-a", vpp.VCLConfFile))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(conf), "namespace-id mt-pod-a") || !strings.Contains(string(conf), "app-socket-api /run/vpp/app_ns_sockets/mt-pod-a") {
		t.Errorf("vcl.conf:\n%s", conf)
	}
	if _, err := os.Stat(filepath.Join(handoff, "pod-a", vpp.FragmentFile)); err != nil {
		t.Error(err)
	}
	st := status()
	if st.Uplink == nil || st.Uplink.Driver != "af_packet" || st.Uplink.Name != "host-eth1" || st.Version != "25.02-release" || st.Sidecars != 1 {
		t.Fatalf("status %+v", st)
	}
	var inVPP []string
	fake.Do(func(s *vpptest.State) { inVPP = s.NamespaceIDs() })
	if !slices.Equal(inVPP, []string{"default", "mt-pod-a"}) {
		t.Errorf("namespaces in VPP: %v", inVPP)
	}

	// Counters of the uplink, from the stats segment; another interface's are not shown.
	stats.Set(st.Uplink.SwIfIndex, vpptest.Counters{Name: "host-eth1", RxPackets: 42, RxBytes: 4200, TxPackets: 7, TxBytes: 700, Drops: 3, RxErrors: 1})
	stats.Set(st.Uplink.SwIfIndex+5, vpptest.Counters{Name: "not-ours", RxPackets: 9})
	waitFor(t, "uplink counters", func() bool { st := status(); return len(st.Interfaces) == 1 && st.Interfaces[0].RxPackets == 42 })
	metrics := get(t, "http://"+addr+"/metrics")
	for _, want := range []string{
		"meshturbo_vpp_connected 1",
		`meshturbo_vpp_info{version="25.02-release"} 1`,
		"meshturbo_vpp_connects_total 1",
		"meshturbo_vpp_last_apply_success 1",
		"meshturbo_vpp_interfaces_owned 1",
		"meshturbo_vpp_app_namespaces 1",
		"meshturbo_vpp_stats_up 1",
		fmt.Sprintf(`meshturbo_vpp_interface_rx_packets_total{interface="host-eth1",sw_if_index="%d"} 42`, st.Uplink.SwIfIndex),
		fmt.Sprintf(`meshturbo_vpp_interface_tx_bytes_total{interface="host-eth1",sw_if_index="%d"} 700`, st.Uplink.SwIfIndex),
		fmt.Sprintf(`meshturbo_vpp_interface_drops_total{interface="host-eth1",sw_if_index="%d"} 3`, st.Uplink.SwIfIndex),
		"meshturbo_accel_enabled 0", // the BPF half is untouched by VPP mode
	} {
		if !strings.Contains(metrics, want) {
			t.Errorf("metrics lack %q", want)
		}
	}
	if strings.Contains(metrics, "not-ours") {
		t.Error("metrics show an interface the agent does not own")
	}

	// The pods change: pod-a goes, pod-b comes.
	writeMesh(t, meshFile, "pod-b")
	waitFor(t, "namespace mt-pod-b only", func() bool { return slices.Equal(status().Namespaces, []string{"mt-pod-b"}) })
	if _, err := os.Stat(filepath.Join(handoff, "pod-a")); !os.IsNotExist(err) {
		t.Errorf("pod-a's hand-off directory after it left: %v", err)
	}
	if _, err := os.Stat(filepath.Join(handoff, "pod-b", vpp.VCLConfFile)); err != nil {
		t.Error(err)
	}

	// VPP restarts with nothing: everything is applied again through a new connection.
	if err := fake.Restart(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "re-apply after the VPP restart", func() bool {
		st := status()
		return st.Connected && st.Connects == 2 && slices.Equal(st.Namespaces, []string{"mt-pod-b"}) && st.LastApplyError == ""
	})
	fake.Do(func(s *vpptest.State) { inVPP = s.NamespaceIDs() })
	if !slices.Equal(inVPP, []string{"default", "mt-pod-b"}) {
		t.Errorf("namespaces in VPP after its restart: %v", inVPP)
	}
	if stats.Connects() < 2 {
		t.Errorf("stats segment connected %d times; want a reconnect with VPP", stats.Connects())
	}

	// A bad pod UID in the mesh file: reported, the previous sidecars stay.
	writeMesh(t, meshFile, "bad uid")
	waitFor(t, "the mesh error", func() bool {
		var raw map[string]any
		_ = json.Unmarshal([]byte(get(t, "http://"+addr+"/v1/vpp")), &raw)
		s, _ := raw["meshError"].(string)
		return strings.Contains(s, `"bad uid"`)
	})
	if st := status(); !slices.Equal(st.Namespaces, []string{"mt-pod-b"}) {
		t.Errorf("namespaces after a bad mesh file: %v", st.Namespaces)
	}
}

// TestRunWithoutVPP: without -vpp-config the agent serves no /v1/vpp (meshctl says "does not
// run VPP").
func TestRunWithoutVPP(t *testing.T) {
	requireRoot(t)
	addr := startRun(t, args{cgroup: testCgroup(t), pinPath: filepath.Join(bpf.DefaultBPFFS, "meshturbo-agent-test-"+suffix()),
		sidecarPorts: "15001", probeFailure: bpf.FeatureSockMapLink})
	resp, err := http.Get("http://" + addr + "/v1/vpp")
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusNotFound {
		t.Fatalf("GET /v1/vpp without VPP mode: %s", resp.Status)
	}
}

// writeSysfsVF builds the sysfs entries of a Mellanox VF (0000:3b:02.1, VF 1 of PF
// 0000:3b:00.0, on mlx5_core with netdev ens2f0v1) and of an Intel VF on vfio-pci
// (0000:5e:02.0, no netdev) under a temporary root, as the kernel shows them.
func writeSysfsVF(t *testing.T) string {
	t.Helper()
	root := t.TempDir()
	devs := filepath.Join(root, "bus", "pci", "devices")
	file := func(path, val string) {
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(val+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	link := func(path, target string) {
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(target, path); err != nil {
			t.Fatal(err)
		}
	}
	for _, f := range []struct{ pf, vf, vendor, device, driver, netdev, mac string }{
		{"0000:3b:00.0", "0000:3b:02.1", "0x15b3", "0x1018", "mlx5_core", "ens2f0v1", "02:15:b3:00:af:02"},
		{"0000:5e:00.0", "0000:5e:02.0", "0x8086", "0x154c", "vfio-pci", "", ""},
	} {
		vf := filepath.Join(devs, f.vf)
		file(filepath.Join(vf, "vendor"), f.vendor)
		file(filepath.Join(vf, "device"), f.device)
		file(filepath.Join(vf, "numa_node"), "0")
		link(filepath.Join(vf, "driver"), "../../../bus/pci/drivers/"+f.driver)
		link(filepath.Join(vf, "physfn"), "../"+f.pf)
		link(filepath.Join(devs, f.pf, "virtfn1"), "../"+f.vf)
		if f.netdev != "" {
			file(filepath.Join(vf, "net", f.netdev, "address"), f.mac)
			file(filepath.Join(vf, "net", f.netdev, "mtu"), "1500")
		}
	}
	return root
}

// TestLoadVPPConfigKubernetes: with the device plugin's resource, the rdma uplink's netdev and
// MAC come from sysfs (a configured MAC must be the VF's), and the addresses from the Multus
// network-status annotation in a downward API file.
func TestLoadVPPConfigKubernetes(t *testing.T) {
	dir := t.TempDir()
	sysfs := writeSysfsVF(t)
	status := `[{"name":"cbr0","interface":"eth0","ips":["10.244.1.17"],"default":true},` +
		`{"name":"kube-system/sriov-vpp","interface":"net1","ips":["192.168.50.11","fd00:50::11"],` +
		`"device-info":{"type":"pci","version":"1.1.0","pci":{"pci-address":"0000:3b:02.1"}}}]`
	annotations := filepath.Join(dir, "annotations")
	body := "kubernetes.io/config.seen=\"2026-01-01T00:00:00Z\"\n" + sriovNetworkStatusKey + "=" + strconv.Quote(status) + "\n"
	if err := os.WriteFile(annotations, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	write := func(body string) string {
		p := filepath.Join(dir, fmt.Sprintf("c%d.yaml", time.Now().UnixNano()))
		if err := os.WriteFile(p, []byte(body+"handoffDir: /run/meshturbo/vpp\nsysfsRoot: "+sysfs+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	env := []string{"PCIDEVICE_NVIDIA_COM_SRIOV_VPP=0000:3b:02.1", "PCIDEVICE_INTEL_COM_SRIOV_VPP=0000:5e:02.0"}
	netStatus := fmt.Sprintf("networkStatus: {annotationsFile: %s, prefixLength: 24}", annotations)

	cfg, err := loadVPPConfig(write("uplink: {driver: rdma, resource: nvidia.com/sriov_vpp, "+netStatus+"}\n"), "", env, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	if u := cfg.Uplink; u.HostIf != "ens2f0v1" || u.MAC.String() != "02:15:b3:00:af:02" ||
		fmt.Sprint(u.Addresses) != "[192.168.50.11/24 fd00:50::11/64]" {
		t.Errorf("uplink %+v", u)
	}
	ag, err := vpp.New(cfg) // what startVPP does next: the config must pass
	if err != nil {
		t.Fatal(err)
	}
	if err := ag.Close(); err != nil {
		t.Fatal(err)
	}

	cfg, err = loadVPPConfig(write("uplink: {driver: dev, resource: intel.com/sriov_vpp, addresses: [192.168.60.11/24]}\n"), "", env, testLogger(t))
	if err != nil || cfg.Uplink.PCIAddress != "0000:5e:02.0" {
		t.Errorf("dev uplink: %+v, %v", cfg.Uplink, err)
	}

	for _, tc := range []struct{ body, want string }{
		{"uplink: {driver: rdma, resource: nvidia.com/sriov_vpp, mac: \"02:15:b3:00:af:99\", addresses: [10.0.0.1/24]}", "is not VF 0000:3b:02.1's MAC 02:15:b3:00:af:02"},
		{"uplink: {driver: rdma, resource: nvidia.com/sriov_vpp, hostIf: eth9, addresses: [10.0.0.1/24]}", "is not VF 0000:3b:02.1's netdev ens2f0v1"},
		{"uplink: {driver: rdma, resource: intel.com/sriov_vpp, addresses: [10.0.0.1/24]}", "has no netdev"},
		{"uplink: {driver: rdma, resource: nvidia.com/sriov_vpp, networkStatus: {annotationsFile: " + annotations + "}}", "prefixLength is not set"},
		{"uplink: {driver: rdma, resource: nvidia.com/sriov_vpp, addresses: [10.0.0.1/24], " + netStatus + "}", "not both"},
		{"uplink: {driver: dev, resource: intel.com/sriov_vpp, " + netStatus + "}", "no attachment for PCI device \"0000:5e:02.0\""},
		{"uplink: {driver: rdma, resource: nvidia.com/sriov_vpp, networkStatus: {annotationsFile: /nonexistent, prefixLength: 24}}", "uplink.networkStatus"},
	} {
		_, err := loadVPPConfig(write(tc.body+"\n"), "", env, testLogger(t))
		if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), "-vpp-config") {
			t.Errorf("%s: err %v, want one naming the file and %q", tc.body, err, tc.want)
		}
	}
	// Without a sysfs view of the VF, rdma needs hostIf and mac in the file.
	noSysfs := filepath.Join(dir, "nosysfs.yaml")
	if err := os.WriteFile(noSysfs, []byte("uplink: {driver: rdma, resource: nvidia.com/sriov_vpp, addresses: [10.0.0.1/24]}\nhandoffDir: /run/meshturbo/vpp\nsysfsRoot: "+dir+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := loadVPPConfig(noSysfs, "", env, testLogger(t)); err == nil || !strings.Contains(err.Error(), "set hostIf and mac") {
		t.Errorf("rdma without sysfs: %v", err)
	}
}

const sriovNetworkStatusKey = "k8s.v1.cni.cncf.io/network-status"
