package vpp

import (
	"errors"
	"net/netip"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"go.fd.io/govpp/adapter"
	"go.fd.io/govpp/adapter/mock"
	"go.fd.io/govpp/api"
	"go.fd.io/govpp/binapi/memclnt"
	"go.fd.io/govpp/binapi/vpe"

	"github.com/meshturbo/meshturbo/internal/testenv"
)

// Unit tests with govpp's own mock adapter, where answering a message or two is all a test
// needs.

// mockVPP answers show_version with version and control_ping while pings is true.
func mockVPP(version string, pings *atomic.Bool) *mock.VppAdapter {
	m := mock.NewVppAdapter()
	m.MockReplyHandler(func(req mock.MessageDTO) ([]byte, uint16, bool) {
		var reply api.Message
		name := req.MsgName
		if name == "" { // the mock keeps control_ping's id apart
			name, _ = m.GetMsgNameByID(req.MsgID)
		}
		switch name {
		case "show_version":
			reply = &vpe.ShowVersionReply{Program: "vpe", Version: version}
		case "control_ping":
			if !pings.Load() {
				return nil, 0, false // the mock then sends a reply govpp cannot match: no answer
			}
			reply = &memclnt.ControlPingReply{}
		default:
			return nil, 0, false
		}
		data, err := m.ReplyBytes(req, reply)
		if err != nil {
			panic(err)
		}
		id, _ := m.GetMsgID(reply.GetMessageName(), reply.GetCrcString())
		return data, id, true
	})
	return m
}

func mockConfig(t *testing.T) Config {
	return Config{
		APISocket:      "/nonexistent/api.sock",
		Uplink:         uplinks[DriverAFPacket],
		HandoffDir:     t.TempDir(),
		RequestTimeout: 100 * time.Millisecond,
		ProbeInterval:  10 * time.Millisecond,
		Backoff:        Backoff{Min: time.Millisecond, Max: 10 * time.Millisecond},
		Logger:         testenv.Logger(t),
	}
}

func TestVersionRangeMock(t *testing.T) {
	for _, tc := range []struct {
		version string
		ok      bool
	}{
		{"25.02-release", true},
		{"25.02.1-release", true},
		{"v25.02-rc2~5-g3f1c2a9", true},
		{"25.06-release", false},
		{"24.10-release", false},
		{"v26.02-rc0~1-gabcdef0", false},
		{"master", false},
	} {
		t.Run(tc.version, func(t *testing.T) {
			var pings atomic.Bool
			pings.Store(true)
			m := mockVPP(tc.version, &pings)
			a, err := New(mockConfig(t), WithAdapter(func(string) adapter.VppAPI { return m }))
			if err != nil {
				t.Fatal(err)
			}
			defer a.Close()
			err = a.WaitConnected(ctxT(t))
			var inc *IncompatibleError
			switch {
			case tc.ok && err != nil:
				t.Fatalf("WaitConnected = %v", err)
			case !tc.ok && !errors.As(err, &inc):
				t.Fatalf("WaitConnected = %v, want an IncompatibleError", err)
			case !tc.ok && inc.Version != tc.version:
				t.Errorf("IncompatibleError.Version = %q", inc.Version)
			}
			if tc.ok && a.Status().Version != tc.version {
				t.Errorf("status version %q", a.Status().Version)
			}
		})
	}
}

// TestHungVPPReconnects: a VPP that accepts requests but stops answering (here: pings) is
// noticed by the probe, and the agent reconnects.
func TestHungVPPReconnects(t *testing.T) {
	var pings atomic.Bool
	pings.Store(true)
	m := mockVPP("25.02-release", &pings)
	var connects atomic.Int32
	m.SetConnectCallback(func() { connects.Add(1) })
	a, err := New(mockConfig(t), WithAdapter(func(string) adapter.VppAPI { return m }))
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	if err := a.WaitConnected(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	pings.Store(false)
	deadline := time.Now().Add(5 * time.Second)
	for connects.Load() < 2 {
		if time.Now().After(deadline) {
			t.Fatalf("no reconnect after VPP stopped answering; status %+v", a.Status())
		}
		time.Sleep(5 * time.Millisecond)
	}
	pings.Store(true)
	if err := a.WaitConnected(ctxT(t)); err != nil {
		t.Fatal(err)
	}
}

func TestParseVersion(t *testing.T) {
	for in, want := range map[string]string{
		"25.02-release":          "25.02",
		"25.02.1-release":        "25.02.1",
		"v25.02-rc0~12-g3f1c2a9": "25.02",
		"v24.10.2~3-gdeadbee":    "24.10.2",
		"25.06":                  "25.06",
	} {
		v, err := parseVersion(in)
		if err != nil || v.String() != want {
			t.Errorf("parseVersion(%q) = %v, %v; want %s", in, v, err, want)
		}
	}
	for _, bad := range []string{"", "master", "25", "25.x", "1.2.3.4"} {
		if _, err := parseVersion(bad); err == nil {
			t.Errorf("parseVersion(%q) succeeded", bad)
		}
	}
}

func TestParseTag(t *testing.T) {
	for _, tc := range []struct {
		tag       string
		kind      Driver
		key, note string
		ok        bool
	}{
		{"meshturbo/dev/0000:3b:02.1/7", DriverDev, "0000:3b:02.1", "7", true},
		{"meshturbo/rdma/ens2f0v0", DriverRDMA, "ens2f0v0", "", true},
		{"meshturbo/af_packet/eth1", DriverAFPacket, "eth1", "", true},
		{"meshturbo/", "", "", "", false},
		{"meshturbo/dev", "", "", "", false},
		{"cni/pod-x", "", "", "", false},
		{"", "", "", "", false},
	} {
		kind, key, note, ok := parseTag(tc.tag)
		if kind != tc.kind || key != tc.key || note != tc.note || ok != tc.ok {
			t.Errorf("parseTag(%q) = %q %q %q %v", tc.tag, kind, key, note, ok)
		}
		if tc.ok && makeTag(kind, key, note) != tc.tag {
			t.Errorf("makeTag does not round-trip %q", tc.tag)
		}
	}
}

func TestConfigValidation(t *testing.T) {
	good := func() Config {
		return Config{Uplink: uplinks[DriverRDMA], HandoffDir: "/run/meshturbo/vpp"}
	}
	for name, tc := range map[string]struct {
		mut  func(*Config)
		want string
	}{
		"dpdk driver":      {func(c *Config) { c.Uplink.Driver = "dpdk" }, "startup.conf"},
		"rdma without MAC": {func(c *Config) { c.Uplink.MAC = nil }, "VF's MAC"},
		"dev bad PCI": {func(c *Config) {
			c.Uplink = Uplink{Driver: DriverDev, PCIAddress: "3b:02.1", Addresses: uplinks[DriverDev].Addresses}
		}, "PCI address"},
		"no address":       {func(c *Config) { c.Uplink.Addresses = nil }, "Addresses is empty"},
		"relative handoff": {func(c *Config) { c.HandoffDir = "handoff" }, "HandoffDir"},
		"bad rx mode":      {func(c *Config) { c.Uplink.RxMode = "turbo" }, "RxMode"},
		"mixed route": {func(c *Config) {
			c.Routes = []Route{{Prefix: testRoutes[0].Prefix, Via: uplinks[DriverRDMA].Addresses[1].Addr()}}
		}, "same family"},
		"empty versions": {func(c *Config) { c.MinVersion, c.MaxVersion = "25.06", "25.02" }, "is empty"},
		"route twice": {func(c *Config) {
			c.Routes = []Route{testRoutes[0], {Prefix: netip.MustParsePrefix("10.96.1.0/12"), Via: testRoutes[0].Via}}
		}, "routed twice"},
	} {
		c := good()
		tc.mut(&c)
		err := c.validate()
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: validate = %v, want %q", name, err, tc.want)
		}
	}
	c := good()
	if err := c.validate(); err != nil {
		t.Fatal(err)
	}
	if c.APISocket != "/run/vpp/api.sock" || c.Uplink.Name != "mt-uplink" || c.Uplink.RxMode != RxPolling || c.RequestTimeout != 5*time.Second {
		t.Errorf("defaults: %+v", c)
	}
	if err := (Desired{Sidecars: []Sidecar{{ID: "a"}, {ID: "a"}}}).validate(); err == nil {
		t.Error("duplicate sidecar accepted")
	}
	if err := (Desired{Sidecars: []Sidecar{{ID: "../etc"}}}).validate(); err == nil {
		t.Error("path-like sidecar ID accepted")
	}
}

func TestNamespaceSecret(t *testing.T) {
	k := []byte("k")
	if namespaceSecret(k, "mt-a") != namespaceSecret(k, "mt-a") {
		t.Error("secret not stable")
	}
	if namespaceSecret(k, "mt-a") == namespaceSecret(k, "mt-b") || namespaceSecret(k, "mt-a") == namespaceSecret([]byte("other"), "mt-a") {
		t.Error("secrets collide")
	}
}
