package eureka

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/meshturbo/meshturbo/internal/testenv"
	"github.com/meshturbo/meshturbo/model"
)

// Faults the real Eureka will not produce on demand, injected by faultProxy.
const (
	faultNone    = ""
	fault5xx     = "5xx"     // 503 with an error page
	faultGarbage = "garbage" // 200 with truncated JSON
	faultSlow    = "slow"    // no answer until the client gives up
	faultDrop    = "drop"    // the connection is closed without an answer
	faultHuge    = "huge"    // 200 with an answer over testMaxBytes, its Content-Length given
	faultPhantom = "phantom" // deltas carry an instance the registry does not have
	faultNoDelta = "nodelta" // 403 to deltas only, as with eureka.server.disable-delta
	phantomApp   = "PHANTOM" // the app of that instance
	phantomHost  = "phantom." + DefaultDomain
)

// faultProxy is a reverse proxy in front of the real Eureka that injects one fault at a time.
type faultProxy struct {
	srv      *httptest.Server
	upstream *url.URL
	rp       *httputil.ReverseProxy
	client   *http.Client
	stop     chan struct{}

	mu    sync.Mutex
	fault string
}

func newFaultProxy(t *testing.T, eurekaURL string) *faultProxy {
	u, err := url.Parse(eurekaURL)
	if err != nil {
		t.Fatal(err)
	}
	upstream := &url.URL{Scheme: u.Scheme, Host: u.Host}
	tr := http.DefaultTransport.(*http.Transport).Clone()
	p := &faultProxy{
		upstream: upstream,
		rp:       &httputil.ReverseProxy{Rewrite: func(r *httputil.ProxyRequest) { r.SetURL(upstream) }, Transport: tr},
		client:   &http.Client{Transport: tr},
		stop:     make(chan struct{}),
	}
	p.srv = httptest.NewServer(http.HandlerFunc(p.serve))
	t.Cleanup(func() {
		close(p.stop)
		p.srv.Close()
		tr.CloseIdleConnections()
	})
	return p
}

// URL is the Eureka base URL through the proxy.
func (p *faultProxy) URL() string { return p.srv.URL + "/eureka" }

func (p *faultProxy) set(fault string) {
	p.mu.Lock()
	p.fault = fault
	p.mu.Unlock()
}

func (p *faultProxy) serve(w http.ResponseWriter, r *http.Request) {
	p.mu.Lock()
	fault := p.fault
	p.mu.Unlock()
	switch fault {
	case fault5xx:
		http.Error(w, "injected: eureka is overloaded", http.StatusServiceUnavailable)
	case faultGarbage:
		w.Header().Set("Content-Type", "application/json")
		_, _ = io.WriteString(w, `{"applications":{"versions__delta":"1","application":[{"name":"ORD`)
	case faultSlow:
		select {
		case <-r.Context().Done():
		case <-p.stop:
		}
	case faultDrop:
		conn, _, err := http.NewResponseController(w).Hijack()
		if err == nil {
			conn.Close()
		}
	case faultHuge:
		w.Header().Set("Content-Length", fmt.Sprint(hugeSize))
		writeHuge(w)
	case faultNoDelta:
		if strings.HasSuffix(r.URL.Path, "/apps/delta") {
			http.Error(w, "", http.StatusForbidden)
			return
		}
		p.rp.ServeHTTP(w, r)
	case faultPhantom:
		if !strings.HasSuffix(r.URL.Path, "/apps/delta") {
			p.rp.ServeHTTP(w, r)
			return
		}
		p.servePhantomDelta(w, r)
	default:
		p.rp.ServeHTTP(w, r)
	}
}

// testMaxBytes is the answer limit of the watchers that meet faultHuge: the default is large
// enough for 100,000 instances, too large to write quickly in every test.
const testMaxBytes = 16 << 20

// hugeSize is the size of writeHuge's answer: 1 MiB over testMaxBytes.
const hugeSize = testMaxBytes + 1<<20

// writeHuge writes a syntactically valid Eureka answer of hugeSize bytes, or until the client
// goes away.
func writeHuge(w http.ResponseWriter) {
	w.Header().Set("Content-Type", "application/json")
	head, tail := `{"applications":{"apps__hashcode":"`, `"}}`
	if _, err := io.WriteString(w, head); err != nil {
		return
	}
	chunk := bytes.Repeat([]byte{'A'}, 1<<20)
	for left := hugeSize - len(head) - len(tail); left > 0; left -= len(chunk) {
		if _, err := w.Write(chunk[:min(left, len(chunk))]); err != nil {
			return
		}
	}
	_, _ = io.WriteString(w, tail)
}

// servePhantomDelta answers the real delta with one more instance in it: applying it makes
// the registry's hash differ from the server's, as when a delta is lost or garbled.
func (p *faultProxy) servePhantomDelta(w http.ResponseWriter, r *http.Request) {
	req, err := http.NewRequestWithContext(r.Context(), http.MethodGet, p.upstream.JoinPath(r.URL.Path).String(), nil)
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	req.Header.Set("Accept", "application/json")
	resp, err := p.client.Do(req)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadGateway)
		return
	}
	defer resp.Body.Close()
	var doc map[string]map[string]any
	if err := json.NewDecoder(resp.Body).Decode(&doc); err != nil || doc["applications"] == nil {
		http.Error(w, fmt.Sprintf("decode upstream delta: %v", err), http.StatusBadGateway)
		return
	}
	apps, _ := doc["applications"]["application"].([]any)
	doc["applications"]["application"] = append(apps, map[string]any{
		"name": phantomApp,
		"instance": []any{map[string]any{
			"instanceId": "ghost", "app": phantomApp, "ipAddr": "10.9.9.9", "status": "UP",
			"port": map[string]any{"$": 80, "@enabled": "true"}, "actionType": "ADDED",
		}},
	})
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(doc)
}

func TestFailsOverToTheNextURL(t *testing.T) {
	eureka := testenv.StartEureka(t)
	newEurekaAPI(t, eureka.URL).register(reg{app: "ORDERS", id: "o1", ip: "10.0.0.1", port: 8080})
	dead := fmt.Sprintf("http://%s/eureka", testenv.Addr(testenv.FreePort(t)))
	w, snaps := runWatcher(t, Config{URLs: []string{dead, eureka.URL}})
	snaps.Await(t, 10*time.Second, "orders through the second URL", hasEndpoints("orders.eureka", "o1"))
	if st := w.Stats(); st.URL != eureka.URL || st.Failures[FailureUnreachable] != 1 || st.Stale {
		t.Errorf("stats = %+v, want one failure on %s and then %s in use", st, dead, eureka.URL)
	}
}

// TestRecoversFromFaults puts each fault between the watcher and the real Eureka, changes the
// registry meanwhile, and checks that the watcher publishes nothing during the fault and the
// change within 5 s after it.
func TestRecoversFromFaults(t *testing.T) {
	eureka := testenv.StartEureka(t)
	api := newEurekaAPI(t, eureka.URL)
	proxy := newFaultProxy(t, eureka.URL)
	api.register(reg{app: "ORDERS", id: "o1", ip: "10.0.0.1", port: 8080})

	w, snaps := runWatcher(t, Config{URLs: []string{proxy.URL()}, RequestTimeout: time.Second, MaxResponseBytes: testMaxBytes})
	ids := []string{"o1"}
	snaps.Await(t, 10*time.Second, "orders", hasEndpoints("orders.eureka", ids...))

	for i, tc := range []struct{ fault, reason string }{
		{fault5xx, FailureHTTPStatus},
		{faultGarbage, FailureBadJSON},
		{faultSlow, FailureTimeout},
		{faultDrop, FailureUnreachable},
		{faultHuge, FailureTooLarge},
	} {
		t.Run(tc.fault, func(t *testing.T) {
			before := w.Stats().Failures[tc.reason]
			proxy.set(tc.fault)
			defer proxy.set(faultNone)
			// From the first failure on, every fetch meets the fault (they run one at a time).
			awaitStats(t, w, 10*time.Second, "a failed fetch", func(s Stats) bool { return s.Failures[tc.reason] > before })
			n := snaps.Count()

			id := fmt.Sprintf("f%d", i)
			api.register(reg{app: "ORDERS", id: id, ip: fmt.Sprintf("10.0.1.%d", i+1), port: 8080})
			ids = append(ids, id)
			awaitStats(t, w, 10*time.Second, "two more failed fetches", func(s Stats) bool {
				return s.Failures[tc.reason] >= before+3 && s.Stale
			})
			if got := snaps.Count(); got != n {
				t.Fatalf("published %d snapshots during the fault; last: %+v", got-n, snaps.Last())
			}

			proxy.set(faultNone)
			snaps.Await(t, 5*time.Second, "the change made during the fault, after it", hasEndpoints("orders.eureka", ids...))
			if st := w.Stats(); st.Stale {
				t.Errorf("stale after recovery: %+v", st)
			}
		})
	}

	t.Run("hash mismatch", func(t *testing.T) {
		before := w.Stats()
		proxy.set(faultPhantom)
		defer proxy.set(faultNone)
		api.register(reg{app: "ORDERS", id: "h1", ip: "10.0.2.1", port: 8080})
		ids = append(ids, "h1")
		// Each mismatching delta is discarded and the registry fetched whole, so changes
		// still arrive, and the phantom never does.
		awaitStats(t, w, 10*time.Second, "mismatches, each followed by a full fetch", func(s Stats) bool {
			return s.HashMismatches >= before.HashMismatches+3 && s.FullFetches >= before.FullFetches+3
		})
		snaps.Await(t, 5*time.Second, "the change, through full fetches", hasEndpoints("orders.eureka", ids...))

		proxy.set(faultNone)
		first := awaitStats(t, w, 5*time.Second, "a delta that checks out", func(s Stats) bool { return s.DeltaFetches > before.DeltaFetches })
		st := awaitStats(t, w, 5*time.Second, "three more deltas", func(s Stats) bool { return s.DeltaFetches >= first.DeltaFetches+3 })
		if st.FullFetches != first.FullFetches || st.HashMismatches != first.HashMismatches {
			t.Errorf("after the fault: full fetches %d→%d, mismatches %d→%d; want deltas only",
				first.FullFetches, st.FullFetches, first.HashMismatches, st.HashMismatches)
		}
		for _, s := range snaps.All() {
			if find(s, phantomHost) != nil {
				t.Fatalf("the phantom instance of a mismatching delta was published: %+v", s)
			}
		}
	})

	// Last, as the watcher then stays on full fetches for ResyncInterval.
	t.Run("deltas refused", func(t *testing.T) {
		before := w.Stats()
		proxy.set(faultNoDelta)
		defer proxy.set(faultNone)
		api.register(reg{app: "ORDERS", id: "n1", ip: "10.0.2.2", port: 8080})
		ids = append(ids, "n1")
		snaps.Await(t, 5*time.Second, "the change, through full fetches", hasEndpoints("orders.eureka", ids...))
		st := awaitStats(t, w, 5*time.Second, "full fetches on every poll", func(s Stats) bool { return s.FullFetches >= before.FullFetches+3 })
		if !maps.Equal(st.Failures, before.Failures) || st.Stale {
			t.Errorf("stats = %+v; a server that refuses deltas is no failure", st)
		}
	})

	// The registry is what the watcher says: compare with a fresh full fetch.
	want, _ := fullFetch(t, eureka.URL)
	if got := snaps.Last(); !equalServices(got, want) {
		t.Errorf("final snapshot differs from Eureka:\n got %+v\nwant %+v", got, want)
	}
}

// fullFetch maps the whole registry as a fresh watcher would.
func fullFetch(t *testing.T, base string) ([]model.Service, []model.Skipped) {
	t.Helper()
	u, err := url.Parse(base)
	if err != nil {
		t.Fatal(err)
	}
	tr := http.DefaultTransport.(*http.Transport).Clone()
	defer tr.CloseIdleConnections()
	c := &client{http: &http.Client{Transport: tr}, timeout: 10 * time.Second, maxBytes: DefaultMaxResponseBytes}
	body, err := c.get(t.Context(), u, "apps")
	if err != nil {
		t.Fatal(err)
	}
	doc, err := decodeApps(body)
	if err != nil {
		t.Fatal(err)
	}
	return newRegistry(doc).services(mapping{domain: DefaultDomain, meshedMetaKey: DefaultMeshedMetaKey})
}

// TestRejectsOversizedAnswers serves an answer over the limit without a Content-Length, so the
// watcher must count what it reads. No Eureka is needed to produce the fault.
func TestRejectsOversizedAnswers(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { writeHuge(w) }))
	t.Cleanup(srv.Close)
	w, snaps := runWatcher(t, Config{URLs: []string{srv.URL + "/eureka"}, MaxResponseBytes: testMaxBytes})
	st := awaitStats(t, w, 30*time.Second, "two rejected answers", func(s Stats) bool { return s.Failures[FailureTooLarge] >= 2 })
	if !st.Stale || st.FullFetches != 0 || len(st.Failures) != 1 {
		t.Errorf("stats = %+v, want only oversized answers, and stale", st)
	}
	if n := snaps.Count(); n != 0 {
		t.Errorf("published %d snapshots from oversized answers", n)
	}
}
