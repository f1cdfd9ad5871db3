/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* mesh.h: constants and small helpers shared by meshturbo's BPF programs. */
#ifndef MESHTURBO_MESH_H
#define MESHTURBO_MESH_H

#include <linux/types.h>
#include <bpf/bpf_endian.h>

#define AF_INET 2
#define AF_INET6 10

/* Sizes of the maps; the loader may override MT_MAX_CONNS (sockhash entries). */
#define MT_MAX_CONNS 65536
#define MT_MAX_PAIRS 32768
#define MT_MAX_MESH_IPS 4096
#define MT_MAX_SIDECAR_PORTS 256
#define MT_MAX_ORIG_DST 65536
#define MT_MAX_SIDECAR_CGROUPS 256
#define MT_MAX_EXCLUDED 256
#define MT_MAX_LISTENERS 4096

/* Socket and address constants (no libc headers in BPF objects). */
#define SOCK_STREAM 1
#define IPPROTO_TCP 6
#define SOL_IP 0
#define SO_ORIGINAL_DST 80

/* mt_mesh_ips values. */
#define MT_IP_MESH 1

/* mt_sk_state.flags: MT_SK_TCP_ONLY is set on a socket whose send missed its peer once, or
 * that streams small writes (see redir.c). From then on all of its sends take the TCP path.
 * The switch is one way on purpose: bytes redirected earlier sit in the peer's ingress queue,
 * which the peer reads before its TCP receive queue, so redirect-then-TCP keeps the order,
 * while TCP-then-redirect could be read out of order. */
#define MT_SK_TCP_ONLY 1
/* MT_SK_BACKOFF is set on a socket whose peer held mt_queue_limit redirected bytes unread
 * (redir.c): its sends take the TCP path, where flow control applies, until its peer has
 * read every byte it sent that way; then it redirects again. */
#define MT_SK_BACKOFF 2
/* MT_SK_SENT is set on a socket's first send seen by redir.c. */
#define MT_SK_SENT 4

/* An IP address in 16 bytes, network byte order: IPv6 as is, IPv4 as ::ffff:a.b.c.d, so
 * that an AF_INET socket and a dual-stack AF_INET6 socket of one IPv4 connection build the
 * same keys. */
struct mt_ip {
	__u32 addr[4];
};

/* The sockhash key: one end of a TCP connection, seen from that end. Ports are in host byte
 * order. sockops and sk_msg both build it with mt_port_from_ctx for the remote port, which
 * the kernel hands over in network byte order in the upper half of a 32-bit field. */
struct mt_sock_key {
	struct mt_ip local_ip;
	struct mt_ip remote_ip;
	__u16 local_port;
	__u16 remote_port;
};

/* Per-CPU counters; user space sums them over CPUs. Every path through a program counts. */
struct mt_counters {
	__u64 sock_inserted;      /* sockets put into the sockhash */
	__u64 sock_insert_failed; /* bpf_sock_hash_update failed (all causes) */
	__u64 sock_insert_busy;   /* ... with EBUSY: another sockmap owner holds the socket */
	__u64 sock_insert_full;   /* ... with E2BIG/ENOMEM: the sockhash is full */
	__u64 sock_skipped;       /* established in the cgroup but not a mesh pair */
	__u64 msg_redirected;     /* sends redirected to the peer socket */
	__u64 bytes_redirected;
	__u64 msg_fallthrough;    /* sends whose peer was not in the sockhash: normal TCP path */
	__u64 bytes_fallthrough;
	__u64 msg_tcp_only;       /* sends of a socket kept on TCP after an earlier miss */
	__u64 bytes_tcp_only;
	__u64 sk_state_failed;    /* mesh sockets without state: not inserted / not redirected */
	__u64 sock_demoted;       /* sockets moved to TCP for streaming small writes */
	__u64 sock_unhooked;      /* demoted sockets taken out of the sockhash (unhook.c) */
	__u64 unhook_deferred;    /* ... not yet: redirected bytes still unread, or in grace */
	__u64 connect_redirected; /* connects sent to the sidecar's outbound port (connect4.c) */
	__u64 connect_sidecar;    /* connects of the sidecar itself: never redirected */
	__u64 connect_excluded;   /* connects to an excluded port or CIDR: never redirected */
	__u64 orig_dst_recorded;  /* original destinations handed from connect to the 4-tuple */
	__u64 orig_dst_answered;  /* SO_ORIGINAL_DST answered by getsockopt.c */
	__u64 queue_backoff;      /* sockets moved to TCP for a while: the peer held mt_queue_limit unread */
	__u64 queue_unknown;      /* pairs moved to TCP for good: the peer's queue could not be read */
	__u64 sock_blocking_demoted; /* pairs moved to TCP: an end's file is in blocking mode */
	__u64 queue_resumed;      /* backed-off sockets redirecting again: the peer read all */
	__u64 sock_blocking_skipped; /* mesh sockets not inserted: their connect or listen socket blocks */
	__u64 sock_unpaired;      /* mesh sockets not inserted: the connecting end is not in our sockhash */
};

/* Per-socket state (socket local storage). peer_addr and peer_cookie cache the peer's
 * mt_sk_addrs record (redir.c), so that a send does not look it up again while the socket at
 * that address still has that cookie and a psock; 0 until the first send that found it. */
struct mt_sk_state {
	__u32 flags;
	__u32 pad;
	__u64 peer_addr;
	__u64 peer_cookie;
};

/* mt_pair_state.flags: MT_PAIR_DEMOTED is set when one end streamed small writes. From then
 * on both ends send on the TCP path, and unhook.c takes each end out of the sockhash once
 * mt_unhook_grace_ns (unhook.c) has passed and no redirected byte waits unread in its queue: only
 * then does the socket send and receive as plain TCP again, at plain TCP's cost. */
#define MT_PAIR_DEMOTED 1
/* MT_PAIR_REDIRECTED is set (atomically, before the first redirect of either end) once a
 * send of the pair is redirected. A demoted pair without it never had a redirect decided
 * (every later verdict sees the demotion), so unhook.c may take it out at once. */
#define MT_PAIR_REDIRECTED 2

/* Per connection (keyed by the key of its lower end, see mt_key_less): which end sent last
 * and how many small sends it made in a row, whether it was demoted and whether anything
 * was redirected. flags is only changed with atomic or (both ends' verdicts race on it). */
struct mt_pair_state {
	__u32 last_sender; /* 1: the lower end, 2: the other; 0: none yet */
	__u32 small_run;
	__u32 flags;
	/* quiet[side - 1] is set once that end is known to have no redirect in flight any
	 * more after the demotion (unhook.c), or never could redirect (redir.c). One byte per
	 * end: each is written alone (no atomic or-instruction on the default BPF CPU). */
	__u8 quiet[2];
	__u16 pad;
	__u64 demoted_ns; /* bpf_ktime_get_ns() when MT_PAIR_DEMOTED was set */
};

/* mt_set_quiet marks end side (1 or 2) of a pair quiet. */
static __always_inline void mt_set_quiet(struct mt_pair_state *ps, __u32 side)
{
	if (side == 1)
		ps->quiet[0] = 1;
	else
		ps->quiet[1] = 1;
}

static __always_inline int mt_is_quiet(const struct mt_pair_state *ps, __u32 side)
{
	return side == 1 ? ps->quiet[0] : ps->quiet[1];
}

/* Where a socket of the sockhash lives (struct sock *), and its cookie, so that redir.c can
 * read how many redirected bytes its peer holds unread: an sk_msg program can't look a
 * socket up (that needs bpf_sk_release, which it lacks). The address is only ever read with
 * bpf_probe_read_kernel and trusted only while the cookie read there still matches. */
struct mt_sk_addr {
	__u64 addr;
	__u64 cookie;
};

/* A listening socket of the cgroup (sockops.c records it at listen(2), listeners.c those that
 * existed before the agent): its network namespace and port. */
struct mt_listener_key {
	__u64 netns;
	__u16 port;
	__u16 pad[3];
};

/* iptables-free redirection (connect4.c, getsockopt.c). One entry, written by the loader. */
struct mt_redirect_cfg {
	__u32 enabled;
	__u32 sidecar_ip4;   /* network byte order */
	__u16 outbound_port; /* host byte order */
	__u16 pad;
	__u32 pad2;
};

/* An original destination, remembered at connect. */
struct mt_orig_dst {
	__u32 ip4;  /* network byte order */
	__u16 port; /* host byte order */
	__u16 pad;
};

/* A redirected connection as the app's socket sees it: the app's address and the sidecar's. */
struct mt_orig_key {
	__u32 app_ip4;     /* network byte order */
	__u32 sidecar_ip4; /* network byte order */
	__u16 app_port;    /* host byte order */
	__u16 sidecar_port;
};

/* An excluded IPv4 CIDR: an LPM trie key. */
struct mt_cidr_key {
	__u32 prefixlen;
	__u32 ip4; /* network byte order */
};

/* The kernel stores the remote port as a 16-bit network-order value shifted into the upper
 * half of a 32-bit field (on little endian); bpf_ntohl turns that into the host-order port.
 * local_port is already host order. */
static __always_inline __u16 mt_port_from_ctx(__u32 remote_port)
{
	return (__u16)bpf_ntohl(remote_port);
}

static __always_inline void mt_ip_from_v4(struct mt_ip *ip, __u32 addr)
{
	ip->addr[0] = 0;
	ip->addr[1] = 0;
	ip->addr[2] = bpf_htonl(0x0000ffff);
	ip->addr[3] = addr;
}

static __always_inline int mt_ip_is_loopback(const struct mt_ip *ip)
{
	if (ip->addr[0] != 0 || ip->addr[1] != 0)
		return 0;
	if (ip->addr[2] == bpf_htonl(0x0000ffff))
		return (bpf_ntohl(ip->addr[3]) >> 24) == 127;
	return ip->addr[2] == 0 && ip->addr[3] == bpf_htonl(1);
}

/* A total order on the two ends of a connection that both ends compute alike. */
static __always_inline int mt_key_less(const struct mt_sock_key *a, const struct mt_sock_key *b)
{
	if (a->local_port != b->local_port)
		return a->local_port < b->local_port;
#pragma unroll
	for (int i = 0; i < 4; i++) {
		if (a->local_ip.addr[i] != b->local_ip.addr[i])
			return a->local_ip.addr[i] < b->local_ip.addr[i];
	}
	return 0;
}

/* Swap the ends of a key: the key the peer socket has. */
static __always_inline void mt_key_swap(struct mt_sock_key *dst, const struct mt_sock_key *src)
{
	dst->local_ip = src->remote_ip;
	dst->remote_ip = src->local_ip;
	dst->local_port = src->remote_port;
	dst->remote_port = src->local_port;
}

#endif /* MESHTURBO_MESH_H */
