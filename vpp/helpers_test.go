package vpp

import (
	"bytes"
	"context"
	"flag"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/meshturbo/meshturbo/internal/testenv"
	"github.com/meshturbo/meshturbo/vpp/internal/fakevpp"
)

var update = flag.Bool("update", false, "rewrite golden files")

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m,
		// govpp's core returns API channels to its pool from a goroutine of its own; they
		// finish on their own.
		goleak.IgnoreAnyFunction("go.fd.io/govpp/core/genericpool.(*Pool[...]).Put"),
	)
}

// startFake runs a fake VPP on a socket in a short temporary directory (unix socket paths are
// limited to 107 bytes, test temp dirs can be longer).
func startFake(t *testing.T, opts ...fakevpp.Option) *fakevpp.Server {
	t.Helper()
	dir, err := os.MkdirTemp("", "fakevpp")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	opts = append([]fakevpp.Option{fakevpp.WithLogf(t.Logf)}, opts...)
	srv, err := fakevpp.New(filepath.Join(dir, "api.sock"), opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	return srv
}

func mustMAC(s string) net.HardwareAddr {
	m, err := net.ParseMAC(s)
	if err != nil {
		panic(err)
	}
	return m
}

// uplinks are the three drivers' uplinks the tests use, as the agent's command line would
// fill them from sysfs (vpp/sriov) and Multus.
var uplinks = map[Driver]Uplink{
	DriverDev: {
		Driver: DriverDev, PCIAddress: "0000:3b:02.1", MTU: 9000, RxMode: RxAdaptive, RxQueues: 2, TxQueues: 2,
		Addresses: []netip.Prefix{netip.MustParsePrefix("192.168.50.11/24")},
	},
	DriverRDMA: {
		Driver: DriverRDMA, HostIf: "ens2f0v0", MAC: mustMAC("02:15:b3:00:af:02"), MTU: 9000,
		Addresses: []netip.Prefix{netip.MustParsePrefix("192.168.50.11/24"), netip.MustParsePrefix("fd00:50::11/64")},
	},
	DriverAFPacket: {
		Driver: DriverAFPacket, HostIf: "eth1", RxMode: RxInterrupt,
		Addresses: []netip.Prefix{netip.MustParsePrefix("192.168.50.11/24")},
	},
}

var testRoutes = []Route{{Prefix: netip.MustParsePrefix("10.96.0.0/12"), Via: netip.MustParseAddr("192.168.50.1")}}

func testConfig(t *testing.T, srv *fakevpp.Server, u Uplink) Config {
	return Config{
		APISocket:      srv.Path(),
		Uplink:         u,
		Routes:         testRoutes,
		HandoffDir:     t.TempDir(),
		SecretKey:      []byte("test key"),
		RequestTimeout: 2 * time.Second,
		ConnectTimeout: time.Second,
		ProbeInterval:  20 * time.Millisecond,
		Backoff:        Backoff{Min: 5 * time.Millisecond, Max: 50 * time.Millisecond},
		Logger:         testenv.Logger(t),
	}
}

// startAgent starts an agent and waits until it is connected.
func startAgent(t *testing.T, cfg Config, opts ...Option) *Agent {
	t.Helper()
	a, err := New(cfg, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := a.WaitConnected(ctx); err != nil {
		t.Fatalf("WaitConnected: %v", err)
	}
	return a
}

func sidecars(ids ...string) Desired {
	var d Desired
	for _, id := range ids {
		d.Sidecars = append(d.Sidecars, Sidecar{ID: id, Name: "default/" + id})
	}
	return d
}

func golden(t *testing.T, name string, lines []string) {
	t.Helper()
	got := []byte(strings.Join(lines, "\n") + "\n")
	path := filepath.Join("testdata", name)
	if *update {
		if err := os.WriteFile(path, got, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run with -update to create it)", err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("%s differs (run with -update to accept):\n--- got\n%s--- want\n%s", name, got, want)
	}
}

// changes leaves out the read-only requests of a plan (dumps, show_version): what remains
// changed VPP.
func changes(plan []string) []string {
	var out []string
	for _, l := range plan {
		name, _, _ := strings.Cut(l, " ")
		if !strings.HasSuffix(name, "_dump") && name != "show_version" {
			out = append(out, l)
		}
	}
	return out
}

// waitSeen waits until the fake received a message named last (the client's writes race the
// test's reads) and returns every message name it received.
func waitSeen(t *testing.T, srv *fakevpp.Server, last string) []string {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		seen := srv.Seen()
		if len(seen) > 0 && seen[len(seen)-1] == last || time.Now().After(deadline) {
			return seen
		}
		time.Sleep(time.Millisecond)
	}
}
