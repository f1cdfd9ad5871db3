package hotupgrade

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"sync/atomic"
	"syscall"
	"unsafe"
)

// Envoy's hot-restart shared memory, /dev/shm/envoy_shared_memory_<base*10>
// (source/server/hot_restart_impl.h):
//
//	struct SharedMemory {
//	  uint64_t size_;            // sizeof(SharedMemory); "11.104" = version 11, 104 bytes
//	  uint64_t version_;         // HOT_RESTART_VERSION
//	  pthread_mutex_t log_lock_, access_log_lock_;  // robust, process-shared
//	  std::atomic<uint64_t> flags_;                 // last field
//	};
//
// Every epoch sets SHMEM_FLAGS_INITIALIZING when it attaches and clears it when its workers
// start. An epoch that dies before that leaves the flag set, and every later epoch then
// refuses to start ("previous envoy process is still initializing"). After a failed epoch
// has exited, and before the next is started, the manager clears the flag.

const shmFlagInitializing = 0x1

func shmPath(baseID int) string { return fmt.Sprintf("/dev/shm/envoy_shared_memory_%d", baseID*10) }

// clearInitializing clears a stale initializing flag; it reports whether it was set. Call it
// only when no Envoy of this base id is starting.
func clearInitializing(baseID int) (bool, error) {
	f, err := os.OpenFile(shmPath(baseID), os.O_RDWR, 0)
	if err != nil {
		return false, fmt.Errorf("open hot-restart shared memory: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return false, err
	}
	if st.Size() < 24 || st.Size() > 4096 {
		return false, fmt.Errorf("hot-restart shared memory %s: unexpected size %d", f.Name(), st.Size())
	}
	mem, err := syscall.Mmap(int(f.Fd()), 0, int(st.Size()), syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_SHARED)
	if err != nil {
		return false, fmt.Errorf("map hot-restart shared memory: %w", err)
	}
	defer syscall.Munmap(mem)
	size := binary.NativeEndian.Uint64(mem[0:8])
	if size != uint64(len(mem)) || size%8 != 0 {
		return false, fmt.Errorf("hot-restart shared memory %s: size field %d, file %d bytes", f.Name(), size, len(mem))
	}
	flags := (*atomic.Uint64)(unsafe.Pointer(&mem[size-8]))
	for {
		old := flags.Load()
		if old&shmFlagInitializing == 0 {
			return false, nil
		}
		if flags.CompareAndSwap(old, old&^shmFlagInitializing) {
			return true, nil
		}
	}
}

// removeShm deletes the shared memory segment once no Envoy of this base id runs.
func removeShm(baseID int) error {
	if err := os.Remove(shmPath(baseID)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove hot-restart shared memory: %w", err)
	}
	return nil
}
