package vpp

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/meshturbo/meshturbo/vpp/internal/fakevpp"
)

// backoffRecorder replaces the agent's sleep between connection attempts: it records each
// delay the agent asked for and waits only a millisecond, so the test sees the backoff
// sequence without waiting it out.
type backoffRecorder struct {
	mu     sync.Mutex
	delays []time.Duration
}

func (b *backoffRecorder) option() Option {
	return func(a *Agent) {
		a.sleep = func(ctx context.Context, d time.Duration) bool {
			b.mu.Lock()
			b.delays = append(b.delays, d)
			b.mu.Unlock()
			return sleep(ctx, time.Millisecond)
		}
	}
}

func (b *backoffRecorder) get() []time.Duration {
	b.mu.Lock()
	defer b.mu.Unlock()
	return slices.Clone(b.delays)
}

// TestReconnectBackoff: while VPP's socket is missing the agent retries with a delay that
// doubles from Backoff.Min up to Backoff.Max; once connected the delay starts over from Min
// when the connection is lost again.
func TestReconnectBackoff(t *testing.T) {
	srv := startFake(t)
	cfg := testConfig(t, srv, uplinks[DriverAFPacket])
	cfg.Backoff = Backoff{Min: 5 * time.Millisecond, Max: 40 * time.Millisecond}
	srv.Close() // no VPP yet

	var rec backoffRecorder
	hook, ch := applyHook()
	a, err := New(cfg, rec.option(), hook)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	if err := a.Reconcile(ctxT(t), sidecars("pod-a")); !errors.Is(err, ErrNotConnected) {
		t.Fatalf("Reconcile without VPP = %v, want ErrNotConnected", err)
	}
	waitUntil(t, "6 failed connection attempts", func() bool { return len(rec.get()) >= 6 })
	if s := a.Status(); s.Connected || !strings.Contains(s.ConnectError, cfg.APISocket) {
		t.Errorf("status while VPP is absent: %+v", s)
	}

	srv2, err := fakevpp.New(srv.Path(), fakevpp.WithLogf(t.Logf))
	if err != nil {
		t.Fatal(err)
	}
	if ap := waitApplied(t, ch, "connected"); ap.err != nil {
		t.Fatal(ap.err)
	}
	checkApplied(t, srv2, cfg, "pod-a")
	before := rec.get()
	want := cfg.Backoff.Min
	for i, d := range before {
		if d != want {
			t.Fatalf("delays before the first connection %v: delay %d is %v, want %v", before, i, d, want)
		}
		want = min(2*want, cfg.Backoff.Max)
	}

	// VPP goes away again: the backoff starts over from Min.
	srv2.Close()
	waitUntil(t, "a connection attempt after VPP went away", func() bool { return len(rec.get()) > len(before) })
	if d := rec.get()[len(before)]; d != cfg.Backoff.Min {
		t.Errorf("first delay after losing the connection %v, want %v", d, cfg.Backoff.Min)
	}
}

// TestVPPDownThenBack: VPP stops, stays away for a few connection attempts while the desired
// state changes, and comes back empty (a restart). The agent applies the state desired now —
// not the one from before — including the removal of a sidecar whose namespace VPP has
// forgotten, with nothing but the difference to an empty VPP.
func TestVPPDownThenBack(t *testing.T) {
	srv := startFake(t)
	cfg := testConfig(t, srv, uplinks[DriverDev])
	var rec backoffRecorder
	hook, ch := applyHook()
	a := startAgent(t, cfg, rec.option(), hook)
	if err := a.Reconcile(ctxT(t), sidecars("pod-a", "pod-b")); err != nil {
		t.Fatal(err)
	}
	fresh := startFake(t) // the plan an empty VPP gets for pod-b and pod-c
	freshCfg := cfg
	freshCfg.APISocket, freshCfg.HandoffDir = fresh.Path(), t.TempDir()
	ref := startAgent(t, freshCfg)
	if err := ref.Reconcile(ctxT(t), sidecars("pod-b", "pod-c")); err != nil {
		t.Fatal(err)
	}
	ref.Close()

	srv.Close()
	waitUntil(t, "3 failed connection attempts", func() bool { return len(rec.get()) >= 3 })
	if err := a.Reconcile(ctxT(t), sidecars("pod-b", "pod-c")); !errors.Is(err, ErrNotConnected) {
		t.Fatalf("Reconcile while VPP is down = %v, want ErrNotConnected", err)
	}
	if s := a.Status(); s.Connected || s.ConnectError == "" {
		t.Errorf("status while VPP is down: %+v", s)
	}

	srv2, err := fakevpp.New(srv.Path(), fakevpp.WithLogf(t.Logf))
	if err != nil {
		t.Fatal(err)
	}
	defer srv2.Close()
	if ap := waitApplied(t, ch, "connected"); ap.err != nil {
		t.Fatalf("apply after VPP came back: %v", ap.err)
	}
	checkApplied(t, srv2, cfg, "pod-b", "pod-c")
	// pod-a is gone from the desired state and from VPP (it restarted): the agent still asks
	// VPP to delete its namespace (its hand-off directory was left), then sends what an empty
	// VPP needs.
	want := append([]string{
		"app_namespace_add_del_v4 {Secret:0 IsAdd:false SwIfIndex:4294967295 IP4FibID:0 IP6FibID:0 NamespaceID:mt-pod-a SockName:}",
	}, changes(fresh.Plan())...)
	if got := changes(srv2.Plan()); !slices.Equal(got, want) {
		t.Errorf("after VPP came back the agent sent\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	if s := a.Status(); !s.Connected || s.Connects != 2 || s.ConnectError != "" || s.LastApplyError != "" ||
		fmt.Sprint(s.Namespaces) != "[mt-pod-b mt-pod-c]" {
		t.Errorf("status after VPP came back: %+v", s)
	}
}
