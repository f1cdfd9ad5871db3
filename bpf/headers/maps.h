/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* maps.h: every map of meshturbo's BPF programs. All are pinned by name under the agent's
 * pin path, so an agent restart finds them again and acceleration never stops. */
#ifndef MESHTURBO_MAPS_H
#define MESHTURBO_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "mesh.h"

/* Established mesh sockets by their own 4-tuple. The value is 64 bits so that user space can
 * look a key up and get the socket's cookie back (SO_COOKIE), which proves the key layout. */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, MT_MAX_CONNS);
	__type(key, struct mt_sock_key);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mt_sockhash SEC(".maps");

/* Local IPs of mesh workloads (pod IPs). Both ends of a connection in this set: a mesh pair. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MT_MAX_MESH_IPS);
	__type(key, struct mt_ip);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mt_mesh_ips SEC(".maps");

/* Sidecar ports (host byte order). A loopback connection with one end on such a port: a mesh
 * pair. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MT_MAX_SIDECAR_PORTS);
	__type(key, __u16);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mt_mesh_ports SEC(".maps");

/* One struct mt_counters per CPU. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct mt_counters);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mt_stats SEC(".maps");

/* Demotion events (redir.c writes one when a pair is demoted): they wake the agent's
 * sweeper (unhook.go), which sleeps otherwise. The record carries nothing. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4096);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mt_events SEC(".maps");

/* Per-socket state, freed with the socket. */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct mt_sk_state);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mt_sk_storage SEC(".maps");

/* Per connection state (redir.c). Not LRU: MT_PAIR_REDIRECTED must not be lost while the
 * connection lives (unhook.c relies on it); sockops.c deletes the entry when an end closes.
 * When the map is full a new pair is not redirected at all. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MT_MAX_PAIRS);
	__type(key, struct mt_sock_key);
	__type(value, struct mt_pair_state);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mt_pairs SEC(".maps");

/* Kernel address and cookie of each socket put into mt_sockhash, by its key (sockops.c), for
 * redir.c's queue limit. Written before the insert (no record, no insert) and deleted when
 * the socket closes: a socket without a record is not in our sockhash. Not LRU: evicting a
 * live socket's record would make it look like a stranger. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MT_MAX_CONNS);
	__type(key, struct mt_sock_key);
	__type(value, struct mt_sk_addr);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mt_sk_addrs SEC(".maps");

/* iptables-free redirection: its switch and the sidecar's outbound address (one entry). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct mt_redirect_cfg);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mt_redirect SEC(".maps");

/* cgroup IDs of sidecars: connects made by their processes are never redirected. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MT_MAX_SIDECAR_CGROUPS);
	__type(key, __u64);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mt_sidecar_cgroups SEC(".maps");

/* Destination ports (host byte order) never redirected. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MT_MAX_EXCLUDED);
	__type(key, __u16);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mt_excluded_ports SEC(".maps");

/* Destination CIDRs never redirected. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, MT_MAX_EXCLUDED);
	__type(key, struct mt_cidr_key);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mt_excluded_cidrs SEC(".maps");

/* Original destinations by the redirected socket's cookie, from connect until sockops sees
 * the connection established and moves the entry to mt_orig_by_addr. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MT_MAX_ORIG_DST);
	__type(key, __u64);
	__type(value, struct mt_orig_dst);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mt_orig_by_cookie SEC(".maps");

/* Original destinations by the redirected connection's addresses: what the sidecar's
 * getsockopt(SO_ORIGINAL_DST) on the accepted socket answers. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MT_MAX_ORIG_DST);
	__type(key, struct mt_orig_key);
	__type(value, struct mt_orig_dst);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mt_orig_by_addr SEC(".maps");

/* Listening sockets by namespace and port (struct sock * and cookie, as in mt_sk_addrs), so
 * that sockops.c can tell whether a connection it sees established will be accepted by a
 * blocking listener. LRU: a listener that closed is evicted in time, and its entry is trusted
 * only while the cookie read at its address still matches. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MT_MAX_LISTENERS);
	__type(key, struct mt_listener_key);
	__type(value, struct mt_sk_addr);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mt_listeners SEC(".maps");

/* Written by the loader: a hash of every map's key and value layout. A pinned map set whose
 * hash differs was made by an agent with other layouts and is replaced, not reused. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mt_meta SEC(".maps");

static __always_inline struct mt_counters *mt_counters_get(void)
{
	__u32 zero = 0;
	return bpf_map_lookup_elem(&mt_stats, &zero);
}

#define mt_count(c, field, n) __sync_fetch_and_add(&(c)->field, (n))

static __always_inline struct mt_redirect_cfg *mt_redirect_cfg_get(void)
{
	__u32 zero = 0;
	struct mt_redirect_cfg *cfg = bpf_map_lookup_elem(&mt_redirect, &zero);

	return cfg && cfg->enabled ? cfg : 0;
}

/* mt_demote moves a pair to the TCP path for good. The flag is set with an atomic or, which
 * orders it against MT_PAIR_REDIRECTED (set the same way before a redirect): either the
 * redirect's or saw the demotion and did not redirect, or unhook.c sees MT_PAIR_REDIRECTED. */
static __always_inline void mt_demote(struct mt_pair_state *ps)
{
	__u8 one = 1;

	if (!(ps->flags & MT_PAIR_DEMOTED))
		ps->demoted_ns = bpf_ktime_get_ns();
	/* The first demotion wakes the agent's sweeper (unhook.go). */
	if (!(__sync_fetch_and_or(&ps->flags, MT_PAIR_DEMOTED) & MT_PAIR_DEMOTED))
		bpf_ringbuf_output(&mt_events, &one, sizeof(one), 0);
}

#endif /* MESHTURBO_MAPS_H */
