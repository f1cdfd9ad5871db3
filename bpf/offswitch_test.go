package bpf

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
)

// envAgent makes the test binary an agent process: New with the JSON Config in the
// variable, "ready" on stdout, Close on SIGTERM (as cmd/meshturbo-agent does); SIGKILL is
// a crash.
const envAgent = "MESHTURBO_BPF_TEST_AGENT"

func agentMain(cfgJSON string) int {
	var cfg Config
	if err := json.Unmarshal([]byte(cfgJSON), &cfg); err != nil {
		fmt.Fprintln(os.Stderr, "agent config:", err)
		return 2
	}
	term := make(chan os.Signal, 1)
	signal.Notify(term, syscall.SIGTERM)
	a, err := New(cfg)
	if err != nil {
		fmt.Fprintln(os.Stderr, "agent:", err)
		return 1
	}
	fmt.Println("ready")
	<-term
	if err := a.Close(); err != nil {
		fmt.Fprintln(os.Stderr, "agent close:", err)
		return 1
	}
	return 0
}

// agentProc is an agent child process.
type agentProc struct {
	cmd    *exec.Cmd
	exited chan error
}

func startAgentProc(t *testing.T, cfg Config) *agentProc {
	t.Helper()
	b, err := json.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), envAgent+"="+string(b))
	cmd.Stderr = &testLogWriter{t: t}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start agent: %v", err)
	}
	p := &agentProc{cmd: cmd, exited: make(chan error, 1)}
	ready := make(chan bool, 1)
	go func() {
		sc := bufio.NewScanner(out)
		ready <- sc.Scan() && sc.Text() == "ready"
		for sc.Scan() {
		}
		p.exited <- cmd.Wait()
	}()
	t.Cleanup(func() { p.stop(t, syscall.SIGKILL) })
	select {
	case ok := <-ready:
		if !ok {
			t.Fatal("agent process did not get ready")
		}
	case <-time.After(20 * time.Second):
		t.Fatal("agent process not ready after 20s")
	}
	return p
}

// stop sends sig and waits for the exit; a second call does nothing.
func (p *agentProc) stop(t *testing.T, sig syscall.Signal) error {
	if p.cmd == nil {
		return nil
	}
	_ = p.cmd.Process.Signal(sig)
	var err error
	select {
	case err = <-p.exited:
	case <-time.After(20 * time.Second):
		_ = p.cmd.Process.Kill()
		err = <-p.exited
		t.Errorf("agent process did not exit within 20s of %v; killed", sig)
	}
	p.cmd = nil
	return err
}

// TestOffSwitchLosesNothing: with 8 MiB unread in each of 4 accelerated pairs (sitting in
// the peers' psock queues, where deleting a sockhash entry would drop them), an agent crash
// (SIGKILL), stop (SIGTERM), upgrade (a new agent adopting the pins), disable (an empty
// mesh set) and uninstall lose no byte: every receiver reads all 8 MiB and 1 MiB sent
// afterwards, byte for byte; no live entry is deleted. After a crash or stop a restarted
// agent adopts every pinned object with no failed insert (no EBUSY); after uninstall and the
// pairs' close no meshturbo object remains in the kernel.
func TestOffSwitchLosesNothing(t *testing.T) {
	requirePrivileges(t)
	for _, tc := range []string{"sigkill", "sigterm", "upgrade", "disable", "uninstall"} {
		t.Run(tc, func(t *testing.T) { testOffSwitch(t, tc) })
	}
}

func testOffSwitch(t *testing.T, action string) {
	cg := testCgroup(t)
	w := startWorkload(t, cg)
	cfg := testConfig(t, cg)
	addr := w.call(wlRequest{Op: "listen", Addr: "127.0.0.1:0"}).Addr
	cfg.SidecarPorts = []uint16{netip.MustParseAddrPort(addr).Port()}
	cfg.QueueLimit = 32 << 20 // let the 8 MiB sit in the peers' queues: the hazard's setting
	const pairs, unread = 4, 8 << 20

	var inProc *Agent
	var proc *agentProc
	if action == "disable" {
		inProc = newAgent(t, cfg)
	} else {
		proc = startAgentProc(t, cfg)
	}
	sockhash, err := ebpf.LoadPinnedMap(filepath.Join(cfg.PinPath, "mt_sockhash"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer sockhash.Close()
	counters, err := ebpf.LoadPinnedMap(filepath.Join(cfg.PinPath, "mt_stats"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer counters.Close()

	w.call(wlRequest{Op: "pairs", Addr: addr, N: pairs})
	w.call(wlRequest{Op: "send", Bytes: unread, Seed: 21})
	s0, err := readStats(counters)
	if err != nil {
		t.Fatal(err)
	}
	if s0.BytesRedirected != pairs*unread || s0.InsertFailed != 0 {
		t.Fatalf("before %s: %+v, want %d bytes redirected (unread in the peers' queues)", action, s0, pairs*unread)
	}

	switch action {
	case "sigkill":
		_ = proc.stop(t, syscall.SIGKILL)
	case "sigterm", "upgrade", "uninstall":
		if err := proc.stop(t, syscall.SIGTERM); err != nil {
			t.Fatalf("agent stop: %v", err)
		}
		if action == "uninstall" {
			if err := Uninstall(cfg.PinPath); err != nil {
				t.Fatalf("Uninstall: %v", err)
			}
		}
	case "disable":
		if err := inProc.SetMesh(nil, nil); err != nil {
			t.Fatalf("disable: %v", err)
		}
	}
	if keys, err := sockhashKeys(sockhash); err != nil || len(keys) != 2*pairs {
		t.Fatalf("after %s: %d sockhash entries (%v), want all %d live ones", action, len(keys), err, 2*pairs)
	}
	if action == "upgrade" { // the new agent comes up while the bytes still wait
		inProc = newAgent(t, cfg)
		checkAdopted(t, inProc)
	}

	// The pairs go on: 1 MiB more each, then everything is read back.
	w.call(wlRequest{Op: "send", Bytes: 1 << 20, Seed: 22})
	rep := w.call(wlRequest{Op: "recv"})
	for _, p := range rep.Problems {
		t.Errorf("after %s: %s", action, p)
	}
	if want := int64(pairs * (unread + 1<<20)); rep.Bytes != want {
		t.Errorf("after %s: received %d bytes, want %d", action, rep.Bytes, want)
	}
	s1, _ := readStats(counters)
	if d := diff(s1, s0); d.BytesRedirected != pairs<<20 {
		t.Errorf("after %s: live pairs redirected %d bytes of the next %d", action, d.BytesRedirected, pairs<<20)
	}

	switch action {
	case "sigkill", "sigterm":
		a := newAgent(t, cfg)
		checkAdopted(t, a)
		w.call(wlRequest{Op: "pairs", Addr: addr, N: 1})
		if n := len(sockets(t, a)); n != 2*pairs+2 {
			t.Errorf("restarted agent: %d sockets in the sockhash, want the %d live ones and the new pair's 2", n, 2*pairs)
		}
		if st := stats(t, a); st.InsertFailed != 0 || st.InsertBusy != 0 {
			t.Errorf("restarted agent: failed inserts %+v", st)
		}
	case "disable":
		w.call(wlRequest{Op: "pairs", Addr: addr, N: 1})
		if n := len(sockets(t, inProc)); n != 2*pairs {
			t.Errorf("disabled: %d sockets in the sockhash, want only the %d old ones", n, 2*pairs)
		}
	}
	w.call(wlRequest{Op: "close"})
	if action == "uninstall" {
		sockhash.Close()
		counters.Close()
		if err := checkNoLeftovers(); err != nil {
			t.Fatalf("objects left after uninstall and drain: %v", err)
		}
	}
}

// checkAdopted: every link an earlier agent pinned was adopted, every map reused.
func checkAdopted(t *testing.T, a *Agent) {
	t.Helper()
	st := a.State()
	for _, p := range st.Programs {
		if !p.Adopted {
			t.Errorf("%s not adopted: %+v", p.Program, p)
		}
	}
	if len(st.ReplacedMaps) != 0 {
		t.Errorf("replaced maps %v", st.ReplacedMaps)
	}
}
