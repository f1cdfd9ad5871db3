package sriov

import (
	"bufio"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// buildSysfs builds the tree a testdata/*.sysfs description names in a temporary directory
// and returns its root. The descriptions hold sysfs's symbolic links (bus/pci/devices → the
// device, virtfn<n>, physfn, driver) as text, so that the repository holds no symlinks.
func buildSysfs(t *testing.T, desc string) string {
	t.Helper()
	root := t.TempDir()
	f, err := os.Open(filepath.Join("testdata", desc))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		fields := strings.Fields(line)
		if len(fields) < 2 {
			t.Fatalf("%s:%d: want KIND PATH [ARG]: %q", desc, n, line)
		}
		p := filepath.Join(root, fields[1])
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		switch {
		case fields[0] == "d" && len(fields) == 2:
			err = os.MkdirAll(p, 0o755)
		case fields[0] == "f" && len(fields) >= 3:
			err = os.WriteFile(p, []byte(strings.Join(fields[2:], " ")+"\n"), 0o644)
		case fields[0] == "l" && len(fields) == 3:
			err = os.Symlink(fields[2], p)
		default:
			t.Fatalf("%s:%d: bad entry %q", desc, n, line)
		}
		if err != nil {
			t.Fatalf("%s:%d: %v", desc, n, err)
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return root
}

func mac(t *testing.T, s string) net.HardwareAddr {
	t.Helper()
	m, err := net.ParseMAC(s)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func TestDiscoverIntel(t *testing.T) {
	root := buildSysfs(t, "intel-x710.sysfs")
	pfs, err := Discover(root)
	if err != nil {
		t.Fatal(err)
	}
	if len(pfs) != 2 {
		t.Fatalf("got %d PFs, want 2 (the NVMe disk is no PF): %+v", len(pfs), pfs)
	}
	pf := pfs[0]
	if pf.PCIAddress != "0000:3b:00.0" || pf.Driver != "i40e" || pf.Netdev != "ens1f0" || pf.MTU != 9000 ||
		pf.TotalVFs != 64 || pf.NumVFs != 2 || pf.Vendor != "0x8086" || pf.Device != "0x1572" || pf.NUMANode != 0 {
		t.Errorf("PF 0 = %+v", pf)
	}
	if got, want := pf.MAC.String(), "3c:fd:fe:a1:b2:c0"; got != want {
		t.Errorf("PF MAC %s, want %s", got, want)
	}
	if len(pf.VFs) != 2 {
		t.Fatalf("PF 0 has %d VFs, want 2", len(pf.VFs))
	}
	vf0, vf1 := pf.VFs[0], pf.VFs[1]
	if vf0.PCIAddress != "0000:3b:02.0" || vf0.Index != 0 || vf0.PF != "0000:3b:00.0" || vf0.Driver != "iavf" ||
		vf0.Netdev != "ens1f0v0" || vf0.MTU != 1500 || vf0.Device != "0x154c" {
		t.Errorf("VF 0 = %+v", vf0)
	}
	if vf0.MAC.String() != "02:00:00:00:3b:20" {
		t.Errorf("VF 0 MAC %s", vf0.MAC)
	}
	if vf1.PCIAddress != "0000:3b:02.1" || vf1.Index != 1 || vf1.Driver != "vfio-pci" || vf1.Netdev != "" || vf1.MAC != nil || vf1.MTU != 0 {
		t.Errorf("VF 1 (vfio-pci, no netdev) = %+v", vf1)
	}
	if p1 := pfs[1]; p1.PCIAddress != "0000:3b:00.1" || p1.NumVFs != 0 || len(p1.VFs) != 0 || p1.Netdev != "ens1f1" {
		t.Errorf("PF 1 = %+v", p1)
	}
}

func TestDiscoverMellanox(t *testing.T) {
	root := buildSysfs(t, "mellanox-cx5.sysfs")
	pfs, err := Discover(root)
	if err != nil {
		t.Fatal(err)
	}
	if len(pfs) != 1 || len(pfs[0].VFs) != 2 {
		t.Fatalf("got %+v, want one PF with two VFs", pfs)
	}
	pf := pfs[0]
	if pf.Driver != "mlx5_core" || pf.NUMANode != 1 || pf.Netdev != "ens2f0np0" {
		t.Errorf("PF = %+v", pf)
	}
	for i, want := range []struct{ addr, netdev, mac string }{
		{"0000:af:00.2", "ens2f0v0", "02:15:b3:00:af:02"},
		{"0000:af:00.3", "ens2f0v1", "02:15:b3:00:af:03"},
	} {
		vf := pf.VFs[i]
		if vf.PCIAddress != want.addr || vf.Netdev != want.netdev || vf.MAC.String() != want.mac || vf.Driver != "mlx5_core" || vf.Index != i {
			t.Errorf("VF %d = %+v, want %+v", i, vf, want)
		}
	}
}

func TestLookupVF(t *testing.T) {
	root := buildSysfs(t, "intel-x710.sysfs")
	vf, err := LookupVF(root, "0000:3b:02.1")
	if err != nil {
		t.Fatal(err)
	}
	if vf.Index != 1 || vf.PF != "0000:3b:00.0" || vf.Driver != "vfio-pci" {
		t.Errorf("got %+v", vf)
	}
	for _, tc := range []struct{ addr, want string }{
		{"0000:3b:00.0", "not a VF"},
		{"0000:3b:09.0", "no such file"},
		{"3b:02.0", "not a PCI address"},
	} {
		_, err := LookupVF(root, tc.addr)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("LookupVF(%s) = %v, want an error containing %q", tc.addr, err, tc.want)
		}
	}
}

func TestDiscoverNoPCIBus(t *testing.T) {
	if _, err := Discover(t.TempDir()); err == nil {
		t.Fatal("Discover on an empty root succeeded")
	}
}

func TestAllocatedVFs(t *testing.T) {
	const res = "intel.com/intel_sriov_netdevice"
	if got := ResourceEnvName(res); got != "PCIDEVICE_INTEL_COM_INTEL_SRIOV_NETDEVICE" {
		t.Fatalf("ResourceEnvName = %s", got)
	}
	for _, tc := range []struct {
		name    string
		env     []string
		want    []string
		wantErr string
	}{
		{"one", []string{"PATH=/bin", "PCIDEVICE_INTEL_COM_INTEL_SRIOV_NETDEVICE=0000:3b:02.0"}, []string{"0000:3b:02.0"}, ""},
		{"two", []string{"PCIDEVICE_INTEL_COM_INTEL_SRIOV_NETDEVICE=0000:3b:02.0,0000:3b:02.1"}, []string{"0000:3b:02.0", "0000:3b:02.1"}, ""},
		{"missing", []string{"PATH=/bin"}, nil, "is not set"},
		{"empty", []string{"PCIDEVICE_INTEL_COM_INTEL_SRIOV_NETDEVICE="}, nil, "is empty"},
		{"garbage", []string{"PCIDEVICE_INTEL_COM_INTEL_SRIOV_NETDEVICE=eth0"}, nil, "not a PCI address"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := AllocatedVFs(tc.env, res)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v, want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil || strings.Join(got, ",") != strings.Join(tc.want, ",") {
				t.Fatalf("got %v, %v; want %v", got, err, tc.want)
			}
		})
	}
}

func TestNetworkStatus(t *testing.T) {
	raw, err := os.ReadFile("testdata/network-status.json")
	if err != nil {
		t.Fatal(err)
	}
	atts, err := ParseNetworkStatus(raw)
	if err != nil {
		t.Fatal(err)
	}
	a, err := FindAttachment(atts, "0000:3b:02.0", "")
	if err != nil {
		t.Fatal(err)
	}
	if a.Interface != "net1" || a.IPs[0] != netip.MustParseAddr("192.168.50.11") || a.MAC.String() != mac(t, "02:00:00:00:3b:20").String() {
		t.Errorf("by PCI address: %+v", a)
	}
	if a, err := FindAttachment(atts, "0000:99:00.0", "sriov-vpp"); err != nil || a.Interface != "net1" {
		t.Errorf("by network name: %+v, %v", a, err)
	}
	if _, err := FindAttachment(atts, "0000:99:00.0", "other"); err == nil {
		t.Error("no match succeeded")
	}
	if _, err := ParseNetworkStatus([]byte(`[{"name":"x","ips":["300.1.1.1"]}]`)); err == nil {
		t.Error("a bad IP parsed")
	}
	if _, err := FindAttachment([]Attachment{{Network: "n", PCIAddress: "0000:3b:02.0"}}, "0000:3b:02.0", ""); err == nil ||
		!strings.Contains(err.Error(), "no IP address yet") {
		t.Errorf("attachment without IP: %v", err)
	}
}

func TestDownwardAnnotation(t *testing.T) {
	raw, err := os.ReadFile("testdata/network-status.json")
	if err != nil {
		t.Fatal(err)
	}
	// The kubelet writes each annotation as key="Go-quoted value", sorted by key.
	file := "kubernetes.io/config.seen=\"2026-01-01T00:00:00Z\"\n" +
		NetworkStatusAnnotation + "=" + strconv.Quote(string(raw)) + "\n"
	v, err := DownwardAnnotation([]byte(file), NetworkStatusAnnotation)
	if err != nil {
		t.Fatal(err)
	}
	if v != string(raw) {
		t.Fatalf("round trip changed the value:\n%s", v)
	}
	if _, err := DownwardAnnotation([]byte(file), "missing"); err == nil {
		t.Fatal("missing annotation found")
	}
}
