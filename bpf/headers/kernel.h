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

/* bpf_rdonly_cast (a kfunc, Linux 6.2 and later) types a kernel address as a pointer to a
 * kernel struct, read-only. The verifier turns the call into a move, and the program then loads
 * the struct's fields directly: the JIT makes each a load that yields 0 instead of faulting, as
 * bpf_probe_read_kernel would, without that helper's call per field. The sk_msg verdict
 * (redir.c) reads a dozen fields per send this way. */
extern void *bpf_rdonly_cast(const void *obj, __u32 btf_id) __ksym;
#define mt_kernel_ptr(addr, type) ((type *)bpf_rdonly_cast((const void *)(unsigned long)(addr), bpf_core_type_id_kernel(type)))

/* mt_sk_blocking_direct is mt_sk_blocking for a socket from mt_kernel_ptr: 1 blocking, 0
 * non-blocking, 2 no file yet (a load that faults yields 0, so it reads as no file). */
static __always_inline int mt_sk_blocking_direct(struct sock *sk)
{
	struct socket *sock = sk->sk_socket;
	struct file *file;

	if (!sock)
		return 2;
	file = sock->file;
	if (!file)
		return 2;
	return !(file->f_flags & MT_O_NONBLOCK);
}

/* mt_psock_direct returns the psock of a socket from mt_kernel_ptr (NULL when it is in no
 * sockmap). */
static __always_inline struct sk_psock *mt_psock_direct(struct sock *sk)
{
	unsigned long ud = (unsigned long)sk->sk_user_data & MT_SK_USER_DATA_PTRMASK;

	if (!ud)
		return 0;
	return mt_kernel_ptr(ud, struct sk_psock);
}

#endif /* MESHTURBO_KERNEL_H */
