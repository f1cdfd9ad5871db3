package zookeeper

import (
	"net/netip"
	"testing"

	"github.com/meshturbo/meshturbo/model"
)

// FuzzParseDubboURL checks that no input makes ParseDubboURL panic, and that what it accepts
// keeps its promises: a dialable IP, a port in range, an interface, and a host name that is
// either valid or refused.
func FuzzParseDubboURL(f *testing.F) {
	f.Add(demoURL)
	f.Add("tri://[fd00::1]:50051/com.example.Greeter?group=prod&version=1.0.0&weight=200")
	f.Fuzz(func(t *testing.T, s string) {
		p, err := ParseDubboURL(s)
		if err != nil {
			if reasonOf(err) == "" {
				t.Fatalf("error %v has no skip reason", err)
			}
			return
		}
		addr, perr := netip.ParseAddr(p.Host)
		if perr != nil || addr.IsUnspecified() || addr.IsMulticast() || addr.Zone() != "" || addr.String() != p.Host {
			t.Fatalf("accepted host %q", p.Host)
		}
		if p.Port == 0 {
			t.Fatal("accepted port 0")
		}
		if p.Interface == "" || p.Protocol == "" {
			t.Fatalf("accepted %+v without interface or protocol", p)
		}
		_ = p.Weight()
		_ = p.Enabled()
		_ = p.Timestamp()
		if h, err := DubboHostname(p.Interface, p.Group(), p.Version(), "dubbo"); err == nil && !model.ValidHostname(h) {
			t.Fatalf("DubboHostname(%q, %q, %q) = %q, not a valid host name", p.Interface, p.Group(), p.Version(), h)
		}
	})
}
