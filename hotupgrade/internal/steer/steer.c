//go:build ignore

/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* steer.c: picks the listen socket of a SO_REUSEPORT group that a new TCP connection goes to,
 * and where the connections queued on a closing member move (tcp_migrate_req).
 *
 * A group is named by the local address its members are bound to, read from the member
 * the kernel runs the program for (md->sk, the closing one when a queue moves); hu_groups gives the slots of hu_socks that hold
 * the members to choose from. A group without an entry, or a slot whose socket is gone (the
 * kernel empties the slot when the socket closes), selects nothing, and the kernel falls
 * back to its own hash over the whole group. The program always passes: it never drops a
 * connection. */

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

char __license[] SEC("license") = "Dual BSD/GPL";

#define HU_AF_INET 2
#define HU_AF_INET6 10
#define HU_MAX_SOCKS 4096
#define HU_MAX_GROUPS 1024

/* The local address of a reuseport group: addr in network byte order (IPv4 in addr[0]),
 * port in host byte order, as in struct bpf_sock. */
struct hu_group_key {
	__u32 family;
	__u32 port;
	__u32 addr[4];
};

/* The members a group's new connections go to: slots base .. base+count-1 of hu_socks. */
struct hu_group {
	__u32 base;
	__u32 count;
};

struct {
	__uint(type, BPF_MAP_TYPE_REUSEPORT_SOCKARRAY);
	__uint(max_entries, HU_MAX_SOCKS);
	__type(key, __u32);
	__type(value, __u64);
} hu_socks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, HU_MAX_GROUPS);
	__type(key, struct hu_group_key);
	__type(value, struct hu_group);
} hu_groups SEC(".maps");

SEC("sk_reuseport/migrate")
int hu_steer(struct sk_reuseport_md *md)
{
	struct bpf_sock *sk = md->sk;
	struct bpf_sock *migrating = md->migrating_sk;
	struct hu_group_key key = {};
	struct hu_group *g;
	__u32 slot;

	key.family = sk->family;
	/* A closing listener that was bound to port 0 has lost its port by the time its queue
	 * moves (inet_put_port); the connection being moved has it as its local port. */
	key.port = sk->src_port;
	if (migrating) {
		__u32 port = migrating->src_port;

		if (port)
			key.port = port;
	}
	if (key.family == HU_AF_INET) {
		key.addr[0] = sk->src_ip4;
	} else if (key.family == HU_AF_INET6) {
		key.addr[0] = sk->src_ip6[0];
		key.addr[1] = sk->src_ip6[1];
		key.addr[2] = sk->src_ip6[2];
		key.addr[3] = sk->src_ip6[3];
	} else {
		return SK_PASS;
	}
	g = bpf_map_lookup_elem(&hu_groups, &key);
	if (!g || g->count == 0)
		return SK_PASS;
	slot = g->base + md->hash % g->count;
	bpf_sk_select_reuseport(md, &hu_socks, &slot, 0);
	return SK_PASS;
}
