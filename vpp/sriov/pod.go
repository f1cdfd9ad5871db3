package sriov

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
)

// NetworkStatusAnnotation is the pod annotation Multus writes with every attachment's
// interface, addresses and (for SR-IOV) PCI address.
const NetworkStatusAnnotation = "k8s.v1.cni.cncf.io/network-status"

// ResourceEnvName is the environment variable through which the SR-IOV network device plugin
// tells a container which PCI devices it allocated for resource (e.g.
// "intel.com/intel_sriov_netdevice" → "PCIDEVICE_INTEL_COM_INTEL_SRIOV_NETDEVICE").
func ResourceEnvName(resource string) string {
	r := strings.NewReplacer(".", "_", "/", "_", "-", "_").Replace(resource)
	return "PCIDEVICE_" + strings.ToUpper(r)
}

// AllocatedVFs returns the PCI addresses the device plugin allocated to the container for
// resource, read from environ (os.Environ() form, "KEY=value"). The plugin writes a
// comma-separated list.
func AllocatedVFs(environ []string, resource string) ([]string, error) {
	key := ResourceEnvName(resource)
	var val string
	found := false
	for _, kv := range environ {
		k, v, ok := strings.Cut(kv, "=")
		if ok && k == key {
			val, found = v, true
		}
	}
	if !found {
		return nil, fmt.Errorf("sriov: %s is not set: the SR-IOV device plugin allocated no %q device to this container (does the pod request it?)", key, resource)
	}
	var addrs []string
	for _, a := range strings.Split(val, ",") {
		a = strings.TrimSpace(a)
		if a == "" {
			continue
		}
		if !ValidPCIAddress(a) {
			return nil, fmt.Errorf("sriov: %s=%q: %q is not a PCI address", key, val, a)
		}
		addrs = append(addrs, a)
	}
	if len(addrs) == 0 {
		return nil, fmt.Errorf("sriov: %s is empty", key)
	}
	return addrs, nil
}

// Attachment is one entry of the Multus network-status annotation.
type Attachment struct {
	Network    string       // "name": the NetworkAttachmentDefinition, "ns/name"
	Interface  string       // interface name in the pod, e.g. "net1"
	IPs        []netip.Addr // addresses (without prefix length: Multus does not report it)
	MAC        net.HardwareAddr
	Default    bool   // the cluster default network
	PCIAddress string // from device-info, for SR-IOV attachments
}

type networkStatus struct {
	Name       string   `json:"name"`
	Interface  string   `json:"interface"`
	IPs        []string `json:"ips"`
	MAC        string   `json:"mac"`
	Default    bool     `json:"default"`
	DeviceInfo *struct {
		Type string `json:"type"`
		PCI  *struct {
			PCIAddress string `json:"pci-address"`
		} `json:"pci"`
	} `json:"device-info"`
}

// ParseNetworkStatus decodes the network-status annotation value.
func ParseNetworkStatus(value []byte) ([]Attachment, error) {
	var raw []networkStatus
	if err := json.Unmarshal(value, &raw); err != nil {
		return nil, fmt.Errorf("sriov: parse %s: %w", NetworkStatusAnnotation, err)
	}
	out := make([]Attachment, 0, len(raw))
	for i, r := range raw {
		a := Attachment{Network: r.Name, Interface: r.Interface, Default: r.Default}
		for _, s := range r.IPs {
			ip, err := netip.ParseAddr(s)
			if err != nil {
				return nil, fmt.Errorf("sriov: parse %s: entry %d (%s): %w", NetworkStatusAnnotation, i, r.Name, err)
			}
			a.IPs = append(a.IPs, ip)
		}
		if r.MAC != "" {
			mac, err := net.ParseMAC(r.MAC)
			if err != nil {
				return nil, fmt.Errorf("sriov: parse %s: entry %d (%s): %w", NetworkStatusAnnotation, i, r.Name, err)
			}
			a.MAC = mac
		}
		if r.DeviceInfo != nil && r.DeviceInfo.PCI != nil {
			a.PCIAddress = r.DeviceInfo.PCI.PCIAddress
		}
		out = append(out, a)
	}
	return out, nil
}

// FindAttachment picks the attachment of the VF at pciAddr; when no entry carries device-info
// (older SR-IOV CNI), it falls back to the entry of network (a NetworkAttachmentDefinition
// "ns/name" or "name"). It is an error when nothing matches or the match has no address.
func FindAttachment(atts []Attachment, pciAddr, network string) (Attachment, error) {
	for _, a := range atts {
		if pciAddr != "" && a.PCIAddress == pciAddr {
			return withIP(a)
		}
	}
	if network != "" {
		for _, a := range atts {
			if a.Network == network || strings.HasSuffix(a.Network, "/"+network) {
				return withIP(a)
			}
		}
	}
	return Attachment{}, fmt.Errorf("sriov: %s has no attachment for PCI device %q or network %q", NetworkStatusAnnotation, pciAddr, network)
}

func withIP(a Attachment) (Attachment, error) {
	if len(a.IPs) == 0 {
		return Attachment{}, fmt.Errorf("sriov: attachment %s (%s) has no IP address yet", a.Network, a.Interface)
	}
	return a, nil
}

// DownwardAnnotation returns the value of annotation key from a Kubernetes downward API
// annotations file (one `key="quoted value"` per line, as the kubelet writes it).
func DownwardAnnotation(file []byte, key string) (string, error) {
	sc := bufio.NewScanner(bytes.NewReader(file))
	sc.Buffer(make([]byte, 0, 64*1024), 4<<20)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), "=")
		if !ok || k != key {
			continue
		}
		s, err := strconv.Unquote(v)
		if err != nil {
			return "", fmt.Errorf("sriov: annotation %s: %w", key, err)
		}
		return s, nil
	}
	if err := sc.Err(); err != nil {
		return "", fmt.Errorf("sriov: read annotations: %w", err)
	}
	return "", fmt.Errorf("sriov: annotation %s: %w", key, errNoAnnotation)
}

var errNoAnnotation = errors.New("not present (has Multus attached the network yet?)")
