//go:build ignore

/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* unhook.c: a sockhash iterator that takes sockets of demoted pairs (redir.c) out of
 * mt_sockhash, so that they send and receive as plain TCP again. A socket in the sockhash
 * sends through tcp_bpf_sendmsg even when its verdict is "TCP path": that costs as much as a
 * redirect for streams of small writes, which is why they were demoted.
 *
 * Pairs are demoted by redir.c for streaming small writes, or when a send missed its peer
 * (which then can never be redirected to, e.g. a connection NATed by iptables).
 *
 * Removing a socket from the sockhash frees its psock, and with it every redirected message
 * still queued unread on its ingress list: the kernel drops them silently; and a redirect
 * still on its way to the socket then fails (EPIPE to the sender, bytes lost). Once a pair is
 * demoted, no verdict of either end redirects again; what remains are redirects whose
 * verdict ran before the demotion. The kernel holds a reference on the sender's psock for a
 * whole sendmsg, verdict and enqueue included, so an end seen with a psock reference count of
 * 1 (its map's own) after the demotion has no such redirect left. A socket is removed only
 *   - when its pair was demoted at least mt_unhook_grace_ns ago,
 *   - when both ends are quiet: each was seen after the demotion with no sendmsg in progress
 *     (reference count 1), or could never redirect (redir.c: its peer missed it), or was
 *     removed itself, which needs the same,
 *   - when it is idle itself right now (reference count 1: no send or receive in progress,
 *     no enqueue into it running), and
 *   - when its psock holds no unread redirected byte (msg_tot_len 0, ingress lists empty).
 * Otherwise it stays (counted in unhook_deferred) and a later run tries again. The agent runs
 * the iterator when sock_demoted grows and while sockets are deferred. Each deferred socket
 * writes one byte to the iterator's output, so the agent knows how many wait. */

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include "headers/mesh.h"
#include "headers/maps.h"
#include "headers/kernel.h"

char __license[] SEC("license") = "Dual BSD/GPL";

/* Set by the loader. */
volatile const __u64 mt_unhook_grace_ns = 10000000;

#define MT_REFS_SAMPLES 512

/* mt_psock_read reads what the rules above need from the socket's psock: whether anything is
 * queued that removing the psock would drop, and its reference count. 0 when unreadable. */
static __always_inline int mt_psock_read(struct sock *sk, int *queued, int *refs)
{
	unsigned long ud = 0;
	struct sk_psock *psock;
	struct list_head *next = 0;
	__u32 tot = 1, qlen = 1;
	void *cork = (void *)1;

	if (bpf_core_read(&ud, sizeof(ud), &sk->sk_user_data))
		return 0;
	psock = (struct sk_psock *)(ud & MT_SK_USER_DATA_PTRMASK);
	if (!psock)
		return 0;
	if (bpf_core_read(&tot, sizeof(tot), &psock->msg_tot_len) ||
	    bpf_core_read(&next, sizeof(next), &psock->ingress_msg.next) ||
	    bpf_core_read(&qlen, sizeof(qlen), &psock->ingress_skb.qlen) ||
	    bpf_core_read(&cork, sizeof(cork), &psock->cork))
		return 0;
	*queued = !(tot == 0 && next == &psock->ingress_msg && qlen == 0 && !cork);
	/* A socket that sends or reads in a tight loop is inside a call most of the time: look
	 * a few microseconds long for a moment between two calls. */
	for (int i = 0; i < MT_REFS_SAMPLES; i++) {
		if (bpf_core_read(refs, sizeof(*refs), &psock->refcnt.refs.counter))
			return 0;
		if (*refs == 1)
			break;
	}
	return 1;
}

SEC("iter/sockmap")
int mt_unhook(struct bpf_iter__sockmap *ctx)
{
	struct seq_file *seq = ctx->meta->seq;
	struct sock *sk = ctx->sk;
	struct mt_sock_key key, peer;
	struct mt_pair_state *ps;
	struct mt_counters *c;
	int queued = 1, refs = 0;
	__u32 side;
	char one = 1;

	if (!ctx->key || !sk)
		return 0;
	if (bpf_probe_read_kernel(&key, sizeof(key), ctx->key))
		return 0;
	mt_key_swap(&peer, &key);
	side = mt_key_less(&key, &peer) ? 1 : 2;
	ps = bpf_map_lookup_elem(&mt_pairs, side == 1 ? &key : &peer);
	if (!ps || !(ps->flags & MT_PAIR_DEMOTED))
		return 0;
	c = mt_counters_get();
	if (!c)
		return 0;
	/* Nothing was ever redirected on this pair (demoted before its first redirect, e.g. for
	 * a blocking end): no redirect can be on its way, nor ever come. Out at once, even while
	 * its own send or read runs (that call holds its own psock reference; the kernel frees
	 * the psock when it returns, and the socket's next call is plain TCP). */
	if (!(ps->flags & MT_PAIR_REDIRECTED)) {
		if (!mt_psock_read(sk, &queued, &refs) || queued)
			goto defer;
		if (bpf_map_delete_elem(&mt_sockhash, &key) == 0)
			mt_count(c, sock_unhooked, 1);
		return 0;
	}
	if (bpf_ktime_get_ns() - ps->demoted_ns < mt_unhook_grace_ns || !mt_psock_read(sk, &queued, &refs))
		goto defer;
	if (refs == 1) /* no sendmsg of this end in progress, none to come that redirects */
		mt_set_quiet(ps, side);
	if (refs != 1 || queued || !mt_is_quiet(ps, 3 - side))
		goto defer;
	if (bpf_map_delete_elem(&mt_sockhash, &key) == 0)
		mt_count(c, sock_unhooked, 1);
	return 0;
defer:
	mt_count(c, unhook_deferred, 1);
	bpf_seq_write(seq, &one, sizeof(one));
	return 0;
}
