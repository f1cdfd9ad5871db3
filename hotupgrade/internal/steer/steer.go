// Package steer chooses which listen sockets of a SO_REUSEPORT group take its new TCP
// connections: a BPF_PROG_TYPE_SK_REUSEPORT program (steer.c), attached to the group,
// selects among the sockets it was given by the connection's reuseport hash, and the other
// members of the group get none. The same program picks where the connections queued on a
// closing member move (it is attached for select-or-migrate), so they go to the chosen
// sockets as well.
//
// A Steer keeps no socket: To and Detach take the sockets they act on and leave them to
// the caller, who should close them soon. A copy of a listen socket keeps it listening after
// its owner closes it, with nobody to accept what arrives; the map the program selects
// from holds no reference to its sockets.
//
// What outlives the Steer: a program stays attached to its groups until Detach, or until
// another program replaces it, or until the group's last socket closes. It goes on steering
// to the sockets of the last To; the kernel empties a map slot when its socket closes, and a
// selection from an empty slot (or for a group the program has no entry for) falls back to
// the kernel's own hash over the whole group. So a process that dies while steering leaves
// every connection answered, only spread as the program last said.
package steer

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"slices"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/features"
	"golang.org/x/sys/unix"
)

// Steer owns the program and its maps.
type Steer struct {
	objs  steerObjects
	slots uint32 // capacity of hu_socks
	next  uint32 // first slot never used
	// used holds what each group's entry in hu_groups points to.
	used map[steerHuGroupKey]members
}

// members are the sockets a group is steered to: their slots of hu_socks and their cookies.
type members struct {
	slots   []uint32
	cookies []uint64 // sorted
}

// New loads the program and its maps. It reports a kernel without the program or map type
// as a wrapped ebpf.ErrNotSupported; without CAP_BPF and CAP_NET_ADMIN loading fails with
// a permission error.
func New() (*Steer, error) {
	if err := features.HaveProgramType(ebpf.SkReuseport); err != nil {
		return nil, fmt.Errorf("steer: sk_reuseport programs: %w", err)
	}
	if err := features.HaveMapType(ebpf.ReusePortSockArray); err != nil {
		return nil, fmt.Errorf("steer: reuseport sockarray maps: %w", err)
	}
	spec, err := loadSteer()
	if err != nil {
		return nil, fmt.Errorf("steer: %w", err)
	}
	s := &Steer{slots: spec.Maps[steerMapHuSocks].MaxEntries, used: map[steerHuGroupKey]members{}}
	if err := spec.LoadAndAssign(&s.objs, nil); err != nil {
		return nil, fmt.Errorf("steer: load the sk_reuseport program: %w", err)
	}
	return s, nil
}

// To steers the new connections of each group that one of fds belongs to (the listen
// sockets bound to one address) to fds' sockets of that group, and attaches the program to
// those groups. Groups a previous To steered that fds do not name go back to the kernel's
// hash. A hash map update replaces a group's entry at once: a connection sees either the
// previous sockets or the new ones.
func (s *Steer) To(fds []int) error {
	groups, err := byGroup(fds)
	if err != nil {
		return err
	}
	for key, fds := range groups {
		cookies, err := cookiesOf(fds)
		if err != nil {
			return err
		}
		prev := s.used[key]
		if slices.Equal(cookies, prev.cookies) {
			continue
		}
		for _, c := range cookies {
			if _, found := slices.BinarySearch(prev.cookies, c); found {
				// A socket is in one slot at a time: empty the previous ones first, and
				// the group is on the kernel's hash until the entry points at the new.
				s.forget(key)
				break
			}
		}
		n := uint32(len(fds))
		if s.next+n > s.slots {
			return fmt.Errorf("steer to %s: %d more sockets do not fit in %d slots", key, n, s.slots)
		}
		base := s.next
		s.next += n
		var slots []uint32
		for i, fd := range fds {
			slot := base + uint32(i)
			if err := s.objs.HuSocks.Update(slot, uint64(fd), ebpf.UpdateAny); err != nil {
				s.free(slots)
				if errors.Is(err, unix.EBUSY) {
					err = fmt.Errorf("%w (the socket is in another sockarray or carries other kernel user data)", err)
				}
				return fmt.Errorf("steer to %s: put socket in slot %d: %w", key, slot, err)
			}
			slots = append(slots, slot)
		}
		// Attached first, the program goes on selecting from the group's previous slots
		// (or none) until the entry below points at the new ones.
		if err := unix.SetsockoptInt(fds[0], unix.SOL_SOCKET, unix.SO_ATTACH_REUSEPORT_EBPF, s.objs.HuSteer.FD()); err != nil {
			s.free(slots)
			return fmt.Errorf("steer to %s: attach the program (SO_ATTACH_REUSEPORT_EBPF): %w", key, err)
		}
		if err := s.objs.HuGroups.Update(key, steerHuGroup{Base: base, Count: n}, ebpf.UpdateAny); err != nil {
			s.free(slots)
			return fmt.Errorf("steer to %s: %w", key, err)
		}
		s.free(s.used[key].slots)
		s.used[key] = members{slots: slots, cookies: cookies}
	}
	for key := range s.used {
		if _, ok := groups[key]; !ok {
			s.forget(key)
		}
	}
	return nil
}

// Detach removes the program from the groups fds belong to; the kernel hashes their new
// connections over all their sockets again. It removes whichever program a group has (the
// kernel does not say which it is); a group without one is no error.
func (s *Steer) Detach(fds []int) error {
	groups, err := byGroup(fds)
	if err != nil {
		return err
	}
	var errs []error
	for key, fds := range groups {
		err := unix.SetsockoptInt(fds[0], unix.SOL_SOCKET, unix.SO_DETACH_REUSEPORT_BPF, 0)
		if err != nil && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("detach the program from %s (SO_DETACH_REUSEPORT_BPF): %w", key, err))
			continue
		}
		s.forget(key)
	}
	return errors.Join(errs...)
}

// Close releases the program and its maps. A group the program is still attached to keeps
// it (see the package comment): Detach first.
func (s *Steer) Close() error {
	return s.objs.Close()
}

// forget puts a group back on the kernel's hash.
func (s *Steer) forget(key steerHuGroupKey) {
	_ = s.objs.HuGroups.Delete(key)
	s.free(s.used[key].slots)
	delete(s.used, key)
}

// free empties slots, so that the map holds no socket it no longer steers to.
func (s *Steer) free(slots []uint32) {
	for _, slot := range slots {
		_ = s.objs.HuSocks.Delete(slot)
	}
}

// byGroup groups TCP listen sockets by the address they are bound to: one SO_REUSEPORT
// group each (sockets bound to one address share a group).
func byGroup(fds []int) (map[steerHuGroupKey][]int, error) {
	groups := map[steerHuGroupKey][]int{}
	for _, fd := range fds {
		key, err := groupOf(fd)
		if err != nil {
			return nil, err
		}
		groups[key] = append(groups[key], fd)
	}
	return groups, nil
}

func cookiesOf(fds []int) ([]uint64, error) {
	var out []uint64
	for _, fd := range fds {
		c, err := unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_COOKIE)
		if err != nil {
			return nil, fmt.Errorf("steer: socket %d: cookie: %w", fd, err)
		}
		out = append(out, c)
	}
	slices.Sort(out)
	return out, nil
}

func groupOf(fd int) (steerHuGroupKey, error) {
	var key steerHuGroupKey
	proto, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_PROTOCOL)
	if err != nil {
		return key, fmt.Errorf("steer: socket %d: %w", fd, err)
	}
	acc, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ACCEPTCONN)
	if err != nil {
		return key, fmt.Errorf("steer: socket %d: %w", fd, err)
	}
	if proto != unix.IPPROTO_TCP || acc == 0 {
		return key, fmt.Errorf("steer: socket %d is not a listening TCP socket", fd)
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		return key, fmt.Errorf("steer: socket %d: %w", fd, err)
	}
	// bpf_sock has the address in network byte order, the port in host byte order.
	switch a := sa.(type) {
	case *unix.SockaddrInet4:
		key.Family, key.Port = unix.AF_INET, uint32(a.Port)
		key.Addr[0] = binary.NativeEndian.Uint32(a.Addr[:])
	case *unix.SockaddrInet6:
		key.Family, key.Port = unix.AF_INET6, uint32(a.Port)
		for i := range key.Addr {
			key.Addr[i] = binary.NativeEndian.Uint32(a.Addr[4*i:])
		}
	default:
		return key, fmt.Errorf("steer: socket %d is neither IPv4 nor IPv6", fd)
	}
	return key, nil
}

func (k steerHuGroupKey) String() string {
	var b [16]byte
	for i, w := range k.Addr {
		binary.NativeEndian.PutUint32(b[4*i:], w)
	}
	addr := netip.AddrFrom16(b)
	if k.Family == unix.AF_INET {
		addr = netip.AddrFrom4([4]byte(b[:4]))
	}
	return netip.AddrPortFrom(addr, uint16(k.Port)).String()
}

// Backlog is the number of connections waiting in the accept queue of listen socket fd.
func Backlog(fd int) (int, error) {
	// tcp_get_info reports a listener's accept queue length as tcpi_unacked.
	info, err := unix.GetsockoptTCPInfo(fd, unix.IPPROTO_TCP, unix.TCP_INFO)
	if err != nil {
		return 0, fmt.Errorf("steer: accept queue of socket %d: %w", fd, err)
	}
	return int(info.Unacked), nil
}
