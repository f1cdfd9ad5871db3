package bpf

import (
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/cilium/ebpf/link"
)

// A sweeper runs the unhook iterator (unhook.c) over the sockhash whenever more pairs were
// demoted (streaming small writes, or a send that missed its peer), and again while some
// sockets of demoted pairs had to stay (grace period, a send or read in progress, redirected
// bytes not read yet): every sweepRetry for the first second without progress, then
// backing off to maxSweepBackoff. Between demotions it only reads the counters.
type sweeper struct {
	iter *link.Iter
	poll time.Duration
	base time.Duration

	stop chan struct{}
	done chan struct{}

	mu        sync.Mutex
	deferred  int
	lastError string
}

const (
	sweepPoll       = 5 * time.Millisecond
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
	a.state.Unhook.On = true
	s := &sweeper{iter: it, poll: sweepPoll, base: sweepRetry,
		stop: make(chan struct{}), done: make(chan struct{})}
	a.sweeper = s
	go s.run(a)
}

func (a *Agent) stopSweeper() {
	if a.sweeper == nil {
		return
	}
	close(a.sweeper.stop)
	<-a.sweeper.done
	a.sweeper.iter.Close()
	a.sweeper = nil
}

func (s *sweeper) run(a *Agent) {
	defer close(s.done)
	tick := time.NewTicker(s.poll)
	defer tick.Stop()
	var seen uint64
	var last, progress time.Time
	backoff := s.base
	deferred := 0
	for {
		select {
		case <-s.stop:
			return
		case <-tick.C:
		}
		st, err := readStats(a.sockops.MtStats)
		if err != nil {
			s.setResult(deferred, err)
			continue
		}
		demoted := st.SocketsDemoted + st.MsgFallthrough
		switch {
		case demoted != seen:
			backoff, progress = s.base, time.Now()
		case deferred > 0 && time.Since(last) >= backoff:
			if time.Since(progress) > fastSweeps {
				backoff = min(2*backoff, maxSweepBackoff)
			}
		default:
			continue
		}
		seen = demoted
		last = time.Now()
		n, err := s.sweep()
		if err == nil {
			if n < deferred {
				backoff, progress = s.base, time.Now() // keep looking closely
			}
			deferred = n
		}
		s.setResult(deferred, err)
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
