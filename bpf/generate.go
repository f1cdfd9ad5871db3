package bpf

// The BPF objects are built by bpf2go from the C beside this file; the generated *_bpfel.go
// and *_bpfel.o are committed, so building the agent needs no clang. `make generate` (or
// `go generate ./bpf/`) rebuilds them with clang and libbpf-dev (installed by `make deps`).
//
// Types of maps.h and mesh.h get their Go mirrors from the sockops object (-type); the other
// objects (one per hook) share the same maps and generate no types of their own.

//go:generate go tool bpf2go -cc clang -cflags "-O2 -g -Wall -Werror -mcpu=v3" -target bpfel -go-package bpf -type mt_ip -type mt_sock_key -type mt_counters -type mt_sk_state -type mt_pair_state -type mt_redirect_cfg -type mt_orig_dst -type mt_orig_key -type mt_cidr_key -type mt_listener_key sockops sockops.c -- -I. -I/usr/include/x86_64-linux-gnu -I/usr/include/aarch64-linux-gnu
//go:generate go tool bpf2go -cc clang -cflags "-O2 -g -Wall -Werror -mcpu=v3" -target bpfel -go-package bpf -no-global-types redir redir.c -- -I. -I/usr/include/x86_64-linux-gnu -I/usr/include/aarch64-linux-gnu
//go:generate go tool bpf2go -cc clang -cflags "-O2 -g -Wall -Werror" -target bpfel -go-package bpf -no-global-types unhook unhook.c -- -I. -I/usr/include/x86_64-linux-gnu -I/usr/include/aarch64-linux-gnu
//go:generate go tool bpf2go -cc clang -cflags "-O2 -g -Wall -Werror" -target bpfel -go-package bpf -no-global-types listeners listeners.c -- -I. -I/usr/include/x86_64-linux-gnu -I/usr/include/aarch64-linux-gnu
//go:generate go tool bpf2go -cc clang -cflags "-O2 -g -Wall -Werror" -target bpfel -go-package bpf -no-global-types connect4 connect4.c -- -I. -I/usr/include/x86_64-linux-gnu -I/usr/include/aarch64-linux-gnu
//go:generate go tool bpf2go -cc clang -cflags "-O2 -g -Wall -Werror" -target bpfel -go-package bpf -no-global-types getsockopt getsockopt.c -- -I. -I/usr/include/x86_64-linux-gnu -I/usr/include/aarch64-linux-gnu
