package hotupgrade

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/meshturbo/meshturbo/hotupgrade/internal/steer"
)

// Steering during a reuseport hand-off (steps 4 and 3 of the design comment in handoff.go):
// before an Envoy is told to stop accepting, the new connections to the listen addresses
// both Envoys share go to the other Envoy's sockets only (package steer attaches a
// sk_reuseport program to each shared SO_REUSEPORT group), and the manager waits until the
// first Envoy has accepted what its sockets had queued. Its listen sockets then close
// empty, and nothing depends on the kernel moving a queue (net.ipv4.tcp_migrate_req) at
// the moment Envoy closes them. The program also decides where a queue moves if there is
// one left, so that goes to the other Envoy as well.
//
// The manager holds copies of Envoy's listen sockets (pidfd_getfd) only while it attaches
// the program or watches the queues: a copy keeps a socket listening after Envoy closes it,
// with nobody to accept.

const (
	// steerWait bounds the wait for the accept queues of the Envoy that is about to stop
	// accepting to be empty; after it, its queues move when its sockets close.
	steerWait = 2 * time.Second
	// steerPoll is how often the queues are read; steerSettle how many reads in a row
	// must find them all empty (a connection whose handshake is under way when steering
	// starts reaches the queue a moment later).
	steerPoll   = 10 * time.Millisecond
	steerSettle = 3
)

// steering is the sk_reuseport program of one hand-off. A nil *steering steers nothing.
type steering struct {
	s     *steer.Steer
	ports map[int]bool
}

// steerAway steers the new connections to the addresses from and to share on ports to to's
// sockets and waits (at most steerWait) until from has accepted what its sockets on those
// addresses had queued. st is the hand-off's steering so far, or nil to start it. Steering
// is an improvement, never a condition: when it cannot be done, steerAway logs why,
// removes what it attached, and returns nil; the hand-off then relies on the kernel moving
// the queues as it did without it.
func (m *Manager) steerAway(st *steering, from, to *process, ports map[int]bool) *steering {
	log := m.cfg.Logger
	var toSocks, fromSocks []listenSocket
	fail := func(err error) *steering {
		log.Warn("hotupgrade: cannot steer new connections away from the Envoy that stops accepting; "+
			"connections queued on its listeners when they close rely on net.ipv4.tcp_migrate_req alone",
			"epoch", from.epoch, "error", err)
		if st != nil {
			if err := st.s.Detach(append(fdsOf(toSocks), fdsOf(fromSocks)...)); err != nil {
				log.Warn("hotupgrade: remove the steering program", "error", err)
			}
			_ = st.s.Close()
		}
		return nil
	}
	var err error
	if toSocks, err = listenSockets(to.pid(), ports); err != nil {
		return fail(err)
	}
	defer closeSockets(toSocks)
	if fromSocks, err = listenSockets(from.pid(), ports); err != nil {
		return fail(err)
	}
	defer closeSockets(fromSocks)
	shared := map[netip.AddrPort]bool{}
	for _, s := range fromSocks {
		shared[s.addr] = true
	}
	var target []int
	groups := map[netip.AddrPort]bool{}
	for _, s := range toSocks {
		if shared[s.addr] {
			target, groups[s.addr] = append(target, s.fd), true
		}
	}
	var watch []int
	for _, s := range fromSocks {
		if groups[s.addr] {
			watch = append(watch, s.fd)
		}
	}
	if len(target) == 0 {
		if st != nil {
			return fail(errors.New("the two Envoys share no listen address any more"))
		}
		return nil // nothing shared: nothing to queue on a socket the other would not have
	}
	if st == nil {
		s, err := steer.New()
		if err != nil {
			return fail(err)
		}
		st = &steering{s: s, ports: ports}
	}
	if err := st.s.To(target); err != nil {
		return fail(err)
	}
	start := time.Now()
	left, err := awaitEmptyQueues(watch)
	switch {
	case err != nil:
		// The steering works; only the wait for the queues could not be done.
		log.Warn("hotupgrade: read the accept queues of the Envoy that stops accepting", "epoch", from.epoch, "error", err)
	case left > 0:
		log.Warn("hotupgrade: accept queues of the Envoy that stops accepting still hold connections; they move when its listeners close",
			"epoch", from.epoch, "queued", left, "waited", steerWait)
	default:
		log.Info("hotupgrade: new connections steered away from the Envoy that stops accepting, and its accept queues are empty",
			"epoch", from.epoch, "to_epoch", to.epoch, "addresses", len(groups), "sockets", len(target), "waited", time.Since(start).Round(time.Millisecond))
	}
	return st
}

// close removes the program from the groups of p's listen sockets (the kernel hashes their
// new connections over all their sockets again) and releases it.
func (st *steering) close(m *Manager, p *process) {
	if st == nil {
		return
	}
	socks, err := listenSockets(p.pid(), st.ports)
	if err == nil {
		err = st.s.Detach(fdsOf(socks))
		closeSockets(socks)
	}
	if err != nil {
		// Left attached, it steers to p's sockets: the group's only ones (see package steer).
		m.cfg.Logger.Warn("hotupgrade: remove the steering program", "epoch", p.epoch, "error", err)
	}
	if err := st.s.Close(); err != nil {
		m.cfg.Logger.Warn("hotupgrade: release the steering program", "error", err)
	}
}

// awaitEmptyQueues waits until the accept queues of the listen sockets fds are all empty
// for steerSettle reads in a row, or steerWait passes. It returns how many connections
// were queued at the last read.
func awaitEmptyQueues(fds []int) (int, error) {
	deadline := time.Now().Add(steerWait)
	empty := 0
	for {
		queued := 0
		for _, fd := range fds {
			n, err := steer.Backlog(fd)
			if err != nil {
				return 0, err
			}
			queued += n
		}
		if queued == 0 {
			empty++
		} else {
			empty = 0
		}
		if empty >= steerSettle || time.Now().After(deadline) {
			return queued, nil
		}
		time.Sleep(steerPoll)
	}
}

// listenSocket is a copy of one TCP listen socket of a process.
type listenSocket struct {
	fd   int
	addr netip.AddrPort
	ino  uint64 // the socket's inode: the process may hold it under several descriptors
}

// listenSockets copies the TCP listen sockets process pid holds on ports (pidfd_getfd:
// root or CAP_SYS_PTRACE). The caller closes them soon (closeSockets).
func listenSockets(pid int, ports map[int]bool) ([]listenSocket, error) {
	pidfd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return nil, fmt.Errorf("pidfd_open %d: %w", pid, err)
	}
	defer unix.Close(pidfd)
	dir := filepath.Join("/proc", strconv.Itoa(pid), "fd")
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("list the sockets of pid %d: %w", pid, err)
	}
	var out []listenSocket
	seen := map[uint64]bool{}
	for _, e := range ents {
		link, err := os.Readlink(filepath.Join(dir, e.Name()))
		target, aerr := strconv.Atoi(e.Name())
		if err != nil || aerr != nil || !strings.HasPrefix(link, "socket:") {
			continue
		}
		fd, err := unix.PidfdGetfd(pidfd, target, 0)
		if errors.Is(err, unix.EBADF) {
			continue // closed meanwhile
		}
		if err != nil {
			closeSockets(out)
			return nil, fmt.Errorf("pidfd_getfd: %w (the manager needs ptrace rights over Envoy: root or CAP_SYS_PTRACE)", err)
		}
		if s, ok := asListenSocket(fd); ok && ports[int(s.addr.Port())] && !seen[s.ino] {
			seen[s.ino] = true
			out = append(out, s)
			continue
		}
		unix.Close(fd)
	}
	return out, nil
}

func asListenSocket(fd int) (listenSocket, bool) {
	s := listenSocket{fd: fd}
	acc, err1 := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ACCEPTCONN)
	proto, err2 := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_PROTOCOL)
	sa, err3 := unix.Getsockname(fd)
	var st unix.Stat_t
	err4 := unix.Fstat(fd, &st)
	if errors.Join(err1, err2, err3, err4) != nil || acc == 0 || proto != unix.IPPROTO_TCP {
		return s, false
	}
	switch a := sa.(type) {
	case *unix.SockaddrInet4:
		s.addr = netip.AddrPortFrom(netip.AddrFrom4(a.Addr), uint16(a.Port))
	case *unix.SockaddrInet6:
		s.addr = netip.AddrPortFrom(netip.AddrFrom16(a.Addr), uint16(a.Port))
	default:
		return s, false
	}
	s.ino = st.Ino
	return s, true
}

func fdsOf(socks []listenSocket) []int {
	var out []int
	for _, s := range socks {
		out = append(out, s.fd)
	}
	return out
}

func closeSockets(socks []listenSocket) {
	for _, s := range socks {
		unix.Close(s.fd)
	}
}
