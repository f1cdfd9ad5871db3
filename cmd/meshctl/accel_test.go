package main

import (
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/meshturbo/meshturbo/bpf"
)

// jsonKeys lists the JSON names of t's fields.
func jsonKeys(t reflect.Type) []string {
	var keys []string
	for f := range t.Fields() {
		name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
		if name != "" && name != "-" {
			keys = append(keys, name)
		}
	}
	slices.Sort(keys)
	return keys
}

// TestAccelTypesFollowTheAgent: meshctl keeps its own copy of the agent's /v1/accel answer (so
// the CLI does not link the BPF library); every counter and state field the agent serves must
// be in it, or `meshctl accel status` silently drops it.
func TestAccelTypesFollowTheAgent(t *testing.T) {
	for _, tc := range []struct {
		name        string
		agent, ours reflect.Type
		// shown elsewhere by meshctl
		skip []string
	}{
		{"stats", reflect.TypeFor[bpf.Stats](), reflect.TypeFor[accelStats](), nil},
		// state.features repeats the top-level features, which meshctl shows.
		{"state", reflect.TypeFor[bpf.State](), reflect.TypeFor[accelState](), []string{"features"}},
	} {
		ours := jsonKeys(tc.ours)
		for _, k := range jsonKeys(tc.agent) {
			if !slices.Contains(ours, k) && !slices.Contains(tc.skip, k) {
				t.Errorf("the agent serves %s.%s; meshctl's %v does not decode it", tc.name, k, tc.ours)
			}
		}
	}
}
