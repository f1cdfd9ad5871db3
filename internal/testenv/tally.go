package testenv

import (
	"fmt"
	"io"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// Tally counts the requests a load generator sent that succeeded and failed, and keeps the
// first errors with the time they happened. Safe for concurrent use.
type Tally struct {
	ok, failed atomic.Int64
	mu         sync.Mutex
	errs       []string
}

// maxTallyErrors is how many errors a Tally keeps.
const maxTallyErrors = 10

// Record counts one request: ok when err is nil, failed (and kept, up to a few) otherwise.
func (t *Tally) Record(err error) {
	if err == nil {
		t.ok.Add(1)
		return
	}
	t.failed.Add(1)
	t.mu.Lock()
	defer t.mu.Unlock()
	if len(t.errs) < maxTallyErrors {
		t.errs = append(t.errs, time.Now().Format("15:04:05.000 ")+err.Error())
	}
}

// Counts returns how many requests succeeded and failed so far.
func (t *Tally) Counts() (ok, failed int64) { return t.ok.Load(), t.failed.Load() }

// Errors returns the first errors recorded.
func (t *Tally) Errors() []string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return slices.Clone(t.errs)
}

// PostOK POSTs body to url and reads the whole answer; anything but a 200 is an error.
func PostOK(c *http.Client, url string, body io.Reader) error {
	resp, err := c.Post(url, "text/plain", body)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if _, err := io.Copy(io.Discard, resp.Body); err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("status %d", resp.StatusCode)
	}
	return nil
}
