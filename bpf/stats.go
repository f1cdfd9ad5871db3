package bpf

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf"
)

// Stats are the programs' counters, summed over CPUs. They live in a pinned map, so they
// survive agent restarts.
type Stats struct {
	// SocketsInserted counts sockets put into the sockhash.
	SocketsInserted uint64 `json:"sockets_inserted"`
	// InsertFailed counts failed inserts of mesh sockets (never silent); InsertBusy and
	// InsertFull are the parts due to another sockmap owner (EBUSY) and a full sockhash.
	InsertFailed uint64 `json:"insert_failed"`
	InsertBusy   uint64 `json:"insert_busy"`
	InsertFull   uint64 `json:"insert_full"`
	// SocketsSkipped counts established sockets in the cgroup that are not mesh pairs.
	SocketsSkipped uint64 `json:"sockets_skipped"`
	// MsgRedirected and BytesRedirected count sends handed straight to the peer socket.
	MsgRedirected   uint64 `json:"msg_redirected"`
	BytesRedirected uint64 `json:"bytes_redirected"`
	// MsgFallthrough and BytesFallthrough count sends whose peer was not in the sockhash;
	// they took the normal TCP path.
	MsgFallthrough   uint64 `json:"msg_fallthrough"`
	BytesFallthrough uint64 `json:"bytes_fallthrough"`
	// MsgTCPOnly and BytesTCPOnly count sends of sockets kept on the TCP path: after an
	// earlier miss (so that their bytes can't be read out of order) or for streaming small
	// writes.
	MsgTCPOnly   uint64 `json:"msg_tcp_only"`
	BytesTCPOnly uint64 `json:"bytes_tcp_only"`
	// SocketsDemoted counts sockets moved to the TCP path for streaming small writes
	// (Config.SmallMsg); their later sends count in MsgTCPOnly.
	SocketsDemoted uint64 `json:"sockets_demoted"`
	// SocketsUnhooked counts sockets of demoted pairs taken out of the sockhash: they send
	// and receive as plain TCP again. UnhookDeferred counts sweeps that had to leave such a
	// socket in place for now (grace period, or redirected bytes still unread).
	SocketsUnhooked uint64 `json:"sockets_unhooked"`
	UnhookDeferred  uint64 `json:"unhook_deferred"`
	// QueueBackoff counts sends that found their peer holding Config.QueueLimit redirected
	// bytes unread: the socket moved to the TCP path, where flow control applies, until the
	// peer has read all it sent there; QueueResumed counts sockets redirecting again after
	// that. QueueUnknown counts sends whose peer's queue could not be read: their pair moved
	// to the TCP path for good (counted in SocketsDemoted as well).
	QueueBackoff uint64 `json:"queue_backoff"`
	QueueResumed uint64 `json:"queue_resumed"`
	QueueUnknown uint64 `json:"queue_unknown"`
	// BlockingDemoted counts sends whose pair moved to the TCP path because one end's file
	// is in blocking mode (a signal would turn its blocking read into EAGAIN when
	// redirected); counted in SocketsDemoted as well.
	BlockingDemoted uint64 `json:"blocking_demoted"`
	// BlockingSkipped counts mesh sockets never inserted because they would read in
	// blocking mode: the connecting socket's file blocks, or the listener that will accept
	// the connection does. Unpaired counts accepted mesh sockets never inserted because the
	// connecting end is not in the sockhash (skipped as blocking, outside the cgroup,
	// refused, or its addresses differ as with iptables NAT): no send could be redirected.
	BlockingSkipped uint64 `json:"blocking_skipped"`
	Unpaired        uint64 `json:"unpaired"`
	// ConnectRedirected counts connects the redirect mode sent to the sidecar;
	// ConnectSidecar and ConnectExcluded those it left alone because the sidecar made them
	// or their destination is excluded.
	ConnectRedirected uint64 `json:"connect_redirected"`
	ConnectSidecar    uint64 `json:"connect_sidecar"`
	ConnectExcluded   uint64 `json:"connect_excluded"`
	// OrigDstRecorded counts redirected connections whose original destination was filed
	// under their addresses; OrigDstAnswered the SO_ORIGINAL_DST calls answered with one.
	OrigDstRecorded uint64 `json:"orig_dst_recorded"`
	OrigDstAnswered uint64 `json:"orig_dst_answered"`
	// StateFailed counts mesh sockets left out because their per-socket state could not
	// be made (also counted in InsertFailed), and sends of sockets without it.
	StateFailed uint64 `json:"state_failed"`
}

// Stats reads the counters.
func (a *Agent) Stats() (Stats, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.closed {
		return Stats{}, errors.New("bpf: stats: agent closed")
	}
	return readStats(a.sockops.MtStats)
}

func readStats(m *ebpf.Map) (Stats, error) {
	var per []sockopsMtCounters
	if err := m.Lookup(uint32(0), &per); err != nil {
		return Stats{}, fmt.Errorf("bpf: read counters: %w", err)
	}
	var s Stats
	for _, c := range per {
		s.SocketsInserted += c.SockInserted
		s.InsertFailed += c.SockInsertFailed
		s.InsertBusy += c.SockInsertBusy
		s.InsertFull += c.SockInsertFull
		s.SocketsSkipped += c.SockSkipped
		s.MsgRedirected += c.MsgRedirected
		s.BytesRedirected += c.BytesRedirected
		s.MsgFallthrough += c.MsgFallthrough
		s.BytesFallthrough += c.BytesFallthrough
		s.MsgTCPOnly += c.MsgTcpOnly
		s.BytesTCPOnly += c.BytesTcpOnly
		s.StateFailed += c.SkStateFailed
		s.SocketsDemoted += c.SockDemoted
		s.SocketsUnhooked += c.SockUnhooked
		s.UnhookDeferred += c.UnhookDeferred
		s.ConnectRedirected += c.ConnectRedirected
		s.ConnectSidecar += c.ConnectSidecar
		s.ConnectExcluded += c.ConnectExcluded
		s.OrigDstRecorded += c.OrigDstRecorded
		s.OrigDstAnswered += c.OrigDstAnswered
		s.QueueBackoff += c.QueueBackoff
		s.QueueResumed += c.QueueResumed
		s.QueueUnknown += c.QueueUnknown
		s.BlockingDemoted += c.SockBlockingDemoted
		s.BlockingSkipped += c.SockBlockingSkipped
		s.Unpaired += c.SockUnpaired
	}
	return s, nil
}
