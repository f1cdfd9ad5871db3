package testenv

import (
	"fmt"
	"maps"
	"os/exec"
	"slices"
	"testing"
	"time"
)

// Eureka is our Spring Cloud Netflix Eureka server (e2e/eureka-server): one node, no
// self-preservation, instances evicted and changes visible within about a second.
type Eureka struct {
	*Process
	URL string // base URL of the REST API, e.g. "http://127.0.0.1:8761/eureka"
}

// StartEureka runs the Eureka server jar on a free port and returns once GET /eureka/apps
// (Accept: application/json) answers 200.
func StartEureka(t testing.TB) *Eureka {
	t.Helper()
	e, err := StartEurekaIn(testEnv(t), RequireDeps(t))
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	return e
}

// StartEurekaIn is StartEureka outside a test.
func StartEurekaIn(env *Env, d Deps) (*Eureka, error) {
	return StartEurekaWith(env, d, EurekaOptions{})
}

// EurekaOptions are the rare knobs of a test Eureka server.
type EurekaOptions struct {
	// MaxHeap is the JVM's -Xmx (default "512m"); 100,000 instances need about 2g.
	MaxHeap string
	// Properties are Spring properties passed on the command line (--key=value), over
	// e2e/eureka-server's application.properties, e.g.
	// "eureka.server.retention-time-in-m-s-in-delta-queue": "30000".
	Properties map[string]string
}

// StartEurekaWith is StartEurekaIn with options.
func StartEurekaWith(env *Env, d Deps, o EurekaOptions) (*Eureka, error) {
	if o.MaxHeap == "" {
		o.MaxHeap = "512m"
	}
	dir, err := env.workDir("eureka")
	if err != nil {
		return nil, fmt.Errorf("start eureka: %w", err)
	}
	ports, err := FreeLoopbackPorts(1)
	if err != nil {
		return nil, err
	}
	url := fmt.Sprintf("http://%s/eureka", Addr(ports[0]))
	args := append(javaTestFlags(dir, o.MaxHeap), "-jar", d.EurekaJar, fmt.Sprintf("--server.port=%d", ports[0]))
	for _, k := range slices.Sorted(maps.Keys(o.Properties)) {
		args = append(args, fmt.Sprintf("--%s=%s", k, o.Properties[k]))
	}
	cmd := exec.Command(d.Java, args...)
	cmd.Dir = dir
	// Spring Boot starts in 5-10 s here; much slower with -race tests on both cores.
	p, err := StartIn(env, "eureka", cmd, HTTPProbe(url+"/apps", nil, "Accept", "application/json"), 3*time.Minute)
	if err != nil {
		return nil, err
	}
	return &Eureka{Process: p, URL: url}, nil
}
