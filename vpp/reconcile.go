package vpp

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"go.fd.io/govpp/binapi/ethernet_types"
	"go.fd.io/govpp/binapi/fib_types"
	interfaces "go.fd.io/govpp/binapi/interface"
	"go.fd.io/govpp/binapi/interface_types"
	"go.fd.io/govpp/binapi/ip"
	"go.fd.io/govpp/binapi/ip_types"
	"go.fd.io/govpp/binapi/session"
)

const invalidIndex = ^uint32(0)

// apply brings VPP to the desired state through c: it dumps what VPP has, then changes only
// what differs, in the order VPP needs — stale namespaces, routes and interfaces out first;
// then create → MAC/MTU → rx mode → admin up → addresses (after up, or connected routes and
// ARP break) → routes → session layer → one app namespace per sidecar → hand-off files.
// It touches only interfaces carrying the agent's tag, routes through them, and namespaces
// named mt-<sidecar>. A failed step returns its error; whatever was applied before it stays
// and is found again by the next apply's dump.
func (a *Agent) apply(ctx context.Context, c *vppConn, d Desired) error {
	all, err := dump[*interfaces.SwInterfaceDetails](ctx, c, &interfaces.SwInterfaceDump{SwIfIndex: interface_types.InterfaceIndex(invalidIndex)}, c.ifc.SwInterfaceDump)
	if err != nil {
		return err
	}
	var up *ownedIf
	var stale []ownedIf
	for _, det := range all {
		kind, key, note, ok := parseTag(det.Tag)
		if !ok {
			continue
		}
		o := ownedIf{swIfIndex: uint32(det.SwIfIndex), kind: kind, key: key, note: note, details: det}
		if up == nil && kind == a.driver.kind() && key == a.driver.key() {
			up = &o
			continue
		}
		stale = append(stale, o)
	}

	want := a.wantNamespaces(d)
	if err := a.removeNamespaces(ctx, c, want); err != nil {
		return err
	}

	// Routes through interfaces the agent owns that are not wanted (through the uplink to
	// stay) go before stale interfaces do.
	ownedIdx := map[uint32]bool{}
	for _, o := range stale {
		ownedIdx[o.swIfIndex] = true
	}
	if up != nil {
		ownedIdx[up.swIfIndex] = true
	}
	var have []ownedRoute
	if len(ownedIdx) > 0 { // no owned interface, no owned route
		if have, err = a.ownedRoutes(ctx, c, ownedIdx); err != nil {
			return err
		}
	}
	var keep []routeKey
	for _, r := range have {
		if up != nil && r.swIfIndex == up.swIfIndex && slices.Contains(a.cfg.Routes, r.route) && !slices.Contains(keep, r.routeKey) {
			keep = append(keep, r.routeKey)
			continue
		}
		if err := a.delRoute(ctx, c, r); err != nil {
			return err
		}
	}

	for _, o := range stale {
		a.log.Info("vpp: removing an interface the agent no longer wants", "sw_if_index", o.swIfIndex, "name", o.details.InterfaceName, "tag", o.details.Tag)
		drv := driverForTag(o)
		if drv == nil {
			return fmt.Errorf("vpp: interface %d has tag %q of an unknown driver; remove it by hand", o.swIfIndex, o.details.Tag)
		}
		if err := drv.remove(ctx, c, o); err != nil {
			return err
		}
	}

	if up == nil {
		sw, note, err := a.driver.create(ctx, c)
		if err != nil {
			return err
		}
		if err := tagInterface(ctx, c, a.driver, sw, note); err != nil {
			return err
		}
		dets, err := dump[*interfaces.SwInterfaceDetails](ctx, c, &interfaces.SwInterfaceDump{SwIfIndex: interface_types.InterfaceIndex(sw)}, c.ifc.SwInterfaceDump)
		if err != nil {
			return err
		}
		if len(dets) != 1 {
			return fmt.Errorf("vpp: the interface just created (%d) is not in VPP's dump", sw)
		}
		up = &ownedIf{swIfIndex: sw, kind: a.driver.kind(), key: a.driver.key(), note: note, details: dets[0]}
		a.log.Info("vpp: created the uplink", "driver", a.driver.kind(), "device", a.driver.key(), "sw_if_index", sw, "name", dets[0].InterfaceName)
	}
	a.setUplink(up)

	if err := a.applyLink(ctx, c, up); err != nil {
		return err
	}
	for _, r := range a.cfg.Routes {
		k := routeKey{route: r, swIfIndex: up.swIfIndex}
		if slices.Contains(keep, k) {
			continue
		}
		if err := a.addRoute(ctx, c, k); err != nil {
			return err
		}
	}

	if !c.sessionEnabled {
		if _, err := invoke(ctx, c, &session.SessionEnableDisableV2{RtEngineType: session.RT_BACKEND_ENGINE_API_RULE_TABLE}, c.sess.SessionEnableDisableV2); err != nil {
			return err
		}
		c.sessionEnabled = true
	}
	if err := a.addNamespaces(ctx, c, want, up.swIfIndex); err != nil {
		return err
	}
	return a.handoff.sync(d, want)
}

// applyLink sets MAC, MTU, rx mode, admin state and addresses where they differ.
func (a *Agent) applyLink(ctx context.Context, c *vppConn, up *ownedIf) error {
	u := a.cfg.Uplink
	sw := interface_types.InterfaceIndex(up.swIfIndex)
	if u.MAC != nil && !bytes.Equal(up.details.L2Address[:], u.MAC) {
		if _, err := invoke(ctx, c, &interfaces.SwInterfaceSetMacAddress{SwIfIndex: sw, MacAddress: ethernet_types.NewMacAddress(u.MAC)},
			c.ifc.SwInterfaceSetMacAddress); err != nil {
			return err
		}
	}
	if u.MTU != 0 && up.details.LinkMtu != u.MTU {
		if _, err := invoke(ctx, c, &interfaces.HwInterfaceSetMtu{SwIfIndex: sw, Mtu: u.MTU}, c.ifc.HwInterfaceSetMtu); err != nil {
			return err
		}
	}

	queues, err := dump[*interfaces.SwInterfaceRxPlacementDetails](ctx, c, &interfaces.SwInterfaceRxPlacementDump{SwIfIndex: sw}, c.ifc.SwInterfaceRxPlacementDump)
	if err != nil {
		return err
	}
	mode := rxModes[u.RxMode]
	if slices.ContainsFunc(queues, func(q *interfaces.SwInterfaceRxPlacementDetails) bool { return q.Mode != mode }) {
		if _, err := invoke(ctx, c, &interfaces.SwInterfaceSetRxMode{SwIfIndex: sw, Mode: mode}, c.ifc.SwInterfaceSetRxMode); err != nil {
			return err
		}
	}

	if up.details.Flags&interface_types.IF_STATUS_API_FLAG_ADMIN_UP == 0 {
		if _, err := invoke(ctx, c, &interfaces.SwInterfaceSetFlags{SwIfIndex: sw, Flags: interface_types.IF_STATUS_API_FLAG_ADMIN_UP},
			c.ifc.SwInterfaceSetFlags); err != nil {
			return err
		}
	}

	// Addresses go on after admin up: set on a down interface, VPP installs no connected
	// routes for them until it comes up, and ARP on the link misbehaves.
	var have []netip.Prefix
	for _, v6 := range []bool{false, true} {
		ds, err := dump[*ip.IPAddressDetails](ctx, c, &ip.IPAddressDump{SwIfIndex: sw, IsIPv6: v6}, c.ipc.IPAddressDump)
		if err != nil {
			return err
		}
		for _, d := range ds {
			have = append(have, fromPrefix(ip_types.Prefix(d.Prefix)))
		}
	}
	for _, p := range have {
		if !slices.Contains(u.Addresses, p) {
			if _, err := invoke(ctx, c, &interfaces.SwInterfaceAddDelAddress{SwIfIndex: sw, IsAdd: false, Prefix: ip_types.AddressWithPrefix(toPrefix(p))},
				c.ifc.SwInterfaceAddDelAddress); err != nil {
				return err
			}
		}
	}
	for _, p := range u.Addresses {
		if !slices.Contains(have, p) {
			if _, err := invoke(ctx, c, &interfaces.SwInterfaceAddDelAddress{SwIfIndex: sw, IsAdd: true, Prefix: ip_types.AddressWithPrefix(toPrefix(p))},
				c.ifc.SwInterfaceAddDelAddress); err != nil {
				return err
			}
		}
	}
	return nil
}

var rxModes = map[RxMode]interface_types.RxMode{
	RxPolling:   interface_types.RX_MODE_API_POLLING,
	RxInterrupt: interface_types.RX_MODE_API_INTERRUPT,
	RxAdaptive:  interface_types.RX_MODE_API_ADAPTIVE,
}

// routeKey is one single-path route through an owned interface.
type routeKey struct {
	route     Route
	swIfIndex uint32
}

type ownedRoute struct {
	routeKey
	table uint32
	paths []fib_types.FibPath // as dumped, for an exact delete
}

// ownedRoutes dumps the default table (both families) and returns the routes the agent
// counts as its own: every path a normal path through an owned interface to a next hop. That
// leaves out the routes VPP makes itself there: connected (no next hop), local (path type
// local) and the host routes of resolved neighbors (next hop = the prefix's address).
func (a *Agent) ownedRoutes(ctx context.Context, c *vppConn, owned map[uint32]bool) ([]ownedRoute, error) {
	var out []ownedRoute
	for _, v6 := range []bool{false, true} {
		ds, err := dump[*ip.IPRouteDetails](ctx, c, &ip.IPRouteDump{Table: ip.IPTable{TableID: 0, IsIP6: v6}}, c.ipc.IPRouteDump)
		if err != nil {
			return nil, err
		}
		for _, d := range ds {
			prefix := fromPrefix(d.Route.Prefix)
			mine := len(d.Route.Paths) > 0
			for _, p := range d.Route.Paths {
				nh := pathNextHop(p)
				if !owned[p.SwIfIndex] || p.Type != fib_types.FIB_API_PATH_TYPE_NORMAL || !nh.IsValid() || nh.IsUnspecified() ||
					(prefix.IsSingleIP() && prefix.Addr() == nh) {
					mine = false
				}
			}
			if !mine {
				continue
			}
			r := ownedRoute{table: d.Route.TableID, paths: d.Route.Paths}
			// A multipath route is never one of the configured (single path) routes: it is
			// removed and, if configured, added back with its one path.
			if len(d.Route.Paths) == 1 {
				r.routeKey = routeKey{route: Route{Prefix: prefix, Via: pathNextHop(d.Route.Paths[0])}, swIfIndex: d.Route.Paths[0].SwIfIndex}
			} else {
				r.routeKey = routeKey{route: Route{Prefix: prefix}, swIfIndex: invalidIndex}
			}
			out = append(out, r)
		}
	}
	return out, nil
}

func (a *Agent) delRoute(ctx context.Context, c *vppConn, r ownedRoute) error {
	_, err := invoke(ctx, c, &ip.IPRouteAddDel{IsAdd: false, Route: ip.IPRoute{TableID: r.table, Prefix: toPrefix(r.route.Prefix),
		NPaths: uint8(len(r.paths)), Paths: r.paths}}, c.ipc.IPRouteAddDel)
	return err
}

func (a *Agent) addRoute(ctx context.Context, c *vppConn, k routeKey) error {
	path := nextHopPath(k.swIfIndex, k.route.Via)
	_, err := invoke(ctx, c, &ip.IPRouteAddDel{IsAdd: true, Route: ip.IPRoute{TableID: 0, Prefix: toPrefix(k.route.Prefix.Masked()),
		NPaths: 1, Paths: []fib_types.FibPath{path}}}, c.ipc.IPRouteAddDel)
	return err
}

// namespaceSpec is what one sidecar's app namespace should be.
type namespaceSpec struct {
	sidecar  Sidecar
	secret   uint64
	sockName string
}

func (a *Agent) wantNamespaces(d Desired) map[string]namespaceSpec {
	want := make(map[string]namespaceSpec, len(d.Sidecars))
	for _, s := range d.Sidecars {
		id := NamespaceID(s.ID)
		want[id] = namespaceSpec{sidecar: s, secret: a.secret(id), sockName: a.cfg.AppSocketDir + "/" + id}
	}
	return want
}

// removeNamespaces deletes the agent's namespaces that are not wanted: those it added through
// this connection, and those the hand-off directory shows it added before (an agent restart
// forgets the first kind; VPP has no dump of namespaces). VPP refusing to delete one of the
// second kind means it is gone already (VPP restarted meanwhile).
func (a *Agent) removeNamespaces(ctx context.Context, c *vppConn, want map[string]namespaceSpec) error {
	gone := map[string]bool{} // namespace id → known to be in VPP
	for id := range c.namespaces {
		if _, ok := want[id]; !ok {
			gone[id] = true
		}
	}
	leftovers, err := a.handoff.leftovers(want)
	if err != nil {
		return err
	}
	for _, sid := range leftovers {
		id := NamespaceID(sid)
		if _, known := gone[id]; !known {
			gone[id] = false
		}
	}
	ids := make([]string, 0, len(gone))
	for id := range gone {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	for _, id := range ids {
		_, err := invoke(ctx, c, &session.AppNamespaceAddDelV4{IsAdd: false, NamespaceID: id, SwIfIndex: interface_types.InterfaceIndex(invalidIndex)},
			c.sess.AppNamespaceAddDelV4)
		var apiErr *APIError
		if err != nil && !gone[id] && errors.As(err, &apiErr) && apiErr.Retval != 0 {
			a.log.Debug("vpp: namespace of a removed sidecar was not in VPP", "namespace", id, "err", err)
			err = nil
		}
		if err != nil {
			return err
		}
		delete(c.namespaces, id)
		if err := a.handoff.remove(strings.TrimPrefix(id, namespacePrefix)); err != nil {
			return err
		}
		a.log.Info("vpp: removed app namespace", "namespace", id)
	}
	return nil
}

// addNamespaces adds (or updates: VPP's add replaces an existing namespace's settings) the
// wanted namespaces this connection has not applied as they should be.
func (a *Agent) addNamespaces(ctx context.Context, c *vppConn, want map[string]namespaceSpec, sw uint32) error {
	ids := make([]string, 0, len(want))
	for id := range want {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	for _, id := range ids {
		spec := want[id]
		applied := appliedNamespace{swIfIndex: sw, secret: spec.secret, sockName: spec.sockName}
		if c.namespaces[id] == applied {
			continue
		}
		if _, err := invoke(ctx, c, &session.AppNamespaceAddDelV4{
			IsAdd:       true,
			Secret:      spec.secret,
			SwIfIndex:   interface_types.InterfaceIndex(sw),
			NamespaceID: id,
			SockName:    spec.sockName,
		}, c.sess.AppNamespaceAddDelV4); err != nil {
			return err
		}
		c.namespaces[id] = applied
		a.log.Info("vpp: app namespace ready", "namespace", id, "sidecar", spec.sidecar.Name, "socket", spec.sockName)
	}
	return nil
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

func nextHopPath(sw uint32, nh netip.Addr) fib_types.FibPath {
	p := fib_types.FibPath{SwIfIndex: sw, Weight: 1, Type: fib_types.FIB_API_PATH_TYPE_NORMAL}
	if nh.Is6() {
		p.Proto = fib_types.FIB_API_PATH_NH_PROTO_IP6
		p.Nh.Address.SetIP6(ip_types.IP6Address(nh.As16()))
	} else {
		p.Proto = fib_types.FIB_API_PATH_NH_PROTO_IP4
		p.Nh.Address.SetIP4(ip_types.IP4Address(nh.As4()))
	}
	return p
}

func pathNextHop(p fib_types.FibPath) netip.Addr {
	switch p.Proto {
	case fib_types.FIB_API_PATH_NH_PROTO_IP4:
		return netip.AddrFrom4(p.Nh.Address.GetIP4())
	case fib_types.FIB_API_PATH_NH_PROTO_IP6:
		return netip.AddrFrom16(p.Nh.Address.GetIP6())
	}
	return netip.Addr{}
}
