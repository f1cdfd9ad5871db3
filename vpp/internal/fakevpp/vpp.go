package fakevpp

import (
	"fmt"
	"net/netip"
	"slices"
	"sort"
	"strings"

	"go.fd.io/govpp/api"
	afpacket "go.fd.io/govpp/binapi/af_packet"
	"go.fd.io/govpp/binapi/dev"
	"go.fd.io/govpp/binapi/ethernet_types"
	"go.fd.io/govpp/binapi/fib_types"
	interfaces "go.fd.io/govpp/binapi/interface"
	"go.fd.io/govpp/binapi/interface_types"
	"go.fd.io/govpp/binapi/ip"
	"go.fd.io/govpp/binapi/ip_types"
	"go.fd.io/govpp/binapi/rdma"
	"go.fd.io/govpp/binapi/session"
	"go.fd.io/govpp/binapi/vpe"
)

// VPP is the state the fake keeps, a small model of what VPP would hold. Tests read and seed
// it through Server.Do.
type VPP struct {
	Version        string
	Interfaces     map[uint32]*Interface
	Devices        map[uint32]string // dev_index → device_id ("pci/0000:3b:02.0")
	SessionEnabled bool
	Namespaces     map[string]*Namespace
	Routes         []*Route

	nextIf  uint32
	nextDev uint32
}

// Interface is one VPP software interface.
type Interface struct {
	SwIfIndex uint32
	Name      string
	DevType   string // "iavf", "rdma", "af_packet", "local"
	Tag       string
	MAC       ethernet_types.MacAddress
	LinkMTU   uint16
	AdminUp   bool
	Queues    int
	RxMode    interface_types.RxMode
	Addrs     []netip.Prefix

	DevIndex uint32 // device API ports: the device
	HostIf   string // rdma and af_packet: the host netdev
}

// Namespace is an app namespace.
type Namespace struct {
	ID        string
	Secret    uint64
	SwIfIndex uint32
	SockName  string
}

// Route is a FIB entry. Source tells who made it: "api" (ip_route_add_del), "interface"
// (connected and local routes of an interface address), or "adjacency" (host routes VPP adds
// for resolved neighbors; tests seed them).
type Route struct {
	Table  uint32
	Prefix netip.Prefix
	Paths  []fib_types.FibPath
	Source string
}

const invalidIndex = ^uint32(0)

func newVPP(version string) *VPP {
	v := &VPP{
		Version:    version,
		Interfaces: map[uint32]*Interface{},
		Devices:    map[uint32]string{},
		Namespaces: map[string]*Namespace{},
	}
	// Every VPP has local0 and the default app namespace.
	v.Interfaces[0] = &Interface{SwIfIndex: 0, Name: "local0", DevType: "local", Queues: 0}
	v.nextIf = 1
	v.Namespaces["default"] = &Namespace{ID: "default", SwIfIndex: invalidIndex}
	return v
}

// AddInterface adds an interface the agent does not own (e.g. one from startup.conf).
func (v *VPP) AddInterface(name, devType string) *Interface {
	i := &Interface{SwIfIndex: v.nextIf, Name: name, DevType: devType, LinkMTU: 1500, Queues: 1,
		RxMode: interface_types.RX_MODE_API_POLLING, MAC: fakeMAC(v.nextIf)}
	v.Interfaces[i.SwIfIndex] = i
	v.nextIf++
	return i
}

// InterfacesTagged returns the interfaces whose tag starts with prefix, by index.
func (v *VPP) InterfacesTagged(prefix string) []*Interface {
	var out []*Interface
	for _, i := range v.Interfaces {
		if prefix != "" && strings.HasPrefix(i.Tag, prefix) {
			out = append(out, i)
		}
	}
	sort.Slice(out, func(a, b int) bool { return out[a].SwIfIndex < out[b].SwIfIndex })
	return out
}

// NamespaceIDs returns the ids of all app namespaces, sorted.
func (v *VPP) NamespaceIDs() []string {
	var ids []string
	for id := range v.Namespaces {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	return ids
}

// AddRoute adds a route as the given source.
func (v *VPP) AddRoute(table uint32, prefix netip.Prefix, source string, paths ...fib_types.FibPath) {
	v.Routes = append(v.Routes, &Route{Table: table, Prefix: prefix.Masked(), Paths: paths, Source: source})
}

// NextHop builds a normal path through sw_if_index via nh (invalid nh: attached).
func NextHop(swIfIndex uint32, nh netip.Addr) fib_types.FibPath {
	p := fib_types.FibPath{SwIfIndex: swIfIndex, Weight: 1, Type: fib_types.FIB_API_PATH_TYPE_NORMAL}
	if nh.Is6() {
		p.Proto = fib_types.FIB_API_PATH_NH_PROTO_IP6
		p.Nh.Address.SetIP6(ip_types.IP6Address(nh.As16()))
	} else if nh.Is4() {
		p.Proto = fib_types.FIB_API_PATH_NH_PROTO_IP4
		p.Nh.Address.SetIP4(ip_types.IP4Address(nh.As4()))
	}
	return p
}

func fakeMAC(n uint32) ethernet_types.MacAddress {
	return ethernet_types.MacAddress{0x02, 0xfe, byte(n >> 24), byte(n >> 16), byte(n >> 8), byte(n)}
}

func retval(e api.VPPApiError) int32 { return int32(e) }

func (v *VPP) iface(sw interface_types.InterfaceIndex) (*Interface, bool) {
	i, ok := v.Interfaces[uint32(sw)]
	return i, ok
}

func (v *VPP) newIface(name, devType string) *Interface {
	i := v.AddInterface(name, devType)
	i.RxMode = interface_types.RX_MODE_API_POLLING
	return i
}

func (v *VPP) nameTaken(name string) bool {
	for _, i := range v.Interfaces {
		if i.Name == name {
			return true
		}
	}
	return false
}

func (v *VPP) deleteIface(i *Interface) {
	delete(v.Interfaces, i.SwIfIndex)
	v.Routes = slices.DeleteFunc(v.Routes, func(r *Route) bool {
		return slices.ContainsFunc(r.Paths, func(p fib_types.FibPath) bool { return p.SwIfIndex == i.SwIfIndex })
	})
}

// handle answers one request, changing state as VPP would. Every reply carries the retval VPP
// would send; an error means the fake does not implement the message.
func (v *VPP) handle(req api.Message) ([]api.Message, error) {
	switch r := req.(type) {
	case *vpe.ShowVersion:
		return one(&vpe.ShowVersionReply{Program: "vpe", Version: v.Version, BuildDate: "2025-02-26T12:00:00",
			BuildDirectory: "/w/workspace/vpp-merge-2502-ubuntu2204-x86_64"}), nil

	case *interfaces.SwInterfaceDump:
		var out []api.Message
		for _, i := range v.sortedIfaces() {
			if uint32(r.SwIfIndex) != invalidIndex && uint32(r.SwIfIndex) != i.SwIfIndex {
				continue
			}
			if r.NameFilterValid && !strings.Contains(i.Name, r.NameFilter) {
				continue
			}
			out = append(out, i.details())
		}
		return out, nil

	case *dev.DevAttach:
		if !strings.HasPrefix(r.DeviceID, "pci/") || r.DriverName == "" {
			return one(&dev.DevAttachReply{Retval: retval(api.INVALID_VALUE), ErrorString: "bad device id or driver"}), nil
		}
		for _, d := range v.Devices {
			if d == r.DeviceID {
				return one(&dev.DevAttachReply{Retval: retval(api.ENTRY_ALREADY_EXISTS), ErrorString: "device already attached"}), nil
			}
		}
		idx := v.nextDev
		v.nextDev++
		v.Devices[idx] = r.DeviceID
		return one(&dev.DevAttachReply{DevIndex: idx}), nil

	case *dev.DevCreatePortIf:
		if _, ok := v.Devices[r.DevIndex]; !ok {
			return one(&dev.DevCreatePortIfReply{Retval: retval(api.NO_SUCH_ENTRY), ErrorString: "no such device"}), nil
		}
		if r.IntfName == "" || v.nameTaken(r.IntfName) {
			return one(&dev.DevCreatePortIfReply{Retval: retval(api.IF_ALREADY_EXISTS), ErrorString: "bad interface name"}), nil
		}
		i := v.newIface(r.IntfName, "iavf")
		i.DevIndex = r.DevIndex
		i.Queues = int(max(r.NumRxQueues, 1))
		return one(&dev.DevCreatePortIfReply{SwIfIndex: i.SwIfIndex}), nil

	case *dev.DevRemovePortIf:
		i, ok := v.iface(interface_types.InterfaceIndex(r.SwIfIndex))
		if !ok || i.DevType != "iavf" {
			return one(&dev.DevRemovePortIfReply{Retval: retval(api.INVALID_SW_IF_INDEX)}), nil
		}
		v.deleteIface(i)
		return one(&dev.DevRemovePortIfReply{}), nil

	case *dev.DevDetach:
		if _, ok := v.Devices[r.DevIndex]; !ok {
			return one(&dev.DevDetachReply{Retval: retval(api.NO_SUCH_ENTRY)}), nil
		}
		for _, i := range v.Interfaces {
			if i.DevType == "iavf" && i.DevIndex == r.DevIndex {
				return one(&dev.DevDetachReply{Retval: retval(api.INSTANCE_IN_USE), ErrorString: "device has ports"}), nil
			}
		}
		delete(v.Devices, r.DevIndex)
		return one(&dev.DevDetachReply{}), nil

	case *rdma.RdmaCreateV4:
		for _, i := range v.Interfaces {
			if i.DevType == "rdma" && i.HostIf == r.HostIf {
				return one(&rdma.RdmaCreateV4Reply{Retval: retval(api.IF_ALREADY_EXISTS)}), nil
			}
		}
		name := r.Name
		if name == "" {
			name = "rdma-" + r.HostIf
		}
		if v.nameTaken(name) {
			return one(&rdma.RdmaCreateV4Reply{Retval: retval(api.IF_ALREADY_EXISTS)}), nil
		}
		i := v.newIface(name, "rdma")
		i.HostIf = r.HostIf
		i.Queues = int(max(r.RxqNum, 1))
		// VPP's rdma driver makes up a MAC rather than taking the netdev's.
		i.MAC = ethernet_types.MacAddress{0x02, 0xfe, 0x5e, 0xed, 0x00, byte(i.SwIfIndex)}
		return one(&rdma.RdmaCreateV4Reply{SwIfIndex: interface_types.InterfaceIndex(i.SwIfIndex)}), nil

	case *rdma.RdmaDelete:
		i, ok := v.iface(r.SwIfIndex)
		if !ok || i.DevType != "rdma" {
			return one(&rdma.RdmaDeleteReply{Retval: retval(api.INVALID_SW_IF_INDEX)}), nil
		}
		v.deleteIface(i)
		return one(&rdma.RdmaDeleteReply{}), nil

	case *afpacket.AfPacketCreateV3:
		name := "host-" + r.HostIfName
		if r.HostIfName == "" || v.nameTaken(name) {
			return one(&afpacket.AfPacketCreateV3Reply{Retval: retval(api.IF_ALREADY_EXISTS)}), nil
		}
		i := v.newIface(name, "af_packet")
		i.HostIf = r.HostIfName
		i.Queues = int(max(r.NumRxQueues, 1))
		if !r.UseRandomHwAddr {
			i.MAC = r.HwAddr
		}
		return one(&afpacket.AfPacketCreateV3Reply{SwIfIndex: interface_types.InterfaceIndex(i.SwIfIndex)}), nil

	case *afpacket.AfPacketDelete:
		for _, i := range v.Interfaces {
			if i.DevType == "af_packet" && i.HostIf == r.HostIfName {
				v.deleteIface(i)
				return one(&afpacket.AfPacketDeleteReply{}), nil
			}
		}
		return one(&afpacket.AfPacketDeleteReply{Retval: retval(api.INVALID_SW_IF_INDEX)}), nil

	case *interfaces.SwInterfaceTagAddDel:
		i, ok := v.iface(r.SwIfIndex)
		if !ok {
			return one(&interfaces.SwInterfaceTagAddDelReply{Retval: retval(api.INVALID_SW_IF_INDEX)}), nil
		}
		if r.IsAdd {
			i.Tag = r.Tag
		} else {
			i.Tag = ""
		}
		return one(&interfaces.SwInterfaceTagAddDelReply{}), nil

	case *interfaces.SwInterfaceSetMacAddress:
		i, ok := v.iface(r.SwIfIndex)
		if !ok {
			return one(&interfaces.SwInterfaceSetMacAddressReply{Retval: retval(api.INVALID_SW_IF_INDEX)}), nil
		}
		i.MAC = r.MacAddress
		return one(&interfaces.SwInterfaceSetMacAddressReply{}), nil

	case *interfaces.HwInterfaceSetMtu:
		i, ok := v.iface(r.SwIfIndex)
		if !ok {
			return one(&interfaces.HwInterfaceSetMtuReply{Retval: retval(api.INVALID_SW_IF_INDEX)}), nil
		}
		if r.Mtu < 64 || r.Mtu > 9216 {
			return one(&interfaces.HwInterfaceSetMtuReply{Retval: retval(api.INVALID_VALUE)}), nil
		}
		i.LinkMTU = r.Mtu
		return one(&interfaces.HwInterfaceSetMtuReply{}), nil

	case *interfaces.SwInterfaceRxPlacementDump:
		i, ok := v.iface(r.SwIfIndex)
		if !ok {
			return nil, nil
		}
		var out []api.Message
		for q := 0; q < i.Queues; q++ {
			out = append(out, &interfaces.SwInterfaceRxPlacementDetails{SwIfIndex: r.SwIfIndex, QueueID: uint32(q), WorkerID: uint32(q), Mode: i.RxMode})
		}
		return out, nil

	case *interfaces.SwInterfaceSetRxMode:
		i, ok := v.iface(r.SwIfIndex)
		if !ok {
			return one(&interfaces.SwInterfaceSetRxModeReply{Retval: retval(api.INVALID_SW_IF_INDEX)}), nil
		}
		if r.Mode == interface_types.RX_MODE_API_UNKNOWN || r.QueueIDValid {
			return one(&interfaces.SwInterfaceSetRxModeReply{Retval: retval(api.INVALID_VALUE)}), nil
		}
		i.RxMode = r.Mode
		return one(&interfaces.SwInterfaceSetRxModeReply{}), nil

	case *interfaces.SwInterfaceSetFlags:
		i, ok := v.iface(r.SwIfIndex)
		if !ok {
			return one(&interfaces.SwInterfaceSetFlagsReply{Retval: retval(api.INVALID_SW_IF_INDEX)}), nil
		}
		i.AdminUp = r.Flags&interface_types.IF_STATUS_API_FLAG_ADMIN_UP != 0
		return one(&interfaces.SwInterfaceSetFlagsReply{}), nil

	case *interfaces.SwInterfaceAddDelAddress:
		return one(&interfaces.SwInterfaceAddDelAddressReply{Retval: v.addDelAddress(r)}), nil

	case *ip.IPAddressDump:
		i, ok := v.iface(r.SwIfIndex)
		if !ok {
			return nil, nil
		}
		var out []api.Message
		for _, a := range i.Addrs {
			if a.Addr().Is6() == r.IsIPv6 {
				out = append(out, &ip.IPAddressDetails{SwIfIndex: r.SwIfIndex, Prefix: ip_types.AddressWithPrefix(toPrefix(a))})
			}
		}
		return out, nil

	case *ip.IPRouteDump:
		var out []api.Message
		for _, rt := range v.Routes {
			if rt.Table == r.Table.TableID && rt.Prefix.Addr().Is6() == r.Table.IsIP6 {
				out = append(out, &ip.IPRouteDetails{Route: ip.IPRoute{TableID: rt.Table, Prefix: toPrefix(rt.Prefix),
					NPaths: uint8(len(rt.Paths)), Paths: slices.Clone(rt.Paths)}})
			}
		}
		return out, nil

	case *ip.IPRouteAddDel:
		return one(&ip.IPRouteAddDelReply{Retval: v.addDelRoute(r)}), nil

	case *session.SessionEnableDisableV2:
		v.SessionEnabled = r.RtEngineType != session.RT_BACKEND_ENGINE_API_DISABLE
		return one(&session.SessionEnableDisableV2Reply{}), nil

	case *session.AppNamespaceAddDelV4:
		return one(v.addDelNamespace(r)), nil
	}
	return nil, fmt.Errorf("not implemented by the fake")
}

func one(m api.Message) []api.Message { return []api.Message{m} }

func (v *VPP) sortedIfaces() []*Interface {
	out := make([]*Interface, 0, len(v.Interfaces))
	for _, i := range v.Interfaces {
		out = append(out, i)
	}
	sort.Slice(out, func(a, b int) bool { return out[a].SwIfIndex < out[b].SwIfIndex })
	return out
}

func (i *Interface) details() *interfaces.SwInterfaceDetails {
	var flags interface_types.IfStatusFlags
	if i.AdminUp {
		flags |= interface_types.IF_STATUS_API_FLAG_ADMIN_UP | interface_types.IF_STATUS_API_FLAG_LINK_UP
	}
	return &interfaces.SwInterfaceDetails{
		SwIfIndex:        interface_types.InterfaceIndex(i.SwIfIndex),
		SupSwIfIndex:     i.SwIfIndex,
		L2Address:        i.MAC,
		Flags:            flags,
		Type:             interface_types.IF_API_TYPE_HARDWARE,
		LinkMtu:          i.LinkMTU,
		Mtu:              []uint32{uint32(i.LinkMTU), 0, 0, 0},
		InterfaceName:    i.Name,
		InterfaceDevType: i.DevType,
		Tag:              i.Tag,
	}
}

func (v *VPP) addDelAddress(r *interfaces.SwInterfaceAddDelAddress) int32 {
	i, ok := v.iface(r.SwIfIndex)
	if !ok {
		return retval(api.INVALID_SW_IF_INDEX)
	}
	p := fromPrefix(ip_types.Prefix(r.Prefix))
	if r.DelAll {
		for _, a := range slices.Clone(i.Addrs) {
			v.removeAddr(i, a)
		}
		return 0
	}
	if !r.IsAdd {
		if !slices.Contains(i.Addrs, p) {
			return retval(api.NO_SUCH_ENTRY)
		}
		v.removeAddr(i, p)
		return 0
	}
	if slices.Contains(i.Addrs, p) {
		return retval(api.DUPLICATE_IF_ADDRESS)
	}
	// VPP refuses a prefix that overlaps one on another interface of the same table.
	for _, o := range v.Interfaces {
		for _, a := range o.Addrs {
			if o != i && a.Overlaps(p) {
				return retval(api.ADDRESS_IN_USE)
			}
		}
	}
	i.Addrs = append(i.Addrs, p)
	bits := 32
	if p.Addr().Is6() {
		bits = 128
	}
	v.AddRoute(0, p.Masked(), "interface", NextHop(i.SwIfIndex, netip.Addr{}))
	local := NextHop(i.SwIfIndex, netip.Addr{})
	local.Type = fib_types.FIB_API_PATH_TYPE_LOCAL
	v.AddRoute(0, netip.PrefixFrom(p.Addr(), bits), "interface", local)
	return 0
}

func (v *VPP) removeAddr(i *Interface, p netip.Prefix) {
	i.Addrs = slices.DeleteFunc(i.Addrs, func(a netip.Prefix) bool { return a == p })
	bits := 32
	if p.Addr().Is6() {
		bits = 128
	}
	host := netip.PrefixFrom(p.Addr(), bits)
	v.Routes = slices.DeleteFunc(v.Routes, func(r *Route) bool {
		return r.Source == "interface" && (r.Prefix == p.Masked() || r.Prefix == host) &&
			len(r.Paths) == 1 && r.Paths[0].SwIfIndex == i.SwIfIndex
	})
}

func (v *VPP) addDelRoute(r *ip.IPRouteAddDel) int32 {
	p := fromPrefix(r.Route.Prefix).Masked()
	for _, path := range r.Route.Paths {
		if path.SwIfIndex != invalidIndex {
			if _, ok := v.Interfaces[path.SwIfIndex]; !ok {
				return retval(api.INVALID_SW_IF_INDEX)
			}
		}
	}
	idx := slices.IndexFunc(v.Routes, func(rt *Route) bool {
		return rt.Table == r.Route.TableID && rt.Prefix == p && rt.Source == "api"
	})
	if r.IsAdd {
		if len(r.Route.Paths) == 0 {
			return retval(api.INVALID_VALUE)
		}
		if idx >= 0 && !r.IsMultipath {
			v.Routes[idx].Paths = slices.Clone(r.Route.Paths)
			return 0
		}
		if idx >= 0 {
			v.Routes[idx].Paths = append(v.Routes[idx].Paths, r.Route.Paths...)
			return 0
		}
		v.AddRoute(r.Route.TableID, p, "api", slices.Clone(r.Route.Paths)...)
		return 0
	}
	if idx < 0 {
		return retval(api.NO_SUCH_ENTRY)
	}
	if !r.IsMultipath {
		v.Routes = slices.Delete(v.Routes, idx, idx+1)
		return 0
	}
	rt := v.Routes[idx]
	for _, del := range r.Route.Paths {
		rt.Paths = slices.DeleteFunc(rt.Paths, func(p fib_types.FibPath) bool { return describePath(p) == describePath(del) })
	}
	if len(rt.Paths) == 0 {
		v.Routes = slices.Delete(v.Routes, idx, idx+1)
	}
	return 0
}

func (v *VPP) addDelNamespace(r *session.AppNamespaceAddDelV4) api.Message {
	if !v.SessionEnabled {
		return &session.AppNamespaceAddDelV4Reply{Retval: retval(api.FEATURE_DISABLED)}
	}
	if r.NamespaceID == "" {
		return &session.AppNamespaceAddDelV4Reply{Retval: retval(api.INVALID_VALUE)}
	}
	if !r.IsAdd {
		if _, ok := v.Namespaces[r.NamespaceID]; !ok || r.NamespaceID == "default" {
			return &session.AppNamespaceAddDelV4Reply{Retval: retval(api.INVALID_VALUE)}
		}
		delete(v.Namespaces, r.NamespaceID)
		return &session.AppNamespaceAddDelV4Reply{}
	}
	if uint32(r.SwIfIndex) != invalidIndex {
		if _, ok := v.iface(r.SwIfIndex); !ok {
			return &session.AppNamespaceAddDelV4Reply{Retval: retval(api.INVALID_VALUE)}
		}
	}
	ns := v.Namespaces[r.NamespaceID]
	if ns == nil {
		ns = &Namespace{ID: r.NamespaceID}
		v.Namespaces[r.NamespaceID] = ns
	}
	ns.Secret, ns.SwIfIndex, ns.SockName = r.Secret, uint32(r.SwIfIndex), r.SockName
	idx := slices.Index(v.NamespaceIDs(), r.NamespaceID)
	return &session.AppNamespaceAddDelV4Reply{AppnsIndex: uint32(idx)}
}

func toPrefix(p netip.Prefix) ip_types.Prefix {
	var a ip_types.Address
	if p.Addr().Is4() {
		a.Af = ip_types.ADDRESS_IP4
		a.Un.SetIP4(ip_types.IP4Address(p.Addr().As4()))
	} else {
		a.Af = ip_types.ADDRESS_IP6
		a.Un.SetIP6(ip_types.IP6Address(p.Addr().As16()))
	}
	return ip_types.Prefix{Address: a, Len: uint8(p.Bits())}
}

func fromPrefix(p ip_types.Prefix) netip.Prefix {
	var a netip.Addr
	if p.Address.Af == ip_types.ADDRESS_IP6 {
		a = netip.AddrFrom16(p.Address.Un.GetIP6())
	} else {
		a = netip.AddrFrom4(p.Address.Un.GetIP4())
	}
	return netip.PrefixFrom(a, int(p.Len))
}

func describePath(p fib_types.FibPath) string {
	var nh string
	switch p.Proto {
	case fib_types.FIB_API_PATH_NH_PROTO_IP6:
		nh = netip.AddrFrom16(p.Nh.Address.GetIP6()).String()
	default:
		nh = netip.AddrFrom4(p.Nh.Address.GetIP4()).String()
	}
	s := fmt.Sprintf("via %s dev %d", nh, p.SwIfIndex)
	if p.Type != fib_types.FIB_API_PATH_TYPE_NORMAL {
		s += " " + p.Type.String()
	}
	return s
}
