package hotupgrade

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/meshturbo/meshturbo/internal/testenv"
)

// fixture is a Manager running a static bootstrap in front of a Go backend.
type fixture struct {
	m       *Manager
	admin   string
	listen  string
	backend string
	deps    testenv.Deps
	mk      func(admin, listen, backend, tag string) []byte
}

func (f *fixture) bootstrap(tag string) []byte {
	return f.mk(f.admin, f.listen, f.backend, tag)
}

func newFixture(t testing.TB, binary string, mutate func(*Config)) *fixture {
	t.Helper()
	return newFixtureWith(t, binary, startBackend(t), staticBootstrap, mutate)
}

// newFixtureWith runs a bootstrap of mk's making in front of backend.
func newFixtureWith(t testing.TB, binary, backend string, mk func(admin, listen, backend, tag string) []byte, mutate func(*Config)) *fixture {
	t.Helper()
	deps := testenv.RequireDeps(t)
	if binary == "" {
		binary = deps.Envoy
	}
	// A port picked free may be taken by another package's test before Envoy binds it; pick
	// new ones then (Envoy names the port in its error).
	var f *fixture
	for attempt := 1; ; attempt++ {
		f = &fixture{admin: freeAddr(t), listen: freeAddr(t), backend: backend, deps: deps, mk: mk}
		cfg := Config{
			Envoy: binary, Bootstrap: f.bootstrap("v0"), AdminAddr: f.admin,
			ExtraArgs: []string{"--concurrency", "2", "--log-level", "warn"},
			Output:    testenv.Writer(t), Logger: testenv.Logger(t),
			HandoffTimeout: 15 * time.Second, DrainTimeout: 10 * time.Second, EnvoyDrainTime: 2 * time.Second,
		}
		if mutate != nil {
			mutate(&cfg)
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		m, err := New(ctx, cfg)
		cancel()
		if err == nil {
			f.m = m
			break
		}
		if attempt == 3 || !strings.Contains(err.Error(), "exited before it was ready") {
			t.Fatal(err)
		}
		t.Logf("epoch 0 did not start (a port taken meanwhile?), retrying with new ports: %v", err)
	}
	t.Cleanup(func() { f.close(t) })
	return f
}

// close stops the manager and checks it left nothing behind: no Envoy, no shared memory, no
// hot-restart sockets.
func (f *fixture) close(t testing.TB) {
	t.Helper()
	base := f.m.Status().BaseID
	if err := f.m.Close(); err != nil {
		t.Errorf("close: %v", err)
	}
	if _, err := os.Stat(shmPath(base)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("shared memory %s left behind (%v)", shmPath(base), err)
	}
	unix, _ := os.ReadFile("/proc/net/unix")
	if prefix := strings.TrimPrefix(socketPath(base, 0), "@"); strings.Contains(string(unix), prefix[:len(prefix)-2]) {
		t.Errorf("hot-restart sockets of base id %d left behind", base)
	}
}

func (f *fixture) upgrade(t testing.TB, req UpgradeRequest) UpgradeResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	res, err := f.m.Upgrade(ctx, req)
	if err != nil {
		t.Fatalf("upgrade: %v", err)
	}
	t.Logf("upgrade %d->%d %s->%s: handoff %dms probe %dms drain %dms total %dms; old had %d connections, stopped: %s",
		res.FromEpoch, res.ToEpoch, res.FromVersion, res.ToVersion, res.HandoffMS, res.ProbeMS, res.DrainMS, res.TotalMS, res.OldConnections, res.OldStopped)
	return res
}

// expectConfig waits until a new connection through Envoy is answered by config tag.
func (f *fixture) expectConfig(t testing.TB, tag string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	got, err := get(ctx, f.listen)
	if err != nil || got != tag {
		t.Fatalf("through Envoy: config %q, error %v; want config %q", got, err, tag)
	}
}

func TestUpgradesUnderLoadLoseNothing(t *testing.T) {
	f := newFixture(t, "", nil)
	ls := startLoads(t, f.listen, 200, modeKeepAlive, modeClose, modeH2C)
	for i := 1; i <= 10; i++ {
		tag := "v" + string(rune('0'+i%10))
		res := f.upgrade(t, UpgradeRequest{Bootstrap: f.bootstrap(tag)})
		if res.Outcome != OutcomeUpgraded || res.ToEpoch != i {
			t.Fatalf("result %+v", res)
		}
		f.expectConfig(t, tag)
		if st := f.m.Status(); st.Epoch != i || st.Phase != PhaseServing || st.Upgrades != i {
			t.Fatalf("status %+v", st)
		}
	}
	ls.check(t)
}

// script writes an executable shell script standing in for an Envoy binary.
func script(t *testing.T, name, body string) string {
	t.Helper()
	path := t.TempDir() + "/" + name
	if err := os.WriteFile(path, []byte("#!/bin/sh\n"+body), 0o755); err != nil {
		t.Fatal(err)
	}
	return path
}

func (f *fixture) expectFailure(t *testing.T, req UpgradeRequest, outcome, errText string) UpgradeResult {
	t.Helper()
	before := f.m.Status()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	res, err := f.m.Upgrade(ctx, req)
	if err == nil || res.Outcome != outcome || !strings.Contains(err.Error(), errText) {
		t.Fatalf("upgrade: outcome %q, error %v; want %s with %q", res.Outcome, err, outcome, errText)
	}
	t.Logf("%s as expected after %dms (handoff %dms, cleared initializing flag: %v): %v", res.Outcome, res.TotalMS, res.HandoffMS, res.ClearedInitializing, err)
	st := f.m.Status()
	if st.Epoch != before.Epoch || st.PID != before.PID || st.Phase != PhaseServing {
		t.Fatalf("status after a failed upgrade %+v, before %+v", st, before)
	}
	f.expectConfig(t, "v0")
	return res
}

func TestFailedUpgradesKeepTheOldEnvoyServing(t *testing.T) {
	var failProbe atomic.Bool
	f := newFixture(t, "", func(c *Config) {
		c.ProbeTimeout = time.Second
		c.Probe = func(ctx context.Context) error {
			if failProbe.Load() {
				return errors.New("probe says no")
			}
			return nil
		}
	})
	ls := startLoads(t, f.listen, 150, modeKeepAlive, modeClose, modeH2C)

	// Rejected before anything starts.
	f.expectFailure(t, UpgradeRequest{Bootstrap: []byte(`{"static_resources": {"clusters": [{"name": 7}]}}`)}, OutcomeRejected, "--mode validate")
	other := script(t, "envoy-other", `[ "$1" = --hot-restart-version ] && { printf 99.1; exit 0; }; exec `+f.deps.Envoy+` "$@"`)
	res := f.expectFailure(t, UpgradeRequest{Binary: other, Handoff: HandoffHotRestart}, OutcomeRejected, "hot-restart versions differ")
	if res.HandoffMS != 0 {
		t.Errorf("a rejected upgrade started Envoy: %+v", res)
	}

	// Valid, but cannot run: its listener cannot bind.
	bad := staticBootstrap(f.admin, "192.0.2.1:"+strings.Split(f.listen, ":")[1], f.backend, "bad")
	f.expectFailure(t, UpgradeRequest{Bootstrap: bad}, OutcomeRolledBack, "exited before it was ready")
	if !f.m.Status().AdminClosed {
		t.Error("status does not say the old Envoy's admin is closed")
	}

	// A binary that passes the precheck and exits when run.
	crash := script(t, "envoy-crash", `for a in "$@"; do case "$a" in --version|--hot-restart-version|validate) exec `+f.deps.Envoy+` "$@";; esac; done
echo "simulated crash" >&2; exit 3`)
	f.expectFailure(t, UpgradeRequest{Binary: crash, Bootstrap: f.bootstrap("crash")}, OutcomeRolledBack, "exit status 3")

	// LIVE, accepting connections next to the old one, but the probe fails: the new epoch is
	// drained, the old one never stopped listening.
	failProbe.Store(true)
	res = f.expectFailure(t, UpgradeRequest{Bootstrap: f.bootstrap("unprobed")}, OutcomeRolledBack, "probe says no")
	if res.ProbeMS < 900 {
		t.Errorf("probe gave up after %dms, before ProbeTimeout", res.ProbeMS)
	}
	failProbe.Store(false)

	// And then an upgrade works, with no cleanup by hand.
	f.upgrade(t, UpgradeRequest{Bootstrap: f.bootstrap("v1")})
	f.expectConfig(t, "v1")
	st := f.m.Status()
	if st.Epoch != 1 || st.Upgrades != 1 || st.Rollbacks != 3 || st.Rejected != 2 || st.AdminClosed {
		t.Errorf("status %+v", st)
	}
	ls.check(t)
}

func TestFaultsDuringTheHandOff(t *testing.T) {
	var fault atomic.Pointer[func(child *process, kind hrKind)]
	f := newFixture(t, "", func(c *Config) {
		c.HandoffTimeout = 2 * time.Second
		// After the old Envoy was stopped for a while, clients hold idle keep-alive
		// connections to it that Envoy's drain does not close; they end after DrainIdle.
		c.DrainTimeout = 5 * time.Second
		c.hooks.relayRequest = func(child *process, kind hrKind) {
			if fn := fault.Load(); fn != nil {
				(*fn)(child, kind)
			}
		}
	})
	ls := startLoads(t, f.listen, 150, modeKeepAlive, modeClose, modeH2C)
	inject := func(fn func(child *process, kind hrKind)) {
		if fn == nil {
			fault.Store(nil)
			return
		}
		fault.Store(&fn)
	}

	t.Run("SIGKILL the new Envoy before the drain", func(t *testing.T) {
		inject(func(child *process, kind hrKind) {
			if kind == reqPassListenSocket && child != nil {
				child.signal(syscall.SIGKILL)
			}
		})
		f.expectFailure(t, UpgradeRequest{Bootstrap: f.bootstrap("killed")}, OutcomeRolledBack, "signal: killed")
	})

	// The old Envoy stops answering hot-restart requests for a while (SIGSTOP) just as the
	// new one asks it to close its admin; each fault fires once.
	stopOld := func(d time.Duration) <-chan struct{} {
		old := f.m.Status().PID
		resumed := make(chan struct{})
		var once sync.Once
		inject(func(_ *process, kind hrKind) {
			if kind != reqShutdownAdmin {
				return
			}
			once.Do(func() {
				if err := syscall.Kill(old, syscall.SIGSTOP); err != nil {
					t.Errorf("SIGSTOP: %v", err)
				}
				time.AfterFunc(d, func() { _ = syscall.Kill(old, syscall.SIGCONT); close(resumed) })
			})
		})
		return resumed
	}

	t.Run("SIGSTOP the old Envoy shorter than the hand-off timeout", func(t *testing.T) {
		resumed := stopOld(700 * time.Millisecond)
		res := f.upgrade(t, UpgradeRequest{Bootstrap: f.bootstrap("v1")})
		<-resumed
		if res.HandoffMS < 700 {
			t.Errorf("hand-off took %dms, less than the old Envoy was stopped", res.HandoffMS)
		}
		f.expectConfig(t, "v1")
	})

	t.Run("SIGSTOP the old Envoy past the hand-off timeout", func(t *testing.T) {
		resumed := stopOld(3 * time.Second)
		bs := f.bootstrap("v2")
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		res, err := f.m.Upgrade(ctx, UpgradeRequest{Bootstrap: bs})
		if res.Outcome != OutcomeRolledBack || !strings.Contains(err.Error(), "waiting") {
			t.Fatalf("outcome %q, error %v; want a rollback naming the unanswered request", res.Outcome, err)
		}
		t.Logf("rolled back: %v", err)
		<-resumed
		inject(nil)
		f.expectConfig(t, "v1")
		f.upgrade(t, UpgradeRequest{Bootstrap: bs})
		f.expectConfig(t, "v2")
	})
	inject(nil)
	f.upgrade(t, UpgradeRequest{Bootstrap: f.bootstrap("v3")})
	f.expectConfig(t, "v3")
	ls.check(t)
}

// Envoy 1.39.3 and 1.40.0 report the same hot-restart version (11.104), so hot restart
// between them is allowed; upgrade and downgrade under load.
func TestUpgradeAndDowngradeAcrossVersions(t *testing.T) {
	deps := testenv.RequireDeps(t)
	f := newFixture(t, deps.EnvoyOld, nil)
	ctx := context.Background()
	oldV, err1 := HotRestartVersion(ctx, deps.EnvoyOld)
	newV, err2 := HotRestartVersion(ctx, deps.Envoy)
	if err1 != nil || err2 != nil || oldV != newV {
		t.Fatalf("hot-restart versions %s %q (%v), %s %q (%v)", deps.EnvoyOldVersion, oldV, err1, deps.EnvoyVersion, newV, err2)
	}
	ls := startLoads(t, f.listen, 150, modeKeepAlive, modeClose, modeH2C)
	for i, bin := range []string{deps.Envoy, deps.EnvoyOld, deps.Envoy, deps.EnvoyOld} {
		tag := "skew" + string(rune('1'+i))
		res := f.upgrade(t, UpgradeRequest{Binary: bin, Bootstrap: f.bootstrap(tag)})
		want := map[string]string{deps.Envoy: deps.EnvoyVersion, deps.EnvoyOld: deps.EnvoyOldVersion}[bin]
		if st := f.m.Status(); st.Version != want || res.ToVersion != want || st.Binary != bin {
			t.Fatalf("status %+v, result %+v; want version %s", st, res, want)
		}
		f.expectConfig(t, tag)
	}
	ls.check(t)
}

func TestUpgradesAreSerializedAndTriggeredOverHTTP(t *testing.T) {
	hold := make(chan struct{})
	var holding atomic.Bool
	f := newFixture(t, "", func(c *Config) {
		c.ProbeTimeout = 30 * time.Second
		c.Probe = func(ctx context.Context) error {
			if holding.Load() {
				select {
				case <-hold:
				case <-ctx.Done():
					return ctx.Err()
				}
			}
			return nil
		}
	})
	srv := httptest.NewServer(f.m.UpgradeHandler())
	defer srv.Close()
	post := func(body string) (int, UpgradeResult) {
		resp, err := http.Post(srv.URL, "application/json", strings.NewReader(body))
		if err != nil {
			t.Error(err)
			return 0, UpgradeResult{}
		}
		defer resp.Body.Close()
		var res UpgradeResult
		_ = json.NewDecoder(resp.Body).Decode(&res)
		return resp.StatusCode, res
	}
	path := t.TempDir() + "/bootstrap.yaml"
	if err := os.WriteFile(path, f.bootstrap("http"), 0o600); err != nil {
		t.Fatal(err)
	}

	holding.Store(true)
	first := make(chan int, 1)
	go func() {
		code, _ := post(`{"binary": "` + f.deps.Envoy + `", "bootstrap_path": "` + path + `"}`)
		first <- code
	}()
	deadline := time.Now().Add(30 * time.Second)
	for f.m.Status().Phase != PhaseProbing {
		if time.Now().After(deadline) {
			t.Fatalf("upgrade never reached the probe: %+v", f.m.Status())
		}
		time.Sleep(10 * time.Millisecond)
	}
	if code, _ := post(`{}`); code != http.StatusConflict {
		t.Errorf("second POST during an upgrade: status %d, want 409", code)
	}
	queued := make(chan UpgradeResult, 1)
	go func() {
		res, err := f.m.Upgrade(context.Background(), UpgradeRequest{Bootstrap: f.bootstrap("queued")})
		if err != nil {
			t.Errorf("queued upgrade: %v", err)
		}
		queued <- res
	}()
	holding.Store(false)
	close(hold)
	if code := <-first; code != http.StatusOK {
		t.Fatalf("POST: status %d", code)
	}
	q := <-queued
	if q.FromEpoch != 1 || q.ToEpoch != 2 {
		t.Errorf("queued upgrade ran from epoch %d to %d; want 1 to 2, after the first", q.FromEpoch, q.ToEpoch)
	}
	f.expectConfig(t, "queued")
	if code, res := post(`{"bootstrap_path": "` + t.TempDir() + `/missing"}`); code != http.StatusBadRequest {
		t.Errorf("missing bootstrap: status %d %+v, want 400", code, res)
	}
	if code, res := post(`{"binary": "/nonexistent/envoy"}`); code != http.StatusUnprocessableEntity || res.Outcome != OutcomeRejected {
		t.Errorf("missing binary: status %d %+v, want 422 rejected", code, res)
	}
}

// After the old epoch is stopped, the new one still asks it for stats (every second here)
// until its --parent-shutdown-time-s passes and it sends Terminate; the relay answers in the
// old one's place, then lets go.
func TestNewEpochOutlivesItsParent(t *testing.T) {
	f := newFixture(t, "", nil)
	f.upgrade(t, UpgradeRequest{Bootstrap: f.bootstrap("v1")})
	f.m.mu.Lock()
	r := f.m.standins[0]
	f.m.mu.Unlock()
	deadline := time.Now().Add(20 * time.Second)
	for !r.finished() {
		if time.Now().After(deadline) {
			t.Fatalf("the relay for epoch 0 never finished: %s", r.state())
		}
		time.Sleep(50 * time.Millisecond)
	}
	r.mu.Lock()
	answered, seen := r.answered, r.seen
	r.mu.Unlock()
	t.Logf("epoch 1 sent %v; the relay answered %d requests for the stopped epoch 0", seen, answered)
	if answered == 0 {
		t.Error("the relay never answered in place of the stopped parent")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := admin(ctx, http.MethodGet, f.admin, "/ready"); err != nil {
		t.Fatalf("epoch 1 is not ready after its parent went away: %v", err)
	}
	f.expectConfig(t, "v1")
	// The next upgrade closes the finished relay.
	f.upgrade(t, UpgradeRequest{Bootstrap: f.bootstrap("v2")})
	select {
	case <-r.closed:
	default:
		t.Error("the finished relay was not closed by the next upgrade")
	}
}
