package main

import (
	"context"
	"errors"
	"fmt"
	"math"
	"os"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// verdictName is the agent's sk_msg program (bpf/redir.c), the one that runs on every send.
const verdictName = "mt_redir"

// verdictCost runs the Go harness's 64 B ping-pong with the kernel's BPF run-time statistics
// on and returns the sk_msg verdict's mean cost in nanoseconds per send. Statistics cost every BPF
// program two clock reads per run, so they are on only for this run, never in the others. The
// figure does not swing with this VM's load the way the rates do: it compares what ours does
// per send (the queue bound, the blocking check) with the naive redirect directly.
func (b *bench) verdictCost(ctx context.Context) (float64, error) {
	stats, err := ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
	if err != nil {
		return 0, fmt.Errorf("enable BPF run-time statistics: %w", err)
	}
	defer stats.Close()
	before, err := verdictRuns()
	if err != nil {
		return 0, err
	}
	// Ping-pong, not a stream: request/response never trips the small-write rule, so every
	// send takes the redirect path whose cost this measures (a stream would be demoted and
	// unhooked at once, leaving a handful of cheap TCP-path verdicts).
	if _, err := b.goRunFor(ctx, "pingpong", 64, 2*time.Second); err != nil {
		return 0, err
	}
	after, err := verdictRuns()
	if err != nil {
		return 0, err
	}
	runs, ns := after.count-before.count, after.ns-before.ns
	if runs == 0 {
		return math.NaN(), errors.New("the sk_msg verdict did not run: no send went through the sockhash")
	}
	return float64(ns) / float64(runs), nil
}

type verdictTotal struct{ count, ns uint64 }

// verdictRuns sums the run counts and times of every loaded program named verdictName.
func verdictRuns() (verdictTotal, error) {
	var t verdictTotal
	id := ebpf.ProgramID(0)
	for {
		next, err := ebpf.ProgramGetNextID(id)
		if errors.Is(err, unix.ENOENT) || errors.Is(err, os.ErrNotExist) {
			return t, nil
		}
		if err != nil {
			return t, fmt.Errorf("list BPF programs: %w", err)
		}
		id = next
		p, err := ebpf.NewProgramFromID(id)
		if err != nil {
			continue // unloaded meanwhile
		}
		info, ierr := p.Info()
		st, serr := p.Stats()
		p.Close()
		if ierr != nil || serr != nil || info.Name != verdictName {
			continue
		}
		t.count += st.RunCount
		t.ns += uint64(st.Runtime)
	}
}
