package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"syscall"
	"time"

	"github.com/meshturbo/meshturbo/internal/admin"
)

// daemon is a meshturbo daemon meshctl talks to, and how its address is set.
type daemon struct {
	short       string // xds, upgrade, agent
	name        string // meshturbo-xds
	flag        string // --xds-admin
	env         string // MESHTURBO_XDS_ADMIN
	defaultAddr string // the daemon's own default -admin
	addr        string
}

// knownDaemons are the daemons in the order meshctl reports them. The defaults are the
// daemons' own -admin defaults.
func knownDaemons() []daemon {
	return []daemon{
		{short: "xds", name: "meshturbo-xds", flag: "xds-admin", env: "MESHTURBO_XDS_ADMIN", defaultAddr: "127.0.0.1:15051"},
		{short: "upgrade", name: "meshturbo-upgrade", flag: "upgrade-admin", env: "MESHTURBO_UPGRADE_ADMIN", defaultAddr: "127.0.0.1:15052"},
		{short: "agent", name: "meshturbo-agent", flag: "agent-admin", env: "MESHTURBO_AGENT_ADMIN", defaultAddr: "127.0.0.1:15055"},
	}
}

func (d daemon) defaultPort() string {
	_, port, _ := net.SplitHostPort(d.defaultAddr)
	return port
}

// unreachableError: the daemon's admin API did not answer at all.
type unreachableError struct {
	d   daemon
	err error
}

func (e *unreachableError) Error() string {
	return fmt.Sprintf("%s admin at %s: %s — is %s running there? set --%s or %s",
		e.d.name, e.d.addr, describeNetErr(e.err), e.d.name, e.d.flag, e.d.env)
}

func (e *unreachableError) Unwrap() error { return e.err }

// httpError: the daemon answered with a non-2xx status.
type httpError struct {
	d      daemon
	method string
	path   string
	code   int
	msg    string // the {"error": ...} of the body, or its text
	json   bool   // the body was a JSON error object (an answer of the API, not a missing route)
}

func (e *httpError) Error() string {
	s := fmt.Sprintf("%s admin at %s: %s %s: %d %s", e.d.name, e.d.addr, e.method, e.path, e.code, http.StatusText(e.code))
	if e.msg != "" {
		s += ": " + e.msg
	}
	switch {
	case e.code == http.StatusUnauthorized:
		s += " — pass the admin token with --token-file or MESHTURBO_TOKEN_FILE"
	case e.code == http.StatusNotFound && !e.json:
		s += fmt.Sprintf(" — is %s a %s? set --%s or %s", e.d.addr, e.d.name, e.d.flag, e.d.env)
	}
	return s
}

// describeNetErr says in a few words why a connection failed.
func describeNetErr(err error) string {
	var dnsErr *net.DNSError
	switch {
	case errors.Is(err, syscall.ECONNREFUSED):
		return "connection refused"
	case errors.Is(err, fs.ErrNotExist), errors.Is(err, syscall.ENOENT):
		return "no such socket"
	case errors.Is(err, fs.ErrPermission), errors.Is(err, syscall.EACCES):
		return "permission denied on the socket (run as its owner or group)"
	case errors.As(err, &dnsErr):
		return fmt.Sprintf("host %q not found", dnsErr.Name)
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, os.ErrDeadlineExceeded):
		return "no answer in time"
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return "no answer in time"
	}
	var ue *url.Error
	if errors.As(err, &ue) {
		return ue.Err.Error()
	}
	return err.Error()
}

// client talks to one daemon's admin API.
type client struct {
	d       daemon
	base    string
	http    *http.Client
	token   string
	timeout time.Duration
}

// client returns a client for the daemon with short name, or for addr when it is set. An
// address pod/NAME[.NAMESPACE][:PORT] is reached through kubectl port-forward.
func (g *globals) client(ctx context.Context, short, addr string) (*client, error) {
	d := *g.daemons[short]
	if addr != "" {
		d.addr = addr
	}
	token, err := g.token()
	if err != nil {
		return nil, err
	}
	target := d.addr
	if pod, ns, port, ok := podTarget(d.addr, d.defaultPort()); ok {
		if target, err = g.portForward(ctx, d, pod, ns, port); err != nil {
			return nil, err
		}
	}
	base, dial, err := parseAddr(target, g.connectTimeout)
	if err != nil {
		return nil, usageErr("%s address %q (--%s): %v", d.name, d.addr, d.flag, err)
	}
	tr := &http.Transport{DialContext: dial, DisableKeepAlives: false, ResponseHeaderTimeout: 0, MaxIdleConnsPerHost: 4}
	return &client{d: d, base: base, http: &http.Client{Transport: tr}, token: token, timeout: g.timeout}, nil
}

func (g *globals) token() (string, error) {
	if g.tokenFile == "" {
		return "", nil
	}
	b, err := os.ReadFile(g.tokenFile)
	if err != nil {
		return "", usageErr("--token-file: %v", err)
	}
	t := strings.TrimSpace(string(b))
	if t == "" {
		return "", usageErr("--token-file %s is empty", g.tokenFile)
	}
	return t, nil
}

// parseAddr turns host:port, http(s)://host:port or unix:///path into a base URL and a dialer.
func parseAddr(addr string, connectTimeout time.Duration) (string, func(context.Context, string, string) (net.Conn, error), error) {
	dialer := &net.Dialer{Timeout: connectTimeout}
	if path, ok := admin.IsUnix(addr); ok {
		if path == "" {
			return "", nil, errors.New("want unix:///path/to/socket")
		}
		return "http://unix", func(ctx context.Context, _, _ string) (net.Conn, error) {
			return dialer.DialContext(ctx, "unix", path)
		}, nil
	}
	base := addr
	if !strings.Contains(addr, "://") {
		if _, _, err := net.SplitHostPort(addr); err != nil {
			return "", nil, fmt.Errorf("want host:port, http://host:port or unix:///path: %v", err)
		}
		base = "http://" + addr
	}
	u, err := url.Parse(base)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return "", nil, errors.New("want host:port, http://host:port or unix:///path")
	}
	return strings.TrimSuffix(u.String(), "/"), dialer.DialContext, nil
}

// do sends one request; with timeout 0 it may take as long as ctx allows.
func (c *client) do(ctx context.Context, method, path string, body []byte, timeout time.Duration) (int, []byte, error) {
	if timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, timeout)
		defer cancel()
	}
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, rd)
	if err != nil {
		return 0, nil, err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	req.Header.Set("Accept", "application/json")
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		if ctx.Err() != nil && errors.Is(context.Cause(ctx), context.Canceled) && !errors.Is(err, context.DeadlineExceeded) {
			return 0, nil, withCode(exitError, fmt.Errorf("%s %s: interrupted", method, path))
		}
		return 0, nil, &unreachableError{d: c.d, err: err}
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 256<<20))
	if err != nil {
		return 0, nil, &unreachableError{d: c.d, err: fmt.Errorf("reading the answer to %s %s: %w", method, path, err)}
	}
	return resp.StatusCode, b, nil
}

// get fetches path and returns the body of a 2xx answer; any other status is an *httpError.
func (c *client) get(ctx context.Context, path string) ([]byte, error) {
	code, body, err := c.do(ctx, http.MethodGet, path, nil, c.timeout)
	if err != nil {
		return nil, err
	}
	if code/100 != 2 {
		return nil, c.httpErr(http.MethodGet, path, code, body)
	}
	return body, nil
}

// getJSON fetches path and decodes it into v; the raw body is returned for -o json/yaml.
func (c *client) getJSON(ctx context.Context, path string, v any) (json.RawMessage, error) {
	body, err := c.get(ctx, path)
	if err != nil {
		return nil, err
	}
	if v != nil {
		if err := json.Unmarshal(body, v); err != nil {
			return nil, withCode(exitError, fmt.Errorf("%s admin at %s: GET %s: the answer is not what meshctl expects (%v); is meshctl as new as the daemon?",
				c.d.name, c.d.addr, path, err))
		}
	}
	return body, nil
}

func (c *client) httpErr(method, path string, code int, body []byte) *httpError {
	e := &httpError{d: c.d, method: method, path: path, code: code}
	var obj struct {
		Error string `json:"error"`
	}
	if json.Unmarshal(body, &obj) == nil && obj.Error != "" {
		e.msg, e.json = obj.Error, true
	} else {
		e.msg = strings.TrimSpace(string(body))
		if len(e.msg) > 200 {
			e.msg = e.msg[:200] + "…"
		}
	}
	return e
}

// isRouteMissing reports whether err is a 404 of a route the daemon does not serve at all
// (Go's mux answers "404 page not found" as text), as opposed to an API's own 404 answer.
func isRouteMissing(err error) bool {
	var he *httpError
	return errors.As(err, &he) && he.code == http.StatusNotFound && !he.json
}

func isNotFound(err error) bool {
	var he *httpError
	return errors.As(err, &he) && he.code == http.StatusNotFound
}
