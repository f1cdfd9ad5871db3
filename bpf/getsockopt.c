//go:build ignore

/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* getsockopt.c: answer getsockopt(SOL_IP, SO_ORIGINAL_DST) on the sidecar's accepted socket
 * of a connection connect4.c redirected, with the destination the app asked for, as
 * netfilter does after an iptables REDIRECT. Any other call is left as the kernel answered
 * it. */

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "headers/mesh.h"
#include "headers/maps.h"

char __license[] SEC("license") = "Dual BSD/GPL";

/* struct sockaddr_in, 16 bytes. */
struct mt_sockaddr_in {
	__u16 sin_family;
	__u16 sin_port; /* network byte order */
	__u32 sin_addr; /* network byte order */
	__u8 zero[8];
};

SEC("cgroup/getsockopt")
int mt_getsockopt(struct bpf_sockopt *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	struct mt_sockaddr_in *sin;
	struct mt_orig_dst *orig;
	struct mt_orig_key key = {};
	struct mt_counters *c;

	if (ctx->level != SOL_IP || ctx->optname != SO_ORIGINAL_DST)
		return 1;
	if (!sk || sk->family != AF_INET || sk->protocol != IPPROTO_TCP)
		return 1;
	/* The sidecar's socket: its peer is the app. */
	key.app_ip4 = sk->dst_ip4;
	key.app_port = bpf_ntohs(sk->dst_port);
	key.sidecar_ip4 = sk->src_ip4;
	key.sidecar_port = (__u16)sk->src_port;
	orig = bpf_map_lookup_elem(&mt_orig_by_addr, &key);
	if (!orig)
		return 1;
	sin = ctx->optval;
	if ((void *)(sin + 1) > ctx->optval_end)
		return 1; /* the caller's buffer is too small: keep the kernel's answer */
	sin->sin_family = AF_INET;
	sin->sin_port = bpf_htons(orig->port);
	sin->sin_addr = orig->ip4;
	__builtin_memset(sin->zero, 0, sizeof(sin->zero));
	/* Two 4-byte stores: the context allows no 8-byte one over both fields. */
	*(volatile __s32 *)&ctx->optlen = sizeof(*sin);
	*(volatile __s32 *)&ctx->retval = 0;
	c = mt_counters_get();
	if (c)
		mt_count(c, orig_dst_answered, 1);
	return 1;
}
