package consul

import (
	"encoding/json"
	"testing"

	"github.com/hashicorp/consul/api"

	"github.com/meshturbo/meshturbo/model"
)

// FuzzHealthService feeds arbitrary /v1/health/service answers through the watcher's decoding
// and mapping: it must never panic, and what survives validation must be servable.
func FuzzHealthService(f *testing.F) {
	for _, seed := range []string{
		`[{"Node":{"Node":"n1","Address":"10.0.0.1"},"Service":{"ID":"a-1","Service":"a","Address":"10.0.0.2","Port":8080,"Meta":{"protocol":"http","mesh":"true"},"Tags":["v=1"],"Weights":{"Passing":3}},"Checks":[]}]`,
		`[{"Node":{"Address":"10.0.0.1"},"Service":{"ID":"a-1","Service":"a","Port":0}}]`,
		`[{"Node":{"Address":"not-an-ip"},"Service":{"ID":"x","Service":"a","Address":"","Port":70000,"Meta":{"protocol":"grpc"}}}]`,
		`[{"Node":null,"Service":{"ID":"x","Service":"a","Address":"::1","Port":-5,"Tags":["=","k=v=w"]}}]`,
		`[]`, `null`, `[{}]`,
	} {
		f.Add([]byte(seed))
	}
	w, err := New(Config{Address: "127.0.0.1:8500"})
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		var entries []*api.ServiceEntry
		if json.Unmarshal(data, &entries) != nil {
			return
		}
		entries = nonNil(entries)
		if len(entries) == 0 {
			return
		}
		svcs := w.snapshot(map[string][]*api.ServiceEntry{"fuzzed": entries})
		clean, _ := model.Sanitize(svcs)
		again, skipped := model.Sanitize(clean)
		if len(skipped) != 0 || len(again) != len(clean) {
			t.Fatalf("sanitized output is not stable: %v", skipped)
		}
	})
}

// nonNil drops entries the API client would never hand over (no Service or Node).
func nonNil(in []*api.ServiceEntry) []*api.ServiceEntry {
	out := in[:0]
	for _, e := range in {
		if e != nil && e.Service != nil && e.Node != nil {
			out = append(out, e)
		}
	}
	return out
}
