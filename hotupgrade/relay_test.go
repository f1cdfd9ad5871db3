package hotupgrade

import (
	"fmt"
	"log/slog"
	"net"
	"os"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"
)

// threadsIn counts this process's threads blocked in system call nr.
func threadsIn(nr int) int {
	tasks, _ := os.ReadDir("/proc/self/task")
	n := 0
	for _, task := range tasks {
		b, err := os.ReadFile("/proc/self/task/" + task.Name() + "/syscall")
		if err == nil && strings.HasPrefix(string(b), fmt.Sprint(nr, " ")) {
			n++
		}
	}
	return n
}

// Starting a child that inherits the relay's sockets puts them into blocking mode for a
// moment (see relay.inherit); a reader that starts a read then blocks in the kernel. Close
// must still end every reader.
func TestRelayCloseEndsReadersBlockedInTheKernel(t *testing.T) {
	r, err := newRelay(1<<20+12345, 0, slog.New(slog.DiscardHandler), nil)
	if err != nil {
		t.Fatal(err)
	}
	files, done := r.inherit()
	for _, f := range files {
		f.Fd() // what starting a process does: blocking mode, shared with the relay's sockets
	}
	// Wake each reader once: its next read blocks in recvmsg.
	for _, a := range r.bound {
		if w, err := net.DialUnix("unixgram", nil, a); err == nil {
			_, _ = w.Write([]byte("x"))
			w.Close()
		}
	}
	// The four readers reach their next read, which blocks a thread in recvmsg each.
	for deadline := time.Now().Add(5 * time.Second); threadsIn(syscall.SYS_RECVMSG) < 4; {
		if time.Now().After(deadline) {
			t.Fatalf("%d threads in recvmsg, want the relay's 4 readers", threadsIn(syscall.SYS_RECVMSG))
		}
		runtime.Gosched()
	}
	done()
	closed := make(chan error, 1)
	go func() { closed <- r.Close() }()
	select {
	case <-closed:
	case <-time.After(5 * time.Second):
		t.Fatal("relay.Close hangs on a reader blocked in recvmsg")
	}
}
