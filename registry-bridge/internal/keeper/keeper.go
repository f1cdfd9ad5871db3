// Package keeper runs the loop every reverse registrar (Consul, ZooKeeper, Eureka) needs:
// make sure the mesh services are registered now, and again every interval, since a
// registry that restarts, expires a session or drops a lease forgets them.
package keeper

import (
	"context"
	"sync"
	"time"
)

// Loop runs one registrar's passes until Stop. Its owner is the registrar: it starts the loop
// in its constructor and stops it in Close, before deregistering.
type Loop struct {
	cancel context.CancelFunc
	done   chan struct{}

	mu         sync.Mutex
	registered bool
}

// Start runs pass at once and then every interval until Stop. An error pass returns while the
// loop runs goes to warn (errors after Stop began are the cancellation's and are dropped);
// the first pass without one marks the services registered.
func Start(interval time.Duration, pass func(ctx context.Context) error, warn func(error)) *Loop {
	ctx, cancel := context.WithCancel(context.Background())
	l := &Loop{cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(l.done)
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			if err := pass(ctx); err == nil {
				l.mu.Lock()
				l.registered = true
				l.mu.Unlock()
			} else if ctx.Err() == nil {
				warn(err)
			}
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
		}
	}()
	return l
}

// Registered reports whether every service has been registered at least once.
func (l *Loop) Registered() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.registered
}

// Stop ends the loop and waits for a pass in progress to return.
func (l *Loop) Stop() {
	l.cancel()
	<-l.done
}
