package hotupgrade

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"
)

// relay sits on the hot-restart sockets between a running Envoy (the parent, epoch N) and
// the next epoch (the child), so that the manager, not Envoy's timers, decides each step:
//
//   - DrainListeners, which the child sends as soon as its workers start, is held until the
//     manager has seen the child LIVE and its probe pass. Until then the parent keeps its
//     listeners, so a child that fails can be stopped while the parent serves on.
//   - Terminate, which the child sends when --parent-shutdown-time-s expires, is never
//     passed on: the manager stops the parent itself when its connections reach zero.
//   - The manager asks the parent for its stats on the same socket (parentStats), to see
//     whether a draining parent still has a request in flight: its admin is closed.
//   - Once the parent is gone the relay answers for it (empty stats, "no socket"), so the
//     child never blocks on a dead parent (Envoy issue #10953) nor aborts on a refused
//     sendmsg; and replies a parent sends to a child that died are absorbed instead of
//     making the parent retry and abort.
//
// Each epoch is started with its own --socket-path, so the child's requests reach the relay
// and the parent's replies do too. Envoy binds abstract names padded with NULs to the full
// sun_path; hrAddr builds the same names.
type relay struct {
	parentEpoch int
	log         *slog.Logger
	onRequest   func(kind hrKind) // test hook: called before a child's request is acted on

	childSide  *net.UnixConn // the child sends here; replies to the child leave from here
	parentSide *net.UnixConn // the parent replies here; requests to the parent leave from here
	childAddr  *net.UnixAddr // the child's own socket
	parentAddr *net.UnixAddr // the parent's own socket
	udp        []*net.UnixConn
	bound      [4]*net.UnixAddr // the names of childSide, parentSide and udp

	// sendMu orders requests to the parent with fifo: the parent answers in the order it
	// was asked, and each answer goes to whoever is first in fifo (nil: the child).
	sendMu sync.Mutex

	mu              sync.Mutex
	fifo            []chan []byte
	releaseDrain    bool
	heldDrain       [][]byte
	drainSent       chan struct{}
	parentGone      bool
	childGone       bool
	childTerminated bool
	pending         hrKind // the child's request the parent has not answered yet
	pendingSince    time.Time
	seen            []string
	answered        int // requests answered in the gone parent's place
	// adopted: when a restarted manager took the relay's sockets back. Replies the parent
	// owed the dead manager may still come; the relay asks the parent nothing of its own
	// until they have (see parentStats).
	adopted time.Time

	wg     sync.WaitGroup
	closed chan struct{}
}

// socketPath is the --socket-path of one epoch.
func socketPath(baseID, epoch int) string {
	return fmt.Sprintf("@meshturbo-hr-%d-%d", baseID, epoch)
}

// hrAddr is the address Envoy binds for a role: <path>_<role>_<base*10 + epoch%3>.
func hrAddr(path, role string, baseID, epoch int) *net.UnixAddr {
	name := fmt.Sprintf("%s_%s_%d", path, role, baseID*10+epoch%3)
	if strings.HasPrefix(name, "@") && len(name) < 108 {
		name += strings.Repeat("\x00", 108-len(name))
	}
	return &net.UnixAddr{Name: name, Net: "unixgram"}
}

// relayAddrs are the four sockets a relay binds between parent epoch parentEpoch and its
// child: where the child sends, where the parent replies, and the two QUIC forwarding
// sockets (udpToChild, udpToParent).
func relayAddrs(baseID, parentEpoch int) [4]*net.UnixAddr {
	pPath, cPath := socketPath(baseID, parentEpoch), socketPath(baseID, parentEpoch+1)
	return [4]*net.UnixAddr{
		hrAddr(cPath, "parent", baseID, parentEpoch),
		hrAddr(pPath, "child", baseID, parentEpoch+1),
		hrAddr(pPath+"_udp", "child", baseID, parentEpoch+1),
		hrAddr(cPath+"_udp", "parent", baseID, parentEpoch),
	}
}

func newRelay(baseID, parentEpoch int, log *slog.Logger, onRequest func(hrKind)) (*relay, error) {
	var conns [4]*net.UnixConn
	for i, a := range relayAddrs(baseID, parentEpoch) {
		c, err := net.ListenUnixgram("unixgram", a)
		if err != nil {
			for _, c := range conns[:i] {
				c.Close()
			}
			return nil, fmt.Errorf("hot-restart relay: bind %q: %w", strings.TrimRight(a.Name, "\x00"), err)
		}
		conns[i] = c
	}
	return startRelay(baseID, parentEpoch, log, onRequest, conns), nil
}

// startRelay runs a relay on its four sockets (bound now, or taken back from the Envoy that
// inherited them, see adoptRelay).
func startRelay(baseID, parentEpoch int, log *slog.Logger, onRequest func(hrKind), conns [4]*net.UnixConn) *relay {
	pPath, cPath := socketPath(baseID, parentEpoch), socketPath(baseID, parentEpoch+1)
	r := &relay{
		parentEpoch: parentEpoch,
		log:         log,
		onRequest:   onRequest,
		childAddr:   hrAddr(cPath, "child", baseID, parentEpoch+1),
		parentAddr:  hrAddr(pPath, "parent", baseID, parentEpoch),
		drainSent:   make(chan struct{}),
		closed:      make(chan struct{}),
		childSide:   conns[0],
		parentSide:  conns[1],
		bound:       relayAddrs(baseID, parentEpoch),
	}
	// The UDP pair carries QUIC packets the draining parent forwards to the child; pass them
	// through as they are.
	r.udp = []*net.UnixConn{conns[2], conns[3]}
	r.wg.Add(4)
	go r.fromChild()
	go r.fromParent()
	go r.pipe(conns[2], hrAddr(cPath+"_udp", "child", baseID, parentEpoch+1))
	go r.pipe(conns[3], hrAddr(pPath+"_udp", "parent", baseID, parentEpoch))
	return r
}

// inherit returns copies of the relay's sockets for the child Envoy to inherit, so that the
// sockets stay bound, and the Envoys' hot-restart calls wait in their queues instead of
// failing, if the manager dies: a parent whose reply cannot be sent aborts (Envoy
// RELEASE_ASSERTs after ten refused sendmsg), and so does a child. A manager started again
// takes them back (adoptRelay). Call done once the child is started: starting a process puts
// the shared socket into blocking mode, done puts it back.
func (r *relay) inherit() (files []*os.File, done func()) {
	conns := append([]*net.UnixConn{r.childSide, r.parentSide}, r.udp...)
	for _, c := range conns {
		f, err := c.File()
		if err != nil {
			r.log.Warn("hot-restart relay: socket not inherited by the new epoch", "error", err)
			continue
		}
		files = append(files, f)
	}
	return files, func() {
		for _, f := range files {
			f.Close()
		}
		for _, c := range conns {
			if rc, err := c.SyscallConn(); err == nil {
				_ = rc.Control(func(fd uintptr) { _ = syscall.SetNonblock(int(fd), true) })
			}
		}
	}
}

// startChild readies the relay for a new child (a first one, or a retry after a rollback).
// It waits, until ctx ends, while the parent still owes an answer to an earlier child: that
// answer would reach the new child and break its protocol.
func (r *relay) startChild(ctx context.Context) error {
	for {
		r.mu.Lock()
		if r.pending == hrUnknown {
			r.releaseDrain, r.heldDrain, r.drainSent = false, nil, make(chan struct{})
			r.childGone, r.childTerminated, r.seen = false, false, nil
			r.mu.Unlock()
			return nil
		}
		pending, since := r.pending, r.pendingSince
		r.mu.Unlock()
		select {
		case <-ctx.Done():
			return fmt.Errorf("the running Envoy has not answered %s for %s (is it stopped?)", pending, time.Since(since).Round(time.Millisecond))
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// release lets the child's DrainListeners through to the parent (now, or when it comes).
func (r *relay) release() {
	r.mu.Lock()
	r.releaseDrain = true
	held := r.heldDrain
	r.heldDrain = nil
	r.mu.Unlock()
	if held != nil {
		r.drainToParent(held)
	}
}

// drained is closed once the parent has been told to drain its listeners.
func (r *relay) drained() <-chan struct{} {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.drainSent
}

func (r *relay) drainToParent(msg [][]byte) {
	for _, d := range msg {
		if err := r.toParent(d, false, nil); err != nil {
			r.log.Warn("hot-restart relay: DrainListeners to the parent", "epoch", r.parentEpoch, "error", err)
		}
	}
	r.mu.Lock()
	select {
	case <-r.drainSent:
	default:
		close(r.drainSent)
	}
	r.mu.Unlock()
}

// childExited forgets a child that is gone; later replies for it are dropped.
func (r *relay) childExited() {
	r.mu.Lock()
	r.childGone, r.heldDrain = true, nil
	r.mu.Unlock()
}

// parentExited makes the relay answer in the gone parent's place, including a request the
// child is blocked on.
func (r *relay) parentExited() {
	r.mu.Lock()
	r.parentGone = true
	for _, ch := range r.fifo {
		if ch != nil {
			close(ch)
		}
	}
	r.fifo = nil
	pending := r.pending
	r.pending = hrUnknown
	childGone := r.childGone
	r.mu.Unlock()
	if pending != hrUnknown && !childGone {
		r.answer(pending)
	}
}

// finished tells whether the relay has nothing left to do: the parent is gone and the
// child will not talk to it again.
func (r *relay) finished() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.parentGone && (r.childGone || r.childTerminated)
}

// saw tells whether the current child sent a request of this kind.
func (r *relay) saw(kind hrKind) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Contains(r.seen, kind.String())
}

// state describes the hand-off so far, for errors that explain a wedged one.
func (r *relay) state() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	s := "child sent [" + strings.Join(r.seen, " ") + "]"
	if r.pending != hrUnknown {
		s += fmt.Sprintf("; waiting %s for the parent's answer to %s", time.Since(r.pendingSince).Round(time.Millisecond), r.pending)
	}
	return s
}

func (r *relay) Close() error {
	select {
	case <-r.closed:
		return nil
	default:
	}
	close(r.closed)
	conns := append([]*net.UnixConn{r.childSide, r.parentSide}, r.udp...)
	// A reader may sit in a blocking recvmsg, out of reach of Close: the sockets are in
	// blocking mode for a moment while a child is started (see inherit), and a read that
	// began then blocks in the kernel until a datagram comes. Send each one an empty
	// datagram; the reader sees r.closed and returns.
	// (The names are dialed as bound, NUL padding included: LocalAddr cuts an abstract name
	// at its first NUL.)
	for _, a := range r.bound {
		if w, err := net.DialUnix("unixgram", nil, a); err == nil {
			_, _ = w.Write([]byte{0})
			w.Close()
		}
	}
	var errs []error
	for _, c := range conns {
		errs = append(errs, c.Close())
	}
	r.wg.Wait()
	return errors.Join(errs...)
}

func (r *relay) isClosed() bool {
	select {
	case <-r.closed:
		return true
	default:
		return false
	}
}

func (r *relay) fromChild() {
	defer r.wg.Done()
	buf := make([]byte, 64<<10)
	oob := make([]byte, syscall.CmsgSpace(4*8))
	rest, kind := 0, hrUnknown
	for {
		n, oobn, _, _, err := r.childSide.ReadMsgUnix(buf, oob)
		if err != nil || r.isClosed() {
			closeFDs(oob[:oobn])
			return
		}
		closeFDs(oob[:oobn]) // requests carry no file descriptors
		d := append([]byte(nil), buf[:n]...)
		first := rest == 0
		if first {
			total, k, ok := hrHeader(d)
			if !ok {
				r.log.Warn("hot-restart relay: malformed message from the child; dropped", "epoch", r.parentEpoch+1, "bytes", n)
				continue
			}
			rest, kind = total, k
		}
		rest = max(rest-n, 0)
		r.childRequest(kind, d, first)
	}
}

func (r *relay) childRequest(kind hrKind, d []byte, first bool) {
	if first && r.onRequest != nil {
		r.onRequest(kind)
	}
	r.mu.Lock()
	if first {
		r.seen = append(r.seen, kind.String())
	}
	switch kind {
	case reqDrainListeners:
		if !r.releaseDrain {
			r.heldDrain = append(r.heldDrain, d)
			r.mu.Unlock()
			return
		}
		r.mu.Unlock()
		r.drainToParent([][]byte{d})
		return
	case reqTerminate:
		r.childTerminated = true
		r.mu.Unlock()
		return
	}
	if r.parentGone {
		r.mu.Unlock()
		if first && kind.expectsReply() {
			r.answer(kind)
		}
		return
	}
	asks := first && kind.expectsReply()
	if asks {
		r.pending, r.pendingSince = kind, time.Now()
	}
	r.mu.Unlock()
	if err := r.toParent(d, asks, nil); err != nil {
		// Nobody is bound there: the parent died on its own. Answer for it.
		r.log.Warn("hot-restart relay: parent unreachable; answering in its place", "epoch", r.parentEpoch, "request", kind, "error", err)
		r.parentExited()
	}
}

// answer replies to the child's request in the gone parent's place.
func (r *relay) answer(req hrKind) {
	if err := r.send(r.childSide, hrReply(req), nil, r.childAddr); err != nil {
		r.log.Debug("hot-restart relay: answer for the parent dropped", "epoch", r.parentEpoch+1, "request", req, "error", err)
		return
	}
	r.mu.Lock()
	r.answered++
	r.mu.Unlock()
}

func (r *relay) fromParent() {
	defer r.wg.Done()
	buf := make([]byte, 64<<10)
	oob := make([]byte, syscall.CmsgSpace(4*8))
	rest := 0
	var mine chan []byte // the message being read answers the relay's own request
	var msg []byte
	for {
		n, oobn, _, _, err := r.parentSide.ReadMsgUnix(buf, oob)
		if err != nil || r.isClosed() {
			closeFDs(oob[:oobn])
			return
		}
		fds := parseFDs(oob[:oobn])
		if rest == 0 {
			total, _, ok := hrHeader(buf[:n])
			if ok {
				rest = total
			}
			r.mu.Lock()
			mine = nil
			if len(r.fifo) > 0 {
				mine, r.fifo = r.fifo[0], r.fifo[1:]
			}
			if mine == nil {
				r.pending = hrUnknown
			}
			r.mu.Unlock()
			msg = msg[:0]
		}
		rest = max(rest-n, 0)
		if n < hrChunk {
			rest = 0 // a short datagram ends a message (resyncs a relay adopted mid-message)
		}
		if mine != nil {
			msg = append(msg, buf[:n]...)
			if rest == 0 {
				mine <- append([]byte(nil), msg...)
			}
		} else {
			r.mu.Lock()
			gone := r.childGone
			r.mu.Unlock()
			if !gone {
				if err := r.send(r.childSide, buf[:n], fds, r.childAddr); err != nil {
					r.log.Debug("hot-restart relay: reply to the child dropped", "epoch", r.parentEpoch+1, "error", err)
				}
			}
		}
		for _, fd := range fds {
			syscall.Close(fd)
		}
	}
}

// toParent sends one datagram to the parent; when it starts a request that the parent
// answers, reply receives the answer (nil: the answer goes to the child).
func (r *relay) toParent(d []byte, asks bool, reply chan []byte) error {
	r.sendMu.Lock()
	defer r.sendMu.Unlock()
	if asks {
		r.mu.Lock()
		r.fifo = append(r.fifo, reply)
		r.mu.Unlock()
	}
	err := r.send(r.parentSide, d, nil, r.parentAddr)
	if err != nil && asks {
		r.mu.Lock()
		if n := len(r.fifo); n > 0 {
			r.fifo = r.fifo[:n-1]
		}
		r.mu.Unlock()
	}
	return err
}

var errParentGone = errors.New("the old Envoy is gone")

// parentStats asks the parent for its stats, as a child does on each stats flush, and
// returns its gauges. (The parent also hands over the counter increments since the last
// ask; those taken here do not reach the child.)
func (r *relay) parentStats(ctx context.Context) (map[string]uint64, error) {
	r.mu.Lock()
	gone, adopted := r.parentGone, r.adopted
	r.mu.Unlock()
	if gone {
		return nil, errParentGone
	}
	if !adopted.IsZero() && time.Since(adopted) < adoptQuiet {
		return nil, errors.New("the relay was just taken over from a dead manager; answers it was owed may still come")
	}
	reply := make(chan []byte, 1)
	if err := r.toParent(hrRequest(reqStats), true, reply); err != nil {
		return nil, fmt.Errorf("ask the old Envoy for stats: %w", err)
	}
	select {
	case msg, ok := <-reply:
		if !ok {
			return nil, errParentGone
		}
		g, ok := hrStats(msg)
		if !ok {
			return nil, errors.New("the old Envoy's stats reply does not parse")
		}
		return g, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-r.closed:
		return nil, errParentGone
	}
}

// pipe passes datagrams from c to dst as they are.
func (r *relay) pipe(c *net.UnixConn, dst *net.UnixAddr) {
	defer r.wg.Done()
	buf := make([]byte, 64<<10)
	oob := make([]byte, syscall.CmsgSpace(4*8))
	for {
		n, oobn, _, _, err := c.ReadMsgUnix(buf, oob)
		if err != nil || r.isClosed() {
			closeFDs(oob[:oobn])
			return
		}
		closeFDs(oob[:oobn])
		_ = r.send(c, buf[:n], nil, dst)
	}
}

// send writes one datagram, with fds attached, retrying for a while when the receiver's
// queue is full (a child still reading a long stats reply).
func (r *relay) send(c *net.UnixConn, d []byte, fds []int, dst *net.UnixAddr) error {
	var oob []byte
	if len(fds) > 0 {
		oob = syscall.UnixRights(fds...)
	}
	deadline := time.Now().Add(3 * time.Second)
	for {
		_ = c.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
		_, _, err := c.WriteMsgUnix(d, oob, dst)
		if err == nil {
			return nil
		}
		if !errors.Is(err, os.ErrDeadlineExceeded) && !errors.Is(err, syscall.EAGAIN) || time.Now().After(deadline) {
			return err
		}
		select {
		case <-r.closed:
			return err
		case <-time.After(5 * time.Millisecond):
		}
	}
}

func parseFDs(oob []byte) []int {
	msgs, err := syscall.ParseSocketControlMessage(oob)
	if err != nil {
		return nil
	}
	var fds []int
	for _, m := range msgs {
		if f, err := syscall.ParseUnixRights(&m); err == nil {
			fds = append(fds, f...)
		}
	}
	return fds
}

func closeFDs(oob []byte) {
	for _, fd := range parseFDs(oob) {
		syscall.Close(fd)
	}
}
