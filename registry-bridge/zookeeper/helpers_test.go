package zookeeper

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"path"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-zookeeper/zk"

	"github.com/meshturbo/meshturbo/internal/testenv"
	"github.com/meshturbo/meshturbo/model"
)

// recorder keeps every snapshot a watcher publishes.
type recorder struct {
	mu      sync.Mutex
	snaps   [][]model.Service
	changed chan struct{}
}

func newRecorder() *recorder { return &recorder{changed: make(chan struct{}, 1)} }

func (r *recorder) publish(s []model.Service) {
	r.mu.Lock()
	r.snaps = append(r.snaps, s)
	r.mu.Unlock()
	select {
	case r.changed <- struct{}{}:
	default:
	}
}

func (r *recorder) all() [][]model.Service {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.snaps)
}

func (r *recorder) count() int { return len(r.all()) }

// wait returns the first snapshot, the latest published or a later one, for which check
// returns nil; the test fails if none comes within timeout.
func (r *recorder) wait(t *testing.T, timeout time.Duration, check func([]model.Service) error) []model.Service {
	t.Helper()
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	lastErr := errors.New("nothing published")
	for {
		if all := r.all(); len(all) > 0 {
			snap := all[len(all)-1]
			if lastErr = check(snap); lastErr == nil {
				return snap
			}
		}
		select {
		case <-r.changed:
		case <-deadline.C:
			t.Fatalf("no matching snapshot within %v: %v", timeout, lastErr)
		}
	}
}

// summary describes a snapshot as host → "address:port protocol weight" per endpoint, sorted.
func summary(snap []model.Service) map[string][]string {
	out := map[string][]string{}
	for _, s := range snap {
		var eps []string
		for _, e := range s.Endpoints {
			for name, port := range e.Ports {
				proto := ""
				for _, p := range s.Ports {
					if p.Name == name {
						proto = string(p.Protocol)
					}
				}
				eps = append(eps, fmt.Sprintf("%s:%d %s w%d", e.Address, port, proto, e.Weight))
			}
		}
		slices.Sort(eps)
		out[s.Hostname] = eps
	}
	return out
}

// want returns a check that the snapshot's summary is exactly w.
func want(w map[string][]string) func([]model.Service) error {
	return func(snap []model.Service) error {
		got := summary(snap)
		if fmt.Sprint(got) != fmt.Sprint(w) {
			return fmt.Errorf("snapshot\n  %v\nwant\n  %v", got, w)
		}
		return nil
	}
}

// logRecord is one captured log line.
type logRecord struct {
	level slog.Level
	msg   string
	attrs map[string]string
}

// logCapture keeps what a watcher logs, and passes it on to the test log.
type logCapture struct {
	mu      sync.Mutex
	recs    []logRecord
	changed chan struct{}
}

type captureHandler struct {
	next  slog.Handler
	c     *logCapture
	attrs []slog.Attr
}

func (h *captureHandler) Enabled(ctx context.Context, l slog.Level) bool {
	return h.next.Enabled(ctx, l)
}

func (h *captureHandler) Handle(ctx context.Context, r slog.Record) error {
	rec := logRecord{level: r.Level, msg: r.Message, attrs: map[string]string{}}
	for _, a := range h.attrs {
		rec.attrs[a.Key] = a.Value.String()
	}
	r.Attrs(func(a slog.Attr) bool {
		rec.attrs[a.Key] = a.Value.String()
		return true
	})
	h.c.mu.Lock()
	h.c.recs = append(h.c.recs, rec)
	h.c.mu.Unlock()
	select {
	case h.c.changed <- struct{}{}:
	default:
	}
	return h.next.Handle(ctx, r)
}

func (h *captureHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return &captureHandler{next: h.next.WithAttrs(as), c: h.c, attrs: append(slices.Clone(h.attrs), as...)}
}

func (h *captureHandler) WithGroup(name string) slog.Handler {
	return &captureHandler{next: h.next.WithGroup(name), c: h.c, attrs: h.attrs}
}

func newLogCapture(t *testing.T) (*logCapture, *slog.Logger) {
	c := &logCapture{changed: make(chan struct{}, 1)}
	return c, slog.New(&captureHandler{next: testenv.Logger(t).Handler(), c: c})
}

func (c *logCapture) find(match func(logRecord) bool) (logRecord, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, r := range c.recs {
		if match(r) {
			return r, true
		}
	}
	return logRecord{}, false
}

// wait returns the first record that matches, failing the test after timeout.
func (c *logCapture) wait(t *testing.T, timeout time.Duration, what string, match func(logRecord) bool) logRecord {
	t.Helper()
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		if r, ok := c.find(match); ok {
			return r
		}
		select {
		case <-c.changed:
		case <-deadline.C:
			t.Fatalf("no log record %s within %v", what, timeout)
		}
	}
}

func msgIs(level slog.Level, prefix string) func(logRecord) bool {
	return func(r logRecord) bool { return r.level == level && strings.HasPrefix(r.msg, prefix) }
}

// startWatcher runs a watcher until the test ends.
func startWatcher(t *testing.T, cfg Config) (*Watcher, *recorder, *logCapture) {
	t.Helper()
	logs, logger := newLogCapture(t)
	cfg.Logger = logger
	if cfg.SessionTimeout == 0 {
		cfg.SessionTimeout = 4 * time.Second
	}
	w, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	rec := newRecorder()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx, rec.publish) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run returned %v", err)
			}
		case <-time.After(15 * time.Second):
			t.Error("Run did not return within 15s of its context ending")
		}
	})
	return w, rec, logs
}

// dial opens an admin session to ZooKeeper for the test to change the registry with.
func dial(t *testing.T, addr string) *zk.Conn {
	t.Helper()
	conn, events, err := zk.Connect([]string{addr}, 10*time.Second, zk.WithLogger(&zkLogger{log: testenv.Logger(t)}))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		conn.Close()
		for range events {
		}
	})
	deadline := time.After(15 * time.Second)
	for {
		select {
		case ev := <-events:
			if ev.State == zk.StateHasSession {
				return conn
			}
		case <-deadline:
			t.Fatalf("no ZooKeeper session at %s within 15s", addr)
		}
	}
}

// create makes a persistent znode with its missing parents.
func create(t *testing.T, c *zk.Conn, p string, data []byte) {
	t.Helper()
	mkParents(t, c, path.Dir(p))
	if _, err := c.Create(p, data, 0, zk.WorldACL(zk.PermAll)); err != nil {
		t.Fatalf("create %s: %v", p, err)
	}
}

func mkParents(t *testing.T, c *zk.Conn, dir string) {
	t.Helper()
	if dir == "/" {
		return
	}
	mkParents(t, c, path.Dir(dir))
	if _, err := c.Create(dir, nil, 0, zk.WorldACL(zk.PermAll)); err != nil && !errors.Is(err, zk.ErrNodeExists) {
		t.Fatalf("create %s: %v", dir, err)
	}
}

func remove(t *testing.T, c *zk.Conn, p string) {
	t.Helper()
	if err := c.Delete(p, -1); err != nil {
		t.Fatalf("delete %s: %v", p, err)
	}
}

// providerPath is where Dubbo registers a provider URL.
func providerPath(iface, providerURL string) string {
	return "/dubbo/" + iface + "/providers/" + url.QueryEscape(providerURL)
}
