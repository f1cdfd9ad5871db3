package main

import (
	"bytes"
	"errors"
	"io"
	"os"
	"testing"

	"go.yaml.in/yaml/v3"
)

// TestInstallDaemonSetArgsParse parses the arguments install/meshturbo.yaml gives the agent
// with the agent's own flag parser.
func TestInstallDaemonSetArgsParse(t *testing.T) {
	raw, err := os.ReadFile("../../install/meshturbo.yaml")
	if err != nil {
		t.Fatal(err)
	}
	dec := yaml.NewDecoder(bytes.NewReader(raw))
	for {
		var obj struct {
			Kind     string                `yaml:"kind"`
			Metadata struct{ Name string } `yaml:"metadata"`
			Spec     struct {
				Template struct {
					Spec struct {
						Containers []struct {
							Args []string `yaml:"args"`
						} `yaml:"containers"`
					} `yaml:"spec"`
				} `yaml:"template"`
			} `yaml:"spec"`
		}
		if err := dec.Decode(&obj); errors.Is(err, io.EOF) {
			t.Fatal("install/meshturbo.yaml has no DaemonSet meshturbo-agent")
		} else if err != nil {
			t.Fatal(err)
		}
		if obj.Kind != "DaemonSet" || obj.Metadata.Name != "meshturbo-agent" {
			continue
		}
		var stderr bytes.Buffer
		a, err := parseArgs(obj.Spec.Template.Spec.Containers[0].Args, &stderr)
		if err != nil {
			t.Fatalf("agent args: %v\n%s", err, stderr.String())
		}
		if _, err := a.flagMesh(); err != nil {
			t.Errorf("agent mesh flags: %v", err)
		}
		if a.adminAddr != "0.0.0.0:15055" || a.tokenFile == "" || a.pinPath == "" || a.cgroup == "" {
			t.Errorf("agent args parsed to %+v: want the admin on 0.0.0.0:15055 with a token file, a pin path and a cgroup", a)
		}
		return
	}
}
