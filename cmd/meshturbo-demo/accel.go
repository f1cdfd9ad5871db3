package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/cilium/ebpf"

	"github.com/meshturbo/meshturbo/bpf"
)

// The acceleration part of the demo: a server and a client on one node (one child process
// of this binary, in a cgroup of its own), first on plain loopback TCP, then with the node
// agent's programs (package bpf) loaded on that cgroup and the server's port declared a
// sidecar port: a 64 B ping-pong and a 128 KiB bulk stream each time, and the agent's
// counters. Go's sockets are non-blocking with epoll, as Envoy's. make bench-accel measures
// the same properly (interleaved reps, sockperf, iperf3, a real Envoy).

const (
	accelCgroup2 = "/sys/fs/cgroup/unified"
	accelRun     = time.Second
	accelReps    = 3
)

// accelChild runs in the child: it listens on addr, dials itself, and prints
// "p50_us <n> gbps <n>" for a ping-pong and a bulk stream of d each.
func accelChild(addr string, d time.Duration) error {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	defer l.Close()
	accepted := make(chan net.Conn, 2)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			accepted <- c
		}
	}()
	dial := func() (net.Conn, net.Conn, error) {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			return nil, nil, err
		}
		select {
		case s := <-accepted:
			return c, s, nil
		case <-time.After(5 * time.Second):
			c.Close()
			return nil, nil, errors.New("accept timed out")
		}
	}

	c, s, err := dial()
	if err != nil {
		return err
	}
	go func() { // echo (not io.Copy(s, s): that splices a socket into itself)
		b := make([]byte, 64)
		for {
			if _, err := io.ReadFull(s, b); err != nil {
				return
			}
			if _, err := s.Write(b); err != nil {
				return
			}
		}
	}()
	msg := make([]byte, 64)
	var rtts []time.Duration
	for end := time.Now().Add(d); time.Now().Before(end); {
		t0 := time.Now()
		if _, err := c.Write(msg); err != nil {
			return err
		}
		if _, err := io.ReadFull(c, msg); err != nil {
			return err
		}
		rtts = append(rtts, time.Since(t0))
	}
	c.Close()
	s.Close()
	slices.Sort(rtts)
	p50 := float64(rtts[len(rtts)/2].Nanoseconds()) / 2e3

	c, s, err = dial()
	if err != nil {
		return err
	}
	got := make(chan int64, 1)
	go func() { n, _ := io.Copy(io.Discard, s); got <- n }()
	buf := make([]byte, 128<<10)
	start := time.Now()
	for end := start.Add(d); time.Now().Before(end); {
		if _, err := c.Write(buf); err != nil {
			return err
		}
	}
	c.Close()
	n := <-got
	s.Close()
	fmt.Printf("p50_us %.3f gbps %.3f\n", p50, float64(n)*8/time.Since(start).Seconds()/1e9)
	return nil
}

// demoAccel prints the acceleration part, or why it was skipped.
func demoAccel(ctx context.Context) error {
	fmt.Println("• acceleration (node agent: sockops + sk_msg) between a client and a server on this node")
	skip := func(why string) error {
		fmt.Printf("  skipped: %s\n", why)
		return nil
	}
	if os.Geteuid() != 0 {
		return skip("needs root (loads BPF programs, makes a cgroup)")
	}
	var st syscall.Statfs_t
	if err := syscall.Statfs(accelCgroup2, &st); err != nil || st.Type != 0x63677270 { // CGROUP2_SUPER_MAGIC
		return skip("needs cgroup v2 mounted at " + accelCgroup2)
	}
	suffix := strconv.Itoa(os.Getpid())
	cg := filepath.Join(accelCgroup2, "meshturbo-demo-"+suffix)
	if err := os.Mkdir(cg, 0o755); err != nil {
		return fmt.Errorf("make the demo cgroup: %w", err)
	}
	defer func() {
		for range 100 { // the child's exit reaches the cgroup a moment later
			if os.Remove(cg) == nil {
				return
			}
			time.Sleep(50 * time.Millisecond)
		}
	}()
	cgFD, err := os.Open(cg)
	if err != nil {
		return err
	}
	defer cgFD.Close()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	addr := l.Addr().String()
	port := uint16(l.Addr().(*net.TCPAddr).Port)
	l.Close()
	self, err := os.Executable()
	if err != nil {
		return err
	}
	measure := func() (p50, gbps float64, err error) {
		cmd := exec.CommandContext(ctx, self, "-accel-child", addr, "-accel-run", accelRun.String())
		cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(cgFD.Fd())}
		out, err := cmd.CombinedOutput()
		if err != nil {
			return 0, 0, fmt.Errorf("accel workload: %w: %s", err, out)
		}
		f := strings.Fields(string(out))
		if len(f) != 4 {
			return 0, 0, fmt.Errorf("accel workload printed %q", out)
		}
		p50, err1 := strconv.ParseFloat(f[1], 64)
		gbps, err2 := strconv.ParseFloat(f[3], 64)
		return p50, gbps, errors.Join(err1, err2)
	}

	pin := filepath.Join(bpf.DefaultBPFFS, "meshturbo-demo-"+suffix)
	var plainP50, plainRate, accelP50, accelRate []float64
	var stats bpf.Stats
	for range accelReps {
		p, r, err := measure()
		if err != nil {
			return err
		}
		plainP50, plainRate = append(plainP50, p), append(plainRate, r)
		agent, err := bpf.New(bpf.Config{CgroupPath: cg, PinPath: pin, SidecarPorts: []uint16{port}})
		if errors.Is(err, ebpf.ErrNotSupported) {
			return skip(err.Error())
		}
		if err != nil {
			return err
		}
		p, r, err = measure()
		if s, serr := agent.Stats(); serr == nil {
			stats.SocketsInserted += s.SocketsInserted
			stats.BytesRedirected += s.BytesRedirected
			stats.MsgRedirected += s.MsgRedirected
		}
		if uerr := agent.Uninstall(); err == nil {
			err = uerr
		}
		if err != nil {
			return err
		}
		accelP50, accelRate = append(accelP50, p), append(accelRate, r)
	}
	med := func(v []float64) float64 { slices.Sort(v); return v[len(v)/2] }
	pp, ap, pr, ar := med(plainP50), med(accelP50), med(plainRate), med(accelRate)
	fmt.Printf("  64 B ping-pong p50 (one-way): plain %.1f µs, accelerated %.1f µs (%.2f×)\n", pp, ap, ap/pp)
	fmt.Printf("  128 KiB bulk:                 plain %.1f Gbit/s, accelerated %.1f Gbit/s (%.2f×)\n", pr, ar, ar/pr)
	fmt.Printf("  agent counters: %d sockets inserted, %d sends and %.0f MiB redirected past the TCP/IP stack\n",
		stats.SocketsInserted, stats.MsgRedirected, float64(stats.BytesRedirected)/(1<<20))
	fmt.Printf("  (medians of %d alternated runs of %s; make bench-accel measures more cases, and through a real Envoy)\n", accelReps, accelRun)
	return nil
}
