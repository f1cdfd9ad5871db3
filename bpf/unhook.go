package bpf

import (
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/ringbuf"
)

// A sweeper runs the unhook iterator (unhook.c) over the sockhash whenever a pair was
// demoted (streaming small writes, a blocking end, a send that missed its peer): redir.c
// writes an event into mt_events, which wakes it. While some sockets of demoted pairs had
// to stay (grace period, a send or read in progress, redirected bytes not read yet) it
// sweeps again every sweepRetry for the first second without progress, then backing off to
// maxSweepBackoff. Otherwise it sleeps: no timer runs on the node while nothing is demoted
// (a 5 ms poll of the counters, as before, cost unrelated streams on this 2-vCPU machine
// about a tenth of their rate).
type sweeper struct {
	iter   *link.Iter
	events *ringbuf.Reader
	base   time.Duration

	stop chan struct{}
	done chan struct{}

	mu        sync.Mutex
	deferred  int
	lastError string
}

const (
	sweepRetry      = 10 * time.Millisecond
	maxSweepBackoff = time.Second
	fastSweeps      = time.Second
)

func (a *Agent) startSweeper() {
	if a.unhook.MtUnhook == nil {
		return
	}
	it, err := link.AttachIter(link.IterOptions{Program: a.unhook.MtUnhook, Map: a.sockops.MtSockhash})
	if err != nil {
		a.state.Unhook.Off = fmt.Sprintf("attach the sockhash iterator: %v", err)
		return
	}
	rd, err := ringbuf.NewReader(a.sockops.MtEvents)
	if err != nil {
		it.Close()
		a.state.Unhook.Off = fmt.Sprintf("read demotion events (mt_events): %v", err)
		return
	}
	a.state.Unhook.On = true
	s := &sweeper{iter: it, events: rd, base: sweepRetry, stop: make(chan struct{}), done: make(chan struct{})}
	a.sweeper = s
	go s.run()
}

func (a *Agent) stopSweeper() {
	if a.sweeper == nil {
		return
	}
	close(a.sweeper.stop)
	a.sweeper.events.Close() // ends the event reader of run
	<-a.sweeper.done
	a.sweeper.iter.Close()
	a.sweeper = nil
}

func (s *sweeper) run() {
	defer close(s.done)
	wake := make(chan struct{}, 1)
	var wg sync.WaitGroup
	defer wg.Wait()
	wg.Add(1)
	go func() { // ends when stopSweeper closes the reader
		defer wg.Done()
		for {
			if _, err := s.events.Read(); err != nil {
				return
			}
			select {
			case wake <- struct{}{}:
			default: // a sweep is due anyway
			}
		}
	}()
	// One sweep at start: an adopted sockhash may hold demoted sockets already.
	retry := time.NewTimer(0)
	defer retry.Stop()
	backoff, progress, deferred := s.base, time.Now(), 0
	for {
		select {
		case <-s.stop:
			return
		case <-wake:
			backoff, progress = s.base, time.Now()
		case <-retry.C:
			if time.Since(progress) > fastSweeps {
				backoff = min(2*backoff, maxSweepBackoff)
			}
		}
		n, err := s.sweep()
		if err == nil {
			if n < deferred {
				backoff, progress = s.base, time.Now() // keep looking closely
			}
			deferred = n
		}
		s.setResult(deferred, err)
		retry.Stop()
		if deferred > 0 || err != nil {
			retry.Reset(backoff)
		}
	}
}

// sweep runs the iterator once and returns how many sockets it left in place.
func (s *sweeper) sweep() (int, error) {
	rd, err := s.iter.Open()
	if err != nil {
		return 0, fmt.Errorf("bpf: unhook: open iterator: %w", err)
	}
	defer rd.Close()
	n, err := io.Copy(io.Discard, rd)
	if err != nil {
		return 0, fmt.Errorf("bpf: unhook: run iterator: %w", err)
	}
	return int(n), nil
}

func (s *sweeper) setResult(deferred int, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.deferred = deferred
	if err != nil {
		s.lastError = err.Error()
	}
}

func (s *sweeper) status(u UnhookState) UnhookState {
	s.mu.Lock()
	defer s.mu.Unlock()
	u.Deferred, u.LastError = s.deferred, s.lastError
	return u
}
