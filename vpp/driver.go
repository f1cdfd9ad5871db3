package vpp

import (
	"context"
	"fmt"
	"strings"

	"go.fd.io/govpp/api"
	interfaces "go.fd.io/govpp/binapi/interface"
	"go.fd.io/govpp/binapi/interface_types"
)

// linkDriver creates and removes the uplink interface one way: VPP's device API, rdma, or
// af_packet. Everything after creation (MAC, MTU, rx mode, state, addresses) is common.
type linkDriver interface {
	kind() Driver
	// key names the device behind the interface (a PCI address, a netdev); an interface the
	// agent owns with another kind or key is not the one wanted and goes.
	key() string
	// messages are the requests and replies the driver uses, for the CRC check.
	messages() []api.Message
	// create makes the interface and returns its index and the driver's note for remove (it
	// ends up in the tag). On error it leaves nothing behind.
	create(ctx context.Context, c *vppConn) (swIfIndex uint32, note string, err error)
	// remove deletes an interface the agent made, found by its tag.
	remove(ctx context.Context, c *vppConn, o ownedIf) error
}

var (
	_ linkDriver = (*devDriver)(nil)
	_ linkDriver = (*rdmaDriver)(nil)
	_ linkDriver = (*afPacketDriver)(nil)
)

func newDriver(u Uplink) linkDriver {
	switch u.Driver {
	case DriverDev:
		return &devDriver{pci: u.PCIAddress, driverName: u.DevDriver, name: u.Name,
			rxQueues: u.RxQueues, txQueues: u.TxQueues, rxQueueSize: u.RxQueueSize, txQueueSize: u.TxQueueSize}
	case DriverRDMA:
		return &rdmaDriver{hostIf: u.HostIf, name: u.Name,
			rxQueues: u.RxQueues, rxQueueSize: u.RxQueueSize, txQueueSize: u.TxQueueSize}
	case DriverAFPacket:
		return &afPacketDriver{hostIf: u.HostIf, mac: u.MAC, rxQueues: u.RxQueues, txQueues: u.TxQueues}
	}
	return nil
}

// driverForTag returns the driver able to remove an owned interface of another kind or key
// than the configured one (the configuration changed since it was made).
func driverForTag(o ownedIf) linkDriver {
	switch o.kind {
	case DriverDev:
		return &devDriver{pci: o.key}
	case DriverRDMA:
		return &rdmaDriver{hostIf: o.key}
	case DriverAFPacket:
		return &afPacketDriver{hostIf: o.key}
	}
	return nil
}

// Interface tags mark what the agent owns: "meshturbo/<driver>/<key>[/<note>]". VPP keeps
// tags (64 bytes) with the interface, so ownership survives agent restarts; interfaces without
// the prefix are never touched.
const tagPrefix = "meshturbo/"

func makeTag(kind Driver, key, note string) string {
	t := tagPrefix + string(kind) + "/" + key
	if note != "" {
		t += "/" + note
	}
	return t
}

// ownedIf is an interface carrying the agent's tag.
type ownedIf struct {
	swIfIndex uint32
	kind      Driver
	key       string
	note      string
	details   *interfaces.SwInterfaceDetails
}

func parseTag(tag string) (kind Driver, key, note string, ok bool) {
	rest, found := strings.CutPrefix(tag, tagPrefix)
	if !found {
		return "", "", "", false
	}
	parts := strings.SplitN(rest, "/", 3)
	if len(parts) < 2 || parts[0] == "" || parts[1] == "" {
		return "", "", "", false
	}
	if len(parts) == 3 {
		note = parts[2]
	}
	return Driver(parts[0]), parts[1], note, true
}

// tagInterface tags a new interface; if that fails the interface is removed again, so that no
// untagged (unowned, never cleaned up) interface stays behind.
func tagInterface(ctx context.Context, c *vppConn, d linkDriver, sw uint32, note string) error {
	tag := makeTag(d.kind(), d.key(), note)
	if len(tag) > 63 {
		return fmt.Errorf("vpp: tag %q is longer than VPP's 63 characters", tag)
	}
	_, err := invoke(ctx, c, &interfaces.SwInterfaceTagAddDel{IsAdd: true, SwIfIndex: interface_types.InterfaceIndex(sw), Tag: tag},
		c.ifc.SwInterfaceTagAddDel)
	if err == nil {
		return nil
	}
	if rerr := d.remove(ctx, c, ownedIf{swIfIndex: sw, kind: d.kind(), key: d.key(), note: note}); rerr != nil {
		return fmt.Errorf("%w (and removing the untagged interface %d failed: %v)", err, sw, rerr)
	}
	return err
}
