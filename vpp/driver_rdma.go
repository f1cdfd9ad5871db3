package vpp

import (
	"context"

	"go.fd.io/govpp/api"
	"go.fd.io/govpp/binapi/interface_types"
	"go.fd.io/govpp/binapi/rdma"
)

// rdmaDriver drives a Mellanox/NVIDIA VF through VPP's rdma plugin (rdma_create_v4). The VF
// stays on mlx5_core and keeps its netdev, which VPP opens. VPP's rdma interface makes up its
// own MAC; the reconciler then sets the VF's (Uplink.MAC is required for this driver).
type rdmaDriver struct {
	hostIf      string
	name        string
	rxQueues    uint16
	rxQueueSize uint16
	txQueueSize uint16
}

func (d *rdmaDriver) kind() Driver { return DriverRDMA }
func (d *rdmaDriver) key() string  { return d.hostIf }

func (d *rdmaDriver) messages() []api.Message {
	return []api.Message{
		&rdma.RdmaCreateV4{}, &rdma.RdmaCreateV4Reply{},
		&rdma.RdmaDelete{}, &rdma.RdmaDeleteReply{},
	}
}

func (d *rdmaDriver) create(ctx context.Context, c *vppConn) (uint32, string, error) {
	rep, err := invoke(ctx, c, &rdma.RdmaCreateV4{
		HostIf:  d.hostIf,
		Name:    d.name,
		RxqNum:  d.rxQueues,
		RxqSize: d.rxQueueSize,
		TxqSize: d.txQueueSize,
		Mode:    rdma.RDMA_API_MODE_AUTO, // direct verbs where the NIC has them
	}, c.rdma.RdmaCreateV4)
	if err != nil {
		return 0, "", err
	}
	return uint32(rep.SwIfIndex), "", nil
}

func (d *rdmaDriver) remove(ctx context.Context, c *vppConn, o ownedIf) error {
	_, err := invoke(ctx, c, &rdma.RdmaDelete{SwIfIndex: interface_types.InterfaceIndex(o.swIfIndex)}, c.rdma.RdmaDelete)
	return err
}
