//go:build ignore

/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* redir.c: sk_msg verdict on mt_sockhash: hand each send straight to the peer socket's
 * ingress queue. Whatever can't be redirected goes the normal TCP path: this program always
 * returns SK_PASS, since returning the helper's SK_DROP would drop the data.
 *
 * Redirecting wins for request/response and for large writes; for a stream of small writes
 * it wins with a reader that drains many messages per wake-up (an event loop), and loses with
 * one that wakes per message (a blocking read(2); such sockets are never redirected, see
 * "Faithful reads" below). When the loader turns the small-write rule on (mt_small_msg > 0;
 * off by default), a socket that sends mt_small_run small (< mt_small_msg bytes) messages
 * in a row, with no send of its peer in between (which a request/response exchange has),
 * moves its connection to the TCP path for good (MT_SK_TCP_ONLY, MT_PAIR_DEMOTED). The run
 * is kept per connection in mt_pairs, since an sk_msg program can't reach its peer socket's
 * storage. Sending on the TCP path from a socket still in the sockhash costs about as much
 * as the redirect (the send goes through tcp_bpf_sendmsg's copy and the coalescing TCP
 * does is mostly lost), so unhook.c later takes demoted sockets out of the sockhash. */

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "headers/mesh.h"
#include "headers/maps.h"
#include "headers/kernel.h"

char __license[] SEC("license") = "Dual BSD/GPL";

/* Set by the loader. mt_small_msg 0 turns the small-write rule off (the default). */
volatile const __u32 mt_small_msg = 0;
volatile const __u32 mt_small_run = 16;
/* Set by the loader: the most redirected bytes a peer may hold unread (0: no limit). */
volatile const __u32 mt_queue_limit = 4 << 20;

/* mt_live_psock returns the psock of the socket at addr while it is still the socket with
 * that cookie (the cookie changes when the memory is reused for another socket) and in a
 * sockmap (the psock goes when it leaves); NULL otherwise. */
static __always_inline struct sk_psock *mt_live_psock(__u64 addr, __u64 cookie)
{
	struct sock *sk = mt_kernel_ptr(addr, struct sock);

	if ((__u64)sk->__sk_common.skc_cookie.counter != cookie)
		return 0;
	return mt_psock_direct(sk);
}

/* mt_peer_queued returns how many redirected bytes the peer socket holds unread in its
 * psock; MT_PEER_NOT_OURS when the peer has no address record (sockops.c records every
 * socket it inserts and forgets it when it closes), so it is not in our sockhash and the
 * redirect would miss; MT_PEER_UNKNOWN when its queue can't be read (the socket at the
 * address is another one by now, or it has no psock). With want_caught_up, *caught_up says
 * whether the peer has read every byte this socket sent on the TCP path (see the back-off
 * below). It runs on every send, so it reads the sockets' fields directly (mt_kernel_ptr). */
#define MT_PEER_NOT_OURS (-2)
#define MT_PEER_UNKNOWN (-1)
#define MT_PEER_BLOCKING (-3)
static __always_inline __s64 mt_peer_queued(struct sk_msg_md *msg, struct mt_sk_state *st, const struct mt_sock_key *peer,
					   int want_caught_up, int *caught_up)
{
	struct mt_sk_addr *pa;
	struct sock *sk, *own;
	struct sk_psock *psock = 0;
	int pb, ob;

	/* The peer an earlier send found, kept in this socket's storage; otherwise (first send,
	 * or the cached peer is gone) the record decides, and is cached. */
	if (st->peer_addr)
		psock = mt_live_psock(st->peer_addr, st->peer_cookie);
	if (!psock) {
		st->peer_addr = 0;
		pa = bpf_map_lookup_elem(&mt_sk_addrs, peer);
		if (!pa)
			return MT_PEER_NOT_OURS;
		if (!pa->addr)
			return MT_PEER_UNKNOWN;
		psock = mt_live_psock(pa->addr, pa->cookie);
		if (!psock)
			return MT_PEER_UNKNOWN;
		st->peer_addr = pa->addr;
		st->peer_cookie = pa->cookie;
	}
	sk = mt_kernel_ptr(st->peer_addr, struct sock);
	/* Blocking reads (see below): no end may be blocking. An end not accepted yet (no file)
	 * does not stop the redirect: a client commonly sends before the server accepts, and
	 * should the accepted socket turn out blocking, the first send after that moves the
	 * pair to TCP, whose bytes its reader reads after the redirected ones. */
	own = mt_kernel_ptr(msg->sk, struct sock);
	pb = mt_sk_blocking_direct(sk);
	ob = mt_sk_blocking_direct(own);
	if (pb == 1 || ob == 1)
		return MT_PEER_BLOCKING;
	if (want_caught_up) {
		struct tcp_sock *otp = mt_kernel_ptr(msg->sk, struct tcp_sock);
		struct tcp_sock *ptp = mt_kernel_ptr(st->peer_addr, struct tcp_sock);

		*caught_up = otp->write_seq == ptp->copied_seq;
	}
	return psock->msg_tot_len;
}

/* The peer's key: this socket's key with the ends swapped. */
static __always_inline int mt_peer_key_from_msg(struct sk_msg_md *msg, struct mt_sock_key *key)
{
	__u32 family = msg->family;

	if (family == AF_INET) {
		mt_ip_from_v4(&key->local_ip, msg->remote_ip4);
		mt_ip_from_v4(&key->remote_ip, msg->local_ip4);
	} else if (family == AF_INET6) {
		key->local_ip.addr[0] = msg->remote_ip6[0];
		key->local_ip.addr[1] = msg->remote_ip6[1];
		key->local_ip.addr[2] = msg->remote_ip6[2];
		key->local_ip.addr[3] = msg->remote_ip6[3];
		key->remote_ip.addr[0] = msg->local_ip6[0];
		key->remote_ip.addr[1] = msg->local_ip6[1];
		key->remote_ip.addr[2] = msg->local_ip6[2];
		key->remote_ip.addr[3] = msg->local_ip6[3];
	} else {
		return -1;
	}
	key->local_port = mt_port_from_ctx(msg->remote_port);
	key->remote_port = (__u16)msg->local_port;
	return 0;
}

static __always_inline int mt_keep_on_tcp(struct mt_counters *c, __u64 size)
{
	mt_count(c, msg_tcp_only, 1);
	mt_count(c, bytes_tcp_only, size);
	return SK_PASS;
}

SEC("sk_msg")
int mt_redir(struct sk_msg_md *msg)
{
	struct mt_sock_key peer = {};
	struct mt_pair_state *ps = 0;
	struct mt_sk_state *st;
	__u32 side = 0; /* 1: this end is the pair's lower end (mt_key_less), 2: the other */
	struct mt_counters *c;
	__u64 size = msg->size;

	c = mt_counters_get();
	if (!c)
		return SK_PASS;

	/* sockops created the state before inserting the socket; without it (not expected),
	 * never redirect, so the socket's bytes all take one path. */
	st = bpf_sk_storage_get(&mt_sk_storage, msg->sk, 0, 0);
	if (!st) {
		mt_count(c, sk_state_failed, 1);
		return mt_keep_on_tcp(c, size);
	}
	if (st->flags & MT_SK_TCP_ONLY)
		return mt_keep_on_tcp(c, size);
	if (mt_peer_key_from_msg(msg, &peer) < 0) {
		st->flags |= MT_SK_TCP_ONLY;
		return mt_keep_on_tcp(c, size);
	}

	if (mt_small_msg || mt_queue_limit) {
		struct mt_sock_key own;

		mt_key_swap(&own, &peer);
		side = mt_key_less(&own, &peer) ? 1 : 2;
		struct mt_sock_key *ck = side == 1 ? &own : &peer;

		ps = bpf_map_lookup_elem(&mt_pairs, ck);

		if (!ps) {
			/* The first send of the pair, or the other end closed (sockops.c deleted the
			 * entry): a socket that sent before may have redirected. */
			struct mt_pair_state fresh = {.last_sender = side};

			if (st->flags & MT_SK_SENT)
				fresh.flags = MT_PAIR_REDIRECTED;
			bpf_map_update_elem(&mt_pairs, ck, &fresh, BPF_NOEXIST);
			ps = bpf_map_lookup_elem(&mt_pairs, ck);
		}
		st->flags |= MT_SK_SENT;
		if (!ps) { /* the map is full: this pair is not accelerated */
			st->flags |= MT_SK_TCP_ONLY;
			return mt_keep_on_tcp(c, size);
		}
		{
			if (ps->flags & MT_PAIR_DEMOTED) { /* the other end streamed small writes */
				st->flags |= MT_SK_TCP_ONLY;
				return mt_keep_on_tcp(c, size);
			}
			if (ps->last_sender != side) { /* the peer spoke since: a new run */
				ps->last_sender = side;
				ps->small_run = 0;
			}
			if (!mt_small_msg || size >= mt_small_msg) {
				ps->small_run = 0;
			} else if (++ps->small_run >= mt_small_run) {
				/* The whole pair leaves the redirect path; unhook.c then takes both
				 * ends out of the sockhash once nothing redirected waits unread. */
				st->flags |= MT_SK_TCP_ONLY;
				mt_demote(ps);
				mt_count(c, sock_demoted, 1);
				return mt_keep_on_tcp(c, size);
			}
		}
	}

	/* Bounded queueing: a redirect skips TCP's flow control, so a peer that does not read
	 * would collect every byte sent. Once it holds mt_queue_limit unread, this socket backs
	 * off (MT_SK_BACKOFF): its sends take the TCP path, where the sender blocks as on plain
	 * TCP when the reader falls behind. The order holds both ways: the peer reads its
	 * redirected bytes before its TCP receive queue, so redirect-then-TCP is read in order;
	 * and the socket redirects again only once the peer has read every byte it sent on TCP
	 * (the peer's copied_seq equals this socket's write_seq: redirected bytes take no
	 * sequence numbers on either side; the check runs under this socket's lock, so no send
	 * of its own races it), so nothing sent earlier is left to be read after the redirected
	 * bytes. A reader that keeps up gets redirected bytes again within moments; one that
	 * does not read holds at most mt_queue_limit redirected bytes plus TCP's window.
	 * Faithful reads: a blocking read(2) on a socket with a psock returns EAGAIN when a
	 * signal interrupts its wait (tcp_bpf_recvmsg), where TCP restarts it; so a pair is
	 * redirected only while both ends' files are non-blocking (event loops: Envoy, Go),
	 * and moves to TCP for good when one is not. A queue that can't be read moves the pair
	 * to TCP for good as well. */
	if (mt_queue_limit) {
		int caught_up = 0;
		__s64 queued;

		queued = mt_peer_queued(msg, st, &peer, st->flags & MT_SK_BACKOFF, &caught_up);

		if (queued == MT_PEER_BLOCKING || queued == MT_PEER_UNKNOWN) {
			st->flags |= MT_SK_TCP_ONLY;
			if (ps)
				mt_demote(ps);
			if (queued == MT_PEER_BLOCKING)
				mt_count(c, sock_blocking_demoted, 1);
			else
				mt_count(c, queue_unknown, 1);
			mt_count(c, sock_demoted, 1);
			return mt_keep_on_tcp(c, size);
		}
		/* A peer outside our sockhash (MT_PEER_NOT_OURS): the redirect below misses. */
		if (queued >= 0) {
			if (st->flags & MT_SK_BACKOFF) {
				if (!caught_up || queued + size > mt_queue_limit)
					return mt_keep_on_tcp(c, size);
				st->flags &= ~MT_SK_BACKOFF;
				mt_count(c, queue_resumed, 1);
			} else if (queued + size > mt_queue_limit) {
				st->flags |= MT_SK_BACKOFF;
				mt_count(c, queue_backoff, 1);
				return mt_keep_on_tcp(c, size);
			}
		}
	}

	/* Record the pair's first redirect before it happens; a demotion that came first wins. */
	if (ps && !(ps->flags & MT_PAIR_REDIRECTED) &&
	    (__sync_fetch_and_or(&ps->flags, MT_PAIR_REDIRECTED) & MT_PAIR_DEMOTED)) {
		st->flags |= MT_SK_TCP_ONLY;
		return mt_keep_on_tcp(c, size);
	}
	if (bpf_msg_redirect_hash(msg, &mt_sockhash, &peer, BPF_F_INGRESS) == SK_PASS) {
		mt_count(c, msg_redirected, 1);
		mt_count(c, bytes_redirected, size);
		return SK_PASS;
	}

	/* Missed: this send takes the TCP path, and so must every later one of this socket. The
	 * peer is not ours (e.g. its address was rewritten by iptables NAT, or it is outside the
	 * cgroup): the pair is demoted, so that unhook.c takes this socket out of the sockhash
	 * and it runs as plain TCP. */
	st->flags |= MT_SK_TCP_ONLY;
	if (ps && !(ps->flags & MT_PAIR_DEMOTED)) {
		/* The peer was not in the sockhash, so it has redirected nothing to us. */
		mt_set_quiet(ps, 3 - side);
		mt_demote(ps);
	}
	mt_count(c, msg_fallthrough, 1);
	mt_count(c, bytes_fallthrough, size);
	return SK_PASS;
}
