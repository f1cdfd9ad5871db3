package lazyload

import (
	"context"
	"log/slog"
	"sync"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	accesslogdata "github.com/envoyproxy/go-control-plane/envoy/data/accesslog/v3"
	alsv3 "github.com/envoyproxy/go-control-plane/envoy/service/accesslog/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// peerLogName marks access-log streams between meshturbo-xds replicas: edges arriving on them
// are learned but not forwarded again and not counted as fallback calls.
const peerLogName = "meshturbo-lazyload-peer"

// Replicas of meshturbo-xds share what they learn, so that istiod gets the same Sidecars
// whichever replica it is connected to: each replica forwards every edge it learns from the
// fallback to its peers, over the same access-log service the fallback uses (peers receive it
// as if the fallback had logged the call). On every (re)connection to a peer a replica sends
// all its learned edges, so a restarted peer catches up; the edge set, and so the Sidecar
// versions, converge.

// peer streams edges to one other replica. It owns one goroutine.
type peer struct {
	addr  string
	c     *Controller
	log   *slog.Logger
	kick  chan struct{}
	stop  chan struct{}
	done  chan struct{}
	mu    sync.Mutex
	queue []EdgeKey
}

func newPeer(addr string, c *Controller) *peer {
	p := &peer{addr: addr, c: c, log: c.log.With("peer", addr), kick: make(chan struct{}, 1), stop: make(chan struct{}), done: make(chan struct{})}
	go p.run()
	return p
}

// send queues a newly learned edge for the peer.
func (p *peer) send(k EdgeKey) {
	p.mu.Lock()
	p.queue = append(p.queue, k)
	p.mu.Unlock()
	select {
	case p.kick <- struct{}{}:
	default:
	}
}

func (p *peer) close() {
	close(p.stop)
	<-p.done
}

func (p *peer) run() {
	defer close(p.done)
	backoff := 100 * time.Millisecond
	for {
		synced, err := p.stream()
		if synced {
			backoff = 100 * time.Millisecond
		}
		select {
		case <-p.stop:
			return
		case <-time.After(backoff):
		}
		if err != nil {
			p.log.Debug("lazy-load peer stream ended; reconnecting", "error", err, "after", backoff)
		}
		backoff = min(backoff*2, 5*time.Second)
	}
}

// stream connects, sends every learned edge, then forwards new ones until an error or stop.
// An empty message every heartbeat finds a broken stream (a client stream learns of it only
// when it sends). synced reports whether the full set reached the peer.
func (p *peer) stream() (synced bool, err error) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		select {
		case <-p.stop:
			cancel()
		case <-ctx.Done():
		}
	}()
	conn, err := grpc.NewClient(p.addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return false, err
	}
	defer conn.Close()
	s, err := alsv3.NewAccessLogServiceClient(conn).StreamAccessLogs(ctx)
	if err != nil {
		return false, err
	}
	var all []EdgeKey
	for _, e := range p.c.graph.Edges("") {
		if e.Origin == OriginLearned {
			all = append(all, e.EdgeKey)
		}
	}
	p.mu.Lock()
	p.queue = nil // everything queued so far is in the full set
	p.mu.Unlock()
	if err := s.Send(p.message(all, true)); err != nil {
		return false, err
	}
	heartbeat := time.NewTicker(time.Second)
	defer heartbeat.Stop()
	for {
		select {
		case <-ctx.Done():
			_, _ = s.CloseAndRecv()
			return true, ctx.Err()
		case <-heartbeat.C:
		case <-p.kick:
		}
		p.mu.Lock()
		batch := p.queue
		p.queue = nil
		p.mu.Unlock()
		if err := s.Send(p.message(batch, false)); err != nil {
			return true, err // the next stream starts with the full set, batch included
		}
	}
}

func (p *peer) message(keys []EdgeKey, first bool) *alsv3.StreamAccessLogsMessage {
	entries := make([]*accesslogdata.HTTPAccessLogEntry, 0, len(keys))
	for _, k := range keys {
		w := p.c.workload(k.Workload)
		if w == nil {
			continue
		}
		entries = append(entries, &accesslogdata.HTTPAccessLogEntry{CommonProperties: &accesslogdata.AccessLogCommon{
			UpstreamCluster: clusterName(k.Host, k.Port),
			TlsProperties: &accesslogdata.TLSProperties{PeerCertificateProperties: &accesslogdata.TLSProperties_CertificateProperties{
				SubjectAltName: []*accesslogdata.TLSProperties_CertificateProperties_SubjectAltName{{
					San: &accesslogdata.TLSProperties_CertificateProperties_SubjectAltName_Uri{Uri: spiffeID(p.c.cfg.TrustDomain, w.Namespace, w.ServiceAccount)},
				}},
			}},
		}})
	}
	m := &alsv3.StreamAccessLogsMessage{LogEntries: &alsv3.StreamAccessLogsMessage_HttpLogs{
		HttpLogs: &alsv3.StreamAccessLogsMessage_HTTPAccessLogEntries{LogEntry: entries},
	}}
	if first {
		m.Identifier = &alsv3.StreamAccessLogsMessage_Identifier{Node: &core.Node{Id: "meshturbo-xds"}, LogName: peerLogName}
	}
	return m
}
