//go:build ignore

/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* connect4.c: iptables-free redirection. A TCP connect(2) of an app in the cgroup goes to
 * the sidecar's outbound port instead of its destination, which is remembered by socket
 * cookie (mt_orig_by_cookie); sockops.c moves it to the connection's addresses when it is
 * established, and getsockopt.c answers SO_ORIGINAL_DST with it on the sidecar's side.
 *
 * Never redirected: connects of the sidecar itself (its process's cgroup is in
 * mt_sidecar_cgroups), destinations whose port is in mt_excluded_ports or whose address is
 * in mt_excluded_cidrs, connects straight to the sidecar's outbound address, and anything
 * but TCP. The program always allows the connect. */

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "headers/mesh.h"
#include "headers/maps.h"

char __license[] SEC("license") = "Dual BSD/GPL";

SEC("cgroup/connect4")
int mt_connect4(struct bpf_sock_addr *ctx)
{
	struct mt_redirect_cfg *cfg = mt_redirect_cfg_get();
	struct mt_counters *c;
	struct mt_orig_dst orig = {};
	struct mt_cidr_key cidr = {.prefixlen = 32};
	__u64 cgroup, cookie;
	__u16 port;

	if (!cfg || ctx->type != SOCK_STREAM || ctx->protocol != IPPROTO_TCP)
		return 1;
	c = mt_counters_get();
	if (!c)
		return 1;
	cgroup = bpf_get_current_cgroup_id();
	if (bpf_map_lookup_elem(&mt_sidecar_cgroups, &cgroup)) {
		mt_count(c, connect_sidecar, 1);
		return 1;
	}
	port = bpf_ntohs((__u16)ctx->user_port);
	cidr.ip4 = ctx->user_ip4;
	if (bpf_map_lookup_elem(&mt_excluded_ports, &port) || bpf_map_lookup_elem(&mt_excluded_cidrs, &cidr)) {
		mt_count(c, connect_excluded, 1);
		return 1;
	}
	if (ctx->user_ip4 == cfg->sidecar_ip4 && port == cfg->outbound_port)
		return 1;
	orig.ip4 = ctx->user_ip4;
	orig.port = port;
	cookie = bpf_get_socket_cookie(ctx);
	if (bpf_map_update_elem(&mt_orig_by_cookie, &cookie, &orig, BPF_ANY))
		return 1; /* nothing could answer SO_ORIGINAL_DST: leave the connect alone */
	ctx->user_ip4 = cfg->sidecar_ip4;
	ctx->user_port = (__u32)bpf_htons(cfg->outbound_port);
	mt_count(c, connect_redirected, 1);
	return 1;
}
