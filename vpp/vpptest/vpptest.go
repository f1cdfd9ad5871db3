// Package vpptest gives tests outside package vpp (the agent's command, e2e) a VPP to talk
// to: the fake VPP binary API socket of vpp/internal/fakevpp (VPP's wire protocol, answered
// by a small model of VPP's state) and a stats segment adapter for govpp's stats API. Use it
// only in tests.
package vpptest

import (
	"os"
	"path/filepath"
	"sync"
	"testing"

	"go.fd.io/govpp/adapter"

	"github.com/meshturbo/meshturbo/vpp/internal/fakevpp"
)

type (
	// Server is a fake VPP API socket: Plan, Restart, Fail, Drop, Do, Close.
	Server = fakevpp.Server
	// State is what the fake VPP holds (interfaces, namespaces, routes); read it in Server.Do.
	State = fakevpp.VPP
	// Option configures a Server.
	Option = fakevpp.Option
)

var (
	// WithVersion sets the version show_version reports (default "25.02-release").
	WithVersion = fakevpp.WithVersion
	// WithoutMessages leaves messages out of VPP's table, as a VPP without a plugin would.
	WithoutMessages = fakevpp.WithoutMessages
	// WithCRC advertises a message under another CRC, as another VPP release would.
	WithCRC = fakevpp.WithCRC
)

// Start runs a fake VPP on api.sock in a short temporary directory (unix socket paths are
// limited to 107 bytes; test temp dirs can be longer) until the test ends.
func Start(t testing.TB, opts ...Option) *Server {
	t.Helper()
	dir, err := os.MkdirTemp("", "vpptest")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	opts = append([]Option{fakevpp.WithLogf(t.Logf)}, opts...)
	srv, err := fakevpp.New(filepath.Join(dir, "api.sock"), opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	return srv
}

// Counters are one interface's counters in the stats segment.
type Counters struct {
	Name                                   string
	RxPackets, RxBytes, TxPackets, TxBytes uint64
	Drops, RxErrors, TxErrors              uint64
}

// Stats is a stats segment for govpp's stats API (adapter.StatsAPI), safe for concurrent use:
// the test sets counters while the agent reads them. It serves the /if/ entries VPP has, one
// thread, indexed by sw_if_index. govpp's own mock stats adapter is not safe to change while
// read.
type Stats struct {
	mu        sync.Mutex
	ifs       map[uint32]Counters
	connects  int
	connected bool
	err       error
}

var _ adapter.StatsAPI = (*Stats)(nil)

// NewStats returns an empty stats segment.
func NewStats() *Stats { return &Stats{ifs: map[uint32]Counters{}} }

// Adapter is for vpp.WithStatsAdapter.
func (s *Stats) Adapter(string) adapter.StatsAPI { return s }

// Set sets the counters of interface swIfIndex.
func (s *Stats) Set(swIfIndex uint32, c Counters) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.ifs[swIfIndex] = c
}

// Fail makes every call fail with err (nil: work again), as a stats segment of a VPP that went
// away does.
func (s *Stats) Fail(err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.err = err
}

// Connects counts Connect calls that succeeded.
func (s *Stats) Connects() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.connects
}

func (s *Stats) Connect() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err != nil {
		return s.err
	}
	s.connects++
	s.connected = true
	return nil
}

func (s *Stats) Disconnect() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.connected = false
	return nil
}

func (s *Stats) ListStats(...string) ([]adapter.StatIdentifier, error) {
	d, err := s.dir()
	if err != nil {
		return nil, err
	}
	var out []adapter.StatIdentifier
	for _, e := range d.Entries {
		out = append(out, e.StatIdentifier)
	}
	return out, nil
}

func (s *Stats) DumpStats(...string) ([]adapter.StatEntry, error) {
	d, err := s.dir()
	if err != nil {
		return nil, err
	}
	return d.Entries, nil
}

func (s *Stats) PrepareDir(...string) (*adapter.StatDir, error) { return s.dir() }

func (s *Stats) PrepareDirOnIndex(...uint32) (*adapter.StatDir, error) { return s.dir() }

func (s *Stats) UpdateDir(dir *adapter.StatDir) error {
	d, err := s.dir()
	if err != nil {
		return err
	}
	*dir = *d
	return nil
}

// dir builds the /if/ entries from the counters set so far.
func (s *Stats) dir() (*adapter.StatDir, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err != nil {
		return nil, s.err
	}
	if !s.connected {
		return nil, adapter.ErrStatsDisconnected
	}
	n := uint32(0)
	for sw := range s.ifs {
		n = max(n, sw+1)
	}
	names := make(adapter.NameStat, n)
	rx, tx := make([]adapter.CombinedCounter, n), make([]adapter.CombinedCounter, n)
	drops, rxErr, txErr := make([]adapter.Counter, n), make([]adapter.Counter, n), make([]adapter.Counter, n)
	for sw, c := range s.ifs {
		names[sw] = adapter.Name(c.Name)
		rx[sw] = adapter.CombinedCounter{c.RxPackets, c.RxBytes}
		tx[sw] = adapter.CombinedCounter{c.TxPackets, c.TxBytes}
		drops[sw], rxErr[sw], txErr[sw] = adapter.Counter(c.Drops), adapter.Counter(c.RxErrors), adapter.Counter(c.TxErrors)
	}
	entry := func(i uint32, name string, t adapter.StatType, data adapter.Stat) adapter.StatEntry {
		return adapter.StatEntry{StatIdentifier: adapter.StatIdentifier{Index: i, Name: []byte(name)}, Type: t, Data: data}
	}
	return &adapter.StatDir{Epoch: 1, Entries: []adapter.StatEntry{
		entry(0, "/if/names", adapter.NameVector, names),
		entry(1, "/if/rx", adapter.CombinedCounterVector, adapter.CombinedCounterStat{rx}),
		entry(2, "/if/tx", adapter.CombinedCounterVector, adapter.CombinedCounterStat{tx}),
		entry(3, "/if/drops", adapter.SimpleCounterVector, adapter.SimpleCounterStat{drops}),
		entry(4, "/if/rx-error", adapter.SimpleCounterVector, adapter.SimpleCounterStat{rxErr}),
		entry(5, "/if/tx-error", adapter.SimpleCounterVector, adapter.SimpleCounterStat{txErr}),
	}}, nil
}
