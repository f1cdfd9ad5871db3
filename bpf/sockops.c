//go:build ignore

/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* sockops.c: on a cgroup v2 path, put established TCP sockets of mesh pairs into mt_sockhash. */

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "headers/mesh.h"
#include "headers/maps.h"
#include "headers/kernel.h"

#define EBUSY 16
#define ENOMEM 12
#define E2BIG 7
#define TCP_CLOSE 7

char __license[] SEC("license") = "Dual BSD/GPL";

/* Set by the loader: 0 (naive redirect, for comparison) inserts blocking sockets too. */
volatile const __u32 mt_keep_blocking_out = 1;

static __always_inline int mt_key_from_sockops(struct bpf_sock_ops *skops, struct mt_sock_key *key)
{
	__u32 family = skops->family;

	if (family == AF_INET) {
		mt_ip_from_v4(&key->local_ip, skops->local_ip4);
		mt_ip_from_v4(&key->remote_ip, skops->remote_ip4);
	} else if (family == AF_INET6) {
		key->local_ip.addr[0] = skops->local_ip6[0];
		key->local_ip.addr[1] = skops->local_ip6[1];
		key->local_ip.addr[2] = skops->local_ip6[2];
		key->local_ip.addr[3] = skops->local_ip6[3];
		key->remote_ip.addr[0] = skops->remote_ip6[0];
		key->remote_ip.addr[1] = skops->remote_ip6[1];
		key->remote_ip.addr[2] = skops->remote_ip6[2];
		key->remote_ip.addr[3] = skops->remote_ip6[3];
	} else {
		return -1;
	}
	key->local_port = (__u16)skops->local_port;
	key->remote_port = mt_port_from_ctx(skops->remote_port);
	return 0;
}

static __always_inline int mt_is_mesh_pair(const struct mt_sock_key *key)
{
	if (bpf_map_lookup_elem(&mt_mesh_ips, &key->local_ip) &&
	    bpf_map_lookup_elem(&mt_mesh_ips, &key->remote_ip))
		return 1;
	if (mt_ip_is_loopback(&key->local_ip) && mt_ip_is_loopback(&key->remote_ip) &&
	    (bpf_map_lookup_elem(&mt_mesh_ports, &key->local_port) ||
	     bpf_map_lookup_elem(&mt_mesh_ports, &key->remote_port)))
		return 1;
	return 0;
}

/* A connection connect4.c redirected is now established: move its original destination from
 * the socket cookie to the connection's addresses, where getsockopt.c finds it from the
 * sidecar's side. A connection that was not redirected clears a stale entry of an earlier
 * connection with the same addresses, so that it is never answered for. */
static __always_inline void mt_orig_dst_handoff(struct bpf_sock_ops *skops, struct mt_counters *c)
{
	struct mt_orig_key key = {};
	struct mt_orig_dst *orig;
	__u64 cookie;

	if (skops->family != AF_INET || !mt_redirect_cfg_get())
		return;
	key.app_ip4 = skops->local_ip4;
	key.app_port = (__u16)skops->local_port;
	key.sidecar_ip4 = skops->remote_ip4;
	key.sidecar_port = mt_port_from_ctx(skops->remote_port);
	cookie = bpf_get_socket_cookie(skops);
	orig = bpf_map_lookup_elem(&mt_orig_by_cookie, &cookie);
	if (!orig) {
		bpf_map_delete_elem(&mt_orig_by_addr, &key);
		return;
	}
	if (bpf_map_update_elem(&mt_orig_by_addr, &key, orig, BPF_ANY) == 0)
		mt_count(c, orig_dst_recorded, 1);
	bpf_map_delete_elem(&mt_orig_by_cookie, &cookie);
}

/* A socket we inserted is closing: drop its address record (only its own: the cookie must
 * match), so that a record exists exactly for the sockets of our sockhash. */
static __always_inline void mt_forget_addr(struct bpf_sock_ops *skops)
{
	struct mt_sock_key key = {}, peer;
	struct mt_sk_addr *addr;

	if (skops->args[1] != TCP_CLOSE || mt_key_from_sockops(skops, &key) < 0)
		return;
	addr = bpf_map_lookup_elem(&mt_sk_addrs, &key);
	if (!addr || addr->cookie != bpf_get_socket_cookie(skops))
		return;
	bpf_map_delete_elem(&mt_sk_addrs, &key);
	/* The connection's state goes with its first end to close (redir.c makes a new one,
	 * conservatively, should the other end still send). */
	mt_key_swap(&peer, &key);
	bpf_map_delete_elem(&mt_pairs, mt_key_less(&key, &peer) ? &key : &peer);
}

/* A listening socket of the cgroup: record where it lives, so that the connections it will
 * accept can be checked against its mode (mt_listener_blocks). */
static __always_inline void mt_record_listener(struct bpf_sock_ops *skops)
{
	struct mt_listener_key key = {.netns = bpf_get_netns_cookie(skops), .port = (__u16)skops->local_port};
	struct mt_sk_addr addr = {.cookie = bpf_get_socket_cookie(skops)};

	if (!skops->sk)
		return;
	addr.addr = (__u64)bpf_skc_to_tcp_sock(skops->sk);
	if (addr.addr)
		bpf_map_update_elem(&mt_listeners, &key, &addr, BPF_ANY);
}

/* mt_listener_blocks says whether the listener on the passive socket's port is in blocking
 * mode now: accept(2) on a blocking listener is a blocking server, whose accepted sockets
 * read in blocking mode. 0 when it is not, or not known (no record, or the socket at the
 * recorded address is another one by now). */
static __always_inline int mt_listener_blocks(struct bpf_sock_ops *skops)
{
	struct mt_listener_key key = {.netns = bpf_get_netns_cookie(skops), .port = (__u16)skops->local_port};
	struct mt_sk_addr *l = bpf_map_lookup_elem(&mt_listeners, &key);
	__u64 cookie = 0;
	struct sock *sk;

	if (!l || !l->addr)
		return 0;
	/* The address is read outside bpf_core_read, which would relocate l's own fields. */
	sk = (struct sock *)l->addr;
	if (bpf_core_read(&cookie, sizeof(cookie), &sk->__sk_common.skc_cookie.counter) || cookie != l->cookie)
		return 0;
	return mt_sk_blocking(sk) == 1;
}

/* Blocking sockets are never inserted (redir.c, "Faithful reads"): a socket in the sockhash
 * reads through tcp_bpf_recvmsg, whose blocking wait ends in EAGAIN when a signal interrupts
 * it, even before anything was redirected. The mode is known when it matters for the common
 * kinds: the connecting end has its file (a blocking connect(2) or a socket made blocking
 * before it), and the passive end comes from a listener whose mode a blocking server shares.
 * The connecting end is established first, so the passive end goes in only when its peer
 * did. A socket that changes mode later is caught by redir.c at its pair's next send. */
static __always_inline int mt_blocking_skip(struct bpf_sock_ops *skops, const struct mt_sock_key *key, __u64 own,
					    struct mt_counters *c)
{
	struct mt_sock_key peer;
	const struct mt_sock_key *ck;
	struct mt_pair_state fresh = {}, *ps;

	if (skops->op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB) {
		if (!mt_keep_blocking_out || mt_sk_blocking((struct sock *)own) != 1)
			return 0;
		mt_count(c, sock_blocking_skipped, 1);
		return 1;
	}
	mt_key_swap(&peer, key);
	if (!bpf_map_lookup_elem(&mt_sk_addrs, &peer)) {
		mt_count(c, sock_unpaired, 1);
		return 1;
	}
	if (!mt_keep_blocking_out || !mt_listener_blocks(skops))
		return 0;
	/* The connecting end is in already: demote the pair, so that the sweeper takes it out
	 * at once (nothing was redirected on it). */
	ck = mt_key_less(key, &peer) ? key : &peer;
	bpf_map_update_elem(&mt_pairs, ck, &fresh, BPF_NOEXIST);
	ps = bpf_map_lookup_elem(&mt_pairs, ck);
	if (ps)
		mt_demote(ps);
	mt_count(c, sock_blocking_skipped, 1);
	return 1;
}

SEC("sockops")
int mt_sockops(struct bpf_sock_ops *skops)
{
	struct mt_sock_key key = {};
	struct mt_sk_addr addr = {};
	struct bpf_sock *sk;
	struct mt_counters *c;
	long err;

	switch (skops->op) {
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		break;
	case BPF_SOCK_OPS_STATE_CB:
		mt_forget_addr(skops);
		return 1;
	case BPF_SOCK_OPS_TCP_LISTEN_CB:
		mt_record_listener(skops);
		return 1;
	default:
		return 1;
	}
	c = mt_counters_get();
	if (!c)
		return 1;
	if (skops->op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB)
		mt_orig_dst_handoff(skops, c);
	if (mt_key_from_sockops(skops, &key) < 0 || !mt_is_mesh_pair(&key)) {
		mt_count(c, sock_skipped, 1);
		return 1;
	}
	/* The sk_msg program keeps per-socket state; a socket without it is never inserted, so
	 * that every socket in the sockhash can be switched to TCP for good when needed. */
	if (!skops->sk ||
	    !bpf_sk_storage_get(&mt_sk_storage, skops->sk, 0, BPF_SK_STORAGE_GET_F_CREATE)) {
		mt_count(c, sock_insert_failed, 1);
		mt_count(c, sk_state_failed, 1);
		return 1;
	}
	/* Before the insert: once in the sockhash, the peer's sends may check our queue. */
	addr.cookie = bpf_get_socket_cookie(skops);
	sk = skops->sk;
	if (sk)
		addr.addr = (__u64)bpf_skc_to_tcp_sock(sk);
	/* No record, no insert: redir.c takes a peer without a record for one outside our
	 * sockhash. */
	if (!addr.addr) {
		mt_count(c, sock_insert_failed, 1);
		return 1;
	}
	if (mt_blocking_skip(skops, &key, addr.addr, c))
		return 1;
	err = bpf_map_update_elem(&mt_sk_addrs, &key, &addr, BPF_ANY);
	if (!err) {
		err = bpf_sock_hash_update(skops, &mt_sockhash, &key, BPF_NOEXIST);
		if (err) /* a record exists only for the sockets of our sockhash */
			bpf_map_delete_elem(&mt_sk_addrs, &key);
	}
	if (err) {
		mt_count(c, sock_insert_failed, 1);
		if (err == -EBUSY)
			mt_count(c, sock_insert_busy, 1);
		else if (err == -E2BIG || err == -ENOMEM)
			mt_count(c, sock_insert_full, 1);
		return 1;
	}
	mt_count(c, sock_inserted, 1);
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
	return 1;
}
