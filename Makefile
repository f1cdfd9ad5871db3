# meshturbo: `make deps` installs every real component the tests run against (see
# hack/install-deps.sh); `make test` vets and runs every test, with -race.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

GO ?= go
OUT := out
TEST_TIMEOUT ?= 30m
TEST_FLAGS ?=

.PHONY: all deps vet test demo generate check-generate fuzz bench-bridge bench-accel bench-upgrade bench-lazyload test-long

all: vet

deps:
	hack/install-deps.sh

vet:
	$(GO) vet ./...

# The log is out/test.log; the last line counts the tests: "test: N passed, N failed, N skipped".
test: deps check-generate
	@mkdir -p $(OUT)
	$(GO) vet ./...
	$(GO) build -o $(OUT)/testsummary ./hack/testsummary
	$(GO) test -race -count=1 -timeout $(TEST_TIMEOUT) -json $(TEST_FLAGS) ./... 2>&1 \
		| $(OUT)/testsummary | tee $(OUT)/test.log

demo: deps
	$(GO) run ./cmd/meshturbo-demo

generate:
	$(GO) generate ./...

# Fuzz each registry decoder for FUZZTIME (not part of `make test`).
FUZZTIME ?= 30s
fuzz:
	$(GO) test -run='^$$' -fuzz='^FuzzParseDubboURL$$' -fuzztime=$(FUZZTIME) ./registry-bridge/zookeeper/
	$(GO) test -run='^$$' -fuzz='^FuzzDecodeApps$$' -fuzztime=$(FUZZTIME) ./registry-bridge/eureka/
	$(GO) test -run='^$$' -fuzz='^FuzzHealthService$$' -fuzztime=$(FUZZTIME) ./registry-bridge/consul/

# Registry write → Envoy propagation per registry, and meshturbo-xds at scale. The scale run
# loads the catalog into Consul first (about 1 minute per 10,000 instances on 2 cores).
BENCH_BRIDGE_FLAGS ?= -services 10000 -instances 100000
bench-bridge: deps
	$(GO) run ./bench/bridge $(BENCH_BRIDGE_FLAGS)

# The BPF objects and their Go bindings are committed; regenerate (clang from make deps) and
# fail when that changes anything.
check-generate: generate
	git diff --exit-code -- bpf/ hotupgrade/internal/steer/

# Plain loopback TCP vs sockmap redirection (naive and ours), sockperf and iperf3, interleaved.
BENCH_ACCEL_FLAGS ?=
bench-accel: deps
	$(GO) run ./bpf/benchaccel $(BENCH_ACCEL_FLAGS)

# Long BPF runs: 1 GiB streams each way and 100,000 connections.
test-long:
	$(GO) test -count=1 -timeout 30m ./bpf/ -bpf.long

# fortio at 1,000 qps over HTTP/1.1 (keep-alive and not), HTTP/2 and gRPC through Envoy across
# 100 upgrades per scenario, then 100 across Envoy versions (about 11 minutes).
BENCH_UPGRADE_FLAGS ?=
bench-upgrade: deps
	$(GO) run ./bench/upgrade $(BENCH_UPGRADE_FLAGS)

# Lazy loading with real istiod and Envoy: a full sidecar vs one narrowed to the 5 services it
# calls out of 1,000, and the pushes it gets while 100 unrelated services change (under a minute).
BENCH_LAZYLOAD_FLAGS ?=
bench-lazyload: deps
	$(GO) run ./bench/lazyload $(BENCH_LAZYLOAD_FLAGS)
