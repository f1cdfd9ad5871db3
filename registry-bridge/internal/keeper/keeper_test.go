package keeper

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"
)

// The loop retries a failing pass every interval, reports each failure, counts the services
// registered from the first pass that succeeds, and Stop waits for a pass in progress.
func TestLoopRetriesUntilRegisteredAndStops(t *testing.T) {
	var passes, warned atomic.Int32
	inPass := make(chan struct{}, 1)
	l := Start(5*time.Millisecond, func(ctx context.Context) error {
		if passes.Add(1) <= 3 {
			return errors.New("registry down")
		}
		select {
		case inPass <- struct{}{}:
		default:
		}
		return nil
	}, func(error) { warned.Add(1) })
	deadline := time.Now().Add(5 * time.Second)
	for !l.Registered() {
		if time.Now().After(deadline) {
			t.Fatalf("not registered after %d passes", passes.Load())
		}
		time.Sleep(time.Millisecond)
	}
	<-inPass
	l.Stop()
	if w := warned.Load(); w != 3 {
		t.Errorf("warned %d times, want the 3 failed passes", w)
	}
	n := passes.Load()
	time.Sleep(20 * time.Millisecond) // four intervals: a loop still running would pass again
	if passes.Load() != n {
		t.Errorf("passes went on after Stop: %d, then %d", n, passes.Load())
	}
}

// A pass failing because Stop cancelled it is not a failure to report.
func TestLoopStopDoesNotWarn(t *testing.T) {
	started := make(chan struct{})
	var warned atomic.Int32
	l := Start(time.Hour, func(ctx context.Context) error {
		close(started)
		<-ctx.Done()
		return ctx.Err()
	}, func(error) { warned.Add(1) })
	<-started
	l.Stop()
	if warned.Load() != 0 || l.Registered() {
		t.Errorf("warned %d, registered %v; want neither", warned.Load(), l.Registered())
	}
}
