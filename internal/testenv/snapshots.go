package testenv

import (
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/meshturbo/meshturbo/model"
)

// Snapshots records what a registry watcher publishes: pass its Publish to Watcher.Run.
type Snapshots struct {
	mu  sync.Mutex
	all [][]model.Service
	ch  chan struct{}
}

// NewSnapshots returns an empty recorder.
func NewSnapshots() *Snapshots { return &Snapshots{ch: make(chan struct{}, 1)} }

// Publish records one snapshot.
func (s *Snapshots) Publish(svcs []model.Service) {
	s.mu.Lock()
	s.all = append(s.all, svcs)
	s.mu.Unlock()
	select {
	case s.ch <- struct{}{}:
	default:
	}
}

// Count is how many snapshots were published.
func (s *Snapshots) Count() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.all)
}

// All returns every snapshot published so far, oldest first.
func (s *Snapshots) All() [][]model.Service {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.all)
}

// Last returns the latest snapshot, or nil.
func (s *Snapshots) Last() []model.Service {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.all) == 0 {
		return nil
	}
	return s.all[len(s.all)-1]
}

// Await waits up to within for the latest snapshot to satisfy ok, and returns it. On
// timeout the test fails with what was awaited and a summary of the last snapshot.
func (s *Snapshots) Await(t testing.TB, within time.Duration, what string, ok func([]model.Service) bool) []model.Service {
	t.Helper()
	deadline := time.NewTimer(within)
	defer deadline.Stop()
	for {
		if last := s.Last(); last != nil && ok(last) {
			return last
		}
		select {
		case <-s.ch:
		case <-deadline.C:
			var hosts []string
			for _, svc := range s.Last() {
				hosts = append(hosts, fmt.Sprintf("%s(%d endpoints)", svc.Hostname, len(svc.Endpoints)))
			}
			t.Fatalf("%s: not published within %v; last snapshot: %v", what, within, hosts)
		}
	}
}
