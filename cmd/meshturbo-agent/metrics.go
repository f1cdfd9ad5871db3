package main

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/meshturbo/meshturbo/bpf"
)

// collector exports the agent's counters at scrape time.
type collector struct {
	n *node

	enabled, sockets, inserted, insertFailed, skipped, demoted, msgs, bytes *prometheus.Desc
	unhooked, unhookDeferred, connects, origDst, otherOwners, queue, kept   *prometheus.Desc
}

func newCollector(n *node) *collector {
	d := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc("meshturbo_accel_"+name, help, labels, nil)
	}
	return &collector{
		n:              n,
		enabled:        d("enabled", "1 while acceleration is on; 0 in fallback (the kernel lacks a feature)."),
		sockets:        d("sockets", "Sockets in the sockhash now (two per accelerated connection)."),
		inserted:       d("sockets_inserted_total", "Sockets put into the sockhash."),
		insertFailed:   d("insert_failed_total", "Mesh sockets that could not be put into the sockhash, by reason (busy: another sockmap owner; full; other).", "reason"),
		skipped:        d("sockets_skipped_total", "Established sockets in the cgroup that are not mesh pairs."),
		demoted:        d("sockets_demoted_total", "Sockets moved to the TCP path for good: they streamed small writes, missed their peer, have a blocking end, or their peer's queue could not be read."),
		queue:          d("queue_events_total", "Bounded queueing, by event (backoff: a socket's peer held the queue limit unread, its sends took the TCP path; resumed: it redirects again, its peer read all; unknown: the peer's queue could not be read, the pair stays on TCP).", "event"),
		kept:           d("sockets_kept_out_total", "Mesh sockets never put into the sockhash, by reason (blocking: the connecting socket or the accepting listener is in blocking mode, where a signal would turn a read into EAGAIN; unpaired: the connecting end is not in the sockhash).", "reason"),
		msgs:           d("messages_total", "Sends seen by the sk_msg program, by path (redirected; fallthrough: peer not in the sockhash; tcp_only: socket kept on TCP after a miss or for streaming small writes).", "path"),
		bytes:          d("bytes_total", "Bytes of those sends, by path.", "path"),
		otherOwners:    d("other_owners", "Other sockmap owners found on the cgroup at start (the agent runs beside them only with -coexist-with-other-owners); alert when > 0."),
		unhooked:       d("sockets_unhooked_total", "Sockets of demoted pairs taken out of the sockhash: plain TCP again."),
		unhookDeferred: d("unhook_deferred_total", "Times a socket of a demoted pair had to stay in the sockhash for now (grace period, or redirected bytes unread)."),
		connects:       d("redirect_connects_total", "TCP connects seen by the redirect mode, by outcome (redirected; sidecar: the sidecar's own; excluded: port or CIDR).", "outcome"),
		origDst:        d("redirect_original_dst_total", "Original destinations of redirected connections, by step (recorded at establishment; answered to SO_ORIGINAL_DST).", "step"),
	}
}

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.enabled, c.sockets, c.inserted, c.insertFailed, c.skipped, c.demoted, c.msgs, c.bytes,
		c.unhooked, c.unhookDeferred, c.connects, c.origDst, c.otherOwners, c.queue, c.kept} {
		ch <- d
	}
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	counter := func(d *prometheus.Desc, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	if c.n.agent == nil {
		gauge(c.enabled, 0)
		return
	}
	gauge(c.enabled, 1)
	gauge(c.otherOwners, float64(len(c.n.agent.State().OtherOwners)))
	if keys, err := c.n.agent.Sockets(); err == nil {
		gauge(c.sockets, float64(len(keys)))
	}
	s, err := c.n.agent.Stats()
	if err != nil {
		return
	}
	collectStats(s, counter, c)
}

func collectStats(s bpf.Stats, counter func(*prometheus.Desc, uint64, ...string), c *collector) {
	counter(c.inserted, s.SocketsInserted)
	counter(c.insertFailed, s.InsertBusy, "busy")
	counter(c.insertFailed, s.InsertFull, "full")
	counter(c.insertFailed, s.InsertFailed-s.InsertBusy-s.InsertFull, "other")
	counter(c.skipped, s.SocketsSkipped)
	counter(c.demoted, s.SocketsDemoted)
	counter(c.kept, s.BlockingSkipped, "blocking")
	counter(c.kept, s.Unpaired, "unpaired")
	counter(c.msgs, s.MsgRedirected, "redirected")
	counter(c.msgs, s.MsgFallthrough, "fallthrough")
	counter(c.msgs, s.MsgTCPOnly, "tcp_only")
	counter(c.bytes, s.BytesRedirected, "redirected")
	counter(c.bytes, s.BytesFallthrough, "fallthrough")
	counter(c.bytes, s.BytesTCPOnly, "tcp_only")
	counter(c.queue, s.QueueBackoff, "backoff")
	counter(c.queue, s.QueueResumed, "resumed")
	counter(c.queue, s.QueueUnknown, "unknown")
	counter(c.unhooked, s.SocketsUnhooked)
	counter(c.unhookDeferred, s.UnhookDeferred)
	counter(c.connects, s.ConnectRedirected, "redirected")
	counter(c.connects, s.ConnectSidecar, "sidecar")
	counter(c.connects, s.ConnectExcluded, "excluded")
	counter(c.origDst, s.OrigDstRecorded, "recorded")
	counter(c.origDst, s.OrigDstAnswered, "answered")
}
