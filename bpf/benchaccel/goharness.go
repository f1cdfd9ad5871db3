package main

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// The Go harness: the same cases as sockperf and iperf3 (64 B ping-pong, small-write
// streams, 128 KiB bulk), run by an event-loop program: Go's net package uses non-blocking
// sockets and epoll, as Envoy does. sockperf and iperf3 read with blocking sockets, which
// the agent does not accelerate (a signal would turn a blocking read on a redirected socket
// into EAGAIN: bpf/README.md, "Blocking reads"); their runs show what such a program gets
// (plain TCP, at no cost), the Go runs what an accelerated pair gets.
//
// Both ends are this binary re-executed in the bench cgroup: `-go-serve ADDR` and
// `-go-client ADDR -go-op OP -go-size N`. The client's first byte names the case. Streams
// half-close when the time is up and the server answers with the bytes it read, so rates
// count delivered bytes, not queued ones.

const (
	goOpPingPong = 'P'
	goOpStream   = 'S'
	goOpHold     = 'H' // keep the connection, never read (an idle reader)
	goOpRelease  = 'R' // close every held connection
)

// goFloodConns is the number of flooding pairs in the victim case, as in BenchmarkQueueFlood.
const goFloodConns = 8

// goServe accepts connections on each address and serves each by its first byte:
// ping-pong echoes messages of the size that follows (4 bytes), a stream reads until EOF
// and answers with the byte count, hold keeps the connection unread until a release. It
// prints "listening" once bound and runs until killed.
func goServe(addrs []string) error {
	var ls []net.Listener
	for _, a := range addrs {
		l, err := net.Listen("tcp", a)
		if err != nil {
			return err
		}
		ls = append(ls, l)
	}
	fmt.Println("listening")
	h := &holder{}
	errc := make(chan error, len(ls))
	for _, l := range ls {
		go func() {
			for {
				c, err := l.Accept()
				if err != nil {
					errc <- err
					return
				}
				go func() {
					if keep := goServeConn(c, h); !keep {
						_ = c.Close()
					}
				}()
			}
		}()
	}
	return <-errc
}

// holder keeps the connections of idle readers.
type holder struct {
	mu    sync.Mutex
	conns []net.Conn
}

// goServeConn serves one connection; keep says it was handed to the holder.
func goServeConn(c net.Conn, h *holder) (keep bool) {
	var hdr [5]byte
	if _, err := io.ReadFull(c, hdr[:]); err != nil {
		return false
	}
	size := int(binary.BigEndian.Uint32(hdr[1:]))
	switch hdr[0] {
	case goOpPingPong:
		buf := make([]byte, size)
		for {
			if _, err := io.ReadFull(c, buf); err != nil {
				return false
			}
			if _, err := c.Write(buf); err != nil {
				return false
			}
		}
	case goOpStream:
		buf := make([]byte, 128<<10)
		var n int64
		for {
			k, err := c.Read(buf)
			n += int64(k)
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				return false
			}
		}
		_ = binary.Write(c, binary.BigEndian, n)
	case goOpHold:
		h.mu.Lock()
		h.conns = append(h.conns, c)
		h.mu.Unlock()
		return true
	case goOpRelease:
		h.mu.Lock()
		for _, x := range h.conns {
			_ = x.Close()
		}
		h.conns = nil
		h.mu.Unlock()
	}
	return false
}

// goClient runs one case against addr for d and prints its result: "p50 <usec> p99 <usec>"
// (one-way, half the round trip, as sockperf reports) for ping-pong, "rate <bytes/s>" for
// a stream, "queued <bytes>" for a fill (an idle reader: what the sender queues before it
// blocks), and for a flood "ratio <n> p99_ratio <n>": a plain stream's rate and a plain
// ping-pong's p99 to victim with goFloodConns fills of addr parked, ÷ the same before them.
func goClient(addr, victim, op string, size int, d time.Duration) error {
	switch op {
	case "pingpong":
		return goPingPong(addr, size, d)
	case "stream":
		r, err := goStreamRate(addr, size, d)
		if err == nil {
			fmt.Printf("rate %.0f\n", r)
		}
		return err
	case "fill":
		defer goRelease(victim)
		n, err := goFill(addr)
		if errors.Is(err, syscall.ENOMEM) { // what naive redirection ends in: reported, not fatal
			fmt.Printf("queued %d enomem 1\n", n)
			return nil
		}
		if err == nil {
			fmt.Printf("queued %d enomem 0\n", n)
		}
		return err
	case "flood":
		defer goRelease(victim)
		base, err := goStreamRate(victim, 128<<10, d)
		if err != nil {
			return err
		}
		_, baseP99, err := goPingPongPercentiles(victim, 64, d)
		if err != nil {
			return err
		}
		var wg sync.WaitGroup
		errs := make([]error, goFloodConns)
		for i := range goFloodConns {
			wg.Add(1)
			go func() {
				defer wg.Done()
				_, errs[i] = goFill(addr)
			}()
		}
		wg.Wait()
		enomem := 0
		for _, err := range errs {
			if errors.Is(err, syscall.ENOMEM) {
				enomem++
			} else if err != nil {
				return err
			}
		}
		during, err := goStreamRate(victim, 128<<10, d)
		if err != nil {
			return err
		}
		_, duringP99, err := goPingPongPercentiles(victim, 64, d)
		if err != nil {
			return err
		}
		fmt.Printf("ratio %.4f p99_ratio %.4f enomem %d\n", during/base, duringP99/baseP99, enomem)
		return nil
	}
	return fmt.Errorf("unknown op %q", op)
}

func goDial(addr string, op byte, size int) (net.Conn, error) {
	c, err := net.Dial("tcp", addr)
	if err != nil {
		return nil, err
	}
	hdr := []byte{op, 0, 0, 0, 0}
	binary.BigEndian.PutUint32(hdr[1:], uint32(size))
	if _, err := c.Write(hdr); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

func goPingPong(addr string, size int, d time.Duration) error {
	p50, p99, err := goPingPongPercentiles(addr, size, d)
	if err == nil {
		fmt.Printf("p50 %.3f p99 %.3f\n", p50, p99)
	}
	return err
}

// goPingPongPercentiles runs a ping-pong for d and returns its p50 and p99 one-way latency
// in microseconds.
func goPingPongPercentiles(addr string, size int, d time.Duration) (p50, p99 float64, err error) {
	c, err := goDial(addr, goOpPingPong, size)
	if err != nil {
		return 0, 0, err
	}
	defer c.Close()
	buf := make([]byte, size)
	var rtts []time.Duration
	for end := time.Now().Add(d); time.Now().Before(end); {
		t0 := time.Now()
		if _, err := c.Write(buf); err != nil {
			return 0, 0, err
		}
		if _, err := io.ReadFull(c, buf); err != nil {
			return 0, 0, err
		}
		rtts = append(rtts, time.Since(t0))
	}
	slices.Sort(rtts)
	pct := func(p float64) float64 {
		return float64(rtts[int(p*float64(len(rtts)-1))].Nanoseconds()) / 2e3
	}
	return pct(0.50), pct(0.99), nil
}

// goFill opens a connection to an idle reader and writes 64 KiB chunks until a write makes
// no progress for 500 ms: the bytes the sender could queue before blocking. The connection
// stays open (held by the server) until goRelease.
func goFill(addr string) (int64, error) {
	c, err := goDial(addr, goOpHold, 0)
	if err != nil {
		return 0, err
	}
	chunk := make([]byte, 64<<10)
	var n int64
	for {
		_ = c.SetWriteDeadline(time.Now().Add(500 * time.Millisecond))
		k, err := c.Write(chunk)
		n += int64(k)
		switch {
		case errors.Is(err, os.ErrDeadlineExceeded) && k == 0:
			return n, nil
		case err != nil && !errors.Is(err, os.ErrDeadlineExceeded):
			return n, fmt.Errorf("write after %d bytes: %w", n, err)
		case n > 4<<30:
			return n, errors.New("queued 4 GiB without blocking")
		}
	}
}

// goRelease tells the server to close the connections it holds. It goes to the server's
// address outside the mesh: after naive redirection ran the node into tcp_mem, a redirected
// write of its own could fail.
func goRelease(addr string) {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	_, _ = c.Write([]byte{goOpRelease, 0, 0, 0, 0})
	_, _ = c.Read(make([]byte, 1)) // the server closes when done
}

// goStreamRate streams writes of size bytes to addr for d and returns the delivered bytes/s.
func goStreamRate(addr string, size int, d time.Duration) (float64, error) {
	c, err := goDial(addr, goOpStream, 0)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	buf := make([]byte, size)
	start := time.Now()
	for end := start.Add(d); time.Now().Before(end); {
		if _, err := c.Write(buf); err != nil {
			return 0, fmt.Errorf("write: %w", err)
		}
	}
	if err := c.(*net.TCPConn).CloseWrite(); err != nil {
		return 0, err
	}
	var n int64
	if err := binary.Read(c, binary.BigEndian, &n); err != nil {
		return 0, fmt.Errorf("read the server's count: %w", err)
	}
	return float64(n) / time.Since(start).Seconds(), nil
}

// goRun runs one client of the Go harness for -duration and returns the numbers it printed
// by name.
func (b *bench) goRun(ctx context.Context, op string, size int) (map[string]float64, error) {
	return b.goRunFor(ctx, op, size, b.o.duration)
}

func (b *bench) goRunFor(ctx context.Context, op string, size int, d time.Duration) (map[string]float64, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	out, err := b.output(ctx, self, "-go-client", b.goAddr, "-go-victim", b.goVictimAddr, "-go-op", op, "-go-size", strconv.Itoa(size),
		"-duration", d.String())
	if err != nil {
		return nil, err
	}
	f := strings.Fields(out)
	if len(f) == 0 || len(f)%2 != 0 {
		return nil, fmt.Errorf("go harness printed %q", out)
	}
	res := map[string]float64{}
	for i := 0; i < len(f); i += 2 {
		v, err := strconv.ParseFloat(f[i+1], 64)
		if err != nil {
			return nil, fmt.Errorf("go harness printed %q", out)
		}
		res[f[i]] = v
	}
	return res, nil
}
