package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/meshturbo/meshturbo/hotupgrade"
	"github.com/meshturbo/meshturbo/internal/testenv"
)

// TestMain lets a test start this package's main as a subprocess: the test binary runs
// main() when MESHTURBO_UPGRADE_MAIN=1, with the arguments it was given.
func TestMain(m *testing.M) {
	if os.Getenv("MESHTURBO_UPGRADE_MAIN") == "1" {
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// managerProc is meshturbo-upgrade run as a subprocess (the test binary running main).
type managerProc struct {
	cmd   *exec.Cmd
	admin string
	done  chan struct{}
	err   error
}

func startManager(t *testing.T, logPath, adminAddr string, args ...string) *managerProc {
	t.Helper()
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	cmd := exec.Command(os.Args[0], append([]string{"-admin", adminAddr}, args...)...)
	cmd.Env = append(os.Environ(), "MESHTURBO_UPGRADE_MAIN=1")
	// A file, not a pipe: the Envoys it starts write to it too, and outlive it.
	cmd.Stdout, cmd.Stderr = logf, logf
	// Its own process group, which its Envoys share: the test's cleanup kills the group.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &managerProc{cmd: cmd, admin: adminAddr, done: make(chan struct{})}
	go func() { p.err = cmd.Wait(); close(p.done) }()
	pgid := cmd.Process.Pid
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.done:
		case <-time.After(20 * time.Second):
		}
		_ = syscall.Kill(-pgid, syscall.SIGKILL) // whatever is left, Envoys included
		<-p.done
	})
	return p
}

func (p *managerProc) status() (hotupgrade.Status, error) {
	var st hotupgrade.Status
	resp, err := http.Get("http://" + p.admin + "/v1/upgrade")
	if err != nil {
		return st, err
	}
	defer resp.Body.Close()
	return st, json.NewDecoder(resp.Body).Decode(&st)
}

// await polls the manager's status until ok, failing after a deadline or if it exits.
func (p *managerProc) await(t *testing.T, what string, ok func(hotupgrade.Status) bool) hotupgrade.Status {
	t.Helper()
	deadline := time.Now().Add(40 * time.Second)
	for {
		st, err := p.status()
		if err == nil && ok(st) {
			return st
		}
		select {
		case <-p.done:
			t.Fatalf("%s: meshturbo-upgrade exited: %v", what, p.err)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: last status %+v (last result %+v), error %v", what, st, st.Last, err)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func (p *managerProc) upgrade(t *testing.T, bootstrapPath string) hotupgrade.UpgradeResult {
	t.Helper()
	resp, err := http.Post("http://"+p.admin+"/v1/upgrade", "application/json", strings.NewReader(`{"bootstrap_path": "`+bootstrapPath+`"}`))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var res hotupgrade.UpgradeResult
	_ = json.NewDecoder(resp.Body).Decode(&res)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("POST /v1/upgrade: status %d, result %+v", resp.StatusCode, res)
	}
	return res
}

// kill SIGKILLs the manager alone (not its Envoys) and waits for it to be gone.
func (p *managerProc) kill(t *testing.T) {
	t.Helper()
	if err := p.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	<-p.done
}

// bootstrapWithTCP is bootstrap plus a tcp_proxy listener to an echo backend.
func bootstrapWithTCP(admin, listen, tcpListen int, echo, body string) string {
	h, p, _ := net.SplitHostPort(echo)
	return bootstrap(admin, listen, body) + fmt.Sprintf(`  - name: tcp
    address: {socket_address: {address: 127.0.0.1, port_value: %d}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: tcp
          cluster: echo
  clusters:
  - name: echo
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: echo
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: %s, port_value: %s}}}}]}]
`, tcpListen, h, p)
}

// constLoad sends POSTs at a constant rate (open loop) over keep-alive and fresh
// connections and counts those that did not get a 200.
type constLoad struct {
	testenv.Tally
	stop chan struct{}
	wg   sync.WaitGroup
}

func startConstLoad(t *testing.T, url string, rps int) *constLoad {
	l := &constLoad{stop: make(chan struct{})}
	for _, keepAlive := range []bool{true, false} {
		client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: !keepAlive, MaxIdleConnsPerHost: 16}}
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			defer client.CloseIdleConnections()
			tick := time.NewTicker(time.Second / time.Duration(rps))
			defer tick.Stop()
			for {
				select {
				case <-l.stop:
					return
				case <-tick.C:
				}
				l.wg.Add(1)
				go func() {
					defer l.wg.Done()
					l.Record(testenv.PostOK(client, url, strings.NewReader("x")))
				}()
			}
		}()
	}
	t.Cleanup(l.finish)
	return l
}

func (l *constLoad) finish() {
	select {
	case <-l.stop:
	default:
		close(l.stop)
	}
	l.wg.Wait()
}

func (l *constLoad) check(t *testing.T) {
	t.Helper()
	l.finish()
	ok, failed := l.Counts()
	t.Logf("load: %d ok, %d failed", ok, failed)
	if failed > 0 || ok == 0 {
		t.Errorf("load: %d ok, %d failed; first errors:\n  %s", ok, failed, strings.Join(l.Errors(), "\n  "))
	}
}

// body GETs url on a new connection and returns the body.
func body(t *testing.T, url string) string {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, url, nil)
	req.Close = true
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

// echo writes msg on c and reads it back.
func echo(c net.Conn, msg string) error {
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, msg); err != nil {
		return err
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(c, buf); err != nil {
		return err
	}
	if string(buf) != msg {
		return fmt.Errorf("echo %q, got %q", msg, buf)
	}
	return nil
}

type stateFile struct {
	Next     *struct{ PID int } `json:"next"`
	Draining *struct{ PID int } `json:"draining"`
}

func readState(t *testing.T, dir string) stateFile {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, "state.json"))
	if err != nil {
		t.Fatal(err)
	}
	var st stateFile
	if err := json.Unmarshal(b, &st); err != nil {
		t.Fatal(err)
	}
	return st
}

func alive(pid int) bool { return syscall.Kill(pid, 0) == nil && !zombie(pid) }

func zombie(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return i < 0 || len(s) < i+3 || s[i+2] == 'Z'
}

func awaitGone(t *testing.T, pid int, what string) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for alive(pid) {
		if time.Now().After(deadline) {
			t.Fatalf("%s (pid %d) still running", what, pid)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// SIGKILL meshturbo-upgrade mid-upgrade, twice, under constant load: once while the new
// Envoy is being probed (the restarted manager rolls the upgrade back), once while the old
// one drains a raw TCP connection (the restarted manager finishes the upgrade). Envoy serves
// throughout, no request fails, and later upgrades work without any cleanup. Both hand-offs:
// Envoy's hot restart, and reuseport (two independent Envoys, as for version skew).
func TestManagerSIGKILLedMidUpgrade(t *testing.T) {
	for _, handoff := range []string{hotupgrade.HandoffHotRestart, hotupgrade.HandoffReusePort} {
		t.Run(handoff, func(t *testing.T) { testSIGKILLedMidUpgrade(t, handoff) })
	}
}

func testSIGKILLedMidUpgrade(t *testing.T, handoff string) {
	if handoff == hotupgrade.HandoffReusePort && os.Geteuid() != 0 {
		t.Skip("needs root: the reuseport hand-off sets net.ipv4.tcp_migrate_req")
	}
	deps := testenv.RequireDeps(t)
	ports := testenv.FreePorts(t, 4)
	envoyAdmin, listen, tcpListen, mgrAdmin := ports[0], ports[1], ports[2], testenv.Addr(ports[3])
	dir := t.TempDir()
	work := filepath.Join(dir, "work")
	if err := os.Mkdir(work, 0o700); err != nil {
		t.Fatal(err)
	}
	echoAddr := testenv.StartTCPEcho(t)
	writeBootstrap := func(tag string) string {
		path := filepath.Join(dir, "bootstrap-"+tag+".yaml")
		if err := os.WriteFile(path, []byte(bootstrapWithTCP(envoyAdmin, listen, tcpListen, echoAddr, tag)), 0o600); err != nil {
			t.Fatal(err)
		}
		return path
	}
	var holdProbe atomic.Bool
	probe := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if holdProbe.Load() {
			http.Error(w, "held by the test", http.StatusServiceUnavailable)
		}
	}))
	defer probe.Close()
	args := []string{"-envoy", deps.Envoy, "-envoy-admin", testenv.Addr(envoyAdmin), "-bootstrap", writeBootstrap("v0"),
		"-work-dir", work, "-concurrency", "1", "-interception", "NONE", "-drain-timeout", "30s",
		"-probe-url", probe.URL, "-watch-interval", "0", "-handoff", handoff}
	logPath := filepath.Join(dir, "meshturbo-upgrade.log")
	defer func() {
		b, _ := os.ReadFile(logPath)
		if t.Failed() {
			t.Logf("meshturbo-upgrade and Envoy log:\n%s", b)
			return
		}
		for _, line := range strings.Split(string(b), "\n") {
			if strings.Contains(line, "hotupgrade:") || strings.Contains(line, "level=WARN") || strings.Contains(line, "level=ERROR") {
				t.Log(line)
			}
		}
	}()
	url := "http://" + testenv.Addr(listen) + "/"

	m1 := startManager(t, logPath, mgrAdmin, args...)
	st := m1.await(t, "epoch 0 serving", func(s hotupgrade.Status) bool { return s.Phase == hotupgrade.PhaseServing })
	epoch0 := st.PID
	if b := body(t, url); b != "v0" {
		t.Fatalf("Envoy answers %q, want v0", b)
	}
	load := startConstLoad(t, url, 100)

	// 1. Killed while probing the new epoch, which accepts connections next to the old one.
	holdProbe.Store(true)
	go func() { // its answer never comes: the manager dies
		resp, err := http.Post("http://"+mgrAdmin+"/v1/upgrade", "application/json", strings.NewReader(`{"bootstrap_path": "`+writeBootstrap("v1")+`"}`))
		if err == nil {
			resp.Body.Close()
		}
	}()
	m1.await(t, "probing epoch 1", func(s hotupgrade.Status) bool { return s.Phase == hotupgrade.PhaseProbing })
	next := readState(t, work).Next
	if next == nil || !alive(next.PID) {
		t.Fatalf("state file names no running next epoch: %+v", next)
	}
	m1.kill(t)
	if !alive(epoch0) || !alive(next.PID) {
		t.Fatalf("Envoys died with the manager: epoch 0 alive %v, epoch 1 alive %v", alive(epoch0), alive(next.PID))
	}
	// Both Envoys serve without a manager.
	for range 5 {
		if b := body(t, url); b != "v0" && b != "v1" {
			t.Fatalf("without a manager Envoy answers %q", b)
		}
	}

	m2 := startManager(t, logPath, mgrAdmin, args...)
	st = m2.await(t, "rollback by the restarted manager", func(s hotupgrade.Status) bool {
		return s.Phase == hotupgrade.PhaseServing && s.Last != nil && s.Last.Outcome == hotupgrade.OutcomeRolledBack
	})
	t.Logf("restarted manager: %s (%s)", st.Last.Outcome, st.Last.Error)
	if !st.Adopted || st.Epoch != 0 || st.PID != epoch0 {
		t.Fatalf("after the restart: status %+v, want epoch 0 (pid %d) adopted", st, epoch0)
	}
	awaitGone(t, next.PID, "the rolled-back epoch 1")
	if b := body(t, url); b != "v0" {
		t.Fatalf("after the rollback Envoy answers %q, want v0", b)
	}
	holdProbe.Store(false)
	res := m2.upgrade(t, writeBootstrap("v2"))
	if res.ToEpoch != 1 || res.Handoff != handoff {
		t.Fatalf("upgrade after the rollback: %+v", res)
	}
	if b := body(t, url); b != "v2" {
		t.Fatalf("after the upgrade Envoy answers %q, want v2", b)
	}

	// 2. Killed while the old epoch drains a raw TCP connection opened before the upgrade.
	raw, err := net.Dial("tcp", testenv.Addr(tcpListen))
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	if err := echo(raw, "before"); err != nil {
		t.Fatal(err)
	}
	go func() {
		resp, err := http.Post("http://"+mgrAdmin+"/v1/upgrade", "application/json", strings.NewReader(`{"bootstrap_path": "`+writeBootstrap("v3")+`"}`))
		if err == nil {
			resp.Body.Close()
		}
	}()
	st = m2.await(t, "draining epoch 1", func(s hotupgrade.Status) bool { return s.Phase == hotupgrade.PhaseDraining })
	draining := readState(t, work).Draining
	if draining == nil {
		t.Fatal("state file names no draining epoch")
	}
	m2.kill(t)
	if err := echo(raw, "manager dead"); err != nil {
		t.Fatalf("raw TCP connection through the draining epoch, manager dead: %v", err)
	}
	m3 := startManager(t, logPath, mgrAdmin, args...)
	m3.await(t, "draining adopted", func(s hotupgrade.Status) bool { return s.Adopted && s.Epoch == 2 })
	if err := echo(raw, "adopted"); err != nil {
		t.Fatalf("raw TCP connection through the draining epoch after adoption: %v", err)
	}
	if !alive(draining.PID) {
		t.Fatal("the restarted manager stopped the draining epoch while it had a connection")
	}
	raw.Close() // the old epoch's last connection: now it can go
	st = m3.await(t, "upgrade finished by the restarted manager", func(s hotupgrade.Status) bool {
		return s.Phase == hotupgrade.PhaseServing && s.Last != nil && s.Last.ToEpoch == 2 && s.Last.Outcome == hotupgrade.OutcomeUpgraded
	})
	t.Logf("restarted manager: %s (%s), old epoch stopped: %s", st.Last.Outcome, st.Last.Error, st.Last.OldStopped)
	if !strings.Contains(st.Last.OldStopped, "zero") {
		t.Errorf("old epoch stopped because %q, want its connections reaching zero", st.Last.OldStopped)
	}
	awaitGone(t, draining.PID, "the drained epoch 1")
	if b := body(t, url); b != "v3" {
		t.Fatalf("Envoy answers %q, want v3", b)
	}
	res = m3.upgrade(t, writeBootstrap("v4"))
	if res.ToEpoch != 3 {
		t.Fatalf("upgrade after the finished one: %+v", res)
	}
	if b := body(t, url); b != "v4" {
		t.Fatalf("Envoy answers %q, want v4", b)
	}
	load.check(t)

	// SIGTERM stops Envoy and leaves nothing behind.
	st, _ = m3.status()
	if err := m3.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	<-m3.done
	if m3.err != nil {
		t.Errorf("meshturbo-upgrade exit: %v", m3.err)
	}
	awaitGone(t, st.PID, "Envoy after SIGTERM")
	if _, err := os.Stat(fmt.Sprintf("/dev/shm/envoy_shared_memory_%d", st.BaseID*10)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("shared memory left behind: %v", err)
	}
	if _, err := os.Stat(filepath.Join(work, "state.json")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("state file left behind: %v", err)
	}
}
