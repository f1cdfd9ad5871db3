package bridge

import (
	"net/netip"
	"regexp"
	"strings"
	"testing"

	networking "istio.io/api/networking/v1alpha3"

	"github.com/meshturbo/meshturbo/model"
)

func TestServiceEntryTranslation(t *testing.T) {
	s := model.Service{
		Hostname: "orders.service.consul",
		Source:   model.SourceConsul,
		Ports:    []model.Port{{Name: "http", Number: 8080, Protocol: model.ProtocolHTTP}},
		Endpoints: []model.Endpoint{
			{ID: "m", Address: "10.0.0.1", Ports: map[string]uint32{"http": 9000}, Meshed: true, Locality: "eu/west", Weight: 3,
				Labels: map[string]string{"version": "v1", "bad key!": "x", "team": "has space", TLSModeLabel: "forged"}},
			{ID: "p", Address: "10.0.0.2", Ports: map[string]uint32{"http": 8080}, Labels: map[string]string{TLSModeLabel: "istio"}},
		},
	}
	se := ServiceEntry(&s)
	if se.Resolution != networking.ServiceEntry_STATIC || se.Hosts[0] != s.Hostname {
		t.Fatalf("resolution/hosts = %v %v", se.Resolution, se.Hosts)
	}
	if p := se.Ports[0]; p.Number != 8080 || p.Protocol != "HTTP" || p.Name != "http" {
		t.Fatalf("port = %+v", p)
	}
	meshed, plain := se.Endpoints[0], se.Endpoints[1]
	if meshed.Labels[TLSModeLabel] != "istio" {
		t.Errorf("meshed endpoint lacks tlsMode istio: %v", meshed.Labels)
	}
	if _, ok := plain.Labels[TLSModeLabel]; ok {
		t.Errorf("non-mesh endpoint must not claim mTLS (a registry label cannot forge it): %v", plain.Labels)
	}
	if meshed.Labels["version"] != "v1" || len(meshed.Labels) != 2 {
		t.Errorf("labels = %v, want version and tlsMode only (invalid keys and values dropped)", meshed.Labels)
	}
	if meshed.Ports["http"] != 9000 || meshed.Locality != "eu/west" || meshed.Weight != 3 {
		t.Errorf("endpoint = %+v", meshed)
	}
}

func TestTranslateNamesResources(t *testing.T) {
	cat := model.NewCatalog([]model.Service{{Hostname: "a.service.consul", Source: model.SourceConsul,
		Ports: []model.Port{{Name: "tcp", Number: 5432, Protocol: model.ProtocolTCP}}}})
	res, err := Translate(cat, TranslateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(res) != 1 || res[0].Namespace != "meshturbo-system" || res[0].Name != "a.service.consul" {
		t.Fatalf("resources = %+v", res)
	}
	if res[0].Labels["meshturbo.io/source"] != "consul" {
		t.Errorf("labels = %v", res[0].Labels)
	}
	se := res[0].Spec.(*networking.ServiceEntry)
	if len(se.Addresses) != 1 || !DefaultVIPRange.Contains(netip.MustParseAddr(se.Addresses[0])) {
		t.Errorf("TCP service addresses = %v, want one VIP from %s", se.Addresses, DefaultVIPRange)
	}
}

func TestHTTPServicesNeedNoVIP(t *testing.T) {
	cat := model.NewCatalog([]model.Service{{Hostname: "web.service.consul", Source: model.SourceConsul,
		Ports: []model.Port{{Name: "http", Number: 80, Protocol: model.ProtocolHTTP}}}})
	res, err := Translate(cat, TranslateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if a := res[0].Spec.(*networking.ServiceEntry).Addresses; len(a) != 0 {
		t.Errorf("HTTP service got addresses %v", a)
	}
	if _, err := Translate(model.NewCatalog([]model.Service{
		{Hostname: "a.x", Ports: []model.Port{{Name: "tcp", Number: 1, Protocol: model.ProtocolTCP}}},
		{Hostname: "b.x", Ports: []model.Port{{Name: "tcp", Number: 1, Protocol: model.ProtocolTCP}}},
	}), TranslateOptions{VIPRange: netip.MustParsePrefix("10.0.0.7/32")}); err == nil {
		t.Error("two TCP services fitted in a /32")
	}
}

// TestValidLabelName checks the hand-written check against the Kubernetes label regexp.
func TestValidLabelName(t *testing.T) {
	re := regexp.MustCompile(`^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$`)
	cases := []string{"", "a", "A", "0", "-", "a-", "-a", "a-b", "a_b.c", "a b", "é", "v1.2.3", "a/b",
		strings.Repeat("a", 63), strings.Repeat("a", 64), "a" + strings.Repeat("-", 61) + "a", "a" + strings.Repeat("-", 62) + "a",
		"x_", "_x", "x.", "1.0.0", "has space", "bad key!"}
	for _, s := range cases {
		if got, want := validLabelName(s), re.MatchString(s); got != want {
			t.Errorf("validLabelName(%q) = %v, the regexp says %v", s, got, want)
		}
	}
}
