package bpf

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"slices"

	"github.com/cilium/ebpf"
)

// meshSet is the mesh set last written to the maps.
type meshSet struct {
	ips   map[netip.Addr]struct{}
	ports map[uint16]struct{}
}

func (m meshSet) lists() ([]netip.Addr, []uint16) {
	ips := make([]netip.Addr, 0, len(m.ips))
	for ip := range m.ips {
		ips = append(ips, ip)
	}
	slices.SortFunc(ips, netip.Addr.Compare)
	ports := make([]uint16, 0, len(m.ports))
	for p := range m.ports {
		ports = append(ports, p)
	}
	slices.Sort(ports)
	return ips, ports
}

func checkMesh(ips []netip.Addr, ports []uint16) error {
	for _, ip := range ips {
		if !ip.IsValid() || ip.IsUnspecified() {
			return fmt.Errorf("mesh IP %q is not a usable address", ip)
		}
	}
	if len(ips) > maxMeshIPs {
		return fmt.Errorf("%d mesh IPs, at most %d", len(ips), maxMeshIPs)
	}
	for _, p := range ports {
		if p == 0 {
			return errors.New("sidecar port 0")
		}
	}
	if len(ports) > maxSidecarPorts {
		return fmt.Errorf("%d sidecar ports, at most %d", len(ports), maxSidecarPorts)
	}
	return nil
}

// Sizes of mt_mesh_ips and mt_mesh_ports (mesh.h).
const (
	maxMeshIPs      = 4096
	maxSidecarPorts = 256
)

// SetMesh replaces the mesh set: local IPs of mesh workloads, and sidecar ports for loopback
// pairs. It decides which new connections are accelerated; connections already accelerated
// stay so until they close (removing their entries would drop queued bytes).
func (a *Agent) SetMesh(ips []netip.Addr, sidecarPorts []uint16) error {
	if err := checkMesh(ips, sidecarPorts); err != nil {
		return fmt.Errorf("bpf: set mesh: %w", err)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.closed {
		return errors.New("bpf: set mesh: agent closed")
	}
	return a.setMesh(ips, sidecarPorts)
}

func (a *Agent) setMesh(ips []netip.Addr, ports []uint16) error {
	want := meshSet{ips: map[netip.Addr]struct{}{}, ports: map[uint16]struct{}{}}
	for _, ip := range ips {
		want.ips[ip.Unmap()] = struct{}{}
	}
	for _, p := range ports {
		want.ports[p] = struct{}{}
	}
	one := uint32(1)
	ipMap, portMap := a.sockops.MtMeshIps, a.sockops.MtMeshPorts

	// Delete what is no longer wanted, then add: the map holds entries of an earlier agent.
	var key sockopsMtIp
	var stale []sockopsMtIp
	it := ipMap.Iterate()
	var v uint32
	for it.Next(&key, &v) {
		if _, ok := want.ips[key.addr()]; !ok {
			stale = append(stale, key)
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("bpf: set mesh: read mesh IPs: %w", err)
	}
	for _, k := range stale {
		if err := ipMap.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("bpf: set mesh: delete %s: %w", k.addr(), err)
		}
	}
	for ip := range want.ips {
		if err := ipMap.Put(mtIP(ip), one); err != nil {
			return fmt.Errorf("bpf: set mesh: add %s: %w", ip, err)
		}
	}

	var port uint16
	var stalePorts []uint16
	pit := portMap.Iterate()
	for pit.Next(&port, &v) {
		if _, ok := want.ports[port]; !ok {
			stalePorts = append(stalePorts, port)
		}
	}
	if err := pit.Err(); err != nil {
		return fmt.Errorf("bpf: set mesh: read sidecar ports: %w", err)
	}
	for _, p := range stalePorts {
		if err := portMap.Delete(p); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("bpf: set mesh: delete port %d: %w", p, err)
		}
	}
	for p := range want.ports {
		if err := portMap.Put(p, one); err != nil {
			return fmt.Errorf("bpf: set mesh: add port %d: %w", p, err)
		}
	}
	a.mesh = want
	return nil
}

// mtIP converts an address to the 16-byte form of mesh.h: IPv4 as ::ffff:a.b.c.d. The
// uint32 words hold the network-order bytes as they lie in memory.
func mtIP(ip netip.Addr) sockopsMtIp {
	b := ip.As16()
	var out sockopsMtIp
	for i := range out.Addr {
		out.Addr[i] = binary.NativeEndian.Uint32(b[4*i:])
	}
	return out
}

func (k sockopsMtIp) addr() netip.Addr {
	var b [16]byte
	for i, w := range k.Addr {
		binary.NativeEndian.PutUint32(b[4*i:], w)
	}
	return netip.AddrFrom16(b).Unmap()
}

// SockKey is one end of a TCP connection as the sockhash keys it: seen from that end.
type SockKey struct {
	Local, Remote netip.AddrPort
}

func (k SockKey) mt() sockopsMtSockKey {
	return sockopsMtSockKey{
		LocalIp:    mtIP(k.Local.Addr()),
		RemoteIp:   mtIP(k.Remote.Addr()),
		LocalPort:  k.Local.Port(),
		RemotePort: k.Remote.Port(),
	}
}

func (k sockopsMtSockKey) key() SockKey {
	return SockKey{
		Local:  netip.AddrPortFrom(k.LocalIp.addr(), k.LocalPort),
		Remote: netip.AddrPortFrom(k.RemoteIp.addr(), k.RemotePort),
	}
}

// Lookup returns the socket cookie (SO_COOKIE) of the accelerated socket with key k, or an
// error wrapping ebpf.ErrKeyNotExist.
func (a *Agent) Lookup(k SockKey) (uint64, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.closed {
		return 0, errors.New("bpf: lookup: agent closed")
	}
	var cookie uint64
	if err := a.sockops.MtSockhash.Lookup(k.mt(), &cookie); err != nil {
		return 0, fmt.Errorf("bpf: lookup %v: %w", k, err)
	}
	return cookie, nil
}

// Sockets lists the keys of all accelerated sockets (two per connection).
func (a *Agent) Sockets() ([]SockKey, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.closed {
		return nil, errors.New("bpf: sockets: agent closed")
	}
	return sockhashKeys(a.sockops.MtSockhash)
}

func sockhashKeys(m *ebpf.Map) ([]SockKey, error) {
	var out []SockKey
	var k, next sockopsMtSockKey
	var cur any // nil: start at the first key
	for {
		err := m.NextKey(cur, &next)
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return out, nil
		}
		if err != nil {
			return nil, fmt.Errorf("bpf: iterate sockhash: %w", err)
		}
		out = append(out, next.key())
		k = next
		cur = k
	}
}
