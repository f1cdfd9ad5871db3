// Package install holds meshturbo's install files; its tests validate them. There is no
// cluster here: the manifests are checked by decoding them strictly with client-go's scheme
// and checking what a cluster would reject or what would break at run time; the Istio
// overlay is checked with the real istioctl.
package install

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"
	"google.golang.org/protobuf/encoding/protojson"
	meshconfig "istio.io/api/mesh/v1alpha1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes/scheme"

	"github.com/meshturbo/meshturbo/internal/testenv"
)

const (
	namespace   = "meshturbo-system"
	xdsPort     = 15050
	xdsService  = "meshturbo-xds.meshturbo-system.svc"
	configKey   = "meshturbo-xds.yaml"
	tokenSecret = "meshturbo-admin-token"
)

// splitYAML returns the non-empty documents of a multi-document YAML stream.
func splitYAML(t *testing.T, b []byte) [][]byte {
	t.Helper()
	dec := yaml.NewDecoder(bytes.NewReader(b))
	var docs [][]byte
	for {
		var n yaml.Node
		err := dec.Decode(&n)
		if errors.Is(err, io.EOF) {
			return docs
		}
		if err != nil {
			t.Fatalf("yaml: %v", err)
		}
		if len(n.Content) == 0 || n.Content[0].Kind != yaml.MappingNode {
			continue
		}
		out, err := yaml.Marshal(&n)
		if err != nil {
			t.Fatal(err)
		}
		docs = append(docs, out)
	}
}

type manifests struct {
	objs       []runtime.Object
	namespace  *corev1.Namespace
	sas        map[string]*corev1.ServiceAccount
	configMaps map[string]*corev1.ConfigMap
	deploy     *appsv1.Deployment
	pdb        *policyv1.PodDisruptionBudget
	svc        *corev1.Service
	ds         *appsv1.DaemonSet
	roles      int
}

// loadManifests decodes every object of meshturbo.yaml strictly: an unknown or duplicated
// field is an error, as kubectl apply --validate=strict would make it.
func loadManifests(t *testing.T) *manifests {
	t.Helper()
	raw, err := os.ReadFile("meshturbo.yaml")
	if err != nil {
		t.Fatal(err)
	}
	dec := serializer.NewCodecFactory(scheme.Scheme, serializer.EnableStrict).UniversalDeserializer()
	m := &manifests{sas: map[string]*corev1.ServiceAccount{}, configMaps: map[string]*corev1.ConfigMap{}}
	for i, doc := range splitYAML(t, raw) {
		obj, gvk, err := dec.Decode(doc, nil, nil)
		if err != nil {
			t.Fatalf("meshturbo.yaml document %d: %v", i+1, err)
		}
		m.objs = append(m.objs, obj)
		switch o := obj.(type) {
		case *corev1.Namespace:
			m.namespace = o
		case *corev1.ServiceAccount:
			m.sas[o.Name] = o
		case *corev1.ConfigMap:
			m.configMaps[o.Name] = o
		case *appsv1.Deployment:
			m.deploy = o
		case *policyv1.PodDisruptionBudget:
			m.pdb = o
		case *corev1.Service:
			m.svc = o
		case *appsv1.DaemonSet:
			m.ds = o
		case *rbacv1.ClusterRole, *rbacv1.Role:
			m.roles++
		default:
			t.Errorf("document %d: unexpected kind %s", i+1, gvk)
		}
	}
	return m
}

func TestManifestsDecodeAndHangTogether(t *testing.T) {
	m := loadManifests(t)
	if m.namespace == nil || m.namespace.Name != namespace {
		t.Fatalf("no Namespace %s", namespace)
	}
	if m.deploy == nil || m.pdb == nil || m.svc == nil || m.ds == nil {
		t.Fatalf("want a Deployment, PodDisruptionBudget, Service and DaemonSet; got %d objects", len(m.objs))
	}
	for _, obj := range m.objs {
		acc := obj.(interface {
			GetName() string
			GetNamespace() string
			GetLabels() map[string]string
		})
		if acc.GetName() == "" {
			t.Errorf("%T without a name", obj)
		}
		switch obj.(type) {
		case *corev1.Namespace, *rbacv1.ClusterRole:
		default:
			if acc.GetNamespace() != namespace {
				t.Errorf("%T %s: namespace %q, want %s", obj, acc.GetName(), acc.GetNamespace(), namespace)
			}
		}
		if acc.GetLabels()["app.kubernetes.io/part-of"] != "meshturbo" {
			t.Errorf("%T %s: no app.kubernetes.io/part-of=meshturbo label", obj, acc.GetName())
		}
	}

	// meshturbo-xds: two replicas, ready on the admin API, not all disrupted at once.
	d := m.deploy
	if d.Spec.Replicas == nil || *d.Spec.Replicas != 2 {
		t.Errorf("meshturbo-xds replicas = %v, want 2", d.Spec.Replicas)
	}
	checkPodSpec(t, m, "Deployment meshturbo-xds", d.Spec.Selector.MatchLabels, d.Spec.Template)
	xds := d.Spec.Template.Spec.Containers[0]
	if p := xds.ReadinessProbe; p == nil || p.HTTPGet == nil || p.HTTPGet.Path != "/readyz" {
		t.Errorf("meshturbo-xds readiness probe %+v, want GET /readyz", xds.ReadinessProbe)
	} else {
		checkPortRef(t, "meshturbo-xds readiness probe", xds, p.HTTPGet.Port)
	}
	if sc := xds.SecurityContext; sc == nil || sc.Privileged != nil && *sc.Privileged ||
		sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
		t.Errorf("meshturbo-xds must not be privileged and should have a read-only root: %+v", xds.SecurityContext)
	}
	if !slices.Equal(xds.Args, []string{"-config", "/etc/meshturbo/" + configKey}) {
		t.Errorf("meshturbo-xds args %q", xds.Args)
	}
	cm := m.configMaps["meshturbo-xds"]
	if cm == nil || cm.Data[configKey] == "" {
		t.Fatalf("ConfigMap meshturbo-xds has no %s", configKey)
	}
	checkMounted(t, d.Spec.Template.Spec, xds, "/etc/meshturbo/"+configKey, func(v corev1.Volume) bool {
		return v.ConfigMap != nil && v.ConfigMap.Name == cm.Name
	})
	// The config's own ports and token file agree with the pod (the file itself is parsed by
	// meshturbo-xds's loader in cmd/meshturbo-xds/install_test.go).
	var conf struct {
		Listen string `yaml:"listen"`
		Admin  struct {
			Listen    string `yaml:"listen"`
			TokenFile string `yaml:"tokenFile"`
		} `yaml:"admin"`
	}
	if err := yaml.Unmarshal([]byte(cm.Data[configKey]), &conf); err != nil {
		t.Fatal(err)
	}
	if conf.Listen != "0.0.0.0:15050" || conf.Admin.Listen != "0.0.0.0:15051" {
		t.Errorf("config listen %q admin %q: want 0.0.0.0:15050 and 0.0.0.0:15051 (the container ports)", conf.Listen, conf.Admin.Listen)
	}
	checkMounted(t, d.Spec.Template.Spec, xds, conf.Admin.TokenFile, isTokenSecret)

	if m.pdb.Spec.MinAvailable == nil || m.pdb.Spec.MinAvailable.IntValue() < 1 || m.pdb.Spec.MinAvailable.IntValue() >= 2 {
		t.Errorf("PDB minAvailable %v: want 1 of the 2 replicas", m.pdb.Spec.MinAvailable)
	}
	if !selects(m.pdb.Spec.Selector.MatchLabels, d.Spec.Template.Labels) {
		t.Errorf("PDB selector %v does not select the meshturbo-xds pods %v", m.pdb.Spec.Selector.MatchLabels, d.Spec.Template.Labels)
	}

	// The Service exposes xDS (MCP for istiod, ALS for the fallback) and admin, on ports the pod has.
	if !selects(m.svc.Spec.Selector, d.Spec.Template.Labels) {
		t.Errorf("Service selector %v does not select the meshturbo-xds pods", m.svc.Spec.Selector)
	}
	want := map[string]int32{"grpc-xds": xdsPort, "http-admin": 15051}
	for _, p := range m.svc.Spec.Ports {
		if want[p.Name] != p.Port {
			t.Errorf("Service port %s = %d, want %d", p.Name, p.Port, want[p.Name])
		}
		delete(want, p.Name)
		checkPortRef(t, "Service port "+p.Name, xds, p.TargetPort)
	}
	if len(want) > 0 {
		t.Errorf("Service lacks ports %v", want)
	}

	// meshturbo-agent: privileged for BPF, the node's bpffs and cgroup v2, no host network.
	a := m.ds
	checkPodSpec(t, m, "DaemonSet meshturbo-agent", a.Spec.Selector.MatchLabels, a.Spec.Template)
	agent := a.Spec.Template.Spec.Containers[0]
	if sc := agent.SecurityContext; sc == nil || sc.Privileged == nil || !*sc.Privileged {
		t.Error("meshturbo-agent must be privileged (BPF load, cgroup attach, pinning)")
	}
	if a.Spec.Template.Spec.HostNetwork {
		t.Error("meshturbo-agent asks for the host network; it does not need it")
	}
	hostPaths := map[string]string{}
	for _, v := range a.Spec.Template.Spec.Volumes {
		if v.HostPath != nil {
			hostPaths[v.Name] = v.HostPath.Path
		}
	}
	for _, vm := range agent.VolumeMounts {
		switch hostPaths[vm.Name] {
		case "/sys/fs/bpf":
			if vm.MountPropagation == nil || *vm.MountPropagation != corev1.MountPropagationBidirectional {
				t.Error("bpffs must be mounted Bidirectional so pins are the node's")
			}
			if !slices.Contains(agent.Args, "-pin-path="+vm.MountPath+"/meshturbo") {
				t.Errorf("agent -pin-path is not under the bpffs mount %s: %q", vm.MountPath, agent.Args)
			}
			delete(hostPaths, vm.Name)
		case "/sys/fs/cgroup":
			if !slices.Contains(agent.Args, "-cgroup="+vm.MountPath) {
				t.Errorf("agent -cgroup is not the node's cgroup mount %s: %q", vm.MountPath, agent.Args)
			}
			delete(hostPaths, vm.Name)
		}
	}
	if len(hostPaths) > 0 {
		t.Errorf("agent host paths not mounted or unexpected: %v", hostPaths)
	}
	for _, arg := range agent.Args {
		if f, ok := strings.CutPrefix(arg, "-admin-token-file="); ok {
			checkMounted(t, a.Spec.Template.Spec, agent, f, isTokenSecret)
		}
	}
	if p := agent.ReadinessProbe; p == nil || p.HTTPGet == nil || p.HTTPGet.Path != "/readyz" {
		t.Error("meshturbo-agent has no GET /readyz readiness probe")
	} else {
		checkPortRef(t, "meshturbo-agent readiness probe", agent, p.HTTPGet.Port)
	}
	if m.roles == 0 {
		t.Error("no RBAC for meshctl users")
	}
}

// checkPodSpec checks what a cluster would reject or what would fail at pod start.
func checkPodSpec(t *testing.T, m *manifests, what string, selector map[string]string, tpl corev1.PodTemplateSpec) {
	t.Helper()
	if len(selector) == 0 || !selects(selector, tpl.Labels) {
		t.Errorf("%s: selector %v does not match the template labels %v", what, selector, tpl.Labels)
	}
	spec := tpl.Spec
	if sa := m.sas[spec.ServiceAccountName]; sa == nil {
		t.Errorf("%s: service account %q is not in the manifests", what, spec.ServiceAccountName)
	}
	if spec.AutomountServiceAccountToken == nil || *spec.AutomountServiceAccountToken {
		t.Errorf("%s: mounts an API token it does not use", what)
	}
	if tpl.Annotations["sidecar.istio.io/inject"] != "false" {
		t.Errorf("%s: must not get a sidecar", what)
	}
	if len(spec.Containers) != 1 {
		t.Fatalf("%s: %d containers", what, len(spec.Containers))
	}
	c := spec.Containers[0]
	if c.Image == "" || c.Name == "" {
		t.Errorf("%s: container without a name or image", what)
	}
	if c.Resources.Requests.Cpu().IsZero() || c.Resources.Limits.Memory().IsZero() {
		t.Errorf("%s: set a CPU request and a memory limit", what)
	}
	if c.LivenessProbe == nil {
		t.Errorf("%s: no liveness probe", what)
	}
	vols := map[string]bool{}
	for _, v := range spec.Volumes {
		vols[v.Name] = true
	}
	for _, vm := range c.VolumeMounts {
		if !vols[vm.Name] {
			t.Errorf("%s: mount of undefined volume %q", what, vm.Name)
		}
	}
	for _, v := range spec.Volumes {
		if v.ConfigMap != nil && m.configMaps[v.ConfigMap.Name] == nil {
			t.Errorf("%s: ConfigMap %q is not in the manifests", what, v.ConfigMap.Name)
		}
	}
}

func selects(selector, labels map[string]string) bool {
	for k, v := range selector {
		if labels[k] != v {
			return false
		}
	}
	return len(selector) > 0
}

// checkPortRef checks that a probe or Service targets a port the container declares.
func checkPortRef(t *testing.T, what string, c corev1.Container, p intstr.IntOrString) {
	t.Helper()
	for _, cp := range c.Ports {
		if p.Type == intstr.String && cp.Name == p.StrVal || p.Type == intstr.Int && cp.ContainerPort == p.IntVal {
			return
		}
	}
	t.Errorf("%s: port %s is not a port of container %s", what, p.String(), c.Name)
}

func isTokenSecret(v corev1.Volume) bool {
	return v.Secret != nil && v.Secret.SecretName == tokenSecret
}

// checkMounted checks that path lies in a mount of a volume that ok accepts.
func checkMounted(t *testing.T, spec corev1.PodSpec, c corev1.Container, path string, ok func(corev1.Volume) bool) {
	t.Helper()
	if path == "" {
		t.Errorf("container %s: empty file path", c.Name)
		return
	}
	for _, vm := range c.VolumeMounts {
		if strings.HasPrefix(path, vm.MountPath+"/") {
			for _, v := range spec.Volumes {
				if v.Name == vm.Name && ok(v) {
					return
				}
			}
		}
	}
	t.Errorf("container %s: %s is not in a mount of the expected volume", c.Name, path)
}

// TestIstioOverlayWithRealIstioctl renders the overlay with the istioctl `make deps` built
// from the same istio version as istiod. istioctl needs no cluster and no network for
// `manifest generate`: the charts and profiles are compiled in. It does not check the mesh
// config's fields, so the test decodes the generated mesh config strictly into Istio's
// MeshConfig type: a misspelt or unsupported field fails here.
func TestIstioOverlayWithRealIstioctl(t *testing.T) {
	deps := testenv.RequireDeps(t)
	dir := t.TempDir()
	overlay, err := filepath.Abs("istio-overlay.yaml")
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(deps.Istioctl, "manifest", "generate", "-f", overlay)
	cmd.Dir = dir
	// No kubeconfig: nothing may reach for a cluster.
	cmd.Env = append(os.Environ(), "HOME="+dir, "KUBECONFIG="+filepath.Join(dir, "no-kubeconfig"))
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("istioctl manifest generate -f %s: %v\n%s", overlay, err, stderr.String())
	}

	var meshYAML string
	for _, doc := range splitYAML(t, stdout.Bytes()) {
		var obj struct {
			Kind     string `yaml:"kind"`
			Metadata struct {
				Name      string `yaml:"name"`
				Namespace string `yaml:"namespace"`
			} `yaml:"metadata"`
			Data map[string]string `yaml:"data"`
		}
		if err := yaml.Unmarshal(doc, &obj); err != nil {
			t.Fatal(err)
		}
		if obj.Kind == "ConfigMap" && obj.Metadata.Name == "istio" && obj.Metadata.Namespace == "istio-system" {
			meshYAML = obj.Data["mesh"]
		}
	}
	if meshYAML == "" {
		t.Fatalf("istioctl generated no ConfigMap istio-system/istio with a mesh config; stderr:\n%s", stderr.String())
	}
	var generic any
	if err := yaml.Unmarshal([]byte(meshYAML), &generic); err != nil {
		t.Fatal(err)
	}
	js, err := jsonOf(generic)
	if err != nil {
		t.Fatal(err)
	}
	var mc meshconfig.MeshConfig
	if err := (protojson.UnmarshalOptions{DiscardUnknown: false}).Unmarshal(js, &mc); err != nil {
		t.Fatalf("the generated mesh config is not a valid Istio MeshConfig: %v\n%s", err, meshYAML)
	}

	var sources []string
	for _, s := range mc.GetConfigSources() {
		sources = append(sources, s.GetAddress())
	}
	ours := fmt.Sprintf("xds://%s:%d", xdsService, xdsPort)
	if !slices.Contains(sources, ours) || !slices.Contains(sources, "k8s://") {
		t.Errorf("configSources = %q: want %s and k8s://", sources, ours)
	}
	dc := mc.GetDefaultConfig()
	if dc.GetDrainDuration().AsDuration().Seconds() < 1 || !dc.GetHoldApplicationUntilProxyStarts().GetValue() {
		t.Errorf("proxy defaults for hot upgrade missing: drainDuration %v holdApplicationUntilProxyStarts %v",
			dc.GetDrainDuration(), dc.GetHoldApplicationUntilProxyStarts())
	}

	// The overlay's port is the Service's.
	m := loadManifests(t)
	for _, p := range m.svc.Spec.Ports {
		if p.Name == "grpc-xds" && p.Port != xdsPort {
			t.Errorf("Service port %s %d disagrees with the overlay's %d", p.Name, p.Port, xdsPort)
		}
	}
}

func jsonOf(v any) ([]byte, error) { return json.Marshal(v) }
