# dnbd3go — build, test, benchmark, demo.
#   make demo   build, start dnbd3-server on 127.0.0.1, read an image back, show RPC stats
#   make test   unit + integration tests (installs missing Debian packages when root)

GO       ?= go
BIN      := $(CURDIR)/bin
VERSION  ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
PKG      := github.com/dnbd3go/dnbd3go
LDFLAGS  := -X $(PKG)/internal/version.Version=$(VERSION) -X $(PKG)/internal/version.BuildDate=$(shell date -u +%Y-%m-%d)
CMDS     := $(notdir $(wildcard cmd/*))
UNIT_PKGS = $(shell $(GO) list ./... | grep -v /tests/)
FUZZTIME ?= 20000x

.PHONY: all build test test-unit test-integration bench demo fuzz deps vet clean

all: build

build:
	@mkdir -p $(BIN)
	$(GO) build -trimpath -ldflags "$(LDFLAGS)" -o $(BIN)/ ./cmd/...

deps:
	@./scripts/deps.sh

vet:
	$(GO) vet ./...
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); echo "gofmt needed"; exit 1; }

test: test-unit test-integration

test-unit: deps vet
	$(GO) test -count=1 $(UNIT_PKGS)
	$(GO) test -count=1 -race -short ./protocol/ ./server/ ./client/
	@$(MAKE) --no-print-directory fuzz FUZZTIME=10000x

# Runs every fuzz target for FUZZTIME: an iteration count like 20000x (a
# duration like 30s also works, but short durations can fail spuriously with
# "context deadline exceeded" in Go's fuzzer). The seed corpora also run in test-unit.
fuzz:
	@for pkg in $$($(GO) list ./...); do \
	  dir=$$($(GO) list -f '{{.Dir}}' $$pkg); \
	  for f in $$(grep -ho '^func Fuzz[A-Za-z0-9_]*' $$dir/*_test.go 2>/dev/null | sed 's/func //'); do \
	    echo "fuzz $$pkg $$f ($(FUZZTIME))"; \
	    $(GO) test -run XXX -fuzz "^$$f\$$" -fuzztime $(FUZZTIME) $$pkg >/tmp/dnbd3go-fuzz.log 2>&1 || { cat /tmp/dnbd3go-fuzz.log; exit 1; }; \
	  done; \
	done

# End-to-end tests without root, then the root scenarios against the kernel
# NBD driver inside throw-away qemu VMs: one boot per area, each with its own
# time limit (tests/integration/vm/suites.sh -list; SUITES="cow bridge" runs
# only those).
test-integration: deps build
	$(GO) test -count=1 ./tests/...
	tests/integration/vm/testdata.sh out/vm-testdata
	tests/integration/vm/cowdisk.sh out/vm-cowdisk.img
	tests/integration/vm/suites.sh $(SUITES)

bench: deps build
	./bench/run.sh

demo: build
	./scripts/demo.sh

clean:
	rm -rf $(BIN) out
