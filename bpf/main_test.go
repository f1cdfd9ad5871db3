package bpf

import (
	"github.com/meshturbo/meshturbo/internal/testenv"

	"crypto/rand"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"go.uber.org/goleak"
	"golang.org/x/sys/unix"
)

var long = flag.Bool("bpf.long", false, "long runs: 1 GiB streams, 100,000 connections of churn")

// cgroup2Root is where this machine mounts cgroup v2 (the v1 controllers sit beside it).
const cgroup2Root = "/sys/fs/cgroup/unified"

func TestMain(m *testing.M) {
	if os.Getenv(envWorkload) != "" {
		os.Exit(workloadMain())
	}
	if cfg := os.Getenv(envAgent); cfg != "" {
		os.Exit(agentMain(cfg))
	}
	flag.Parse()
	unlock, err := testenv.LockBPF() // no other package loads mt_* objects meanwhile
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	code := m.Run()
	if code == 0 && os.Geteuid() == 0 {
		if err := checkNoLeftovers(); err != nil {
			fmt.Fprintln(os.Stderr, "leftover BPF objects:", err)
			code = 1
		}
	}
	unlock()
	if code == 0 {
		if err := goleak.Find(); err != nil {
			fmt.Fprintln(os.Stderr, "goleak:", err)
			code = 1
		}
	}
	os.Exit(code)
}

// requirePrivileges skips with the precise missing capability: root, cgroup v2 at
// cgroup2Root, bpffs mountable.
func requirePrivileges(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: loads BPF programs, attaches to cgroups, mounts bpffs")
	}
	var st unix.Statfs_t
	if err := unix.Statfs(cgroup2Root, &st); err != nil || st.Type != unix.CGROUP2_SUPER_MAGIC {
		t.Skipf("needs cgroup v2 mounted at %s", cgroup2Root)
	}
}

func randomSuffix() string {
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// testCgroup creates a cgroup v2 directory for the test and removes it afterwards (the
// workloads in it have exited by then: their cleanups run first).
func testCgroup(t testing.TB) string {
	t.Helper()
	dir := filepath.Join(cgroup2Root, "meshturbo-test-"+randomSuffix())
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatalf("create test cgroup: %v", err)
	}
	t.Cleanup(func() {
		var err error
		for range 50 { // the kernel empties a cgroup shortly after its last task exits
			if err = os.Remove(dir); err == nil || errors.Is(err, os.ErrNotExist) {
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
		t.Errorf("remove test cgroup: %v", err)
	})
	return dir
}

// testConfig returns a Config for cgroup with a fresh pin path, uninstalled after the test.
// smallWrite is the small-write threshold the tests that need the rule turn it on with (it is
// off by default): the threshold it had as the default before blocking readers were kept out.
const smallWrite = 16384

func testConfig(t testing.TB, cgroup string) Config {
	t.Helper()
	pin := filepath.Join(DefaultBPFFS, "meshturbo-test-"+randomSuffix())
	t.Cleanup(func() {
		if err := Uninstall(pin); err != nil {
			t.Errorf("uninstall %s: %v", pin, err)
		}
	})
	return Config{CgroupPath: cgroup, PinPath: pin}
}

func newAgent(t testing.TB, cfg Config, opts ...Option) *Agent {
	t.Helper()
	a, err := New(cfg, opts...)
	if err != nil {
		t.Fatalf("New: %+v", err)
	}
	t.Cleanup(func() {
		if err := a.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return a
}

func stats(t testing.TB, a *Agent) Stats {
	t.Helper()
	s, err := a.Stats()
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func sockets(t testing.TB, a *Agent) []SockKey {
	t.Helper()
	keys, err := a.Sockets()
	if err != nil {
		t.Fatal(err)
	}
	return keys
}

// checkNoLeftovers looks for BPF maps and programs named mt_* in the whole kernel: after
// every test uninstalled and closed everything, the kernel must have freed them. Freeing
// is deferred (RCU, workqueue), so it polls for a while.
func checkNoLeftovers() error {
	var err error
	for range 100 {
		if err = findMeshturboObjects(); err == nil {
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return err
}

func findMeshturboObjects() error {
	var found []string
	var id ebpf.MapID
	for {
		next, err := ebpf.MapGetNextID(id)
		if err != nil {
			break
		}
		id = next
		m, err := ebpf.NewMapFromID(id)
		if err != nil {
			continue
		}
		if info, err := m.Info(); err == nil && strings.HasPrefix(info.Name, "mt_") {
			found = append(found, fmt.Sprintf("map %d %s", id, info.Name))
		}
		m.Close()
	}
	var pid ebpf.ProgramID
	for {
		next, err := ebpf.ProgramGetNextID(pid)
		if err != nil {
			break
		}
		pid = next
		p, err := ebpf.NewProgramFromID(pid)
		if err != nil {
			continue
		}
		if info, err := p.Info(); err == nil && strings.HasPrefix(info.Name, "mt_") {
			found = append(found, fmt.Sprintf("program %d %s", pid, info.Name))
		}
		p.Close()
	}
	if len(found) > 0 {
		return errors.New(strings.Join(found, ", "))
	}
	return nil
}
