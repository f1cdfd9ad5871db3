package bpf

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

// Defaults of RedirectConfig: the sidecar's outbound listener (Istio's capture port).
const (
	DefaultSidecarIP    = "127.0.0.1"
	DefaultOutboundPort = 15001
)

// RedirectConfig is the iptables-free redirection mode: a cgroup/connect4 program sends every
// TCP connect of an app in Config.CgroupPath to the sidecar's outbound address and remembers
// where it was going; a cgroup/getsockopt program answers getsockopt(SOL_IP,
// SO_ORIGINAL_DST) on the sidecar's accepted socket with that destination, as netfilter does
// after an iptables REDIRECT.
//
// The sidecar is told apart by cgroup: connects made by processes whose cgroup v2 directory
// is one of SidecarCgroups are never redirected (in Kubernetes each container has its own
// cgroup, so the sidecar container's is distinct from the app's; a uid is shared too easily).
// Connects to ExcludePorts or ExcludeCIDRs, straight to the sidecar's outbound address, or
// that are not TCP are never redirected either.
type RedirectConfig struct {
	Enabled bool
	// SidecarIP and OutboundPort are where redirected connects go; DefaultSidecarIP and
	// DefaultOutboundPort if unset.
	SidecarIP    netip.Addr
	OutboundPort uint16
	// SidecarCgroups are the cgroup v2 directories of sidecar processes. Required.
	SidecarCgroups []string
	// ExcludePorts and ExcludeCIDRs are destinations never redirected (IPv4 CIDRs).
	ExcludePorts []uint16
	ExcludeCIDRs []netip.Prefix
}

func (c *RedirectConfig) validate() error {
	if !c.Enabled {
		return nil
	}
	if !c.SidecarIP.IsValid() {
		c.SidecarIP = netip.MustParseAddr(DefaultSidecarIP)
	}
	if c.OutboundPort == 0 {
		c.OutboundPort = DefaultOutboundPort
	}
	if !c.SidecarIP.Unmap().Is4() {
		return fmt.Errorf("redirect: sidecar IP %s is not IPv4 (connect4 redirects IPv4 connects)", c.SidecarIP)
	}
	c.SidecarIP = c.SidecarIP.Unmap()
	if len(c.SidecarCgroups) == 0 {
		return errors.New("redirect: SidecarCgroups is required: the sidecar's own connects must be told apart, or they would be sent back to the sidecar")
	}
	if len(c.SidecarCgroups) > maxSidecarCgroups || len(c.ExcludePorts) > maxExcluded || len(c.ExcludeCIDRs) > maxExcluded {
		return fmt.Errorf("redirect: at most %d sidecar cgroups, %d excluded ports and %d excluded CIDRs", maxSidecarCgroups, maxExcluded, maxExcluded)
	}
	for _, p := range c.SidecarCgroups {
		if _, err := cgroupID(p); err != nil {
			return fmt.Errorf("redirect: sidecar cgroup: %w", err)
		}
	}
	for _, p := range c.ExcludeCIDRs {
		if !p.IsValid() || !p.Addr().Unmap().Is4() {
			return fmt.Errorf("redirect: excluded CIDR %s is not an IPv4 prefix", p)
		}
	}
	if slices.Contains(c.ExcludePorts, 0) {
		return errors.New("redirect: excluded port 0")
	}
	return nil
}

// Sizes of the redirect maps (mesh.h).
const (
	maxSidecarCgroups = 256
	maxExcluded       = 256
)

// RedirectState is the redirect mode's state.
type RedirectState struct {
	On bool `json:"on"`
	// Off says why the mode is off although configured (a missing kernel feature).
	Off            string         `json:"off,omitempty"`
	SidecarAddr    netip.AddrPort `json:"sidecar_addr,omitzero"`
	SidecarCgroups []string       `json:"sidecar_cgroups,omitempty"`
	ExcludePorts   []uint16       `json:"exclude_ports,omitempty"`
	ExcludeCIDRs   []netip.Prefix `json:"exclude_cidrs,omitempty"`
}

// cgroupID is the ID bpf_get_current_cgroup_id reports for a cgroup v2 directory: its inode.
func cgroupID(dir string) (uint64, error) {
	var fs unix.Statfs_t
	if err := unix.Statfs(dir, &fs); err != nil {
		return 0, fmt.Errorf("%q: %w", dir, err)
	}
	if fs.Type != unix.CGROUP2_SUPER_MAGIC {
		return 0, fmt.Errorf("%q is not a cgroup v2 directory", dir)
	}
	var st unix.Stat_t
	if err := unix.Stat(dir, &st); err != nil {
		return 0, fmt.Errorf("%q: %w", dir, err)
	}
	return st.Ino, nil
}

// setupRedirect writes the redirect maps and attaches (or adopts) connect4 and getsockopt
// when the mode is on; when it is off, it detaches links an earlier agent left and clears the
// switch, so that the mode follows the configuration.
func (a *Agent) setupRedirect() error {
	rc := a.cfg.Redirect
	if !rc.Enabled || a.state.Redirect.Off != "" {
		if err := a.sockops.MtRedirect.Put(uint32(0), sockopsMtRedirectCfg{}); err != nil {
			return fmt.Errorf("bpf: redirect: switch off: %w", err)
		}
		for _, name := range []string{pinLinkConnect4, pinLinkGetsockopt} {
			path := filepath.Join(a.cfg.PinPath, name)
			l, err := link.LoadPinnedLink(path, nil)
			if errors.Is(err, os.ErrNotExist) {
				continue
			}
			if err == nil {
				err = retireLink(l)
			} else {
				err = errors.Join(err, os.Remove(path))
			}
			if err != nil {
				return fmt.Errorf("bpf: redirect: detach %s: %w", path, err)
			}
		}
		return nil
	}
	if err := a.writeRedirectMaps(rc); err != nil {
		return err
	}
	// getsockopt first: by the time a connect is redirected, its answer can be given.
	var err error
	var adopted bool
	if a.getsockOpt, adopted, err = a.attachCgroup(pinLinkGetsockopt, ebpf.AttachCGroupGetsockopt, a.getsockopt.MtGetsockopt); err != nil {
		return fmt.Errorf("bpf: cgroup/getsockopt: %w", err)
	}
	a.recordAttachment("mt_getsockopt", "cgroup getsockopt on "+a.cfg.CgroupPath, a.getsockopt.MtGetsockopt, a.getsockOpt,
		filepath.Join(a.cfg.PinPath, pinLinkGetsockopt), adopted)
	if a.connect, adopted, err = a.attachCgroup(pinLinkConnect4, ebpf.AttachCGroupInet4Connect, a.connect4.MtConnect4); err != nil {
		return fmt.Errorf("bpf: cgroup/connect4: %w", err)
	}
	a.recordAttachment("mt_connect4", "cgroup connect4 on "+a.cfg.CgroupPath, a.connect4.MtConnect4, a.connect,
		filepath.Join(a.cfg.PinPath, pinLinkConnect4), adopted)
	a.state.Redirect = RedirectState{
		On:             true,
		SidecarAddr:    netip.AddrPortFrom(rc.SidecarIP, rc.OutboundPort),
		SidecarCgroups: slices.Clone(rc.SidecarCgroups),
		ExcludePorts:   slices.Clone(rc.ExcludePorts),
		ExcludeCIDRs:   slices.Clone(rc.ExcludeCIDRs),
	}
	return nil
}

// writeRedirectMaps replaces the sidecar cgroups and exclusions (entries of an earlier agent
// included), then turns the switch on.
func (a *Agent) writeRedirectMaps(rc RedirectConfig) error {
	m := a.sockops.sockopsMaps
	one := uint32(1)
	for _, mp := range []*ebpf.Map{m.MtSidecarCgroups, m.MtExcludedPorts, m.MtExcludedCidrs} {
		if err := clearMap(mp); err != nil {
			return fmt.Errorf("bpf: redirect: clear %s: %w", mp, err)
		}
	}
	for _, dir := range rc.SidecarCgroups {
		id, err := cgroupID(dir)
		if err != nil {
			return fmt.Errorf("bpf: redirect: sidecar cgroup: %w", err)
		}
		if err := m.MtSidecarCgroups.Put(id, one); err != nil {
			return fmt.Errorf("bpf: redirect: add sidecar cgroup %s: %w", dir, err)
		}
	}
	for _, p := range rc.ExcludePorts {
		if err := m.MtExcludedPorts.Put(p, one); err != nil {
			return fmt.Errorf("bpf: redirect: exclude port %d: %w", p, err)
		}
	}
	for _, p := range rc.ExcludeCIDRs {
		p = p.Masked()
		key := sockopsMtCidrKey{Prefixlen: uint32(p.Bits()), Ip4: ip4Word(p.Addr())}
		if err := m.MtExcludedCidrs.Put(key, one); err != nil {
			return fmt.Errorf("bpf: redirect: exclude %s: %w", p, err)
		}
	}
	cfg := sockopsMtRedirectCfg{Enabled: 1, SidecarIp4: ip4Word(rc.SidecarIP), OutboundPort: rc.OutboundPort}
	if err := m.MtRedirect.Put(uint32(0), cfg); err != nil {
		return fmt.Errorf("bpf: redirect: switch on: %w", err)
	}
	return nil
}

// ip4Word is an IPv4 address as the kernel's __be32 reads on this machine.
func ip4Word(ip netip.Addr) uint32 {
	b := ip.Unmap().As4()
	return binary.NativeEndian.Uint32(b[:])
}

func clearMap(m *ebpf.Map) error {
	var keys [][]byte
	key := make([]byte, m.KeySize())
	var cur any
	for {
		next := make([]byte, m.KeySize())
		err := m.NextKey(cur, &next)
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			break
		}
		if err != nil {
			return err
		}
		keys = append(keys, next)
		copy(key, next)
		cur = key
	}
	for _, k := range keys {
		if err := m.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return err
		}
	}
	return nil
}

// OriginalDst is what the getsockopt program answers for the sidecar's end of a redirected
// connection from app; ok is false when it knows none. For tests and status.
func (a *Agent) OriginalDst(app, sidecar netip.AddrPort) (netip.AddrPort, bool, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.closed {
		return netip.AddrPort{}, false, errors.New("bpf: original dst: agent closed")
	}
	key := sockopsMtOrigKey{AppIp4: ip4Word(app.Addr()), SidecarIp4: ip4Word(sidecar.Addr()), AppPort: app.Port(), SidecarPort: sidecar.Port()}
	var v sockopsMtOrigDst
	err := a.sockops.MtOrigByAddr.Lookup(key, &v)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return netip.AddrPort{}, false, nil
	}
	if err != nil {
		return netip.AddrPort{}, false, fmt.Errorf("bpf: original dst: %w", err)
	}
	var b [4]byte
	binary.NativeEndian.PutUint32(b[:], v.Ip4)
	return netip.AddrPortFrom(netip.AddrFrom4(b), v.Port), true, nil
}
