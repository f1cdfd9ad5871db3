// Package bpf is meshturbo's node acceleration: a sockops program on a cgroup v2 path puts
// established TCP sockets of mesh pairs (both ends local and in the mesh set) into a sockhash
// keyed by the 4-tuple, and an sk_msg program on that sockhash hands each send straight to
// the peer socket, skipping the TCP/IP stack. Whatever it can't redirect takes the normal TCP
// path.
//
// Not every send gains from a redirect: a stream of small writes is slower redirected than on
// TCP, which coalesces them. The sk_msg program demotes a connection whose one end streams
// small writes (or whose send missed its peer) to the TCP path, and a sweeper (a sockhash
// iterator, unhook.c) then takes both of its sockets out of the sockhash, each once no
// redirected byte waits unread in its queue: from then on they are plain TCP sockets, at plain
// TCP's cost. A second, switchable mode replaces iptables redirection (redirect.go).
//
// One sockmap owner per socket: New refuses to run beside another one (owner.go).
//
// Everything is pinned under Config.PinPath, so an agent restart adopts the maps and links it
// left and acceleration never stops: Close releases this process's handles only. Uninstall
// detaches the programs and removes every pin, but never deletes a sockhash entry: deleting
// the entry of a live socket drops the bytes queued to it. Pairs accelerated before the
// uninstall keep working until they close, and the kernel frees the objects after the last.
package bpf

import (
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

// Defaults of Config.
const (
	DefaultBPFFS    = "/sys/fs/bpf"
	DefaultPinPath  = "/sys/fs/bpf/meshturbo"
	DefaultMaxConns = 65536
	// DefaultSmallMsg is the agent's default small-write threshold (its -small-msg flag;
	// Config.SmallMsg 0 turns the rule off). With it, a stream of small writes runs as plain
	// TCP, a tie, where a redirect ranged from 0.79× to 1.49× of plain TCP on this VM for
	// an event-loop reader (README.md, "Small writes").
	DefaultSmallMsg = 16 << 10
	DefaultSmallRun = 16
	// DefaultQueueLimit is Config.QueueLimit's default: half of what plain TCP lets a
	// sender queue towards a reader that does not read (send and receive buffers, measured
	// here at 4.1–4.3 MB). A pair that hits it then queues plain TCP's amount on the TCP
	// path, about 1.5× plain TCP's in all.
	DefaultQueueLimit = 2 << 20
)

// Pin names of the links inside Config.PinPath; maps are pinned by their own names (mt_*).
const (
	pinLinkSockOps    = "link_sockops"
	pinLinkSkMsg      = "link_sk_msg"
	pinLinkConnect4   = "link_connect4"
	pinLinkGetsockopt = "link_getsockopt"
)

// Config configures an Agent.
type Config struct {
	// CgroupPath is the cgroup v2 directory whose sockets (and its descendants') are
	// accelerated. Required.
	CgroupPath string
	// PinPath is the bpffs directory for the pinned maps and links; DefaultPinPath if empty.
	PinPath string
	// BPFFS is the bpffs mount point PinPath lives under; DefaultBPFFS if empty. New mounts
	// bpffs there when nothing is mounted yet.
	BPFFS string
	// MeshIPs are local IPs of mesh workloads: a connection with both ends in this set is
	// accelerated.
	MeshIPs []netip.Addr
	// SidecarPorts are ports of sidecars: a loopback connection with one end on such a port
	// is accelerated.
	SidecarPorts []uint16
	// MaxConns is the size of the sockhash (sockets, two per accelerated connection);
	// DefaultMaxConns if 0. Changing it replaces the pinned sockhash (see Agent.State).
	MaxConns uint32
	// A socket that sends SmallRun messages smaller than SmallMsg bytes in a row, with no
	// send of its peer in between, moves to the TCP path for good: TCP coalesces a stream
	// of small writes, a redirect sends and wakes each alone, which is slower for a reader
	// that wakes per message. Request/response traffic never trips it. SmallMsg 0 turns the
	// rule off (the agent's flag defaults to DefaultSmallMsg); SmallRun defaults to
	// DefaultSmallRun.
	SmallMsg, SmallRun uint32
	// QueueLimit bounds the redirected bytes a socket may hold unread (DefaultQueueLimit if
	// 0). A redirect skips TCP's flow control: without a bound, a sender to a reader that
	// does not read queues kernel memory until the node's tcp_mem limit (ENOMEM, and every
	// other TCP flow of the node starves). A pair whose peer holds QueueLimit unread moves
	// to the TCP path for good, where the sender blocks as on plain TCP.
	QueueLimit uint32
	// NaiveRedirect turns the small-write rule and the queue limit off (every send of a
	// mesh socket is redirected). For benchmarks.
	NaiveRedirect bool
	// KeepDemoted leaves demoted sockets in the sockhash (sending on the TCP path through
	// the sk_msg hook) instead of unhooking them. For benchmarks.
	KeepDemoted bool
	// UnhookGrace is how long after its pair was demoted a socket stays in the sockhash at
	// least (see unhook.c); DefaultUnhookGrace if 0.
	UnhookGrace time.Duration
	// Redirect is the iptables-free redirection mode (connect4 + getsockopt); off unless
	// Redirect.Enabled.
	Redirect RedirectConfig
	// CoexistWithOtherOwners runs beside another sockmap owner on the cgroup instead of
	// refusing to start (see owner.go for the rule).
	CoexistWithOtherOwners bool
}

// DefaultUnhookGrace is Config.UnhookGrace's default.
const DefaultUnhookGrace = 10 * time.Millisecond

func (c *Config) validate() error {
	if c.CgroupPath == "" {
		return errors.New("bpf: config: CgroupPath is required")
	}
	if c.PinPath == "" {
		c.PinPath = DefaultPinPath
	}
	if c.BPFFS == "" {
		c.BPFFS = DefaultBPFFS
	}
	if c.MaxConns == 0 {
		c.MaxConns = DefaultMaxConns
	}
	if c.SmallRun == 0 {
		c.SmallRun = DefaultSmallRun
	}
	if c.QueueLimit == 0 {
		c.QueueLimit = DefaultQueueLimit
	}
	if c.UnhookGrace <= 0 {
		c.UnhookGrace = DefaultUnhookGrace
	}
	if err := c.Redirect.validate(); err != nil {
		return fmt.Errorf("bpf: config: %w", err)
	}
	c.PinPath = filepath.Clean(c.PinPath)
	c.BPFFS = filepath.Clean(c.BPFFS)
	if rel, err := filepath.Rel(c.BPFFS, c.PinPath); err != nil || rel == "." || strings.HasPrefix(rel, "..") {
		return fmt.Errorf("bpf: config: PinPath %q is not below BPFFS %q", c.PinPath, c.BPFFS)
	}
	if err := checkMesh(c.MeshIPs, c.SidecarPorts); err != nil {
		return fmt.Errorf("bpf: config: %w", err)
	}
	var st unix.Statfs_t
	if err := unix.Statfs(c.CgroupPath, &st); err != nil {
		return fmt.Errorf("bpf: config: cgroup %q: %w", c.CgroupPath, err)
	}
	if st.Type != unix.CGROUP2_SUPER_MAGIC {
		return fmt.Errorf("bpf: config: %q is not a cgroup v2 directory (sockops attaches to cgroup v2 only)", c.CgroupPath)
	}
	return nil
}

// Option is a rarely needed knob of New and Probe.
type Option func(*options)

type options struct {
	forced map[Feature]error
}

func newOptions(opts []Option) *options {
	o := &options{forced: map[Feature]error{}}
	for _, opt := range opts {
		opt(o)
	}
	return o
}

// WithProbeFailure makes the probe of f report it missing (wrapping ebpf.ErrNotSupported),
// as on a kernel without it. For tests of the fallback path.
func WithProbeFailure(f Feature) Option {
	return func(o *options) { o.forced[f] = errForcedProbe }
}

// Agent owns the loaded, attached and pinned acceleration.
type Agent struct {
	mu         sync.Mutex
	cfg        Config
	opts       *options
	sockops    sockopsObjects
	redir      redirObjects
	unhook     unhookObjects
	listeners  listenersObjects
	connect4   connect4Objects
	getsockopt getsockoptObjects
	skMsg      link.Link
	sockOps    link.Link
	connect    link.Link // cgroup/connect4, nil unless the redirect mode is on
	getsockOpt link.Link // cgroup/getsockopt, likewise
	state      State
	mesh       meshSet
	closed     bool
	cgroupID   uint64
	sweeper    *sweeper // nil when demoted sockets are not unhooked
}

// State describes what New found and did; it is served as the agent's status.
type State struct {
	PinPath    string `json:"pin_path"`
	CgroupPath string `json:"cgroup_path"`
	MaxConns   uint32 `json:"max_conns"`
	// SmallMsg and SmallRun are the small-write rule in force (SmallMsg 0: off).
	SmallMsg uint32 `json:"small_msg"`
	SmallRun uint32 `json:"small_run"`
	// QueueLimit is the bound on unread redirected bytes per socket (0: none).
	QueueLimit uint32          `json:"queue_limit"`
	Features   []FeatureStatus `json:"features"`
	Programs   []Attachment    `json:"programs"`
	// ReusedMaps are maps adopted from pins left by an earlier agent.
	ReusedMaps []string `json:"reused_maps,omitempty"`
	// ReplacedMaps are pinned maps whose layout no longer matched: they were unpinned (the
	// sockets still in them keep working until they close) and created anew.
	ReplacedMaps []ReplacedMap `json:"replaced_maps,omitempty"`
	// OtherOwners are sockmap owners other than us on the cgroup, found at start; New
	// refuses to run beside them unless Config.CoexistWithOtherOwners.
	OtherOwners []OtherOwner `json:"other_owners,omitempty"`
	// OtherSockOps are sockops programs other than ours that run on the cgroup now (attached
	// to it or inherited from an ancestor). A second sockmap owner makes inserts fail with
	// EBUSY, counted in Stats.InsertBusy.
	OtherSockOps []ebpf.ProgramID `json:"other_sockops,omitempty"`
	MeshIPs      []netip.Addr     `json:"mesh_ips"`
	SidecarPorts []uint16         `json:"sidecar_ports"`
	// Unhook says whether sockets of demoted pairs are taken out of the sockhash (and why
	// not, when they are not).
	Unhook UnhookState `json:"unhook"`
	// Listeners says whether listening sockets opened before the agent were recorded at
	// start (their mode decides whether the connections they accept are inserted).
	Listeners ListenersState `json:"listeners"`
	// Redirect is the state of the iptables-free redirection mode.
	Redirect RedirectState `json:"redirect"`
}

// ListenersState is the state of recording listeners at start (listeners.c).
type ListenersState struct {
	On bool `json:"on"`
	// Seeded is how many listeners the start found and recorded.
	Seeded int `json:"seeded"`
	// Off says why it did not run: listeners opened before the agent are then checked at
	// their connections' first send only.
	Off string `json:"off,omitempty"`
}

// UnhookState is the state of unhooking demoted sockets (unhook.c).
type UnhookState struct {
	On bool `json:"on"`
	// Off says why it is off; demoted sockets then stay in the sockhash and send on the
	// TCP path through the sk_msg hook (correct, but slower than plain TCP).
	Off string `json:"off,omitempty"`
	// LastError is the last failed sweep's error.
	LastError string `json:"last_error,omitempty"`
	// Deferred is how many sockets of demoted pairs the last sweep left in place (grace
	// period, or redirected bytes still unread).
	Deferred int `json:"deferred"`
}

// Attachment is one attached program.
type Attachment struct {
	Program   string         `json:"program"`
	Hook      string         `json:"hook"`
	ProgramID ebpf.ProgramID `json:"program_id"`
	LinkID    link.ID        `json:"link_id"`
	LinkPin   string         `json:"link_pin"`
	// Adopted is true when the link was left pinned by an earlier agent and now runs the
	// program loaded by this one.
	Adopted bool `json:"adopted"`
}

// ReplacedMap is a pinned map that had to be replaced.
type ReplacedMap struct {
	Name   string `json:"name"`
	Reason string `json:"reason"`
}

// New probes the kernel, mounts bpffs if needed, loads the programs re-using pinned maps,
// attaches (or adopts the pinned links of an earlier agent) and writes the mesh set. A
// missing kernel feature is a *MissingFeatureError wrapping ebpf.ErrNotSupported; then
// nothing was attached and traffic is untouched.
func New(cfg Config, opts ...Option) (_ *Agent, err error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	feats, err := Probe(opts...)
	if err != nil {
		return nil, err
	}
	if err := ensureBPFFS(cfg.BPFFS); err != nil {
		return nil, err
	}
	// Before anything is created: a refusal leaves nothing behind.
	owners, err := otherOwners(cfg.CgroupPath, cfg.PinPath)
	if err != nil {
		return nil, err
	}
	if len(owners) > 0 && !cfg.CoexistWithOtherOwners {
		return nil, &OwnerConflictError{Cgroup: cfg.CgroupPath, Owners: owners}
	}
	if err := os.MkdirAll(cfg.PinPath, 0o700); err != nil {
		return nil, fmt.Errorf("bpf: create pin path: %w", err)
	}
	var st unix.Stat_t
	if err := unix.Stat(cfg.CgroupPath, &st); err != nil {
		return nil, fmt.Errorf("bpf: stat cgroup: %w", err)
	}
	a := &Agent{cfg: cfg, cgroupID: st.Ino, opts: newOptions(opts)}
	a.state = State{PinPath: cfg.PinPath, CgroupPath: cfg.CgroupPath, MaxConns: cfg.MaxConns, Features: feats,
		SmallMsg: cfg.SmallMsg, SmallRun: cfg.SmallRun, QueueLimit: cfg.QueueLimit, OtherOwners: owners}
	if cfg.NaiveRedirect {
		a.state.SmallMsg, a.state.QueueLimit = 0, 0
	}
	defer func() {
		if err != nil {
			a.closeHandles()
		}
	}()
	if err := a.load(); err != nil {
		return nil, err
	}
	// The verdict program goes on the sockhash before any socket can be put into it: a
	// socket in a sockhash without one would change behaviour and gain nothing.
	if err := a.attachSkMsg(); err != nil {
		return nil, err
	}
	if err := a.attachSockOps(); err != nil {
		return nil, err
	}
	if err := a.setMesh(cfg.MeshIPs, cfg.SidecarPorts); err != nil {
		return nil, err
	}
	if err := a.setupRedirect(); err != nil {
		return nil, err
	}
	a.seedListeners()
	a.startSweeper()
	return a, nil
}

// seedListeners records the listening sockets of the agent's network namespace that were
// opened before any agent ran (listeners.c); sockops.c records those opened since. Without
// it connections they accept are checked against their mode at their first send only.
func (a *Agent) seedListeners() {
	if a.listeners.MtSeedListeners == nil {
		return
	}
	it, err := link.AttachIter(link.IterOptions{Program: a.listeners.MtSeedListeners})
	if err != nil {
		a.state.Listeners.Off = fmt.Sprintf("attach the listener iterator: %v", err)
		return
	}
	defer it.Close()
	rd, err := it.Open()
	if err != nil {
		a.state.Listeners.Off = fmt.Sprintf("run the listener iterator: %v", err)
		return
	}
	defer rd.Close()
	n, err := io.Copy(io.Discard, rd)
	if err != nil {
		a.state.Listeners.Off = fmt.Sprintf("run the listener iterator: %v", err)
		return
	}
	a.state.Listeners.On, a.state.Listeners.Seeded = true, int(n)
}

func ensureBPFFS(dir string) error {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err == nil && st.Type == unix.BPF_FS_MAGIC {
		return nil
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("bpf: create bpffs mount point: %w", err)
	}
	if err := unix.Mount("bpf", dir, "bpf", 0, "mode=0700"); err != nil {
		return fmt.Errorf("bpf: mount bpffs on %s: %w", dir, err)
	}
	return nil
}

// load loads both objects. Maps come from the pins when compatible; incompatible pins are
// unpinned first (never emptied) and recorded in the state.
func (a *Agent) load() error {
	sockopsSpec, err := loadSockops()
	if err != nil {
		return fmt.Errorf("bpf: %w", err)
	}
	redirSpec, err := loadRedir()
	if err != nil {
		return fmt.Errorf("bpf: %w", err)
	}
	unhookSpec, err := loadUnhook()
	if err != nil {
		return fmt.Errorf("bpf: %w", err)
	}
	listenersSpec, err := loadListeners()
	if err != nil {
		return fmt.Errorf("bpf: %w", err)
	}
	connect4Spec, err := loadConnect4()
	if err != nil {
		return fmt.Errorf("bpf: %w", err)
	}
	getsockoptSpec, err := loadGetsockopt()
	if err != nil {
		return fmt.Errorf("bpf: %w", err)
	}
	for _, spec := range []*ebpf.CollectionSpec{sockopsSpec, redirSpec, unhookSpec, listenersSpec, connect4Spec, getsockoptSpec} {
		spec.Maps[sockopsMapMtSockhash].MaxEntries = a.cfg.MaxConns
		spec.Maps[sockopsMapMtPairs].MaxEntries = max(a.cfg.MaxConns/2, 1)
		spec.Maps[sockopsMapMtSkAddrs].MaxEntries = a.cfg.MaxConns
	}
	if err := unhookSpec.Variables[unhookVarMtUnhookGraceNs].Set(uint64(a.cfg.UnhookGrace.Nanoseconds())); err != nil {
		return fmt.Errorf("bpf: set %s: %w", unhookVarMtUnhookGraceNs, err)
	}
	smallMsg, queueLimit, keepBlockingOut := a.cfg.SmallMsg, a.cfg.QueueLimit, uint32(1)
	if a.cfg.NaiveRedirect {
		smallMsg, queueLimit, keepBlockingOut = 0, 0, 0
	}
	if err := redirSpec.Variables[redirVarMtQueueLimit].Set(queueLimit); err != nil {
		return fmt.Errorf("bpf: set %s: %w", redirVarMtQueueLimit, err)
	}
	if err := sockopsSpec.Variables[sockopsVarMtKeepBlockingOut].Set(keepBlockingOut); err != nil {
		return fmt.Errorf("bpf: set %s: %w", sockopsVarMtKeepBlockingOut, err)
	}
	if err := redirSpec.Variables[redirVarMtSmallMsg].Set(smallMsg); err != nil {
		return fmt.Errorf("bpf: set %s: %w", redirVarMtSmallMsg, err)
	}
	if err := redirSpec.Variables[redirVarMtSmallRun].Set(a.cfg.SmallRun); err != nil {
		return fmt.Errorf("bpf: set %s: %w", redirVarMtSmallRun, err)
	}
	layout := layoutHash(sockopsSpec)
	if err := a.retireIncompatible(sockopsSpec, layout); err != nil {
		return err
	}
	if err := sockopsSpec.LoadAndAssign(&a.sockops, &ebpf.CollectionOptions{
		Maps: ebpf.MapOptions{PinPath: a.cfg.PinPath},
	}); err != nil {
		return fmt.Errorf("bpf: load sockops: %w", err)
	}
	if err := a.sockops.MtMeta.Put(uint32(0), layout); err != nil {
		return fmt.Errorf("bpf: record map layout: %w", err)
	}
	shared := &ebpf.CollectionOptions{MapReplacements: a.sockops.sockopsMaps.byName()}
	if err := redirSpec.LoadAndAssign(&a.redir, shared); err != nil {
		return fmt.Errorf("bpf: load sk_msg: %w", err)
	}
	// Optional parts: without them acceleration works; the state says what is off.
	switch {
	case a.cfg.NaiveRedirect:
		a.state.Unhook.Off = "naive redirect: no pair is ever demoted"
	case a.cfg.KeepDemoted:
		a.state.Unhook.Off = "off by configuration (KeepDemoted)"
	default:
		if err := unhookSpec.LoadAndAssign(&a.unhook, shared); err != nil {
			a.state.Unhook.Off = fmt.Sprintf("load the sockhash iterator: %v", err)
		}
	}
	if err := listenersSpec.LoadAndAssign(&a.listeners, shared); err != nil {
		a.state.Listeners.Off = fmt.Sprintf("load the listener iterator: %v", err)
	}
	if a.cfg.Redirect.Enabled {
		if err := a.probeRedirect(); err != nil {
			a.state.Redirect.Off = err.Error()
			return nil
		}
		if err := connect4Spec.LoadAndAssign(&a.connect4, shared); err != nil {
			return fmt.Errorf("bpf: load cgroup/connect4: %w", err)
		}
		if err := getsockoptSpec.LoadAndAssign(&a.getsockopt, shared); err != nil {
			return fmt.Errorf("bpf: load cgroup/getsockopt: %w", err)
		}
	}
	return nil
}

// byName maps each shared map's name to the loaded map, for MapReplacements: every map of
// sockopsMaps, by its `ebpf` tag, so that a map added to maps.h needs no entry here.
func (m *sockopsMaps) byName() map[string]*ebpf.Map {
	out := map[string]*ebpf.Map{}
	v := reflect.ValueOf(m).Elem()
	for i := range v.NumField() {
		if name := v.Type().Field(i).Tag.Get("ebpf"); name != "" {
			if mp, ok := v.Field(i).Interface().(*ebpf.Map); ok && mp != nil {
				out[name] = mp
			}
		}
	}
	return out
}

// retireIncompatible unpins every pinned map that the new spec can't use: a different
// type, size or flags, or (recorded in mt_meta) a different key or value layout. Unpinning
// drops no entry: sockets in an old sockhash keep it alive through their sk_msg program.
func (a *Agent) retireIncompatible(spec *ebpf.CollectionSpec, layout uint64) error {
	layoutChanged := false
	metaPath := filepath.Join(a.cfg.PinPath, sockopsMapMtMeta)
	if m, err := ebpf.LoadPinnedMap(metaPath, nil); err == nil {
		var old uint64
		if spec.Maps[sockopsMapMtMeta].Compatible(m) == nil && m.Lookup(uint32(0), &old) == nil && old != 0 && old != layout {
			layoutChanged = true
		}
		m.Close()
	}
	names := make([]string, 0, len(spec.Maps))
	for name, ms := range spec.Maps {
		if ms.Pinning == ebpf.PinByName {
			names = append(names, name)
		}
	}
	slices.Sort(names)
	for _, name := range names {
		path := filepath.Join(a.cfg.PinPath, name)
		if _, err := os.Lstat(path); errors.Is(err, os.ErrNotExist) {
			continue
		}
		reason := ""
		m, err := ebpf.LoadPinnedMap(path, nil)
		switch {
		case err != nil:
			reason = fmt.Sprintf("pin is not a usable map: %v", err)
		case name != sockopsMapMtMeta && layoutChanged:
			reason = "key or value layout changed"
		default:
			if err := spec.Maps[name].Compatible(m); err != nil {
				reason = err.Error()
			}
		}
		if m != nil {
			m.Close()
		}
		if reason == "" {
			a.state.ReusedMaps = append(a.state.ReusedMaps, name)
			continue
		}
		if err := os.Remove(path); err != nil {
			return fmt.Errorf("bpf: unpin incompatible map %s: %w", name, err)
		}
		a.state.ReplacedMaps = append(a.state.ReplacedMaps, ReplacedMap{Name: name, Reason: reason})
	}
	return nil
}

func (a *Agent) sockhashReused() bool {
	return slices.Contains(a.state.ReusedMaps, sockopsMapMtSockhash)
}

// attachSkMsg attaches the verdict program to the sockhash, or adopts the pinned link of an
// earlier agent and swaps its program. A pinned link of a replaced sockhash is detached:
// sockets of that old sockhash keep the program they got at insertion.
func (a *Agent) attachSkMsg() error {
	path := filepath.Join(a.cfg.PinPath, pinLinkSkMsg)
	prog := a.redir.MtRedir
	adopted := false
	if old, err := link.LoadPinnedLink(path, nil); err == nil {
		info, ierr := old.Info()
		if ierr == nil && info.Type == linkTypeSockMap && a.sockhashReused() {
			if err := old.Update(prog); err != nil {
				old.Close()
				return fmt.Errorf("bpf: update pinned sk_msg link: %w", err)
			}
			a.skMsg, adopted = old, true
		} else {
			if err := retireLink(old); err != nil {
				return fmt.Errorf("bpf: detach stale sk_msg link: %w", err)
			}
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		if err := os.Remove(path); err != nil {
			return fmt.Errorf("bpf: remove unusable pin %s: %w", path, err)
		}
	}
	if a.skMsg == nil {
		l, err := link.AttachRawLink(link.RawLinkOptions{
			Target: a.sockops.MtSockhash.FD(), Program: prog, Attach: ebpf.AttachSkMsgVerdict,
		})
		if err != nil {
			if errors.Is(err, unix.EBUSY) {
				return fmt.Errorf("bpf: attach sk_msg to the sockhash: another program owns it: %w", err)
			}
			return fmt.Errorf("bpf: attach sk_msg to the sockhash: %w", err)
		}
		if err := l.Pin(path); err != nil {
			l.Close()
			return fmt.Errorf("bpf: pin sk_msg link: %w", err)
		}
		a.skMsg = l
	}
	a.recordAttachment("mt_redir", "sk_msg verdict on mt_sockhash", prog, a.skMsg, path, adopted)
	return nil
}

// attachSockOps attaches the sockops program to the cgroup, or adopts the pinned link of an
// earlier agent on the same cgroup and swaps its program.
func (a *Agent) attachSockOps() error {
	l, adopted, err := a.attachCgroup(pinLinkSockOps, ebpf.AttachCGroupSockOps, a.sockops.MtSockops)
	if err != nil {
		return fmt.Errorf("bpf: sockops: %w", err)
	}
	a.sockOps = l
	a.recordAttachment("mt_sockops", "cgroup sockops on "+a.cfg.CgroupPath, a.sockops.MtSockops, l,
		filepath.Join(a.cfg.PinPath, pinLinkSockOps), adopted)
	return nil
}

// attachCgroup attaches prog to the cgroup as a pinned link named pin, or adopts the pinned
// link an earlier agent left on the same cgroup and swaps its program.
func (a *Agent) attachCgroup(pin string, attach ebpf.AttachType, prog *ebpf.Program) (link.Link, bool, error) {
	path := filepath.Join(a.cfg.PinPath, pin)
	if old, err := link.LoadPinnedLink(path, nil); err == nil {
		info, ierr := old.Info()
		if ierr == nil && info.Type == link.CgroupType && info.Cgroup() != nil && info.Cgroup().CgroupId == a.cgroupID {
			if err := old.Update(prog); err != nil {
				old.Close()
				return nil, false, fmt.Errorf("update pinned link %s: %w", path, err)
			}
			return old, true, nil
		}
		if err := retireLink(old); err != nil {
			return nil, false, fmt.Errorf("detach link %s of another cgroup: %w", path, err)
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		if err := os.Remove(path); err != nil {
			return nil, false, fmt.Errorf("remove unusable pin %s: %w", path, err)
		}
	}
	l, err := link.AttachCgroup(link.CgroupOptions{Path: a.cfg.CgroupPath, Attach: attach, Program: prog})
	if err != nil {
		return nil, false, fmt.Errorf("attach to %s: %w", a.cfg.CgroupPath, err)
	}
	if err := l.Pin(path); err != nil {
		l.Close()
		if errors.Is(err, ebpf.ErrNotSupported) {
			return nil, false, &MissingFeatureError{Feature: "cgroup bpf_link (pinnable cgroup attachment)", Err: err}
		}
		return nil, false, fmt.Errorf("pin link %s: %w", path, err)
	}
	return l, false, nil
}

// linkTypeSockMap is BPF_LINK_TYPE_SOCKMAP, which cilium/ebpf does not name.
const linkTypeSockMap link.Type = 14

// retireLink detaches, unpins and closes a link.
func retireLink(l link.Link) error {
	var errs []error
	if err := l.Detach(); err != nil && !errors.Is(err, ebpf.ErrNotSupported) {
		errs = append(errs, err)
	}
	if err := l.Unpin(); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(append(errs, l.Close())...)
}

func (a *Agent) recordAttachment(name, hook string, prog *ebpf.Program, l link.Link, pin string, adopted bool) {
	att := Attachment{Program: name, Hook: hook, LinkPin: pin, Adopted: adopted}
	if info, err := prog.Info(); err == nil {
		att.ProgramID, _ = info.ID()
	}
	if info, err := l.Info(); err == nil {
		att.LinkID = info.ID
	}
	a.state.Programs = append(a.state.Programs, att)
}

// otherSockOps lists sockops programs effective on the cgroup that are not ours.
func (a *Agent) otherSockOps() []ebpf.ProgramID {
	f, err := os.Open(a.cfg.CgroupPath)
	if err != nil {
		return nil
	}
	defer f.Close()
	res, err := link.QueryPrograms(link.QueryOptions{
		Target: int(f.Fd()), Attach: ebpf.AttachCGroupSockOps, QueryFlags: unix.BPF_F_QUERY_EFFECTIVE,
	})
	if err != nil {
		return nil
	}
	var ours ebpf.ProgramID
	for _, p := range a.state.Programs {
		if p.Program == "mt_sockops" {
			ours = p.ProgramID
		}
	}
	var out []ebpf.ProgramID
	for _, p := range res.Programs {
		if p.ID != ours {
			out = append(out, p.ID)
		}
	}
	return out
}

// State returns what New found and did, and the current mesh set.
func (a *Agent) State() State {
	a.mu.Lock()
	defer a.mu.Unlock()
	s := a.state
	s.Features = slices.Clone(s.Features)
	s.Programs = slices.Clone(s.Programs)
	s.MeshIPs, s.SidecarPorts = a.mesh.lists()
	if !a.closed {
		s.OtherSockOps = a.otherSockOps()
	}
	if a.sweeper != nil {
		s.Unhook = a.sweeper.status(s.Unhook)
	}
	s.Redirect.SidecarCgroups = slices.Clone(s.Redirect.SidecarCgroups)
	return s
}

// Close releases this process's handles. Pinned maps and links stay, so acceleration goes on
// and the next New adopts them.
func (a *Agent) Close() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.closed {
		return nil
	}
	a.closed = true
	return a.closeHandles()
}

func (a *Agent) closeHandles() error {
	var errs []error
	a.stopSweeper()
	for _, l := range []link.Link{a.connect, a.getsockOpt, a.sockOps, a.skMsg} {
		if l != nil {
			errs = append(errs, l.Close())
		}
	}
	errs = append(errs, a.connect4.Close(), a.getsockopt.Close(), a.unhook.Close(), a.listeners.Close(), a.redir.Close(), a.sockops.Close())
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("bpf: close: %w", err)
	}
	return nil
}

// Uninstall stops acceleration for new connections and removes every pinned object (see
// the package function Uninstall). The Agent is closed afterwards.
func (a *Agent) Uninstall() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	var errs []error
	if !a.closed {
		a.closed = true
		errs = append(errs, a.closeHandles())
	}
	errs = append(errs, Uninstall(a.cfg.PinPath))
	return errors.Join(errs...)
}

// Uninstall removes meshturbo's pins under pinPath: it first detaches the connect4 link (no
// connect is redirected any more), the getsockopt and sockops links (no socket is inserted
// any more), then the sk_msg link, then unpins the maps (mt_*) and removes
// the directory. It never deletes a sockhash entry: pairs already accelerated keep
// redirecting until they close, then the kernel frees the sockhash and the programs. Works
// without loading anything, e.g. after an upgrade changed the objects.
func Uninstall(pinPath string) error {
	var errs []error
	for _, name := range []string{pinLinkConnect4, pinLinkGetsockopt, pinLinkSockOps, pinLinkSkMsg} {
		path := filepath.Join(pinPath, name)
		l, err := link.LoadPinnedLink(path, nil)
		switch {
		case errors.Is(err, os.ErrNotExist):
			continue
		case err != nil:
			errs = append(errs, fmt.Errorf("bpf: uninstall: load %s: %w", path, err))
			if rerr := os.Remove(path); rerr != nil {
				errs = append(errs, rerr)
			}
			continue
		}
		if err := retireLink(l); err != nil {
			errs = append(errs, fmt.Errorf("bpf: uninstall: detach %s: %w", path, err))
		}
	}
	entries, err := os.ReadDir(pinPath)
	if errors.Is(err, os.ErrNotExist) {
		return errors.Join(errs...)
	}
	if err != nil {
		return errors.Join(append(errs, fmt.Errorf("bpf: uninstall: %w", err))...)
	}
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), "mt_") || strings.HasPrefix(e.Name(), "link_") {
			if err := os.Remove(filepath.Join(pinPath, e.Name())); err != nil {
				errs = append(errs, fmt.Errorf("bpf: uninstall: unpin: %w", err))
			}
		}
	}
	if err := os.Remove(pinPath); err != nil {
		errs = append(errs, fmt.Errorf("bpf: uninstall: remove %s (not ours, left in place?): %w", pinPath, err))
	}
	return errors.Join(errs...)
}
