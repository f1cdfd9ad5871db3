package bpf

// The workload: the socket side of the tests, run in a child process (this test binary
// re-executed with envWorkload set) that starts inside the test cgroup (clone3 with
// CLONE_INTO_CGROUP), because sockops sees only sockets made by tasks in the cgroup. The
// parent drives it with one JSON request per line on stdin and reads one JSON reply per
// line on stdout.

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

const envWorkload = "MESHTURBO_BPF_TEST_WORKLOAD"

type wlRequest struct {
	Op   string `json:"op"`
	Addr string `json:"addr,omitempty"` // listen or dial address
	From string `json:"from,omitempty"` // local IP to dial from
	N    int    `json:"n,omitempty"`
	// stream: bytes per direction per pair, write sizes in [MinWrite, MaxWrite].
	Bytes    int64  `json:"bytes,omitempty"`
	MinWrite int    `json:"min_write,omitempty"`
	MaxWrite int    `json:"max_write,omitempty"`
	Seed     uint64 `json:"seed,omitempty"`
	OneWay   bool   `json:"one_way,omitempty"` // stream: client to server only
	// send/recv: server to client instead; send writes in MinWrite chunks when set.
	Reverse bool `json:"reverse,omitempty"`
	// fill: every pair at once, without keeping what was written for a later "recv"
	// (benchmarks' floods); rep.Bytes is the sum.
	Flood bool `json:"flood,omitempty"`
	// listen: a blocking listener whose accept(2) gives blocking sockets (a classic
	// blocking server); pairs: clients that connect in blocking mode.
	Blocking bool `json:"blocking,omitempty"`
	// sigread: run for this long instead of N requests.
	Seconds float64 `json:"seconds,omitempty"`
}

type wlSock struct {
	Local  netip.AddrPort `json:"local"`
	Remote netip.AddrPort `json:"remote"`
	Cookie uint64         `json:"cookie"`
}

type wlPair struct {
	Client wlSock `json:"client"`
	Server wlSock `json:"server"`
}

type wlReply struct {
	Err   string   `json:"err,omitempty"`
	Addr  string   `json:"addr,omitempty"`
	Pairs []wlPair `json:"pairs,omitempty"`
	// Bytes moved (both directions, all pairs) and problems found.
	Bytes    int64    `json:"bytes,omitempty"`
	Problems []string `json:"problems,omitempty"`
	Seen     []string `json:"seen,omitempty"`
	N        int      `json:"n,omitempty"`
}

// workloadMain serves requests until stdin closes.
func workloadMain() int {
	w := &wlState{accepted: map[uint16]chan net.Conn{}}
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 1<<20), 1<<20)
	out := json.NewEncoder(os.Stdout)
	for in.Scan() {
		var req wlRequest
		var rep wlReply
		if err := json.Unmarshal(in.Bytes(), &req); err != nil {
			rep.Err = err.Error()
		} else if err := w.do(req, &rep); err != nil {
			rep.Err = err.Error()
		}
		if err := out.Encode(rep); err != nil {
			return 1
		}
	}
	w.closeAll()
	return 0
}

type wlConnPair struct {
	client, server *net.TCPConn
	// sent by client and not yet read by server (op "send"/"recv"), and the reverse
	pending, pendingRev []byte
}

// ends returns the writer and reader of op "send"/"recv" and the bytes pending between them.
func (p *wlConnPair) ends(reverse bool) (w, r *net.TCPConn, pending *[]byte) {
	if reverse {
		return p.server, p.client, &p.pendingRev
	}
	return p.client, p.server, &p.pending
}

type wlState struct {
	mu        sync.Mutex
	listeners []net.Listener
	accepted  map[uint16]chan net.Conn // by the client's port
	pairs     []*wlConnPair
	conns     []net.Conn // of ops "connect" and "origdst"
	// async is the result of op "recvasync": bytes read, or an error.
	async chan asyncRead
}

type asyncRead struct {
	got []byte
	err error
}

func (w *wlState) acceptChan(port uint16) chan net.Conn {
	w.mu.Lock()
	defer w.mu.Unlock()
	ch, ok := w.accepted[port]
	if !ok {
		ch = make(chan net.Conn, 1)
		w.accepted[port] = ch
	}
	return ch
}

func (w *wlState) do(req wlRequest, rep *wlReply) error {
	switch req.Op {
	case "listen":
		var l net.Listener
		var err error
		if req.Blocking {
			l, err = listenBlocking(req.Addr)
		} else {
			l, err = net.Listen("tcp", req.Addr)
		}
		if err != nil {
			return err
		}
		w.listeners = append(w.listeners, l)
		go func() {
			for {
				c, err := l.Accept()
				if err != nil {
					return
				}
				port := c.RemoteAddr().(*net.TCPAddr).AddrPort().Port()
				w.acceptChan(port) <- c
			}
		}()
		rep.Addr = l.Addr().String()
		return nil
	case "pairs":
		for range req.N {
			p, err := w.dial(req.Addr, req.From, req.Blocking)
			if err != nil {
				return err
			}
			w.pairs = append(w.pairs, p)
			rep.Pairs = append(rep.Pairs, wlPair{Client: sockInfo(p.client), Server: sockInfo(p.server)})
		}
		return nil
	case "stream":
		rep.Bytes, rep.Problems = w.stream(req)
		return nil
	case "send":
		return w.send(req)
	case "sigread": // blocking reads under signals on the last pair's server (see sigRead)
		return w.sigRead(req, rep)
	case "fill": // write on pair req.N's client until the idle server makes it block
		if !req.Flood {
			return w.fill(req, rep)
		}
		var mu sync.Mutex
		var wg sync.WaitGroup
		for i := range w.pairs {
			wg.Add(1)
			go func() {
				defer wg.Done()
				r := req
				r.N, r.Seed = i, req.Seed+uint64(i)
				var one wlReply
				err := w.fill(r, &one)
				mu.Lock()
				defer mu.Unlock()
				rep.Bytes += one.Bytes
				rep.Problems = append(rep.Problems, one.Problems...)
				if err != nil {
					rep.Problems = append(rep.Problems, err.Error())
				}
			}()
		}
		wg.Wait()
		return nil
	case "recv":
		rep.Bytes, rep.Problems = w.recv(req)
		return nil
	case "close":
		w.closePairs()
		return nil
	case "rst":
		rep.Seen, rep.Problems = w.rst()
		return nil
	case "churn":
		return w.churn(req, rep)
	case "pingpong":
		return w.pingpong(req, rep)
	case "connect": // dial req.Addr, write "x"; the reply's pair has the client side only
		c, err := net.DialTimeout("tcp", req.Addr, 5*time.Second)
		if err != nil {
			return err
		}
		w.conns = append(w.conns, c)
		rep.Pairs = []wlPair{{Client: sockInfo(c.(*net.TCPConn))}}
		_, err = c.Write([]byte("x"))
		return err
	case "recvasync": // read req.Bytes on the first pair's server (client if Reverse) in the background
		_, rd, _ := w.pairs[0].ends(req.Reverse)
		w.async = make(chan asyncRead, 1)
		go func() {
			got := make([]byte, req.Bytes)
			_ = rd.SetReadDeadline(time.Now().Add(30 * time.Second))
			_, err := io.ReadFull(rd, got)
			_ = rd.SetReadDeadline(time.Time{})
			w.async <- asyncRead{got, err}
		}()
		return nil
	case "recvwait": // wait for "recvasync" and compare with what "send" sent that way
		r := <-w.async
		_, _, pending := w.pairs[0].ends(req.Reverse)
		rep.Bytes = int64(len(r.got))
		switch {
		case r.err != nil:
			rep.Problems = append(rep.Problems, fmt.Sprintf("background read: %v", r.err))
		case !bytes.Equal(r.got, *pending):
			rep.Problems = append(rep.Problems, fmt.Sprintf("background read: %d bytes differ from the %d sent", len(r.got), len(*pending)))
		}
		*pending = nil
		return nil
	case "origdst": // take the accepted connection from req.Addr, read "x" and SO_ORIGINAL_DST
		return w.origDst(req, rep)
	case "join": // move this process into the cgroup req.Addr; earlier sockets stay outside
		return os.WriteFile(filepath.Join(req.Addr, "cgroup.procs"), []byte(strconv.Itoa(os.Getpid())), 0)
	}
	return fmt.Errorf("unknown op %q", req.Op)
}

func (w *wlState) dial(addr, from string, blocking bool) (*wlConnPair, error) {
	var c net.Conn
	var err error
	if blocking {
		c, err = dialBlocking(addr, from)
	} else {
		d := net.Dialer{Timeout: 5 * time.Second}
		if from != "" {
			d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(from)}
		}
		c, err = d.Dial("tcp", addr)
	}
	if err != nil {
		return nil, err
	}
	port := c.LocalAddr().(*net.TCPAddr).AddrPort().Port()
	ch := w.acceptChan(port)
	select {
	case s := <-ch:
		w.mu.Lock()
		delete(w.accepted, port)
		w.mu.Unlock()
		return &wlConnPair{client: c.(*net.TCPConn), server: s.(*net.TCPConn)}, nil
	case <-time.After(5 * time.Second):
		c.Close()
		return nil, fmt.Errorf("no accept for client port %d", port)
	}
}

// blockingListener is an IPv4 listening socket in blocking mode, accepting with accept(2)
// and no flags, so that accepted sockets block too, as in a classic threaded server. Accept
// hands each socket to Go's poller (net.FileConn makes it non-blocking afterwards; the
// sockops program decides when the connection is established).
type blockingListener struct {
	fd     int
	addr   *net.TCPAddr
	closed atomic.Bool
}

// blockingSocket parses an IPv4 address:port and opens a TCP socket in blocking mode.
func blockingSocket(addr string) (netip.AddrPort, int, error) {
	ap, err := netip.ParseAddrPort(addr)
	if err != nil || !ap.Addr().Is4() {
		return ap, -1, fmt.Errorf("blocking socket: want an IPv4 address:port, got %q", addr)
	}
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	return ap, fd, err
}

func listenBlocking(addr string) (*blockingListener, error) {
	ap, fd, err := blockingSocket(addr)
	if err != nil {
		return nil, err
	}
	if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: ap.Addr().As4(), Port: int(ap.Port())}); err != nil {
		unix.Close(fd)
		return nil, err
	}
	if err := unix.Listen(fd, 128); err != nil {
		unix.Close(fd)
		return nil, err
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		unix.Close(fd)
		return nil, err
	}
	a := sa.(*unix.SockaddrInet4)
	return &blockingListener{fd: fd, addr: &net.TCPAddr{IP: net.IP(a.Addr[:]), Port: a.Port}}, nil
}

func (l *blockingListener) Accept() (net.Conn, error) {
	nfd, _, err := unix.Accept(l.fd)
	if err != nil {
		if l.closed.Load() {
			return nil, net.ErrClosed
		}
		return nil, err
	}
	return fileConn(nfd)
}

// Close wakes a blocked accept(2) (shutdown makes it fail) before closing.
func (l *blockingListener) Close() error {
	if l.closed.Swap(true) {
		return nil
	}
	_ = unix.Shutdown(l.fd, unix.SHUT_RDWR)
	return unix.Close(l.fd)
}

func (l *blockingListener) Addr() net.Addr { return l.addr }

// dialBlocking connects from a socket in blocking mode (IPv4), as a blocking client does.
func dialBlocking(addr, from string) (net.Conn, error) {
	ap, fd, err := blockingSocket(addr)
	if err != nil {
		return nil, err
	}
	if from != "" {
		ip, err := netip.ParseAddr(from)
		if err != nil || !ip.Is4() {
			unix.Close(fd)
			return nil, fmt.Errorf("blocking dial: bad local address %q", from)
		}
		if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: ip.As4()}); err != nil {
			unix.Close(fd)
			return nil, err
		}
	}
	if err := unix.Connect(fd, &unix.SockaddrInet4{Addr: ap.Addr().As4(), Port: int(ap.Port())}); err != nil {
		unix.Close(fd)
		return nil, err
	}
	return fileConn(fd)
}

// fileConn hands a socket to Go's poller, taking over fd.
func fileConn(fd int) (net.Conn, error) {
	f := os.NewFile(uintptr(fd), "tcp")
	defer f.Close()
	return net.FileConn(f)
}

func sockInfo(c *net.TCPConn) wlSock {
	s := wlSock{
		Local:  c.LocalAddr().(*net.TCPAddr).AddrPort(),
		Remote: c.RemoteAddr().(*net.TCPAddr).AddrPort(),
	}
	s.Local = netip.AddrPortFrom(s.Local.Addr().Unmap(), s.Local.Port())
	s.Remote = netip.AddrPortFrom(s.Remote.Addr().Unmap(), s.Remote.Port())
	if rc, err := c.SyscallConn(); err == nil {
		_ = rc.Control(func(fd uintptr) {
			s.Cookie, _ = unix.GetsockoptUint64(int(fd), unix.SOL_SOCKET, unix.SO_COOKIE)
		})
	}
	return s
}

// writeStream writes n deterministic bytes in writes of random sizes, then half-closes,
// and returns the sha256 of what it wrote.
func writeStream(c *net.TCPConn, n int64, minW, maxW int, seed uint64) (string, error) {
	src := rand.NewChaCha8(seedBytes(seed))
	rng := rand.New(src)
	buf := make([]byte, maxW)
	h := sha256.New()
	for n > 0 {
		size := minW
		if maxW > minW {
			size += rng.IntN(maxW - minW + 1)
		}
		size = int(min(int64(size), n))
		chunk := buf[:size]
		_, _ = src.Read(chunk)
		if _, err := c.Write(chunk); err != nil {
			return "", err
		}
		h.Write(chunk)
		n -= int64(size)
	}
	if err := c.CloseWrite(); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

func seedBytes(seed uint64) [32]byte {
	var s [32]byte
	for i := range 8 {
		s[i] = byte(seed >> (8 * i))
	}
	return s
}

// readStream reads to EOF and returns the byte count and sha256.
func readStream(c *net.TCPConn) (int64, string, error) {
	h := sha256.New()
	n, err := io.CopyBuffer(h, c, make([]byte, 256<<10))
	return n, hex.EncodeToString(h.Sum(nil)), err
}

// stream sends req.Bytes each way over every pair at once, half-closes each direction, and
// compares what arrived with what was sent. The pairs are closed afterwards.
func (w *wlState) stream(req wlRequest) (int64, []string) {
	var mu sync.Mutex
	var total int64
	var problems []string
	fail := func(format string, args ...any) {
		mu.Lock()
		problems = append(problems, fmt.Sprintf(format, args...))
		mu.Unlock()
	}
	var wg sync.WaitGroup
	for i, p := range w.pairs {
		for dir, ends := range [2][2]*net.TCPConn{{p.client, p.server}, {p.server, p.client}} {
			if req.OneWay && dir == 1 {
				_ = p.server.CloseWrite()
				continue
			}
			wg.Add(2)
			seed := req.Seed + uint64(i)*2 + uint64(dir)
			sent := make(chan string, 1)
			go func() {
				defer wg.Done()
				sum, err := writeStream(ends[0], req.Bytes, req.MinWrite, req.MaxWrite, seed)
				if err != nil {
					fail("pair %d dir %d: write: %v", i, dir, err)
				}
				sent <- sum
			}()
			go func() {
				defer wg.Done()
				n, sum, err := readStream(ends[1])
				if err != nil {
					fail("pair %d dir %d: read: %v", i, dir, err)
				}
				if want := <-sent; n != req.Bytes || sum != want {
					fail("pair %d dir %d: got %d bytes sha256 %.12s, sent %d bytes sha256 %.12s", i, dir, n, sum, req.Bytes, want)
				}
				mu.Lock()
				total += n
				mu.Unlock()
			}()
		}
	}
	wg.Wait()
	w.closePairs()
	return total, problems
}

// send writes req.Bytes from every client (server if req.Reverse) without the other end
// reading, in writes of req.MinWrite bytes when set, else in one.
func (w *wlState) send(req wlRequest) error {
	for i, p := range w.pairs {
		wr, _, pending := p.ends(req.Reverse)
		b := make([]byte, req.Bytes)
		_, _ = rand.NewChaCha8(seedBytes(req.Seed + uint64(i))).Read(b)
		if err := wr.SetWriteDeadline(time.Now().Add(10 * time.Second)); err != nil {
			return err
		}
		chunk := len(b)
		if req.MinWrite > 0 {
			chunk = req.MinWrite
		}
		for off := 0; off < len(b); off += chunk {
			if _, err := wr.Write(b[off:min(off+chunk, len(b))]); err != nil {
				return fmt.Errorf("pair %d: write: %w", i, err)
			}
		}
		*pending = append(*pending, b...)
	}
	return nil
}

// fill writes random bytes in 64 KiB writes on pair req.N's client, with nobody reading,
// until a write makes no progress for 500 ms: the sender is blocked (or req.Bytes, when set,
// are queued). rep.Bytes is what was
// queued; every write error other than the deadline is a problem (ENOMEM above all).
func (w *wlState) fill(req wlRequest, rep *wlReply) error {
	p := w.pairs[req.N]
	src := rand.NewChaCha8(seedBytes(req.Seed))
	chunk := make([]byte, 64<<10)
	for {
		_, _ = src.Read(chunk)
		if err := p.client.SetWriteDeadline(time.Now().Add(500 * time.Millisecond)); err != nil {
			return err
		}
		n, err := p.client.Write(chunk)
		if !req.Flood {
			p.pending = append(p.pending, chunk[:n]...)
		}
		rep.Bytes += int64(n)
		if errors.Is(err, os.ErrDeadlineExceeded) && n == 0 {
			break
		}
		if err != nil && !errors.Is(err, os.ErrDeadlineExceeded) {
			rep.Problems = append(rep.Problems, fmt.Sprintf("write after %d bytes: %v", rep.Bytes, err))
			break
		}
		if req.Bytes > 0 && rep.Bytes >= req.Bytes {
			break
		}
		if rep.Bytes > 1<<30 {
			rep.Problems = append(rep.Problems, "queued 1 GiB without blocking")
			break
		}
	}
	return p.client.SetWriteDeadline(time.Time{})
}

// sigRead: the last pair's server (client if req.Reverse) reads with blocking read(2) calls
// on its own thread, which gets SIGUSR1 (an SA_RESTART handler, as every Go handler) about
// every millisecond; the other end sends req.N requests (or as many as fit in req.Seconds)
// of 64 bytes, each answered with the same bytes, so the small-write rule never trips.
// rep.Seen counts what read returned besides data: "EAGAIN@i" and "EINTR@i" per occurrence;
// wrong bytes are problems; rep.N is the number of requests.
func (w *wlState) sigRead(req wlRequest, rep *wlReply) error {
	p := w.pairs[len(w.pairs)-1]
	rdConn, wrConn := p.server, p.client
	if req.Reverse {
		rdConn, wrConn = p.client, p.server
	}
	rc, err := rdConn.SyscallConn()
	if err != nil {
		return err
	}
	var fd int
	if err := rc.Control(func(f uintptr) { fd = int(f) }); err != nil {
		return err
	}
	if err := unix.SetNonblock(fd, false); err != nil {
		return err
	}
	defer unix.SetNonblock(fd, true)
	signal.Notify(make(chan os.Signal, 1), syscall.SIGUSR1)
	defer signal.Reset(syscall.SIGUSR1)

	timed := req.Seconds > 0
	tid := make(chan int, 1)
	type result struct {
		seen     []string // "EAGAIN@i" / "EINTR@i": request i's read returned without data
		problems []string
		requests int
	}
	res := make(chan result, 1)
	go func() { // the blocking reader
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		tid <- unix.Gettid()
		var r result
		buf := make([]byte, 64)
		for i := 0; timed || i < req.N; i++ {
			got := 0
			for got < len(buf) {
				n, err := unix.Read(fd, buf[got:])
				switch {
				case err == unix.EAGAIN, err == unix.EINTR:
					r.seen = append(r.seen, fmt.Sprintf("%s@%d", unix.ErrnoName(err.(unix.Errno)), i))
					continue
				case timed && err == nil && n == 0 && got == 0: // the sender is done
					res <- r
					return
				case err != nil || n == 0:
					r.problems = append(r.problems, fmt.Sprintf("request %d: read: %d %v", i, n, err))
					res <- r
					return
				}
				got += n
			}
			if buf[0] != byte(i) || buf[63] != byte(i) {
				r.problems = append(r.problems, fmt.Sprintf("request %d: wrong bytes %d..%d", i, buf[0], buf[63]))
			}
			if _, err := unix.Write(fd, buf); err != nil {
				r.problems = append(r.problems, fmt.Sprintf("request %d: reply: %v", i, err))
				res <- r
				return
			}
			r.requests = i + 1
		}
		res <- r
	}()
	reader := <-tid
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { // about 1 kHz of signals at the reader's thread
		defer wg.Done()
		t := time.NewTicker(time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-stop:
				return
			case <-t.C:
				_ = unix.Tgkill(os.Getpid(), reader, syscall.SIGUSR1)
			}
		}
	}()
	msg, back := make([]byte, 64), make([]byte, 64)
	deadline := time.Now().Add(time.Duration(req.Seconds * float64(time.Second)))
	for i := 0; timed && time.Now().Before(deadline) || !timed && i < req.N; i++ {
		for j := range msg {
			msg[j] = byte(i)
		}
		if _, err := wrConn.Write(msg); err != nil {
			rep.Problems = append(rep.Problems, fmt.Sprintf("request %d: write: %v", i, err))
			break
		}
		_ = wrConn.SetReadDeadline(time.Now().Add(10 * time.Second))
		if _, err := io.ReadFull(wrConn, back); err != nil {
			rep.Problems = append(rep.Problems, fmt.Sprintf("request %d: read reply: %v", i, err))
			break
		}
		time.Sleep(time.Millisecond) // the reader waits, blocked, between requests
	}
	_ = wrConn.SetReadDeadline(time.Time{})
	if timed {
		_ = wrConn.CloseWrite()
	}
	var r result
	select {
	case r = <-res:
	case <-time.After(10 * time.Second):
		close(stop)
		wg.Wait()
		return errors.New("blocking reader stuck")
	}
	close(stop)
	wg.Wait()
	rep.Problems = append(rep.Problems, r.problems...)
	rep.N = r.requests
	rep.Bytes = int64(r.requests) * 64
	rep.Seen = r.seen
	return nil
}

// recv reads on every server (client if req.Reverse) exactly the bytes sent by "send" and
// compares them.
func (w *wlState) recv(req wlRequest) (int64, []string) {
	var total int64
	var problems []string
	for i, p := range w.pairs {
		_, rd, pending := p.ends(req.Reverse)
		got := make([]byte, len(*pending))
		_ = rd.SetReadDeadline(time.Now().Add(10 * time.Second))
		n, err := io.ReadFull(rd, got)
		total += int64(n)
		if err != nil {
			problems = append(problems, fmt.Sprintf("pair %d: read %d of %d: %v", i, n, len(*pending), err))
		} else if !bytes.Equal(got, *pending) {
			problems = append(problems, fmt.Sprintf("pair %d: %d bytes differ from what was sent", i, n))
		}
		*pending = nil
		_ = rd.SetReadDeadline(time.Time{})
	}
	return total, problems
}

// rst: on even pairs the client resets (SO_LINGER 0), on odd pairs the server; the other
// end, blocked in read, must see ECONNRESET promptly after having read all earlier bytes.
func (w *wlState) rst() ([]string, []string) {
	var seen, problems []string
	for i, p := range w.pairs {
		closer, reader := p.client, p.server
		if i%2 == 1 {
			closer, reader = p.server, p.client
		}
		msg := []byte("before the reset")
		if _, err := closer.Write(msg); err != nil {
			problems = append(problems, fmt.Sprintf("pair %d: write: %v", i, err))
			continue
		}
		got := make([]byte, len(msg))
		_ = reader.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadFull(reader, got); err != nil || !bytes.Equal(got, msg) {
			problems = append(problems, fmt.Sprintf("pair %d: read before reset: %q %v", i, got, err))
			continue
		}
		done := make(chan error, 1)
		go func() {
			_, err := reader.Read(make([]byte, 10))
			done <- err
		}()
		time.Sleep(5 * time.Millisecond) // let the reader block in read
		_ = closer.SetLinger(0)
		_ = closer.Close()
		err := <-done
		switch {
		case errors.Is(err, syscall.ECONNRESET):
			seen = append(seen, "ECONNRESET")
		case errors.Is(err, io.EOF):
			seen = append(seen, "EOF")
		default:
			problems = append(problems, fmt.Sprintf("pair %d: read after reset: %v", i, err))
		}
		reader.Close()
	}
	w.pairs = nil
	return seen, problems
}

// churn opens, uses (one byte each way) and closes req.N connections one after another.
func (w *wlState) churn(req wlRequest, rep *wlReply) error {
	b := make([]byte, 1)
	for i := range req.N {
		p, err := w.dial(req.Addr, req.From, false)
		if err != nil {
			return fmt.Errorf("connection %d: %w", i, err)
		}
		_, err1 := p.client.Write([]byte{byte(i)})
		_, err2 := io.ReadFull(p.server, b)
		_, err3 := p.server.Write(b)
		_, err4 := io.ReadFull(p.client, b)
		p.client.Close()
		p.server.Close()
		if err := errors.Join(err1, err2, err3, err4); err != nil || b[0] != byte(i) {
			return fmt.Errorf("connection %d: %v (byte %d)", i, err, b[0])
		}
		rep.Bytes += 2
	}
	return nil
}

// pingpong makes req.N round trips of req.MinWrite bytes on every pair, one pair at a time.
func (w *wlState) pingpong(req wlRequest, rep *wlReply) error {
	msg := make([]byte, req.MinWrite)
	got := make([]byte, req.MinWrite)
	for i, p := range w.pairs {
		for j := range req.N {
			msg[0] = byte(j)
			if _, err := p.client.Write(msg); err != nil {
				return fmt.Errorf("pair %d: %w", i, err)
			}
			if _, err := io.ReadFull(p.server, got); err != nil || got[0] != byte(j) {
				return fmt.Errorf("pair %d: server read %v", i, err)
			}
			if _, err := p.server.Write(got); err != nil {
				return fmt.Errorf("pair %d: %w", i, err)
			}
			if _, err := io.ReadFull(p.client, got); err != nil || got[0] != byte(j) {
				return fmt.Errorf("pair %d: client read %v", i, err)
			}
			rep.Bytes += 2 * int64(len(msg))
		}
	}
	return nil
}

func (w *wlState) origDst(req wlRequest, rep *wlReply) error {
	from, err := netip.ParseAddrPort(req.Addr)
	if err != nil {
		return err
	}
	var c net.Conn
	select {
	case c = <-w.acceptChan(from.Port()):
	case <-time.After(5 * time.Second):
		return fmt.Errorf("no connection from %s accepted", from)
	}
	w.conns = append(w.conns, c)
	if remote := c.RemoteAddr().(*net.TCPAddr).AddrPort(); netip.AddrPortFrom(remote.Addr().Unmap(), remote.Port()) != from {
		return fmt.Errorf("accepted a connection from %s, want %s", remote, from)
	}
	b := make([]byte, 1)
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(c, b); err != nil || b[0] != 'x' {
		return fmt.Errorf("read from %s: %q %v", from, b, err)
	}
	rc, err := c.(*net.TCPConn).SyscallConn()
	if err != nil {
		return err
	}
	var orig netip.AddrPort
	var oerr error
	if err := rc.Control(func(fd uintptr) { orig, oerr = soOriginalDst(int(fd)) }); err != nil {
		return err
	}
	if oerr != nil {
		rep.Seen = []string{oerr.Error()}
		return nil
	}
	rep.Addr = orig.String()
	return nil
}

// soOriginalDst is getsockopt(SOL_IP, SO_ORIGINAL_DST), as Envoy's original_dst filter calls it.
func soOriginalDst(fd int) (netip.AddrPort, error) {
	const soOriginalDst = 80
	var sa unix.RawSockaddrInet4
	l := uint32(unix.SizeofSockaddrInet4)
	_, _, errno := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), unix.SOL_IP, soOriginalDst,
		uintptr(unsafe.Pointer(&sa)), uintptr(unsafe.Pointer(&l)), 0)
	if errno != 0 {
		return netip.AddrPort{}, errno
	}
	if sa.Family != unix.AF_INET || l != unix.SizeofSockaddrInet4 {
		return netip.AddrPort{}, fmt.Errorf("SO_ORIGINAL_DST: family %d, length %d", sa.Family, l)
	}
	port := uint16(sa.Port>>8 | sa.Port<<8) // network byte order in memory
	return netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), port), nil
}

func (w *wlState) closePairs() {
	for _, p := range w.pairs {
		p.client.Close()
		p.server.Close()
	}
	w.pairs = nil
}

func (w *wlState) closeAll() {
	w.closePairs()
	for _, c := range w.conns {
		c.Close()
	}
	for _, l := range w.listeners {
		l.Close()
	}
}

// workload is the parent's handle on a workload child.
type workload struct {
	t     testing.TB
	cmd   *exec.Cmd
	stdin io.WriteCloser
	out   *bufio.Scanner
	done  chan error
}

// startWorkload starts a workload child, inside cgroupDir unless it is "".
func startWorkload(t testing.TB, cgroupDir string) *workload {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), envWorkload+"=1")
	cmd.Stderr = &testLogWriter{t: t}
	if cgroupDir != "" {
		f, err := os.Open(cgroupDir)
		if err != nil {
			t.Fatalf("open cgroup: %v", err)
		}
		defer f.Close()
		cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(f.Fd())}
	}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start workload: %v", err)
	}
	w := &workload{t: t, cmd: cmd, stdin: stdin, out: bufio.NewScanner(stdout), done: make(chan error, 1)}
	w.out.Buffer(make([]byte, 1<<20), 64<<20)
	t.Cleanup(w.stop)
	return w
}

func (w *workload) stop() {
	if w.stdin == nil {
		return
	}
	w.stdin.Close()
	w.stdin = nil
	exited := make(chan error, 1)
	go func() { exited <- w.cmd.Wait() }()
	select {
	case err := <-exited:
		if err != nil {
			w.t.Errorf("workload exited: %v", err)
		}
	case <-time.After(20 * time.Second):
		_ = w.cmd.Process.Kill()
		<-exited
		w.t.Errorf("workload did not exit within 20s; killed")
	}
}

// call sends one request and returns the reply; a reply error fails the test.
func (w *workload) call(req wlRequest) wlReply {
	w.t.Helper()
	rep, err := w.try(req)
	if err != nil {
		w.t.Fatalf("workload %s: %v", req.Op, err)
	}
	return rep
}

func (w *workload) try(req wlRequest) (wlReply, error) {
	b, err := json.Marshal(req)
	if err != nil {
		return wlReply{}, err
	}
	if _, err := w.stdin.Write(append(b, '\n')); err != nil {
		return wlReply{}, err
	}
	if !w.out.Scan() {
		return wlReply{}, fmt.Errorf("no reply: %v", w.out.Err())
	}
	var rep wlReply
	if err := json.Unmarshal(w.out.Bytes(), &rep); err != nil {
		return wlReply{}, err
	}
	if rep.Err != "" {
		return rep, errors.New(rep.Err)
	}
	return rep, nil
}

type testLogWriter struct{ t testing.TB }

func (w *testLogWriter) Write(p []byte) (int, error) {
	w.t.Log("workload: " + strings.TrimRight(string(p), "\n"))
	return len(p), nil
}
