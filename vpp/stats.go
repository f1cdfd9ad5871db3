package vpp

import (
	"errors"
	"fmt"
	"os"
	"time"

	"go.fd.io/govpp/adapter"
	"go.fd.io/govpp/adapter/statsclient"
	"go.fd.io/govpp/api"
	"go.fd.io/govpp/core"
)

// Interface counters come from VPP's stats segment (startup.conf `statseg { socket-name … }`,
// default /run/vpp/stats.sock) through govpp's stats API (core.StatsConnection), not from the
// binary API: VPP 25.02's binary API has no counter dump (sw_interface_details carries none,
// and the old want_stats messages are gone). The stats segment is shared memory VPP hands out
// over that socket; the agent maps it read-only. The stats connection lives with the API
// connection: it is opened after each (re)connect, retried on the supervisor's probe while it
// is down, and closed with the API connection. Without it the agent works as before; only the
// counters are missing (Status.StatsError says why).

// InterfaceCounters are one owned interface's counters, summed over VPP's threads.
type InterfaceCounters struct {
	SwIfIndex uint32 `json:"swIfIndex"`
	Name      string `json:"name"`
	RxPackets uint64 `json:"rxPackets"`
	RxBytes   uint64 `json:"rxBytes"`
	TxPackets uint64 `json:"txPackets"`
	TxBytes   uint64 `json:"txBytes"`
	// Drops are packets VPP dropped on the interface (no route, no ARP, …); RxErrors and
	// TxErrors the driver's errors.
	Drops    uint64 `json:"drops"`
	RxErrors uint64 `json:"rxErrors"`
	TxErrors uint64 `json:"txErrors"`
}

// WithStatsAdapter replaces govpp's stats socket client (e.g. with vpptest's in tests). A nil
// function turns the counters off.
func WithStatsAdapter(newAdapter func(socket string) adapter.StatsAPI) Option {
	return func(a *Agent) { a.newStats, a.usesStatsSocket = newAdapter, false }
}

// newStatsSocketAdapter is govpp's stats client. It does not wait for a missing socket (the
// supervisor retries), so a VPP without a stats segment costs nothing.
func newStatsSocketAdapter(socket string) adapter.StatsAPI {
	return statsclient.NewStatsClient(socket,
		statsclient.SetSocketRetryPeriod(time.Millisecond), statsclient.SetSocketRetryTimeout(time.Millisecond))
}

// connectStats opens the stats connection if it is not open. Called from the run goroutine.
func (a *Agent) connectStats() {
	if a.newStats == nil {
		return
	}
	a.statsMu.Lock()
	defer a.statsMu.Unlock()
	if a.stats != nil {
		return
	}
	var err error
	if a.usesStatsSocket {
		if _, serr := os.Stat(a.cfg.StatsSocket); serr != nil {
			err = serr
		}
	}
	var sc *core.StatsConnection
	if err == nil {
		sc, err = core.ConnectStats(a.newStats(a.cfg.StatsSocket))
	}
	msg := ""
	if err != nil {
		msg = fmt.Sprintf("vpp: stats segment %s: %v (interface counters are off; set `statseg { socket-name %s }` in VPP's startup.conf "+
			"and mount the socket into the agent)", a.cfg.StatsSocket, err, a.cfg.StatsSocket)
	}
	a.mu.Lock()
	changed := a.status.StatsError != msg
	a.status.StatsError = msg
	a.mu.Unlock()
	if err != nil {
		if changed {
			a.log.Warn("vpp: no interface counters", "err", msg)
		}
		return
	}
	a.stats = sc
	a.log.Info("vpp: stats segment connected", "socket", a.cfg.StatsSocket)
}

// disconnectStats closes the stats connection, if open.
func (a *Agent) disconnectStats() {
	a.statsMu.Lock()
	defer a.statsMu.Unlock()
	if a.stats != nil {
		a.stats.Disconnect()
		a.stats = nil
	}
}

// ErrNoStats is returned by Counters while the agent has no stats connection.
var ErrNoStats = errors.New("vpp: no stats connection")

// Counters returns the counters of the interfaces the agent owns (the uplink), read now from
// VPP's stats segment. A read error closes the stats connection; the supervisor reopens it.
func (a *Agent) Counters() ([]InterfaceCounters, error) {
	a.mu.Lock()
	var owned *UplinkStatus
	if a.status.Uplink != nil && a.conn != nil {
		u := *a.status.Uplink
		owned = &u
	}
	a.mu.Unlock()
	a.statsMu.Lock()
	defer a.statsMu.Unlock()
	if a.stats == nil {
		return nil, ErrNoStats
	}
	var st api.InterfaceStats
	if err := a.stats.GetInterfaceStats(&st); err != nil {
		a.stats.Disconnect()
		a.stats = nil
		err = fmt.Errorf("vpp: read interface counters from %s: %w (reconnecting)", a.cfg.StatsSocket, err)
		a.mu.Lock()
		a.status.StatsError = err.Error()
		a.mu.Unlock()
		return nil, err
	}
	var out []InterfaceCounters
	if owned == nil {
		return out, nil
	}
	for _, c := range st.Interfaces {
		if c.InterfaceIndex != owned.SwIfIndex {
			continue
		}
		name := c.InterfaceName
		if name == "" {
			name = owned.Name
		}
		out = append(out, InterfaceCounters{
			SwIfIndex: c.InterfaceIndex, Name: name,
			RxPackets: c.Rx.Packets, RxBytes: c.Rx.Bytes, TxPackets: c.Tx.Packets, TxBytes: c.Tx.Bytes,
			Drops: c.Drops, RxErrors: c.RxErrors, TxErrors: c.TxErrors,
		})
	}
	return out, nil
}
