package vpp

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/meshturbo/meshturbo/vpp/internal/fakevpp"
	"github.com/meshturbo/meshturbo/vpp/vpptest"
)

func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestCounters: the uplink's counters come from the stats segment (govpp's stats API), only
// for interfaces the agent owns; a broken stats segment is reported and reopened.
func TestCounters(t *testing.T) {
	srv := startFake(t)
	var other uint32
	srv.Do(func(v *fakevpp.VPP) { other = v.AddInterface("eth9", "iavf").SwIfIndex })
	stats := vpptest.NewStats()
	a := startAgent(t, testConfig(t, srv, uplinks[DriverAFPacket]), WithStatsAdapter(stats.Adapter))
	if err := a.Reconcile(ctxT(t), sidecars("a")); err != nil {
		t.Fatal(err)
	}
	up := a.Status().Uplink
	if up == nil {
		t.Fatal("no uplink after apply")
	}
	stats.Set(up.SwIfIndex, vpptest.Counters{Name: up.Name, RxPackets: 10, RxBytes: 1000, TxPackets: 20, TxBytes: 2000, Drops: 2, RxErrors: 3, TxErrors: 4})
	stats.Set(other, vpptest.Counters{Name: "eth9", RxPackets: 99})
	cs, err := a.Counters()
	if err != nil {
		t.Fatal(err)
	}
	want := InterfaceCounters{SwIfIndex: up.SwIfIndex, Name: up.Name, RxPackets: 10, RxBytes: 1000, TxPackets: 20, TxBytes: 2000, Drops: 2, RxErrors: 3, TxErrors: 4}
	if len(cs) != 1 || cs[0] != want {
		t.Fatalf("counters %+v, want only the uplink's %+v", cs, want)
	}

	stats.Fail(errors.New("segment gone"))
	if _, err := a.Counters(); err == nil || !strings.Contains(err.Error(), "segment gone") {
		t.Fatalf("counters with a broken segment: %v", err)
	}
	if s := a.Status().StatsError; !strings.Contains(s, "segment gone") {
		t.Errorf("StatsError %q", s)
	}
	stats.Fail(nil)
	waitUntil(t, "the stats segment reopened", func() bool { _, err := a.Counters(); return err == nil })
	if a.Status().StatsError != "" {
		t.Errorf("StatsError after reconnect: %q", a.Status().StatsError)
	}
}

// TestConnectErrorNamesSocket: while nothing listens, the status names the socket and the
// startup.conf setting; once VPP is there it is cleared. Without a stats socket file the
// agent runs without counters and says so.
func TestConnectErrorNamesSocket(t *testing.T) {
	dir, err := os.MkdirTemp("", "vppabsent")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "api.sock")
	cfg := testConfig(t, &fakevpp.Server{}, uplinks[DriverAFPacket])
	cfg.APISocket = sock
	cfg.StatsSocket = filepath.Join(dir, "stats.sock")
	a, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	waitUntil(t, "a connect error", func() bool { return a.Status().ConnectError != "" })
	if s := a.Status().ConnectError; !strings.Contains(s, sock) || !strings.Contains(s, "socksvr { socket-name "+sock+" }") {
		t.Errorf("ConnectError %q", s)
	}
	srv, err := fakevpp.New(sock, fakevpp.WithLogf(t.Logf))
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	if err := a.WaitConnected(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	st := a.Status()
	if st.ConnectError != "" || !strings.Contains(st.StatsError, "stats.sock") || !strings.Contains(st.StatsError, "statseg") {
		t.Errorf("status %+v", st)
	}
	if _, err := a.Counters(); !errors.Is(err, ErrNoStats) {
		t.Errorf("Counters without a stats segment: %v", err)
	}
	if c := a.Config(); c.StatsSocket != cfg.StatsSocket || c.SecretKey != nil || c.AppSocketDir == "" {
		t.Errorf("Config() %+v", c)
	}
}
