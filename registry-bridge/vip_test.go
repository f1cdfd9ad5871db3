package bridge

import (
	"fmt"
	"net/netip"
	"testing"
)

func TestAssignVIPs(t *testing.T) {
	prefix := netip.MustParsePrefix("10.9.0.0/20") // 200 services in 4094 addresses, a realistic load
	var hosts []string
	for i := range 200 {
		hosts = append(hosts, fmt.Sprintf("svc-%d.service.consul", i))
	}
	a, err := AssignVIPs(hosts, prefix)
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]string{}
	for h, ip := range a {
		addr := netip.MustParseAddr(ip)
		if !prefix.Contains(addr) || ip == "10.9.0.0" || ip == "10.9.15.255" {
			t.Fatalf("%s got %s, outside the usable range", h, ip)
		}
		if other, dup := seen[ip]; dup {
			t.Fatalf("%s and %s share %s", h, other, ip)
		}
		seen[ip] = h
	}

	// Same set in another order: the same assignment (replicas agree).
	rev := make([]string, len(hosts))
	for i, h := range hosts {
		rev[len(hosts)-1-i] = h
	}
	b, _ := AssignVIPs(rev, prefix)
	for h := range a {
		if a[h] != b[h] {
			t.Fatalf("%s: %s vs %s depending on input order", h, a[h], b[h])
		}
	}

	// Adding one service moves at most a few others (only those on its probe path).
	c, _ := AssignVIPs(append(hosts, "new.service.consul"), prefix)
	moved := 0
	for h := range a {
		if a[h] != c[h] {
			moved++
		}
	}
	if moved > 2 {
		t.Errorf("adding one service moved %d others", moved)
	}

	if _, err := AssignVIPs(hosts, netip.MustParsePrefix("10.9.0.0/28")); err == nil {
		t.Error("200 services fitted in a /28")
	}
}
