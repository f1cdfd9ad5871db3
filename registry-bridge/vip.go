package bridge

import (
	"cmp"
	"fmt"
	"hash/fnv"
	"math/big"
	"net/netip"
	"slices"
)

// DefaultVIPRange is where TCP services get their addresses when no range is configured. It
// is in the reserved 240.0.0.0/4 block, next to (not inside) the 240.240.0.0/16 that Istio's
// own DNS auto-allocation uses.
var DefaultVIPRange = netip.MustParsePrefix("240.250.0.0/16")

// AssignVIPs gives each host a distinct address from prefix. Istio matches TCP traffic by
// destination address and port only, so a TCP ServiceEntry needs an address of its own, or
// it captures every connection on its port.
//
// The assignment is a function of the set of hosts alone, so every replica computes the same
// one: each host hashes to a slot, and hosts are placed in order of (slot, name), a host whose
// slot is taken taking the next free one. A host keeps its address while the hosts before it
// on its probe path do not change, which in a range much larger than the service count is
// nearly always. It fails when there are more hosts than addresses.
func AssignVIPs(hosts []string, prefix netip.Prefix) (map[string]string, error) {
	prefix = prefix.Masked()
	bits := prefix.Addr().BitLen() - prefix.Bits()
	if bits > 62 {
		bits = 62 // an IPv6 range this large is never exhausted
	}
	size := uint64(1) << bits
	// Leave out the first and last address of IPv4 ranges of 4 or more (network, broadcast).
	first, usable := uint64(0), size
	if prefix.Addr().Is4() && size >= 4 {
		first, usable = 1, size-2
	}
	if uint64(len(hosts)) > usable {
		return nil, fmt.Errorf("VIP range %s has %d addresses for %d TCP services; configure a larger range", prefix, usable, len(hosts))
	}
	type slotted struct {
		host string
		slot uint64
	}
	order := make([]slotted, 0, len(hosts))
	for _, h := range hosts {
		f := fnv.New64a()
		f.Write([]byte(h))
		order = append(order, slotted{h, f.Sum64() % usable})
	}
	slices.SortFunc(order, func(a, b slotted) int { return cmp.Or(cmp.Compare(a.slot, b.slot), cmp.Compare(a.host, b.host)) })
	taken := make(map[uint64]bool, len(hosts))
	out := make(map[string]string, len(hosts))
	base := new(big.Int).SetBytes(prefix.Addr().AsSlice())
	for _, o := range order {
		s := o.slot
		for taken[s] {
			s = (s + 1) % usable
		}
		taken[s] = true
		n := new(big.Int).Add(base, new(big.Int).SetUint64(first+s))
		b := n.FillBytes(make([]byte, prefix.Addr().BitLen()/8))
		addr, _ := netip.AddrFromSlice(b)
		out[o.host] = addr.String()
	}
	return out, nil
}
