package zookeeper

import (
	"context"
	"fmt"
	"log/slog"
	"maps"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/meshturbo/meshturbo/internal/testenv"
	"github.com/meshturbo/meshturbo/model"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// changeTimeout bounds how long a change in ZooKeeper may take to show in a snapshot.
const changeTimeout = 10 * time.Second

const (
	greeter  = "com.example.Greeter"
	greeterA = "dubbo://10.0.0.1:20880/com.example.Greeter?application=greeter&weight=20&timestamp=1"
	greeterB = "dubbo://10.0.0.2:20880/com.example.Greeter?application=greeter&timestamp=2"
)

func TestDubboProviders(t *testing.T) {
	t.Parallel()
	z := testenv.StartZooKeeper(t)
	c := dial(t, z.Addr)
	create(t, c, providerPath(greeter, greeterA), []byte("10.0.0.1"))
	// Malformed providers next to the good one.
	create(t, c, "/dubbo/"+greeter+"/providers/dubbo%3A%2F%2F%ZZ", nil)
	create(t, c, providerPath(greeter, "dubbo://greeter.example.com:20880/com.example.Greeter"), nil)
	create(t, c, providerPath(greeter, "dubbo://10.0.0.9:0/com.example.Greeter"), nil)
	create(t, c, providerPath(greeter, "dubbo://10.0.0.9:70000/com.example.Greeter"), nil)
	create(t, c, providerPath(greeter, "dubbo://10.0.0.8:20880/com.example.Greeter?enabled=false"), nil)
	// An interface with consumers only, and its providers node still to come.
	create(t, c, "/dubbo/com.example.Late/consumers/x", nil)

	w, rec, logs := startWatcher(t, Config{Servers: []string{z.Addr}})
	const host = "com.example.greeter.dubbo"
	snap := rec.wait(t, changeTimeout, want(map[string][]string{host: {"10.0.0.1:20880 TCP w20"}}))
	if ep := snap[0].Endpoints[0]; ep.ID != "10.0.0.1:20880" || ep.Labels["application"] != "greeter" || snap[0].Source != model.SourceZooKeeper {
		t.Errorf("endpoint %+v of %q", ep, snap[0].Source)
	}
	wantStats := map[string]int{ReasonBadEncoding: 1, ReasonBadHost: 1, ReasonBadPort: 2, ReasonDisabled: 1}
	if got := w.Stats(); !maps.Equal(got, wantStats) {
		t.Errorf("Stats() = %v, want %v", got, wantStats)
	}
	logs.wait(t, time.Second, "about the host name", func(r logRecord) bool {
		return r.msg == "zookeeper entry skipped" && r.attrs["reason"] == ReasonBadHost && strings.Contains(r.attrs["detail"], "greeter.example.com")
	})

	create(t, c, providerPath(greeter, greeterB), nil)
	rec.wait(t, changeTimeout, want(map[string][]string{host: {"10.0.0.1:20880 TCP w20", "10.0.0.2:20880 TCP w100"}}))

	// A new interface, a new version of one, and a providers node created after its interface.
	create(t, c, providerPath("com.example.Other", "tri://10.0.1.1:50051/com.example.Other?group=prod&version=1.0.0&weight=5"), nil)
	create(t, c, providerPath(greeter, "tri://10.0.0.3:50051/com.example.Greeter?version=2.0.0"), nil)
	create(t, c, providerPath("com.example.Late", "rest://10.0.2.1:8080/com.example.Late"), nil)
	rec.wait(t, changeTimeout, want(map[string][]string{
		host:                                  {"10.0.0.1:20880 TCP w20", "10.0.0.2:20880 TCP w100"},
		"com.example.greeter.v2-0-0.dubbo":    {"10.0.0.3:50051 GRPC w100"},
		"com.example.other.prod.v1-0-0.dubbo": {"10.0.1.1:50051 GRPC w5"},
		"com.example.late.dubbo":              {"10.0.2.1:8080 HTTP w100"},
	}))

	remove(t, c, providerPath(greeter, greeterA))
	remove(t, c, providerPath("com.example.Other", "tri://10.0.1.1:50051/com.example.Other?group=prod&version=1.0.0&weight=5"))
	remove(t, c, "/dubbo/com.example.Other/providers")
	remove(t, c, "/dubbo/com.example.Other")
	rec.wait(t, changeTimeout, want(map[string][]string{
		host:                               {"10.0.0.2:20880 TCP w100"},
		"com.example.greeter.v2-0-0.dubbo": {"10.0.0.3:50051 GRPC w100"},
		"com.example.late.dubbo":           {"10.0.2.1:8080 HTTP w100"},
	}))

	// Fixing a malformed entry clears its count.
	remove(t, c, providerPath(greeter, "dubbo://10.0.0.9:0/com.example.Greeter"))
	waitStats(t, w, map[string]int{ReasonBadEncoding: 1, ReasonBadHost: 1, ReasonBadPort: 1, ReasonDisabled: 1})

	for i, s := range rec.all() {
		if len(s) == 0 {
			t.Errorf("snapshot %d is empty", i)
		}
	}
}

// waitStats waits until the watcher's Stats are w.
func waitStats(t *testing.T, w *Watcher, want map[string]int) {
	t.Helper()
	deadline := time.Now().Add(changeTimeout)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for !maps.Equal(w.Stats(), want) {
		if time.Now().After(deadline) {
			t.Fatalf("Stats() = %v, want %v", w.Stats(), want)
		}
		<-tick.C
	}
	// Skipped lists the same entries, but for those left out on purpose, each with a code
	// and its reason.
	reported := map[string]int{}
	for _, s := range w.Skipped() {
		reason, _, _ := strings.Cut(s.Reason, ": ")
		if s.Source != model.SourceZooKeeper || s.ID == "" || s.Code != skipCode(reason) || s.Code == "" {
			t.Errorf("Skipped() has %+v", s)
		}
		reported[reason]++
	}
	for reason, n := range want {
		if skipCode(reason) == "" {
			n = 0
		}
		if reported[reason] != n {
			t.Errorf("Skipped() lists %d entries for %q, want %d (all: %v)", reported[reason], reason, n, w.Skipped())
		}
	}
}

func curatorJSON(name, id, addr string, port int, metadata string) []byte {
	return fmt.Appendf(nil, `{"name":%q,"id":%q,"address":%q,"port":%d,"sslPort":null,
		"payload":{"@class":"org.springframework.cloud.zookeeper.discovery.ZookeeperInstance","id":%q,"name":%q,"metadata":{%s}},
		"registrationTimeUTC":1690000000000,"serviceType":"DYNAMIC","uriSpec":{"parts":[]}}`, name, id, addr, port, name, name, metadata)
}

func TestCuratorInstances(t *testing.T) {
	t.Parallel()
	z := testenv.StartZooKeeper(t)
	c := dial(t, z.Addr)
	create(t, c, "/services/orders/a1", curatorJSON("orders", "a1", "10.1.0.1", 8080, `"zone":"z1","instance_status":"UP"`))
	create(t, c, "/services/orders/bad-json", []byte(`{"name":"orders","address":`))
	create(t, c, "/services/orders/by-name", curatorJSON("orders", "by-name", "orders-3.example.com", 8080, ""))
	create(t, c, "/services/orders/big", curatorJSON("orders", "big", "10.1.0.9", 8080, `"pad":"`+strings.Repeat("x", 2048)+`"`))

	w, rec, _ := startWatcher(t, Config{Servers: []string{z.Addr}, MaxNodeData: 1024})
	snap := rec.wait(t, changeTimeout, want(map[string][]string{"orders.curator": {"10.1.0.1:8080 HTTP w100"}}))
	if ep := snap[0].Endpoints[0]; ep.ID != "a1" || ep.Labels["zone"] != "z1" {
		t.Errorf("endpoint = %+v", ep)
	}
	waitStats(t, w, map[string]int{ReasonBadJSON: 1, ReasonBadHost: 1, ReasonOversized: 1})

	create(t, c, "/services/orders/a2", curatorJSON("orders", "a2", "10.1.0.2", 8080, ""))
	rec.wait(t, changeTimeout, want(map[string][]string{"orders.curator": {"10.1.0.1:8080 HTTP w100", "10.1.0.2:8080 HTTP w100"}}))

	// Changed data (a data watch), a new service (the root's child watch).
	if _, err := c.Set("/services/orders/a1", curatorJSON("orders", "a1", "10.1.0.1", 9090, `"zone":"z2","weight":"7"`), -1); err != nil {
		t.Fatal(err)
	}
	create(t, c, "/services/payments/p1", curatorJSON("payments", "p1", "10.2.0.1", 443, `"protocol":"grpc"`))
	snap = rec.wait(t, changeTimeout, want(map[string][]string{
		"orders.curator":   {"10.1.0.1:9090 HTTP w7", "10.1.0.2:8080 HTTP w100"},
		"payments.curator": {"10.2.0.1:443 GRPC w100"},
	}))
	if ep := snap[0].Endpoints[0]; ep.Labels["zone"] != "z2" {
		t.Errorf("labels after the data change = %v", ep.Labels)
	}

	// Out of service, then deleted; the malformed one fixed.
	if _, err := c.Set("/services/orders/a2", curatorJSON("orders", "a2", "10.1.0.2", 8080, `"instance_status":"OUT_OF_SERVICE"`), -1); err != nil {
		t.Fatal(err)
	}
	rec.wait(t, changeTimeout, want(map[string][]string{
		"orders.curator":   {"10.1.0.1:9090 HTTP w7"},
		"payments.curator": {"10.2.0.1:443 GRPC w100"},
	}))
	remove(t, c, "/services/orders/a2")
	if _, err := c.Set("/services/orders/bad-json", curatorJSON("orders", "bad-json", "10.1.0.3", 9090, ""), -1); err != nil {
		t.Fatal(err)
	}
	rec.wait(t, changeTimeout, want(map[string][]string{
		"orders.curator":   {"10.1.0.1:9090 HTTP w7", "10.1.0.3:9090 HTTP w100"},
		"payments.curator": {"10.2.0.1:443 GRPC w100"},
	}))
	waitStats(t, w, map[string]int{ReasonBadHost: 1, ReasonOversized: 1})
}

// TestSessionExpiry cuts the watcher off from ZooKeeper until the server expires its session,
// changes the registry meanwhile, and checks that the watcher served the last snapshot
// throughout and catches up once it can reach the server again.
func TestSessionExpiry(t *testing.T) {
	t.Parallel()
	z := testenv.StartZooKeeper(t)
	c := dial(t, z.Addr)
	create(t, c, providerPath(greeter, greeterA), nil)
	create(t, c, providerPath(greeter, greeterB), nil)
	p := testenv.StartTCPProxy(t, z.Addr)

	_, rec, logs := startWatcher(t, Config{Servers: []string{p.Addr}, SessionTimeout: 2 * time.Second, Resync: time.Hour})
	const host = "com.example.greeter.dubbo"
	rec.wait(t, changeTimeout, want(map[string][]string{host: {"10.0.0.1:20880 TCP w20", "10.0.0.2:20880 TCP w100"}}))
	session := logs.wait(t, time.Second, "establishing the session", msgIs(slog.LevelInfo, "zookeeper session established")).attrs["session"]
	published := rec.count()

	p.Cut()
	logs.wait(t, changeTimeout, "about the lost connection", msgIs(slog.LevelWarn, "zookeeper connection lost"))
	waitSessionGone(t, z.Addr, session)

	// Changes the watcher cannot see yet.
	remove(t, c, providerPath(greeter, greeterB))
	create(t, c, providerPath(greeter, "dubbo://10.0.0.3:20880/com.example.Greeter"), nil)
	if n := rec.count(); n != published {
		t.Fatalf("%d snapshots published while cut off", n-published)
	}

	p.Restore()
	restored := time.Now()
	rec.wait(t, 5*time.Second, want(map[string][]string{host: {"10.0.0.1:20880 TCP w20", "10.0.0.3:20880 TCP w100"}}))
	t.Logf("caught up %v after the network came back", time.Since(restored).Round(time.Millisecond))
	logs.wait(t, time.Second, "about the expired session", msgIs(slog.LevelWarn, "zookeeper session expired"))
	if r, _ := logs.find(func(r logRecord) bool {
		return r.msg == "zookeeper session established" && r.attrs["session"] != session
	}); r.msg == "" {
		t.Error("no new session was logged")
	}
	for i, s := range rec.all() {
		if _, ok := summary(s)[host]; !ok {
			t.Errorf("snapshot %d lacks %s: %v", i, host, summary(s))
		}
	}

	// Watches work in the new session.
	create(t, c, providerPath(greeter, "dubbo://10.0.0.4:20880/com.example.Greeter"), nil)
	rec.wait(t, changeTimeout, want(map[string][]string{host: {"10.0.0.1:20880 TCP w20", "10.0.0.3:20880 TCP w100", "10.0.0.4:20880 TCP w100"}}))
}

// waitSessionGone waits until the server no longer tracks the session ("0x…").
func waitSessionGone(t *testing.T, addr, session string) {
	t.Helper()
	if !strings.HasPrefix(session, "0x") {
		t.Fatalf("session id %q", session)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		dump, err := testenv.FourLetterWord(ctx, addr, "dump")
		cancel()
		if err == nil && strings.Contains(dump, "SessionTracker dump") && !strings.Contains(dump, session) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("ZooKeeper still tracks session %s after 30s (err %v):\n%s", session, err, dump)
		}
		time.Sleep(100 * time.Millisecond) // polling the server's state, not hoping
	}
}

// TestZooKeeperRestart stops the server under a running watcher: the watcher keeps its
// snapshot, warns, and follows changes made after the server is back.
func TestZooKeeperRestart(t *testing.T) {
	t.Parallel()
	z := testenv.StartZooKeeper(t)
	c := dial(t, z.Addr)
	create(t, c, providerPath(greeter, greeterA), nil)

	w, rec, logs := startWatcher(t, Config{Servers: []string{z.Addr}, SessionTimeout: 2 * time.Second, Resync: time.Hour})
	const host = "com.example.greeter.dubbo"
	rec.wait(t, changeTimeout, want(map[string][]string{host: {"10.0.0.1:20880 TCP w20"}}))
	published := rec.count()
	if h := w.Health(); !h.Connected || h.LastContact.IsZero() || h.LastError != "" {
		t.Errorf("Health() = %+v while connected", h)
	}

	if err := z.Stop(); err != nil {
		t.Fatal(err)
	}
	r := logs.wait(t, changeTimeout, "about the lost connection", msgIs(slog.LevelWarn, "zookeeper connection lost"))
	if !strings.Contains(r.attrs["fix"], z.Addr) {
		t.Errorf("the warning's fix %q does not name %s", r.attrs["fix"], z.Addr)
	}
	if n := rec.count(); n != published {
		t.Fatalf("%d snapshots published while ZooKeeper was down", n-published)
	}
	if h := w.Health(); h.Connected || h.LastError == "" {
		t.Errorf("Health() = %+v while ZooKeeper is down", h)
	}

	z.Restart(t)
	c2 := dial(t, z.Addr)
	create(t, c2, providerPath(greeter, greeterB), nil)
	rec.wait(t, changeTimeout, want(map[string][]string{host: {"10.0.0.1:20880 TCP w20", "10.0.0.2:20880 TCP w100"}}))
	for i, s := range rec.all() {
		if _, ok := summary(s)[host]; !ok {
			t.Errorf("snapshot %d lacks %s: %v", i, host, summary(s))
		}
	}
	if h := w.Health(); !h.Connected {
		t.Errorf("Health() = %+v after the restart", h)
	}
}

// TestZooKeeperDownAtStart starts the watcher before the server: nothing is published, a
// warning names the address and the fix, and the first snapshot follows the server's start.
func TestZooKeeperDownAtStart(t *testing.T) {
	t.Parallel()
	z := testenv.StartZooKeeper(t)
	c := dial(t, z.Addr)
	create(t, c, providerPath(greeter, greeterA), nil)
	create(t, c, "/services/orders/a1", curatorJSON("orders", "a1", "10.1.0.1", 8080, ""))
	if err := z.Stop(); err != nil {
		t.Fatal(err)
	}

	w, rec, logs := startWatcher(t, Config{Servers: []string{z.Addr}, SessionTimeout: 2 * time.Second})
	r := logs.wait(t, changeTimeout, "about the unreachable server", msgIs(slog.LevelWarn, "zookeeper unreachable"))
	if r.attrs["servers"] != z.Addr || !strings.Contains(r.attrs["fix"], z.Addr) {
		t.Errorf("warning %q %v does not name %s", r.msg, r.attrs, z.Addr)
	}
	if n := rec.count(); n != 0 {
		t.Fatalf("%d snapshots published before ZooKeeper was up", n)
	}
	if h := w.Health(); h.Connected || !strings.Contains(h.LastError, "connection refused") {
		t.Errorf("Health() = %+v before ZooKeeper is up", h)
	}

	z.Restart(t)
	rec.wait(t, changeTimeout, want(map[string][]string{
		"com.example.greeter.dubbo": {"10.0.0.1:20880 TCP w20"},
		"orders.curator":            {"10.1.0.1:8080 HTTP w100"},
	}))
	if all := rec.all(); len(all[0]) != 2 {
		t.Errorf("the first snapshot is %v, want the complete registry", summary(all[0]))
	}
}

// TestEmptyRegistry: with nothing registered (not even the roots) the first snapshot is empty
// but published, and roots created later are noticed.
func TestEmptyRegistry(t *testing.T) {
	t.Parallel()
	z := testenv.StartZooKeeper(t)
	_, rec, _ := startWatcher(t, Config{Servers: []string{z.Addr}})
	rec.wait(t, changeTimeout, want(map[string][]string{}))

	c := dial(t, z.Addr)
	create(t, c, "/services/orders/a1", curatorJSON("orders", "a1", "10.1.0.1", 8080, ""))
	create(t, c, providerPath(greeter, greeterA), nil)
	rec.wait(t, changeTimeout, want(map[string][]string{
		"com.example.greeter.dubbo": {"10.0.0.1:20880 TCP w20"},
		"orders.curator":            {"10.1.0.1:8080 HTTP w100"},
	}))
}
