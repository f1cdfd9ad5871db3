package steer

// The BPF object and its Go bindings are built by bpf2go from steer.c; the generated
// steer_bpfel.go and steer_bpfel.o are committed, so building needs no clang. `make generate`
// (or `go generate ./hotupgrade/internal/steer/`) rebuilds them with clang and libbpf-dev.

//go:generate go tool bpf2go -cc clang -cflags "-O2 -g -Wall -Werror" -target bpfel -go-package steer -type hu_group_key -type hu_group steer steer.c -- -I/usr/include/x86_64-linux-gnu -I/usr/include/aarch64-linux-gnu
