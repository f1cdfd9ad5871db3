package main

import (
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// keepAwake keeps every CPU out of its idle state during the ping-pong runs, with one spinning
// thread per CPU at SCHED_IDLE (it runs only when nothing else wants that CPU, and yields to
// any task that wakes there at once). On an idle virtual machine a task woken on an idle
// vCPU waits for the vCPU to wake (~20 µs here, measured: 64 B ping-pong p50 9 µs with the
// CPUs busy, 30 µs idle, in both modes alike), which would hide the TCP stack's share of a
// round trip that this bench compares; a loaded node has no such delay. Not for throughput
// runs: there the spinners cost plain and accelerated bulk alike about a fifth of their
// rate (measured: 31 → 26 and 55 → 36 Gbit/s), vCPUs sharing cores. stop ends them and waits.
func keepAwake() (stop func(), err error) {
	var done atomic.Bool
	var wg sync.WaitGroup
	errc := make(chan error, runtime.NumCPU())
	for cpu := range runtime.NumCPU() {
		wg.Add(1)
		go func() {
			defer wg.Done()
			runtime.LockOSThread() // the thread ends with the goroutine: its policy goes with it
			var set unix.CPUSet
			set.Set(cpu)
			attr := unix.SchedAttr{Size: uint32(unsafe.Sizeof(unix.SchedAttr{})), Policy: unix.SCHED_IDLE}
			if err := unix.SchedSetaffinity(0, &set); err != nil {
				errc <- fmt.Errorf("keep CPU %d awake: sched_setaffinity: %w", cpu, err)
				return
			}
			if err := unix.SchedSetAttr(0, &attr, 0); err != nil {
				errc <- fmt.Errorf("keep CPU %d awake: sched_setattr SCHED_IDLE: %w", cpu, err)
				return
			}
			errc <- nil
			for !done.Load() {
			}
		}()
	}
	stop = func() { done.Store(true); wg.Wait() }
	for range runtime.NumCPU() {
		if e := <-errc; e != nil && err == nil {
			err = e
		}
	}
	if err != nil {
		stop()
		return nil, err
	}
	return stop, nil
}
