package main

import (
	"bytes"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"
)

// installDoc returns the document of install/meshturbo.yaml with the given kind and name.
func installDoc(t *testing.T, kind, name string) *yaml.Node {
	t.Helper()
	raw, err := os.ReadFile("../../install/meshturbo.yaml")
	if err != nil {
		t.Fatal(err)
	}
	dec := yaml.NewDecoder(bytes.NewReader(raw))
	for {
		var doc yaml.Node
		if err := dec.Decode(&doc); errors.Is(err, io.EOF) {
			t.Fatalf("install/meshturbo.yaml has no %s %s", kind, name)
		} else if err != nil {
			t.Fatal(err)
		}
		var meta struct {
			Kind     string                `yaml:"kind"`
			Metadata struct{ Name string } `yaml:"metadata"`
		}
		if err := doc.Decode(&meta); err != nil {
			t.Fatal(err)
		}
		if meta.Kind == kind && meta.Metadata.Name == name {
			return &doc
		}
	}
}

// TestInstallConfigMapParses loads the config file the install manifests ship in the
// meshturbo-xds ConfigMap with meshturbo-xds's own loader. The files it names (the admin
// token) are mounted from a Secret in the pod, which install/install_test.go checks; here
// they are stand-ins in a temp dir, since the loader checks they exist.
func TestInstallConfigMapParses(t *testing.T) {
	var cm struct {
		Data map[string]string `yaml:"data"`
	}
	if err := installDoc(t, "ConfigMap", "meshturbo-xds").Decode(&cm); err != nil {
		t.Fatal(err)
	}
	file := cm.Data["meshturbo-xds.yaml"]
	if file == "" {
		t.Fatal("ConfigMap meshturbo-xds has no meshturbo-xds.yaml")
	}
	var n yaml.Node
	if err := yaml.Unmarshal([]byte(file), &n); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	var stand func(*yaml.Node)
	replaced := 0
	stand = func(n *yaml.Node) {
		for i := 0; n.Kind == yaml.MappingNode && i+1 < len(n.Content); i += 2 {
			k, v := n.Content[i], n.Content[i+1]
			if strings.HasSuffix(k.Value, "File") && v.Kind == yaml.ScalarNode && v.Value != "" {
				p := filepath.Join(dir, filepath.Base(v.Value))
				if err := os.WriteFile(p, []byte("stand-in\n"), 0o600); err != nil {
					t.Fatal(err)
				}
				v.Value = p
				replaced++
			}
		}
		for _, c := range n.Content {
			stand(c)
		}
	}
	stand(&n)
	if replaced == 0 {
		t.Error("the config names no token file, yet its admin API listens beyond loopback")
	}
	b, err := yaml.Marshal(&n)
	if err != nil {
		t.Fatal(err)
	}
	c, err := ParseConfig(b, "install/meshturbo.yaml ConfigMap meshturbo-xds")
	if err != nil {
		t.Fatal(err)
	}
	if c.Listen != "0.0.0.0:15050" || c.Admin.Listen != "0.0.0.0:15051" || c.Admin.TokenFile == "" || len(c.Sources) == 0 {
		t.Errorf("parsed config %+v", c)
	}
	if _, err := c.watchers(slog.New(slog.DiscardHandler)); err != nil {
		t.Errorf("the config's sources do not make watchers: %v", err)
	}
}
