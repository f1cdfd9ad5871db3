package main

import (
	"encoding/json"
	"time"
)

// The daemons' admin JSON, as far as meshctl shows it in tables. meshctl keeps its own copies
// instead of importing the daemons' packages (which would link Consul, ZooKeeper and BPF
// libraries into the CLI); -o json and -o yaml print the daemons' answers unchanged, so a
// field meshctl does not know yet is still shown there. The e2e tests decode the real
// daemons' answers into these types, and TestAccelTypesFollowTheAgent checks the agent's
// state and counters field by field, so a drift fails there.

// sourceStatus is one element of meshturbo-xds GET /v1/registries.
type sourceStatus struct {
	Source      string        `json:"source"`
	Synced      bool          `json:"synced"`
	LastSync    time.Time     `json:"last_sync"`
	Services    int           `json:"services"`
	Endpoints   int           `json:"endpoints"`
	Skipped     []skippedItem `json:"skipped"`
	SyncLatency int64         `json:"sync_latency_ns"`
	Stale       bool          `json:"stale"`
	LastContact time.Time     `json:"last_contact"`
	LastError   string        `json:"last_error"`
}

type skippedItem struct {
	Source   string `json:"source"`
	Hostname string `json:"hostname"`
	Code     string `json:"code"`
	ID       string `json:"id"`
	Reason   string `json:"reason"`
}

// service is one element of meshturbo-xds GET /v1/services (the model's field names).
type service struct {
	Hostname  string
	Namespace string
	Source    string
	Ports     []servicePort
	Endpoints []endpoint
	Labels    map[string]string
}

type servicePort struct {
	Name     string
	Number   uint32
	Protocol string
}

type endpoint struct {
	ID       string
	Address  string
	Ports    map[string]uint32
	Labels   map[string]string
	Locality string
	Weight   uint32
	Meshed   bool
}

// xdsClient is one element of meshturbo-xds GET /v1/xds/clients.
type xdsClient struct {
	NodeID    string            `json:"node_id"`
	Connected time.Time         `json:"connected"`
	Acked     map[string]string `json:"acked"`
	Nacked    map[string]string `json:"nacked"`
}

// The lazy-loading contract of meshturbo-xds:
//
//	GET /v1/lazyload/edges[?workload=<namespace>/<name>] → {"edges": [edge...]}
//	GET /v1/lazyload/scopes                            → {"scopes": [scope...]}
//	GET /v1/lazyload/scopes/{namespace}/{name}         → scope, or 404 {"error": ...}
type edgeList struct {
	Edges []edge `json:"edges"`
}

type edge struct {
	Workload  string    `json:"workload"`
	Host      string    `json:"host"`
	Port      uint32    `json:"port"`
	Protocol  string    `json:"protocol"`
	Origin    string    `json:"origin"` // learned or static
	FirstSeen time.Time `json:"firstSeen"`
	LastSeen  time.Time `json:"lastSeen"`
	Hits      uint64    `json:"hits"`
	Expires   time.Time `json:"expires"` // zero for static edges
}

type scopeList struct {
	Scopes []scope `json:"scopes"`
}

type scope struct {
	Workload     string            `json:"workload"`
	Namespace    string            `json:"namespace"`
	Selector     map[string]string `json:"selector"`
	Hosts        []string          `json:"hosts"`
	Version      string            `json:"version"`
	FallbackHits uint64            `json:"fallbackHits"`
}

// accelStatus is meshturbo-agent GET /v1/accel.
type accelStatus struct {
	Accelerating   bool           `json:"accelerating"`
	FallbackReason string         `json:"fallback_reason"`
	Features       []accelFeature `json:"features"`
	State          *accelState    `json:"state"`
	Stats          *accelStats    `json:"stats"`
	Sockets        int            `json:"accelerated_sockets"`
	Error          string         `json:"error"`
}

type accelFeature struct {
	Feature   string `json:"feature"`
	Supported bool   `json:"supported"`
	Error     string `json:"error"`
}

type accelState struct {
	PinPath      string            `json:"pin_path"`
	CgroupPath   string            `json:"cgroup_path"`
	MaxConns     uint32            `json:"max_conns"`
	SmallMsg     uint32            `json:"small_msg"`
	SmallRun     uint32            `json:"small_run"`
	QueueLimit   uint32            `json:"queue_limit"`
	Programs     []accelAttachment `json:"programs"`
	ReusedMaps   []string          `json:"reused_maps"`
	ReplacedMaps []struct {
		Name   string `json:"name"`
		Reason string `json:"reason"`
	} `json:"replaced_maps"`
	OtherOwners  []json.RawMessage `json:"other_owners"`
	OtherSockOps []uint32          `json:"other_sockops"`
	MeshIPs      []string          `json:"mesh_ips"`
	SidecarPorts []uint16          `json:"sidecar_ports"`
	Unhook       struct {
		On        bool   `json:"on"`
		Off       string `json:"off"`
		LastError string `json:"last_error"`
		Deferred  int    `json:"deferred"`
	} `json:"unhook"`
	Listeners struct {
		On     bool   `json:"on"`
		Seeded int    `json:"seeded"`
		Off    string `json:"off"`
	} `json:"listeners"`
	Redirect struct {
		On          bool     `json:"on"`
		Off         string   `json:"off"`
		SidecarAddr string   `json:"sidecar_addr"`
		Cgroups     []string `json:"sidecar_cgroups"`
	} `json:"redirect"`
}

type accelAttachment struct {
	Program   string `json:"program"`
	Hook      string `json:"hook"`
	ProgramID uint32 `json:"program_id"`
	LinkID    uint32 `json:"link_id"`
	LinkPin   string `json:"link_pin"`
	Adopted   bool   `json:"adopted"`
}

// accelStats are the agent's counters (bpf.Stats), summed over CPUs since the programs loaded.
type accelStats struct {
	SocketsInserted   uint64 `json:"sockets_inserted"`
	InsertFailed      uint64 `json:"insert_failed"`
	InsertBusy        uint64 `json:"insert_busy"`
	InsertFull        uint64 `json:"insert_full"`
	SocketsSkipped    uint64 `json:"sockets_skipped"`
	MsgRedirected     uint64 `json:"msg_redirected"`
	BytesRedirected   uint64 `json:"bytes_redirected"`
	MsgFallthrough    uint64 `json:"msg_fallthrough"`
	BytesFallthrough  uint64 `json:"bytes_fallthrough"`
	MsgTCPOnly        uint64 `json:"msg_tcp_only"`
	BytesTCPOnly      uint64 `json:"bytes_tcp_only"`
	SocketsDemoted    uint64 `json:"sockets_demoted"`
	SocketsUnhooked   uint64 `json:"sockets_unhooked"`
	UnhookDeferred    uint64 `json:"unhook_deferred"`
	QueueBackoff      uint64 `json:"queue_backoff"`
	QueueResumed      uint64 `json:"queue_resumed"`
	QueueUnknown      uint64 `json:"queue_unknown"`
	BlockingDemoted   uint64 `json:"blocking_demoted"`
	BlockingSkipped   uint64 `json:"blocking_skipped"`
	Unpaired          uint64 `json:"unpaired"`
	ConnectRedirected uint64 `json:"connect_redirected"`
	ConnectSidecar    uint64 `json:"connect_sidecar"`
	ConnectExcluded   uint64 `json:"connect_excluded"`
	OrigDstRecorded   uint64 `json:"orig_dst_recorded"`
	OrigDstAnswered   uint64 `json:"orig_dst_answered"`
	StateFailed       uint64 `json:"state_failed"`
}

// vppStatus is meshturbo-agent GET /v1/vpp in VPP mode: the vpp package's Status plus the
// agent's sockets, hand-off directory, sidecar count and the owned interfaces' counters
// (cmd/meshturbo-agent/vpp.go).
type vppStatus struct {
	Connected      bool          `json:"connected"`
	Version        string        `json:"version"`
	Connects       int           `json:"connects"`
	ConnectError   string        `json:"connectError"`
	Uplink         *vppUplink    `json:"uplink"`
	Namespaces     []string      `json:"namespaces"`
	LastApply      time.Time     `json:"lastApply"`
	LastApplyError string        `json:"lastApplyError"`
	StatsError     string        `json:"statsError"`
	Fatal          string        `json:"fatal"`
	APISocket      string        `json:"apiSocket"`
	StatsSocket    string        `json:"statsSocket"`
	HandoffDir     string        `json:"handoffDir"`
	Sidecars       int           `json:"sidecars"`
	Interfaces     []vppCounters `json:"interfaces"`
	MeshError      string        `json:"meshError"`
}

type vppCounters struct {
	SwIfIndex uint32 `json:"swIfIndex"`
	Name      string `json:"name"`
	RxPackets uint64 `json:"rxPackets"`
	RxBytes   uint64 `json:"rxBytes"`
	TxPackets uint64 `json:"txPackets"`
	TxBytes   uint64 `json:"txBytes"`
	Drops     uint64 `json:"drops"`
	RxErrors  uint64 `json:"rxErrors"`
	TxErrors  uint64 `json:"txErrors"`
}

type vppUplink struct {
	SwIfIndex uint32 `json:"swIfIndex"`
	Name      string `json:"name"`
	Driver    string `json:"driver"`
	Device    string `json:"device"`
}

// upgradeStatus is meshturbo-upgrade GET /v1/upgrade.
type upgradeStatus struct {
	Epoch             int            `json:"epoch"`
	Version           string         `json:"version"`
	Binary            string         `json:"binary"`
	HotRestartVersion string         `json:"hot_restart_version"`
	PID               int            `json:"pid"`
	Started           time.Time      `json:"started"`
	Phase             string         `json:"phase"`
	BaseID            int            `json:"base_id"`
	AdminClosed       bool           `json:"admin_closed"`
	Upgrades          int            `json:"upgrades"`
	Rollbacks         int            `json:"rollbacks"`
	Rejected          int            `json:"rejected"`
	Last              *upgradeResult `json:"last_upgrade"`
}

// upgradeResult is the answer of meshturbo-upgrade POST /v1/upgrade.
type upgradeResult struct {
	Outcome        string    `json:"outcome"`
	Error          string    `json:"error"`
	FromEpoch      int       `json:"from_epoch"`
	ToEpoch        int       `json:"to_epoch"`
	FromVersion    string    `json:"from_version"`
	ToVersion      string    `json:"to_version"`
	Started        time.Time `json:"started"`
	PrecheckMS     int64     `json:"precheck_ms"`
	HandoffMS      int64     `json:"handoff_ms"`
	ProbeMS        int64     `json:"probe_ms"`
	DrainMS        int64     `json:"drain_ms"`
	TotalMS        int64     `json:"total_ms"`
	OldConnections int       `json:"old_connections"`
	OldStopped     string    `json:"old_stopped"`
}

// The upgrade manager's phases and outcomes (package hotupgrade).
const (
	phaseServing     = "serving"
	phasePrechecking = "prechecking"
	phaseHandingOff  = "handing_off"
	phaseProbing     = "probing"
	phaseDraining    = "draining"
	phaseRollingBack = "rolling_back"
	phaseStarting    = "starting"

	outcomeUpgraded = "upgraded"
)
