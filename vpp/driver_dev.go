package vpp

import (
	"context"
	"fmt"
	"strconv"

	"go.fd.io/govpp/api"
	"go.fd.io/govpp/binapi/dev"
)

// devDriver drives an Intel VF with VPP's device API (binapi package dev, in VPP core since
// 24.02): dev_attach binds the PCI device to the native "iavf" driver and returns a device
// index, dev_create_port_if makes port 0 an interface. The VF must be bound to vfio-pci. VPP
// offers no dump of attached devices, so the device index is kept in the interface tag, where
// removal (dev_remove_port_if, then dev_detach) finds it.
type devDriver struct {
	pci         string
	driverName  string
	name        string
	rxQueues    uint16
	txQueues    uint16
	rxQueueSize uint16
	txQueueSize uint16
}

func (d *devDriver) kind() Driver { return DriverDev }
func (d *devDriver) key() string  { return d.pci }

func (d *devDriver) messages() []api.Message {
	return []api.Message{
		&dev.DevAttach{}, &dev.DevAttachReply{},
		&dev.DevCreatePortIf{}, &dev.DevCreatePortIfReply{},
		&dev.DevRemovePortIf{}, &dev.DevRemovePortIfReply{},
		&dev.DevDetach{}, &dev.DevDetachReply{},
	}
}

func (d *devDriver) create(ctx context.Context, c *vppConn) (uint32, string, error) {
	att, err := invoke(ctx, c, &dev.DevAttach{DeviceID: "pci/" + d.pci, DriverName: d.driverName}, c.dev.DevAttach)
	if err != nil {
		return 0, "", err
	}
	port, err := invoke(ctx, c, &dev.DevCreatePortIf{
		DevIndex:    att.DevIndex,
		IntfName:    d.name,
		NumRxQueues: d.rxQueues,
		NumTxQueues: d.txQueues,
		RxQueueSize: d.rxQueueSize,
		TxQueueSize: d.txQueueSize,
		PortID:      0, // a VF has one port
	}, c.dev.DevCreatePortIf)
	if err != nil {
		// Leave no attached device behind: nothing would ever detach it.
		if _, derr := invoke(ctx, c, &dev.DevDetach{DevIndex: att.DevIndex}, c.dev.DevDetach); derr != nil {
			return 0, "", fmt.Errorf("%w (and detaching device %d failed: %v)", err, att.DevIndex, derr)
		}
		return 0, "", err
	}
	return port.SwIfIndex, strconv.FormatUint(uint64(att.DevIndex), 10), nil
}

func (d *devDriver) remove(ctx context.Context, c *vppConn, o ownedIf) error {
	devIndex, err := strconv.ParseUint(o.note, 10, 32)
	if err != nil {
		return fmt.Errorf("vpp: interface %d: tag note %q is no device index", o.swIfIndex, o.note)
	}
	if _, err := invoke(ctx, c, &dev.DevRemovePortIf{SwIfIndex: o.swIfIndex}, c.dev.DevRemovePortIf); err != nil {
		return err
	}
	_, err = invoke(ctx, c, &dev.DevDetach{DevIndex: uint32(devIndex)}, c.dev.DevDetach)
	return err
}
