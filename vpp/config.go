package vpp

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"path/filepath"
	"regexp"
	"time"

	"go.fd.io/govpp/adapter"
	"go.fd.io/govpp/adapter/socketclient"
	"go.fd.io/govpp/adapter/statsclient"

	"github.com/meshturbo/meshturbo/vpp/vcl"
)

// Driver selects how VPP drives the uplink.
type Driver string

const (
	// DriverDev is VPP's device API (dev_attach + dev_create_port_if) with its native driver
	// for Intel VFs, "iavf" (AVF's avf_create is deprecated in VPP). The VF must be bound to
	// vfio-pci.
	DriverDev Driver = "dev"
	// DriverRDMA is VPP's rdma plugin (rdma_create_v4) for Mellanox/NVIDIA VFs, which stay on
	// mlx5_core and are opened through their kernel netdev.
	DriverRDMA Driver = "rdma"
	// DriverAFPacket attaches a kernel (host) interface through an AF_PACKET socket
	// (af_packet_create_v3): no SR-IOV needed, much slower; for nodes without a usable VF.
	DriverAFPacket Driver = "af_packet"
)

// RxMode is how VPP receives on the uplink.
type RxMode string

const (
	RxPolling   RxMode = "polling"   // busy-poll: lowest latency, one core spinning
	RxInterrupt RxMode = "interrupt" // sleep until the NIC interrupts
	RxAdaptive  RxMode = "adaptive"  // poll under load, interrupts when idle
)

// Uplink is the interface VPP's host stack sends and receives on: on an SR-IOV node, the VF
// the device plugin gave the VPP pod.
type Uplink struct {
	Driver Driver
	// PCIAddress is the VF (DriverDev), e.g. "0000:3b:02.0".
	PCIAddress string
	// DevDriver is the device API driver (DriverDev; default "iavf").
	DevDriver string
	// HostIf is the kernel netdev: the VF's netdev for DriverRDMA, any host interface for
	// DriverAFPacket.
	HostIf string
	// Name is the VPP interface name for DriverDev and DriverRDMA (default "mt-uplink");
	// VPP names af_packet interfaces host-<HostIf> itself.
	Name string
	// MAC is the address VPP must use. With DriverRDMA it is required and must be the VF's own
	// MAC (from sysfs): the NIC delivers to the VF only frames for that address, and VPP's rdma
	// driver makes up another one. Nil leaves VPP's choice (the PF-assigned MAC for iavf).
	MAC net.HardwareAddr
	// MTU is the link MTU to set (0 leaves VPP's).
	MTU uint16
	// Queue counts and ring sizes (defaults 1 queue each way, 1024 descriptors).
	RxQueues    uint16
	TxQueues    uint16
	RxQueueSize uint16
	TxQueueSize uint16
	// RxMode defaults to RxPolling.
	RxMode RxMode
	// Addresses are set on the interface after it is up, e.g. the pod's address on the SR-IOV
	// network (Multus network-status) with the network's prefix length.
	Addresses []netip.Prefix
}

// Route is a static route through the uplink, in the default table.
type Route struct {
	Prefix netip.Prefix
	Via    netip.Addr
}

// VCLSizes are the shared-memory sizes each sidecar's vcl.conf gets (defaults vcl.Defaults).
type VCLSizes struct {
	SegmentSize    uint64
	AddSegmentSize uint64
	RxFifoSize     uint32
	TxFifoSize     uint32
	EventQueueSize uint32
}

// Backoff bounds the delay between reconnect (and failed re-apply) attempts; it doubles from
// Min up to Max.
type Backoff struct {
	Min time.Duration // default 250ms
	Max time.Duration // default 30s
}

// Config configures an Agent.
type Config struct {
	// APISocket is VPP's binary API socket (default /run/vpp/api.sock; startup.conf
	// `socksvr { socket-name … }`).
	APISocket string
	// StatsSocket is VPP's stats segment socket, for interface counters (default
	// /run/vpp/stats.sock; startup.conf `statseg { socket-name … }`).
	StatsSocket string
	// Uplink and Routes are the node's part of the desired state; Reconcile adds the sidecars.
	Uplink Uplink
	Routes []Route
	// AppSocketDir is where VPP creates each app namespace's session socket (default
	// /run/vpp/app_ns_sockets, VPP's own default); sidecars must see it at the same path.
	AppSocketDir string
	// HandoffDir is where the agent writes, per sidecar, a directory <sidecar ID>/ holding
	// vcl.conf and envoy-vcl.json (the bootstrap fragment). It is the agent's: directories in it
	// that belong to no desired sidecar are removed, with their namespaces.
	HandoffDir string
	VCL        VCLSizes
	// SecretKey derives each namespace's secret (HMAC-SHA256 of the namespace id). Give the
	// same key across agent restarts (e.g. from a Kubernetes Secret) so that secrets stay put;
	// empty means a random key per agent process.
	SecretKey []byte
	// MinVersion (inclusive) and MaxVersion (exclusive) bound the VPP versions the agent
	// accepts, "major.minor" (defaults "25.02" and "25.06": the release the binary API
	// bindings were generated from). The message CRC check runs whatever the version.
	MinVersion string
	MaxVersion string
	// RequestTimeout bounds each request (default 5s). A request without reply marks the
	// connection broken: the agent reconnects and re-applies.
	RequestTimeout time.Duration
	// ConnectTimeout bounds the socket handshake (default 3s).
	ConnectTimeout time.Duration
	// ProbeInterval is how often the agent pings VPP to notice it went away (default 1s).
	ProbeInterval time.Duration
	// ResyncInterval, when set, re-applies the desired state from a fresh dump that often,
	// repairing changes made behind the agent's back. Only differences are sent.
	ResyncInterval time.Duration
	Backoff        Backoff
	Logger         *slog.Logger
}

// Option is a rarely needed knob.
type Option func(*Agent)

// WithAdapter replaces govpp's socket client, e.g. with govpp's mock adapter in tests.
func WithAdapter(newAdapter func(socket string) adapter.VppAPI) Option {
	return func(a *Agent) { a.newAdapter = newAdapter }
}

// WithApplyHook calls fn after every apply of the desired state, with why it ran
// ("reconcile", "connected", "retry", "resync") and its outcome.
func WithApplyHook(fn func(reason string, err error)) Option {
	return func(a *Agent) { a.applyHook = fn }
}

func (c *Config) validate() error {
	var errs []error
	if c.APISocket == "" {
		c.APISocket = socketclient.DefaultSocketName
	}
	if c.StatsSocket == "" {
		c.StatsSocket = statsclient.DefaultSocketName
	}
	if err := c.Uplink.validate(); err != nil {
		errs = append(errs, err)
	}
	prefixes := map[netip.Prefix]bool{}
	for i, r := range c.Routes {
		if !r.Prefix.IsValid() || !r.Via.IsValid() || r.Prefix.Addr().Is4() != r.Via.Is4() {
			errs = append(errs, fmt.Errorf("Routes[%d]: want a prefix and a next hop of the same family, got %v via %v", i, r.Prefix, r.Via))
			continue
		}
		// One path per prefix: a second route to the same prefix would replace the first.
		if prefixes[r.Prefix.Masked()] {
			errs = append(errs, fmt.Errorf("Routes[%d]: %v is routed twice", i, r.Prefix.Masked()))
		}
		prefixes[r.Prefix.Masked()] = true
	}
	if c.AppSocketDir == "" {
		c.AppSocketDir = "/run/vpp/app_ns_sockets"
	}
	if !filepath.IsAbs(c.AppSocketDir) {
		errs = append(errs, fmt.Errorf("AppSocketDir %q is not absolute", c.AppSocketDir))
	}
	if c.HandoffDir == "" || !filepath.IsAbs(c.HandoffDir) {
		errs = append(errs, fmt.Errorf("HandoffDir %q must be an absolute directory the sidecars mount", c.HandoffDir))
	}
	def := vcl.Defaults
	if c.VCL.SegmentSize == 0 {
		c.VCL.SegmentSize = def.SegmentSize
	}
	if c.VCL.AddSegmentSize == 0 {
		c.VCL.AddSegmentSize = def.AddSegmentSize
	}
	if c.VCL.RxFifoSize == 0 {
		c.VCL.RxFifoSize = def.RxFifoSize
	}
	if c.VCL.TxFifoSize == 0 {
		c.VCL.TxFifoSize = def.TxFifoSize
	}
	if c.VCL.EventQueueSize == 0 {
		c.VCL.EventQueueSize = def.EventQueueSize
	}
	if c.MinVersion == "" {
		c.MinVersion = "25.02"
	}
	if c.MaxVersion == "" {
		c.MaxVersion = "25.06"
	}
	lo, err1 := parseVersion(c.MinVersion)
	hi, err2 := parseVersion(c.MaxVersion)
	if err := errors.Join(err1, err2); err != nil {
		errs = append(errs, fmt.Errorf("version range: %w", err))
	} else if !lo.less(hi) {
		errs = append(errs, fmt.Errorf("version range [%s, %s) is empty", c.MinVersion, c.MaxVersion))
	}
	if c.RequestTimeout <= 0 {
		c.RequestTimeout = 5 * time.Second
	}
	if c.ConnectTimeout <= 0 {
		c.ConnectTimeout = socketclient.DefaultConnectTimeout
	}
	if c.ProbeInterval <= 0 {
		c.ProbeInterval = time.Second
	}
	if c.Backoff.Min <= 0 {
		c.Backoff.Min = 250 * time.Millisecond
	}
	if c.Backoff.Max < c.Backoff.Min {
		c.Backoff.Max = max(30*time.Second, c.Backoff.Min)
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("vpp: config: %w", err)
	}
	return nil
}

var netdevRE = regexp.MustCompile(`^[A-Za-z0-9_.:@-]{1,15}$`)

func (u *Uplink) validate() error {
	var errs []error
	switch u.Driver {
	case DriverDev:
		if !pciAddrRE.MatchString(u.PCIAddress) {
			errs = append(errs, fmt.Errorf("Uplink.PCIAddress %q is not a PCI address like 0000:3b:02.0", u.PCIAddress))
		}
		if u.DevDriver == "" {
			u.DevDriver = "iavf"
		}
	case DriverRDMA:
		if !netdevRE.MatchString(u.HostIf) {
			errs = append(errs, fmt.Errorf("Uplink.HostIf %q is not a netdev name (the VF's, e.g. ens2f0v0)", u.HostIf))
		}
		if len(u.MAC) != 6 {
			errs = append(errs, errors.New("Uplink.MAC must be the VF's MAC with the rdma driver (VPP's own would not be delivered to)"))
		}
	case DriverAFPacket:
		if !netdevRE.MatchString(u.HostIf) {
			errs = append(errs, fmt.Errorf("Uplink.HostIf %q is not a netdev name", u.HostIf))
		}
	default:
		errs = append(errs, fmt.Errorf("Uplink.Driver %q: want %q, %q or %q (DPDK-driven VFs come from startup.conf, not from the agent)",
			u.Driver, DriverDev, DriverRDMA, DriverAFPacket))
	}
	if u.MAC != nil && len(u.MAC) != 6 {
		errs = append(errs, fmt.Errorf("Uplink.MAC %v is not a 48-bit MAC", u.MAC))
	}
	if u.Name == "" {
		u.Name = "mt-uplink"
	}
	if u.RxQueues == 0 {
		u.RxQueues = 1
	}
	if u.TxQueues == 0 {
		u.TxQueues = 1
	}
	if u.RxQueueSize == 0 {
		u.RxQueueSize = 1024
	}
	if u.TxQueueSize == 0 {
		u.TxQueueSize = 1024
	}
	switch u.RxMode {
	case "":
		u.RxMode = RxPolling
	case RxPolling, RxInterrupt, RxAdaptive:
	default:
		errs = append(errs, fmt.Errorf("Uplink.RxMode %q: want polling, interrupt or adaptive", u.RxMode))
	}
	if len(u.Addresses) == 0 {
		errs = append(errs, errors.New("Uplink.Addresses is empty: the host stack needs an address (the pod's on the SR-IOV network)"))
	}
	seen := map[netip.Prefix]bool{}
	for _, p := range u.Addresses {
		if !p.IsValid() {
			errs = append(errs, fmt.Errorf("Uplink.Addresses: %v is not a prefix", p))
		}
		if seen[p] {
			errs = append(errs, fmt.Errorf("Uplink.Addresses: %v twice", p))
		}
		seen[p] = true
	}
	return errors.Join(errs...)
}

var pciAddrRE = regexp.MustCompile(`^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$`)

// Desired is the changing part of the node's desired state: the meshed pods' sidecars on the
// node. The uplink and routes come from Config.
type Desired struct {
	Sidecars []Sidecar
}

// Sidecar is one meshed pod's sidecar; it gets its own app namespace.
type Sidecar struct {
	// ID is stable for the pod's life and unique on the node: the pod UID. The namespace is
	// "mt-<ID>" and the hand-off directory <HandoffDir>/<ID>.
	ID string
	// Name is for humans and logs: "namespace/pod".
	Name string
}

var sidecarIDRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,59}$`)

func (d Desired) validate() error {
	seen := map[string]bool{}
	var errs []error
	for _, s := range d.Sidecars {
		if !sidecarIDRE.MatchString(s.ID) {
			errs = append(errs, fmt.Errorf("sidecar %q (%s): ID must be 1-60 of [A-Za-z0-9._-], e.g. the pod UID", s.ID, s.Name))
		}
		if seen[s.ID] {
			errs = append(errs, fmt.Errorf("sidecar %q listed twice", s.ID))
		}
		seen[s.ID] = true
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("vpp: desired state: %w: %w", ErrInvalidDesired, err)
	}
	return nil
}

// ErrInvalidDesired is wrapped by Reconcile's error when the desired state itself is invalid
// (a bad or repeated sidecar ID); the previous desired state stays.
var ErrInvalidDesired = errors.New("invalid")

// NamespaceID is the app namespace the agent creates for the sidecar with this ID.
func NamespaceID(sidecarID string) string { return namespacePrefix + sidecarID }

const namespacePrefix = "mt-"
