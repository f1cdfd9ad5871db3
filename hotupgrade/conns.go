package hotupgrade

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// An Envoy that hands its listeners to the next epoch loses its admin listener first (the
// child's first hot-restart request, ShutdownAdmin, makes it close it), so its stats are out
// of reach while it drains. Its connections are counted from /proc instead: the TCP sockets
// the process holds (/proc/<pid>/fd) matched against the socket table of its network
// namespace (/proc/<pid>/net/tcp, tcp6).

// tcpState values from include/net/tcp_states.h.
const tcpListen = 0x0A

type procSockets struct {
	listenPorts map[int]bool // local ports of the listen sockets the process holds
	conns       map[int]int  // local port -> sockets in any other state (connections)
}

// sockets returns the TCP sockets process pid holds.
func sockets(pid int) (procSockets, error) {
	inodes, err := socketInodes(pid)
	if err != nil {
		return procSockets{}, err
	}
	ps := procSockets{listenPorts: map[int]bool{}, conns: map[int]int{}}
	for _, name := range []string{"tcp", "tcp6"} {
		if err := scanTCP(filepath.Join("/proc", strconv.Itoa(pid), "net", name), inodes, &ps); err != nil {
			return procSockets{}, err
		}
	}
	return ps, nil
}

// downstream counts the connections process pid holds on the given local ports.
func downstream(pid int, ports map[int]bool) (conns int, listening bool, err error) {
	ps, err := sockets(pid)
	if err != nil {
		return 0, false, err
	}
	for p := range ports {
		conns += ps.conns[p]
		listening = listening || ps.listenPorts[p]
	}
	return conns, listening, nil
}

func socketInodes(pid int) (map[uint64]bool, error) {
	dir := filepath.Join("/proc", strconv.Itoa(pid), "fd")
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("list sockets of pid %d: %w", pid, err)
	}
	inodes := map[uint64]bool{}
	for _, e := range ents {
		link, err := os.Readlink(filepath.Join(dir, e.Name()))
		if err != nil {
			continue // closed meanwhile
		}
		if s, ok := strings.CutPrefix(link, "socket:["); ok {
			if n, err := strconv.ParseUint(strings.TrimSuffix(s, "]"), 10, 64); err == nil {
				inodes[n] = true
			}
		}
	}
	return inodes, nil
}

// scanTCP reads a /proc/net/tcp table:
//
//	sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode
//	0: 0100007F:1F90 00000000:0000 0A ...
func scanTCP(path string, inodes map[uint64]bool, ps *procSockets) error {
	f, err := os.Open(path)
	if err != nil {
		if os.IsNotExist(err) {
			return nil // no IPv6
		}
		return fmt.Errorf("read %s: %w", path, err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Scan() // header
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 10 {
			continue
		}
		inode, err := strconv.ParseUint(fields[9], 10, 64)
		if err != nil || !inodes[inode] {
			continue
		}
		_, portHex, ok := strings.Cut(fields[1], ":")
		if !ok {
			continue
		}
		port, err1 := strconv.ParseUint(portHex, 16, 16)
		st, err2 := strconv.ParseUint(fields[3], 16, 8)
		if err1 != nil || err2 != nil {
			continue
		}
		if st == tcpListen {
			ps.listenPorts[int(port)] = true
		} else {
			ps.conns[int(port)]++
		}
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("read %s: %w", path, err)
	}
	return nil
}

// tcpEstablished is TCP_ESTABLISHED in include/net/tcp_states.h.
const tcpEstablished = 0x01

// quietConns returns the file descriptors (in process pid) of its established connections on
// ports that have nothing queued either way (/proc/<pid>/net/tcp tx_queue and rx_queue both
// zero): no request bytes Envoy has not read, no response bytes the client has not acked.
func quietConns(pid int, ports map[int]bool) (map[int]uint64, error) {
	dir := filepath.Join("/proc", strconv.Itoa(pid), "fd")
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("list sockets of pid %d: %w", pid, err)
	}
	fdOf := map[uint64]int{}
	for _, e := range ents {
		link, err := os.Readlink(filepath.Join(dir, e.Name()))
		if err != nil {
			continue
		}
		s, ok := strings.CutPrefix(link, "socket:[")
		if !ok {
			continue
		}
		inode, err1 := strconv.ParseUint(strings.TrimSuffix(s, "]"), 10, 64)
		fd, err2 := strconv.Atoi(e.Name())
		if err1 == nil && err2 == nil {
			fdOf[inode] = fd
		}
	}
	fds := map[int]uint64{} // fd -> socket inode
	for _, name := range []string{"tcp", "tcp6"} {
		b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "net", name))
		if err != nil {
			if os.IsNotExist(err) {
				continue
			}
			return nil, err
		}
		lines := strings.Split(string(b), "\n")
		for _, line := range lines[min(1, len(lines)):] {
			f := strings.Fields(line)
			if len(f) < 10 {
				continue
			}
			inode, err := strconv.ParseUint(f[9], 10, 64)
			fd, ok := fdOf[inode]
			if err != nil || !ok {
				continue
			}
			_, portHex, _ := strings.Cut(f[1], ":")
			port, err1 := strconv.ParseUint(portHex, 16, 16)
			st, err2 := strconv.ParseUint(f[3], 16, 8)
			if err1 != nil || err2 != nil || st != tcpEstablished || !ports[int(port)] {
				continue
			}
			if f[4] == "00000000:00000000" { // tx_queue:rx_queue
				fds[fd] = inode
			}
		}
	}
	return fds, nil
}

// closeQuiet ends process pid's quiet connections on ports (see quietConns) the way a
// server ends an idle keep-alive connection, while the process keeps running: it shuts
// down both directions of each socket through a copy of its descriptor (pidfd_getfd, which
// needs ptrace rights over the process: root or CAP_SYS_PTRACE). The client gets a FIN at
// once; Envoy reads end-of-stream and closes the connection itself. It returns how many
// connections it shut down.
func closeQuiet(pid int, ports map[int]bool) (int, error) {
	fds, err := quietConns(pid, ports)
	if err != nil || len(fds) == 0 {
		return 0, err
	}
	pidfd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return 0, fmt.Errorf("pidfd_open %d: %w", pid, err)
	}
	defer unix.Close(pidfd)
	n := 0
	for target, inode := range fds {
		fd, err := unix.PidfdGetfd(pidfd, target, 0)
		if err != nil {
			if errors.Is(err, unix.EBADF) {
				continue // closed meanwhile
			}
			return n, fmt.Errorf("pidfd_getfd: %w (closing idle connections needs ptrace rights over Envoy: root or CAP_SYS_PTRACE)", err)
		}
		// The descriptor number may name another socket by now (Envoy closed the
		// connection and opened an upstream one): only the socket seen idle is touched.
		var st unix.Stat_t
		if unix.Fstat(fd, &st) == nil && st.Ino == inode && unix.Shutdown(fd, unix.SHUT_RDWR) == nil {
			n++
		}
		unix.Close(fd)
	}
	return n, nil
}
