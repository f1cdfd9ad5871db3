package testenv

import (
	"fmt"
	"os"
	"syscall"
)

// BPFLockPath is the lock every test that loads meshturbo's BPF objects holds: the BPF tests
// check the whole kernel for objects named mt_* after an uninstall, which another package's
// test loading the same programs at that moment would make fail. `go test ./...` runs packages
// in parallel; this serializes only the ones that load BPF.
const BPFLockPath = "/run/lock/meshturbo-bpf-tests.lock"

// LockBPF blocks until this process holds the BPF test lock; call the returned func to release.
func LockBPF() (unlock func(), err error) {
	f, err := os.OpenFile(BPFLockPath, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("bpf test lock %s: %w", BPFLockPath, err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		f.Close()
		return nil, fmt.Errorf("bpf test lock %s: %w", BPFLockPath, err)
	}
	return func() { f.Close() }, nil // closing the file releases the lock
}
