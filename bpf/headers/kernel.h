/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* kernel.h: the few kernel types meshturbo's programs read with CO-RE (bpf_core_read), by
 * name and field, without a vmlinux.h. */
#ifndef MESHTURBO_KERNEL_H
#define MESHTURBO_KERNEL_H

#include <linux/types.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>

struct bpf_iter_meta {
	struct seq_file *seq;
} __attribute__((preserve_access_index));

struct bpf_iter__sockmap {
	struct bpf_iter_meta *meta;
	struct bpf_map *map;
	void *key;
	struct sock *sk;
} __attribute__((preserve_access_index));

typedef struct {
	__s64 counter;
} atomic64_t;

struct net {
	__u64 net_cookie;
} __attribute__((preserve_access_index));

typedef struct {
	struct net *net;
} possible_net_t;

struct sock_common {
	atomic64_t skc_cookie;
	unsigned char skc_state;
	__u16 skc_num;
	possible_net_t skc_net;
} __attribute__((preserve_access_index));

struct bpf_iter__tcp {
	struct bpf_iter_meta *meta;
	struct sock_common *sk_common;
} __attribute__((preserve_access_index));

struct file {
	unsigned int f_flags;
} __attribute__((preserve_access_index));

struct socket {
	struct file *file;
} __attribute__((preserve_access_index));

struct sock {
	struct sock_common __sk_common;
	void *sk_user_data;
	struct socket *sk_socket;
} __attribute__((preserve_access_index));

struct list_head {
	struct list_head *next;
	struct list_head *prev;
} __attribute__((preserve_access_index));

struct sk_buff_head {
	__u32 qlen;
} __attribute__((preserve_access_index));

typedef struct {
	int counter;
} atomic_t;

typedef struct refcount_struct {
	atomic_t refs;
} refcount_t;

struct sk_psock {
	struct sk_msg *cork;
	struct sk_buff_head ingress_skb;
	struct list_head ingress_msg;
	__u32 msg_tot_len;
	refcount_t refcnt;
} __attribute__((preserve_access_index));

/* The receive and send sequence numbers the queue back-off compares (redir.c): copied_seq is
 * the next byte the reader will read, write_seq the next byte the sender will queue. */
struct tcp_sock {
	__u32 copied_seq;
	__u32 write_seq;
} __attribute__((preserve_access_index));

/* sk_user_data carries flag bits (SK_USER_DATA_NOCOPY, _BPF, _PSOCK) below the pointer. */
#define MT_SK_USER_DATA_PTRMASK (~7UL)

/* mt_psock_of returns the psock of a socket in a sockmap (NULL when it has none). */
static __always_inline struct sk_psock *mt_psock_of(struct sock *sk)
{
	unsigned long ud = 0;

	if (bpf_core_read(&ud, sizeof(ud), &sk->sk_user_data))
		return 0;
	return (struct sk_psock *)(ud & MT_SK_USER_DATA_PTRMASK);
}

#define MT_O_NONBLOCK 04000

/* mt_sk_blocking returns 1 when the socket's file is in blocking mode, 0 when it is
 * non-blocking, 2 when it has no file yet (an accepted socket before accept(2): its mode is
 * not known yet), -1 when a read failed. */
static __always_inline int mt_sk_blocking(struct sock *sk)
{
	struct socket *sock = 0;
	struct file *file = 0;
	unsigned int flags = 0;

	if (bpf_core_read(&sock, sizeof(sock), &sk->sk_socket))
		return -1;
	if (!sock)
		return 2;
	if (bpf_core_read(&file, sizeof(file), &sock->file))
		return -1;
	if (!file)
		return 2;
	if (bpf_core_read(&flags, sizeof(flags), &file->f_flags))
		return -1;
	return !(flags & MT_O_NONBLOCK);
}

#endif /* MESHTURBO_KERNEL_H */
