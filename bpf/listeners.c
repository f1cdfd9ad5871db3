//go:build ignore

/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* listeners.c: a TCP socket iterator the agent runs once at start. It records the listening
 * sockets that were opened before any agent ran (sockops.c records later ones at listen(2)),
 * so that connections they accept can be checked against their mode from the start. A TCP
 * iterator walks the network namespace of the agent that runs it: listeners in other
 * namespaces are recorded only by sockops.c. */

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "headers/mesh.h"
#include "headers/maps.h"
#include "headers/kernel.h"

char __license[] SEC("license") = "Dual BSD/GPL";

#define MT_TCP_LISTEN 10

SEC("iter/tcp")
int mt_seed_listeners(struct bpf_iter__tcp *ctx)
{
	struct sock_common *skc = ctx->sk_common;
	struct mt_listener_key key = {};
	struct mt_sk_addr addr = {};
	struct net *net = 0;
	unsigned char state = 0;
	__u16 port = 0;
	char one = 1;

	if (!skc)
		return 0;
	if (bpf_core_read(&state, sizeof(state), &skc->skc_state) || state != MT_TCP_LISTEN)
		return 0;
	if (bpf_core_read(&port, sizeof(port), &skc->skc_num) ||
	    bpf_core_read(&net, sizeof(net), &skc->skc_net.net) || !net ||
	    bpf_core_read(&key.netns, sizeof(key.netns), &net->net_cookie))
		return 0;
	key.port = port;
	/* This listener exists now; a record for its port is either this listener's already or
	 * a closed one's (written while no agent ran). */
	addr.addr = (__u64)skc;
	addr.cookie = bpf_get_socket_cookie(skc);
	if (bpf_map_update_elem(&mt_listeners, &key, &addr, BPF_ANY) == 0)
		bpf_seq_write(ctx->meta->seq, &one, sizeof(one));
	return 0;
}
