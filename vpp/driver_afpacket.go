package vpp

import (
	"context"
	"net"

	"go.fd.io/govpp/api"
	afpacket "go.fd.io/govpp/binapi/af_packet"
	"go.fd.io/govpp/binapi/ethernet_types"
)

// afPacketDriver attaches a kernel interface through an AF_PACKET socket
// (af_packet_create_v3). VPP names the interface host-<netdev>; it is removed by netdev name
// (af_packet_delete).
type afPacketDriver struct {
	hostIf   string
	mac      net.HardwareAddr
	rxQueues uint16
	txQueues uint16
}

func (d *afPacketDriver) kind() Driver { return DriverAFPacket }
func (d *afPacketDriver) key() string  { return d.hostIf }

func (d *afPacketDriver) messages() []api.Message {
	return []api.Message{
		&afpacket.AfPacketCreateV3{}, &afpacket.AfPacketCreateV3Reply{},
		&afpacket.AfPacketDelete{}, &afpacket.AfPacketDeleteReply{},
	}
}

func (d *afPacketDriver) create(ctx context.Context, c *vppConn) (uint32, string, error) {
	req := &afpacket.AfPacketCreateV3{
		Mode:        afpacket.AF_PACKET_API_MODE_ETHERNET,
		HostIfName:  d.hostIf,
		Flags:       afpacket.AF_PACKET_API_FLAG_QDISC_BYPASS,
		NumRxQueues: d.rxQueues,
		NumTxQueues: d.txQueues,
		// Frame sizes and counts 0: VPP's defaults.
	}
	if d.mac != nil {
		req.HwAddr = ethernet_types.NewMacAddress(d.mac)
	} else {
		req.UseRandomHwAddr = true
	}
	rep, err := invoke(ctx, c, req, c.afp.AfPacketCreateV3)
	if err != nil {
		return 0, "", err
	}
	return uint32(rep.SwIfIndex), "", nil
}

func (d *afPacketDriver) remove(ctx context.Context, c *vppConn, _ ownedIf) error {
	_, err := invoke(ctx, c, &afpacket.AfPacketDelete{HostIfName: d.hostIf}, c.afp.AfPacketDelete)
	return err
}
