package testenv

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
)

// DialProbe is a readiness probe that succeeds once addr accepts a TCP connection.
func DialProbe(addr string) func(ctx context.Context) error {
	return func(ctx context.Context) error {
		var d net.Dialer
		conn, err := d.DialContext(ctx, "tcp", addr)
		if err != nil {
			return err
		}
		return conn.Close()
	}
}

// HTTPProbe is a readiness probe: GET url with the given headers (pairs of name, value), read
// the body, and let check decide. A nil check wants status 200.
func HTTPProbe(url string, check func(status int, body []byte) error, header ...string) func(ctx context.Context) error {
	if len(header)%2 != 0 {
		panic("testenv.HTTPProbe: header must be name, value pairs")
	}
	if check == nil {
		check = func(status int, body []byte) error {
			if status != http.StatusOK {
				return fmt.Errorf("status %d: %.200s", status, body)
			}
			return nil
		}
	}
	return func(ctx context.Context) error {
		status, body, err := httpGet(ctx, url, header...)
		if err != nil {
			return err
		}
		if err := check(status, body); err != nil {
			return fmt.Errorf("GET %s: %w", url, err)
		}
		return nil
	}
}

// httpGet does one GET without keep-alive, so that probes leave no idle connections behind.
func httpGet(ctx context.Context, url string, header ...string) (int, []byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return 0, nil, err
	}
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	req.Close = true
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20)) // an Envoy config_dump is MBs
	if err != nil {
		return 0, nil, fmt.Errorf("GET %s: read body: %w", url, err)
	}
	return resp.StatusCode, body, nil
}

// AdminGet returns the body of GET http://<addr><path> from an admin API (Envoy's or a
// daemon's); a status other than 2xx is an error naming the URL and the answer.
func AdminGet(ctx context.Context, addr, path string) (string, error) {
	url := "http://" + addr + path
	code, body, err := httpGet(ctx, url)
	if err != nil {
		return "", err
	}
	if code < 200 || code > 299 {
		return "", fmt.Errorf("GET %s: HTTP %d: %.200s", url, code, body)
	}
	return string(body), nil
}
