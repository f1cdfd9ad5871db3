# meshturbo: `make deps` installs every real component the tests run against (see
# hack/install-deps.sh); `make test` vets and runs every test, with -race.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

GO ?= go
OUT := out
TEST_TIMEOUT ?= 30m
TEST_FLAGS ?=

.PHONY: all deps vet test demo generate

all: vet

deps:
	hack/install-deps.sh

vet:
	$(GO) vet ./...

# The log is out/test.log; the last line counts the tests: "test: N passed, N failed, N skipped".
test: deps
	@mkdir -p $(OUT)
	$(GO) vet ./...
	$(GO) build -o $(OUT)/testsummary ./hack/testsummary
	$(GO) test -race -count=1 -timeout $(TEST_TIMEOUT) -json $(TEST_FLAGS) ./... 2>&1 \
		| $(OUT)/testsummary | tee $(OUT)/test.log

demo: deps
	$(GO) run ./cmd/meshturbo-demo

generate:
	$(GO) generate ./...
