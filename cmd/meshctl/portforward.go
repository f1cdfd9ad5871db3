package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os/exec"
	"regexp"
	"strings"
	"sync"
	"time"
)

// forwardTimeout is how long kubectl port-forward may take to report its local port.
const forwardTimeout = 20 * time.Second

var forwardingRE = regexp.MustCompile(`Forwarding from 127\.0\.0\.1:(\d+) -> `)

// podTarget parses pod/NAME[.NAMESPACE][:PORT], istioctl's way of naming a pod; port
// defaults to defPort, the namespace to kubectl's current one.
func podTarget(addr, defPort string) (name, namespace, port string, ok bool) {
	rest, ok := strings.CutPrefix(addr, "pod/")
	if !ok {
		return "", "", "", false
	}
	rest, port, found := strings.Cut(rest, ":")
	if !found {
		port = defPort
	}
	name, namespace, _ = strings.Cut(rest, ".")
	return name, namespace, port, true
}

// portForward runs `kubectl port-forward` to a pod's admin port, as istioctl reaches a pod's
// agent, with the user's kubeconfig and credentials. It returns the local address once
// kubectl listens; the forward ends when meshctl's command does.
func (g *globals) portForward(ctx context.Context, d daemon, pod, namespace, port string) (string, error) {
	if pod == "" || port == "" {
		return "", usageErr("%s address %q: want pod/<name>[.<namespace>][:<port>]", d.name, d.addr)
	}
	parent := ctx
	ctx, cancel := context.WithCancel(context.WithoutCancel(ctx)) // lives until the command is over
	args := []string{"port-forward", "--address", "127.0.0.1", "pod/" + pod, ":" + port}
	if namespace != "" {
		args = append([]string{"-n", namespace}, args...)
	}
	cmd := exec.CommandContext(ctx, g.kubectl, args...)
	cmd.WaitDelay = 2 * time.Second // a child of kubectl holding the pipes does not hold meshctl
	found := make(chan string, 1)
	var stderr lockedBuffer
	cmd.Stdout = &lineWatcher{re: forwardingRE, found: found}
	cmd.Stderr = &stderr
	what := fmt.Sprintf("%s %s", g.kubectl, strings.Join(args, " "))
	if err := cmd.Start(); err != nil {
		cancel()
		return "", withCode(exitUnreachable, fmt.Errorf("%s: %w — meshctl reaches pods through kubectl; install it or pass --kubectl", what, err))
	}
	exited := make(chan struct{})
	go func() {
		defer close(exited)
		_ = cmd.Wait()
	}()
	g.atEnd(func() {
		cancel()
		<-exited
	})
	select {
	case local := <-found:
		return net.JoinHostPort("127.0.0.1", local), nil
	case <-exited:
		return "", withCode(exitUnreachable, fmt.Errorf("%s failed: %s — check the pod and namespace (pod/<name>.<namespace>) and your kubeconfig",
			what, strings.TrimSpace(stderr.String())))
	case <-time.After(forwardTimeout):
		return "", withCode(exitUnreachable, fmt.Errorf("%s: no local port within %s: %s", what, forwardTimeout, strings.TrimSpace(stderr.String())))
	case <-parent.Done():
		return "", withCode(exitError, errors.New("interrupted"))
	}
}

// lineWatcher sends the first submatch of re found in the lines written to it.
type lineWatcher struct {
	re    *regexp.Regexp
	found chan<- string
	line  []byte
	sent  bool
}

func (w *lineWatcher) Write(p []byte) (int, error) {
	for _, b := range p {
		if b != '\n' {
			if len(w.line) < 4096 {
				w.line = append(w.line, b)
			}
			continue
		}
		if m := w.re.FindSubmatch(w.line); m != nil && !w.sent {
			w.found <- string(m[1])
			w.sent = true
		}
		w.line = w.line[:0]
	}
	return len(p), nil
}

// lockedBuffer is a bytes.Buffer safe for a writer goroutine and a reader.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
