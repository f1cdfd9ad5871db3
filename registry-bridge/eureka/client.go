package eureka

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"time"
)

// Reasons a fetch fails, the keys of Stats.Failures.
const (
	FailureUnreachable = "unreachable"
	FailureTimeout     = "timeout"
	FailureHTTPStatus  = "http status"
	FailureBadJSON     = "bad json"
	FailureTooLarge    = "response too large"
)

// client reads Eureka's REST API (the v2 API under /eureka in Spring Cloud's server). It is
// ours rather than github.com/hudl/fargo's: fargo has no delta fetch and no hash check, logs
// through a package-level logger, and decodes answers of any HTTP status.
type client struct {
	http     *http.Client
	owned    bool // http is ours: its idle connections are closed when Run ends
	timeout  time.Duration
	maxBytes int64
}

// fetchError is a failed fetch, with what to do about it.
type fetchError struct {
	URL    string // the request URL, password redacted
	Reason string // one of the Failure constants
	Status int    // the HTTP status when Reason is FailureHTTPStatus
	Fix    string
	Err    error
}

func (e *fetchError) Error() string { return fmt.Sprintf("GET %s: %v", e.URL, e.Err) }
func (e *fetchError) Unwrap() error { return e.Err }

// get fetches base+path as JSON and returns the body, at most maxBytes of it.
func (c *client) get(ctx context.Context, base *url.URL, path string) ([]byte, error) {
	u := base.JoinPath(path)
	shown := u.Redacted()
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return nil, &fetchError{URL: shown, Reason: FailureUnreachable, Err: err,
			Fix: "check Config.URLs"}
	}
	req.Header.Set("Accept", "application/json")
	resp, err := c.http.Do(req)
	if err != nil {
		return nil, c.transportError(shown, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		snippet, _ := io.ReadAll(io.LimitReader(resp.Body, 256))
		return nil, &fetchError{URL: shown, Reason: FailureHTTPStatus, Status: resp.StatusCode, Fix: statusFix(resp.StatusCode, base),
			Err: fmt.Errorf("status %s: %q", resp.Status, strings.TrimSpace(string(snippet)))}
	}
	if resp.ContentLength > c.maxBytes {
		return nil, c.tooLarge(shown)
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, c.maxBytes+1))
	if err != nil {
		return nil, c.transportError(shown, fmt.Errorf("read body: %w", err))
	}
	if int64(len(body)) > c.maxBytes {
		return nil, c.tooLarge(shown)
	}
	return body, nil
}

func (c *client) tooLarge(shown string) error {
	return &fetchError{URL: shown, Reason: FailureTooLarge,
		Err: fmt.Errorf("answer is larger than %d bytes", c.maxBytes),
		Fix: "raise Config.MaxResponseBytes (meshturbo-xds: sources[].eureka.maxResponseBytes) if the registry is really this large; otherwise check what answers at this URL"}
}

func (c *client) transportError(shown string, err error) error {
	if ue, ok := errors.AsType[*url.Error](err); ok {
		err = ue.Err // fetchError names the method and URL already
	}
	var ne net.Error
	if errors.Is(err, context.DeadlineExceeded) || (errors.As(err, &ne) && ne.Timeout()) {
		return &fetchError{URL: shown, Reason: FailureTimeout, Err: err,
			Fix: fmt.Sprintf("Eureka did not answer within %v: check its load and the network, or raise Config.RequestTimeout (meshturbo-xds: sources[].eureka.requestTimeout)", c.timeout)}
	}
	return &fetchError{URL: shown, Reason: FailureUnreachable, Err: err,
		Fix: "start Eureka or fix Config.URLs; each must be Eureka's REST base, e.g. http://eureka:8761/eureka"}
}

func statusFix(code int, base *url.URL) string {
	switch {
	case code == http.StatusNotFound:
		return fmt.Sprintf("%s is not Eureka's REST base: it must be the URL that /apps hangs off (Spring Cloud: http://host:8761/eureka)", base.Redacted())
	case code == http.StatusForbidden:
		return "a Eureka node that found no peers at start refuses registry reads for eureka.server.wait-time-in-ms-when-sync-empty (5 min by default); wait, or fix peer replication"
	case code == http.StatusUnauthorized:
		return "Eureka wants credentials: put them in the URL (http://user:password@host:8761/eureka)"
	case code >= 500:
		return "Eureka failed to answer: see the Eureka server's log"
	default:
		return "check that the URL points at Eureka's REST API"
	}
}

// closeIdle drops idle connections of a client the watcher made itself.
func (c *client) closeIdle() {
	if c.owned {
		c.http.CloseIdleConnections()
	}
}
