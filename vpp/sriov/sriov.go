// Package sriov finds SR-IOV physical functions (PFs) and their virtual functions (VFs) in
// sysfs, and reads what Kubernetes hands a pod about them: the PCI addresses the SR-IOV network
// device plugin allocated (the PCIDEVICE_<RESOURCE> environment variable) and the pod's address
// on that network (the Multus network-status annotation).
//
// Everything reads from a sysfs root given by the caller ("/sys" on a node), so tests run
// against trees built in a temporary directory.
package sriov

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
)

// Function is one PCI function: a PF or a VF.
type Function struct {
	// PCIAddress is the full address, domain included: "0000:3b:02.0".
	PCIAddress string
	// Vendor and Device are the PCI ids as sysfs prints them, e.g. "0x8086" and "0x154c".
	Vendor string
	Device string
	// Driver is the bound kernel driver ("i40e", "iavf", "mlx5_core", "vfio-pci"); empty when
	// no driver is bound.
	Driver string
	// NUMANode is the function's NUMA node, -1 when the kernel does not know.
	NUMANode int
	// Netdev is the kernel network interface of the function; empty when the bound driver
	// makes none (vfio-pci, or no driver). MAC and MTU are read from it.
	Netdev string
	MAC    net.HardwareAddr
	MTU    int
}

// PF is a physical function that can create VFs.
type PF struct {
	Function
	TotalVFs int // sriov_totalvfs: how many VFs the device supports
	NumVFs   int // sriov_numvfs: how many are enabled now
	VFs      []VF
}

// VF is a virtual function.
type VF struct {
	Function
	// Index is n in the PF's virtfn<n> link.
	Index int
	// PF is the parent's PCI address.
	PF string
}

var pciAddrRE = regexp.MustCompile(`^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$`)

// ValidPCIAddress reports whether s is a full PCI address in sysfs form: domain:bus:device.function,
// lower-case hex, e.g. "0000:3b:02.0".
func ValidPCIAddress(s string) bool { return pciAddrRE.MatchString(s) }

func devicesDir(root string) string { return filepath.Join(root, "bus", "pci", "devices") }

// Discover returns every PF under root (a sysfs mount, normally "/sys") with its VFs, ordered by
// PCI address and VF index. A device counts as a PF when it has an sriov_totalvfs file with a
// value above zero.
func Discover(root string) ([]PF, error) {
	entries, err := os.ReadDir(devicesDir(root))
	if err != nil {
		return nil, fmt.Errorf("sriov: list PCI devices: %w", err)
	}
	var pfs []PF
	for _, e := range entries {
		addr := e.Name()
		if !ValidPCIAddress(addr) {
			continue
		}
		total, ok, err := readIntFile(filepath.Join(devicesDir(root), addr, "sriov_totalvfs"))
		if err != nil {
			return nil, fmt.Errorf("sriov: PF %s: %w", addr, err)
		}
		if !ok || total == 0 {
			continue
		}
		pf, err := readPF(root, addr, total)
		if err != nil {
			return nil, err
		}
		pfs = append(pfs, pf)
	}
	slices.SortFunc(pfs, func(a, b PF) int { return strings.Compare(a.PCIAddress, b.PCIAddress) })
	return pfs, nil
}

func readPF(root, addr string, total int) (PF, error) {
	fn, err := readFunction(root, addr)
	if err != nil {
		return PF{}, err
	}
	pf := PF{Function: fn, TotalVFs: total}
	if n, ok, err := readIntFile(filepath.Join(devicesDir(root), addr, "sriov_numvfs")); err != nil {
		return PF{}, fmt.Errorf("sriov: PF %s: %w", addr, err)
	} else if ok {
		pf.NumVFs = n
	}
	links, err := filepath.Glob(filepath.Join(devicesDir(root), addr, "virtfn*"))
	if err != nil {
		return PF{}, fmt.Errorf("sriov: PF %s: %w", addr, err)
	}
	for _, l := range links {
		idx, err := strconv.Atoi(strings.TrimPrefix(filepath.Base(l), "virtfn"))
		if err != nil {
			continue // not virtfn<n>
		}
		vfAddr, err := linkBase(l)
		if err != nil {
			return PF{}, fmt.Errorf("sriov: PF %s: %w", addr, err)
		}
		vfn, err := readFunction(root, vfAddr)
		if err != nil {
			return PF{}, err
		}
		pf.VFs = append(pf.VFs, VF{Function: vfn, Index: idx, PF: addr})
	}
	slices.SortFunc(pf.VFs, func(a, b VF) int { return a.Index - b.Index })
	return pf, nil
}

// LookupVF returns the VF at PCI address addr, with its index and parent PF.
func LookupVF(root, addr string) (VF, error) {
	if !ValidPCIAddress(addr) {
		return VF{}, fmt.Errorf("sriov: %q is not a PCI address like 0000:3b:02.0", addr)
	}
	dir := filepath.Join(devicesDir(root), addr)
	if _, err := os.Stat(dir); err != nil {
		return VF{}, fmt.Errorf("sriov: VF %s: %w", addr, err)
	}
	pfAddr, err := linkBase(filepath.Join(dir, "physfn"))
	if errors.Is(err, fs.ErrNotExist) {
		return VF{}, fmt.Errorf("sriov: %s is not a VF (it has no physfn link)", addr)
	}
	if err != nil {
		return VF{}, fmt.Errorf("sriov: VF %s: %w", addr, err)
	}
	fn, err := readFunction(root, addr)
	if err != nil {
		return VF{}, err
	}
	vf := VF{Function: fn, Index: -1, PF: pfAddr}
	links, err := filepath.Glob(filepath.Join(devicesDir(root), pfAddr, "virtfn*"))
	if err != nil {
		return VF{}, fmt.Errorf("sriov: VF %s: %w", addr, err)
	}
	for _, l := range links {
		if b, err := linkBase(l); err == nil && b == addr {
			if idx, err := strconv.Atoi(strings.TrimPrefix(filepath.Base(l), "virtfn")); err == nil {
				vf.Index = idx
			}
		}
	}
	if vf.Index < 0 {
		return VF{}, fmt.Errorf("sriov: VF %s: PF %s has no virtfn link to it", addr, pfAddr)
	}
	return vf, nil
}

func readFunction(root, addr string) (Function, error) {
	dir := filepath.Join(devicesDir(root), addr)
	fn := Function{PCIAddress: addr, NUMANode: -1}
	var err error
	if fn.Vendor, err = readTrimmed(filepath.Join(dir, "vendor")); err != nil {
		return Function{}, fmt.Errorf("sriov: %s: %w", addr, err)
	}
	if fn.Device, err = readTrimmed(filepath.Join(dir, "device")); err != nil {
		return Function{}, fmt.Errorf("sriov: %s: %w", addr, err)
	}
	if n, ok, err := readIntFile(filepath.Join(dir, "numa_node")); err != nil {
		return Function{}, fmt.Errorf("sriov: %s: %w", addr, err)
	} else if ok {
		fn.NUMANode = n
	}
	drv, err := linkBase(filepath.Join(dir, "driver"))
	switch {
	case errors.Is(err, fs.ErrNotExist):
	case err != nil:
		return Function{}, fmt.Errorf("sriov: %s: %w", addr, err)
	default:
		fn.Driver = drv
	}
	nets, err := os.ReadDir(filepath.Join(dir, "net"))
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return fn, nil
	case err != nil:
		return Function{}, fmt.Errorf("sriov: %s: %w", addr, err)
	case len(nets) == 0:
		return fn, nil
	}
	// A function has one netdev; should a driver make several, take the first by name.
	fn.Netdev = nets[0].Name()
	ndir := filepath.Join(dir, "net", fn.Netdev)
	if s, err := readTrimmed(filepath.Join(ndir, "address")); err != nil {
		return Function{}, fmt.Errorf("sriov: %s netdev %s: %w", addr, fn.Netdev, err)
	} else if fn.MAC, err = net.ParseMAC(s); err != nil {
		return Function{}, fmt.Errorf("sriov: %s netdev %s: address: %w", addr, fn.Netdev, err)
	}
	if n, ok, err := readIntFile(filepath.Join(ndir, "mtu")); err != nil {
		return Function{}, fmt.Errorf("sriov: %s netdev %s: %w", addr, fn.Netdev, err)
	} else if ok {
		fn.MTU = n
	}
	return fn, nil
}

// linkBase returns the last element of the symlink target at path: sysfs expresses "VF 3 is
// 0000:3b:02.3" and "the driver is iavf" as relative links whose last element is the name.
func linkBase(path string) (string, error) {
	target, err := os.Readlink(path)
	if err != nil {
		return "", err
	}
	return filepath.Base(target), nil
}

func readTrimmed(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	return strings.TrimSpace(string(b)), nil
}

// readIntFile reads a decimal integer file; ok is false when the file does not exist.
func readIntFile(path string) (n int, ok bool, err error) {
	s, err := readTrimmed(path)
	if errors.Is(err, fs.ErrNotExist) {
		return 0, false, nil
	}
	if err != nil {
		return 0, false, err
	}
	n, err = strconv.Atoi(s)
	if err != nil {
		return 0, false, fmt.Errorf("%s: %w", path, err)
	}
	return n, true, nil
}
