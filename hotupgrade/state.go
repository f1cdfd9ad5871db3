package hotupgrade

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// A manager that dies (SIGKILL, OOM kill, a crash) leaves its Envoys running: they are
// started without a parent-death signal, and the hot-restart relay's sockets are inherited
// by each new epoch, so an Envoy's hot-restart calls wait in a socket queue instead of
// failing (Envoy aborts when a hot-restart sendmsg is refused). Both epochs keep serving
// on their worker threads meanwhile; at worst an epoch's main thread waits for an answer.
//
// The manager writes what runs to <WorkDir>/state.json at every step of an upgrade: the base
// id, the serving epoch, the epoch an upgrade started (next) or the one it told to drain,
// their pids with their kernel start times, and the listener ports. A manager started again
// on the same WorkDir adopts them (see Manager.recover):
//
//   - each recorded pid must still be the same process (start time) running an Envoy of
//     this base id and epoch (its command line); it is then watched through a pidfd;
//   - the relay's sockets are taken back from the Envoy that inherited them (pidfd_getfd);
//   - an upgrade whose old epoch was not yet told to drain is rolled back (the next epoch is
//     drained if it was accepting, then stopped); one whose old epoch was told to drain is
//     finished (the old epoch is stopped when its connections are gone or the recorded
//     drain deadline passes);
//   - when nothing recorded is alive, its shared memory is removed and Envoy starts afresh.
//
// A reuseport hand-off (handoff.go) is recovered the same way, with each Envoy's own base
// id and admin address from the file and no relay: one interrupted before the old Envoy
// stopped listening is rolled back (the new Envoy is drained through its admin and stopped,
// its shared memory removed); one after is finished (the old Envoy's drain is started again,
// which Envoy ignores if it runs, and it is stopped when its connections are gone).
//
// The Kubernetes container of a manager that dies takes its processes with it unless the
// manager runs under a supervisor that restarts it in place (an init such as tini or s6 with
// a restart loop, or a pod with shareProcessNamespace); that is what this recovery is for.

const stateFileName = "state.json"

// procRecord identifies one running Envoy in the state file.
type procRecord struct {
	Epoch int `json:"epoch"`
	// BaseID and RestartEpoch are its hot-restart identity (--base-id, --restart-epoch).
	// Files written before reuseport hand-offs existed have neither: the state's base id
	// and the epoch then.
	BaseID       int       `json:"base_id,omitempty"`
	RestartEpoch int       `json:"restart_epoch"`
	PID          int       `json:"pid"`
	StartTicks   uint64    `json:"start_ticks"`
	Binary       string    `json:"binary"`
	Version      string    `json:"version"`
	ConfigPath   string    `json:"config_path"`
	AdminAddr    string    `json:"admin_addr"`
	Started      time.Time `json:"started"`
}

func recordOf(p *process) *procRecord {
	if p == nil {
		return nil
	}
	return &procRecord{Epoch: p.epoch, BaseID: p.baseID, RestartEpoch: p.restartEpoch, PID: p.pid(), StartTicks: p.startTicks, Binary: p.binary, Version: p.version,
		ConfigPath: p.configPath, AdminAddr: p.adminAddr, Started: p.started}
}

// savedState is the state file.
type savedState struct {
	BaseID int `json:"base_id"`
	// AdminAddr is the admin address the serving Envoy's bootstrap configures (its own
	// may differ after a reuseport hand-off: Serving.AdminAddr).
	AdminAddr string `json:"admin_addr,omitempty"`
	// Handoff is how the upgrade in progress hands off (HandoffHotRestart or
	// HandoffReusePort); empty when none runs.
	Handoff           string     `json:"handoff,omitempty"`
	Phase             string     `json:"phase"`
	Serving           procRecord `json:"serving"`
	HotRestartVersion string     `json:"hot_restart_version"`
	// Next is the epoch an upgrade started, before the serving one was told to drain.
	Next *procRecord `json:"next,omitempty"`
	// Draining was told to drain (Serving is its successor) and is not stopped yet.
	Draining      *procRecord `json:"draining,omitempty"`
	DrainDeadline time.Time   `json:"drain_deadline,omitzero"`
	// Ports are the listener ports of the upgrade in progress (the admin port excluded).
	Ports     []int          `json:"ports,omitempty"`
	Upgrades  int            `json:"upgrades"`
	Rollbacks int            `json:"rollbacks"`
	Rejected  int            `json:"rejected"`
	Last      *UpgradeResult `json:"last_upgrade,omitempty"`
}

// persist writes the state file; the caller holds m.mu. A failure is logged: the Envoys
// serve on, only a restarted manager could not adopt them.
func (m *Manager) persistLocked() {
	if m.current == nil {
		return
	}
	st := savedState{BaseID: m.baseID, AdminAddr: m.admin, Handoff: m.handoff, Phase: m.status.Phase, Serving: *recordOf(m.current),
		HotRestartVersion: m.status.HotRestartVersion, Next: recordOf(m.child), Draining: recordOf(m.draining),
		DrainDeadline: m.drainDeadline, Upgrades: m.status.Upgrades, Rollbacks: m.status.Rollbacks,
		Rejected: m.status.Rejected, Last: m.status.Last}
	for p := range m.ports {
		st.Ports = append(st.Ports, p)
	}
	slices.Sort(st.Ports)
	b, err := json.MarshalIndent(st, "", "  ")
	if err == nil {
		err = writeFileAtomic(filepath.Join(m.cfg.WorkDir, stateFileName), b)
	}
	if err != nil {
		m.cfg.Logger.Warn("hotupgrade: write the state file; a restarted manager will not adopt the running Envoy", "error", err)
	}
}

func (m *Manager) persist() {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.persistLocked()
}

func writeFileAtomic(path string, b []byte) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

func loadState(dir string) (savedState, error) {
	var st savedState
	b, err := os.ReadFile(filepath.Join(dir, stateFileName))
	if err != nil {
		return st, err
	}
	if err := json.Unmarshal(b, &st); err != nil {
		return st, fmt.Errorf("state file %s: %w (delete it to start afresh)", filepath.Join(dir, stateFileName), err)
	}
	return st, nil
}

// procStartTicks reads a process's start time (clock ticks since boot) from /proc/<pid>/stat.
func procStartTicks(pid int) (uint64, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, err
	}
	// pid (comm) state ppid ... ; comm may hold spaces and parentheses.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, fmt.Errorf("/proc/%d/stat: no comm field", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 20 {
		return 0, fmt.Errorf("/proc/%d/stat: %d fields", pid, len(f))
	}
	return strconv.ParseUint(f[19], 10, 64) // field 22 overall
}

var errNotRunning = errors.New("not running")

// adoptProcess finds the Envoy rec describes, started by an earlier manager, and watches it
// through a pidfd. It fails with errNotRunning when that process is gone (or its pid now
// names another process).
func adoptProcess(rec procRecord) (*process, error) {
	what := fmt.Sprintf("envoy epoch %d (pid %d)", rec.Epoch, rec.PID)
	baseID := rec.BaseID
	if rec.PID <= 0 {
		return nil, fmt.Errorf("%s: %w", what, errNotRunning)
	}
	pidfd, err := unix.PidfdOpen(rec.PID, 0)
	if err != nil {
		return nil, fmt.Errorf("%s: %w (%v)", what, errNotRunning, err)
	}
	keep := false
	defer func() {
		if !keep {
			unix.Close(pidfd)
		}
	}()
	// The pidfd pins the process; check that it is the one recorded, then that it has not
	// exited (a zombie has no command line either).
	if ticks, err := procStartTicks(rec.PID); err != nil || ticks != rec.StartTicks {
		return nil, fmt.Errorf("%s: %w (the pid names another process)", what, errNotRunning)
	}
	cmdline, _ := os.ReadFile("/proc/" + strconv.Itoa(rec.PID) + "/cmdline")
	args := strings.Split(string(cmdline), "\x00")
	if !hasArg(args, "--base-id", strconv.Itoa(baseID)) || !hasArg(args, "--restart-epoch", strconv.Itoa(rec.RestartEpoch)) {
		return nil, fmt.Errorf("%s: %w (its command line is not envoy --base-id %d --restart-epoch %d)", what, errNotRunning, baseID, rec.RestartEpoch)
	}
	if exited, _ := pidfdExited(pidfd, 0); exited {
		return nil, fmt.Errorf("%s: %w (exited)", what, errNotRunning)
	}
	proc, err := os.FindProcess(rec.PID)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	p := &process{epoch: rec.Epoch, baseID: rec.BaseID, restartEpoch: rec.RestartEpoch, binary: rec.Binary, version: rec.Version, configPath: rec.ConfigPath,
		adminAddr: rec.AdminAddr, started: rec.Started, pidNum: rec.PID, startTicks: rec.StartTicks,
		proc: proc, adopted: true, exited: make(chan struct{})}
	keep = true
	// Owned by the process: it ends when Envoy exits (Manager.Close stops every Envoy).
	go func() {
		defer unix.Close(pidfd)
		for {
			exited, err := pidfdExited(pidfd, -1)
			if exited || err != nil {
				break
			}
		}
		_ = proc.Release()
		p.err = errors.New("exited (adopted from an earlier manager: exit status unknown)")
		close(p.exited)
	}()
	return p, nil
}

// pidfdExited polls a pidfd, which turns readable when its process exits.
func pidfdExited(pidfd int, timeoutMS int) (bool, error) {
	fds := []unix.PollFd{{Fd: int32(pidfd), Events: unix.POLLIN}}
	for {
		n, err := unix.Poll(fds, timeoutMS)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return false, err
		}
		return n > 0, nil
	}
}

func hasArg(args []string, flag, value string) bool {
	for i := 0; i+1 < len(args); i++ {
		if args[i] == flag && args[i+1] == value {
			return true
		}
	}
	return false
}

// adoptRelay takes the relay sockets between parentEpoch and its child back from holder, the
// Envoy that inherited them.
func adoptRelay(holder *process, baseID, parentEpoch int, log *slog.Logger, onRequest func(hrKind)) (*relay, error) {
	// parentEpoch is a restart epoch of baseID.
	addrs := relayAddrs(baseID, parentEpoch)
	var names [4]string
	for i, a := range addrs {
		names[i] = strings.TrimRight(a.Name, "\x00")
	}
	conns, err := grabSockets(holder.pid(), names)
	if err != nil {
		return nil, fmt.Errorf("take the hot-restart relay sockets back from envoy epoch %d (pid %d): %w", holder.epoch, holder.pid(), err)
	}
	r := startRelay(baseID, parentEpoch, log, onRequest, conns)
	r.mu.Lock()
	r.adopted = time.Now()
	r.mu.Unlock()
	return r, nil
}

// grabSockets copies the unix sockets bound to names out of process pid (pidfd_getfd, which
// needs ptrace rights over it: root, or CAP_SYS_PTRACE).
func grabSockets(pid int, names [4]string) ([4]*net.UnixConn, error) {
	var conns [4]*net.UnixConn
	fail := func(err error) ([4]*net.UnixConn, error) {
		for _, c := range conns {
			if c != nil {
				c.Close()
			}
		}
		return [4]*net.UnixConn{}, err
	}
	pidfd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return fail(fmt.Errorf("pidfd_open: %w", err))
	}
	defer unix.Close(pidfd)
	dir := "/proc/" + strconv.Itoa(pid) + "/fd"
	ents, err := os.ReadDir(dir)
	if err != nil {
		return fail(err)
	}
	found := 0
	for _, e := range ents {
		link, err := os.Readlink(filepath.Join(dir, e.Name()))
		if err != nil || !strings.HasPrefix(link, "socket:") {
			continue
		}
		target, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		fd, err := unix.PidfdGetfd(pidfd, target, 0)
		if err != nil {
			return fail(fmt.Errorf("pidfd_getfd: %w (the manager needs ptrace rights over Envoy: root or CAP_SYS_PTRACE)", err))
		}
		sa, err := unix.Getsockname(fd)
		ua, ok := sa.(*unix.SockaddrUnix)
		i := -1
		if err == nil && ok {
			i = slices.Index(names[:], ua.Name)
		}
		if i < 0 || conns[i] != nil {
			unix.Close(fd)
			continue
		}
		f := os.NewFile(uintptr(fd), ua.Name)
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			return fail(fmt.Errorf("socket %q: %w", ua.Name, err))
		}
		conns[i] = c.(*net.UnixConn)
		found++
	}
	if found < len(names) {
		var missing []string
		for i, c := range conns {
			if c == nil {
				missing = append(missing, names[i])
			}
		}
		return fail(fmt.Errorf("it holds no socket bound to %q", missing))
	}
	return conns, nil
}

// listening tells whether process pid holds a listen socket on any of ports.
func listening(pid int, ports map[int]bool) bool {
	ps, err := sockets(pid)
	if err != nil {
		return false
	}
	for p := range ports {
		if ps.listenPorts[p] {
			return true
		}
	}
	return false
}
