# dnbd3go — build, test, benchmark, demo.
#   make demo   build, start dnbd3-server on 127.0.0.1, read an image back, show RPC stats
#   make test   unit + integration tests (installs missing Debian packages when root)
#   make install [PREFIX=/usr/local] [DESTDIR=]   binaries, units, configs, man pages, completions
#   make package   .deb and .rpm packages in out/packages (dnbd3go-server, -client, -merger)

GO       ?= go
BIN      := $(CURDIR)/bin
VERSION  ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
PKG      := github.com/dnbd3go/dnbd3go
LDFLAGS  := -X $(PKG)/internal/version.Version=$(VERSION) -X $(PKG)/internal/version.BuildDate=$(shell date -u +%Y-%m-%d)
CMDS     := $(notdir $(wildcard cmd/*))
UNIT_PKGS = $(shell $(GO) list ./... | grep -v /tests/)
FUZZTIME ?= 20000x

.PHONY: all build test test-unit test-integration test-packages bench demo fuzz deps vet clean \
	install package static man completions

# Installation paths (make install PREFIX=... DESTDIR=...). The configuration
# stays in /etc whatever PREFIX is: dnbd3-server reads /etc/dnbd3-server by
# default. systemd also reads units, sysusers.d and modules-load.d files
# below /usr/local/lib.
PREFIX      ?= /usr/local
DESTDIR     ?=
SYSCONFDIR  ?= /etc
BINDIR      ?= $(PREFIX)/bin
MANDIR      ?= $(PREFIX)/share/man
DOCDIR      ?= $(PREFIX)/share/doc/dnbd3go
UNITDIR     ?= $(PREFIX)/lib/systemd/system
SYSUSERSDIR ?= $(PREFIX)/lib/sysusers.d
MODLOADDIR  ?= $(PREFIX)/lib/modules-load.d
BASHCOMPDIR ?= $(PREFIX)/share/bash-completion/completions
ZSHCOMPDIR  ?= $(PREFIX)/share/zsh/site-functions
FISHCOMPDIR ?= $(PREFIX)/share/fish/vendor_completions.d
# Tools run at their pinned versions through the Go module proxy.
NFPM        ?= $(GO) run github.com/goreleaser/nfpm/v2/cmd/nfpm@v2.48.0
MD2MAN      ?= $(GO) run github.com/cpuguy83/go-md2man/v2@v2.0.7
# Package version: a release sets PKG_VERSION=1.2.3.
PKG_VERSION ?= 0.1.0~git$(shell git log -1 --format=%cd.%h --date=format:%Y%m%d 2>/dev/null || echo 0)
STATIC      := $(CURDIR)/out/static
PACKAGES    := dnbd3go-server dnbd3go-client dnbd3go-merger

all: build

build:
	@mkdir -p $(BIN)
	$(GO) build -trimpath -ldflags "$(LDFLAGS)" -o $(BIN)/ ./cmd/...

deps:
	@./scripts/deps.sh

vet:
	$(GO) vet ./...
	$(GO) run ./internal/funcsize -max-lines 80 -max-complexity 20 .
	$(GO) run ./internal/errprefix .
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); echo "gofmt needed"; exit 1; }

test: test-unit test-packages test-integration

test-unit: deps vet
	$(GO) test -count=1 $(UNIT_PKGS)
	$(GO) test -count=1 -race -short ./protocol/ ./server/ ./server/iscsi/ ./client/
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
	@mkdir -p out
	DNBD3GO_ISCSI_TABLE=$(CURDIR)/out/iscsi-compliance.txt $(GO) test -count=1 ./tests/...
	@echo "libiscsi compliance (iscsi-test-cu), our iSCSI target and the reference's:"; \
	  cat out/iscsi-compliance.txt 2>/dev/null || echo "SKIP: no table (libiscsi-bin missing? see go test -v -run TestISCSICompliance ./tests/e2e/)"
	tests/integration/vm/testdata.sh out/vm-testdata
	tests/integration/vm/cowdisk.sh out/vm-cowdisk.img
	tests/integration/vm/suites.sh $(SUITES)

# Static binaries (no cgo) for install and the packages.
static:
	@mkdir -p $(STATIC)/bin
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "-s -w $(LDFLAGS)" -o $(STATIC)/bin/ ./cmd/...

# Man pages from docs/man/*.md, gzipped as Debian wants them.
man:
	@mkdir -p $(STATIC)/man
	@for f in docs/man/*.md; do \
	  page=$$(basename $$f .md); \
	  $(MD2MAN) -in $$f -out $(STATIC)/man/$$page && gzip -9nf $(STATIC)/man/$$page || exit 1; \
	done

# Completions generated from the static binaries' --help.
completions: static
	$(GO) run ./packaging/gencomp -bin $(STATIC)/bin -out $(STATIC)/completions

# Installs what the packages contain, without a package. Existing
# configuration files are kept. Units get ExecStart paths below $(BINDIR).
install: static man completions
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(UNITDIR) $(DESTDIR)$(MANDIR)/man1 $(DESTDIR)$(MANDIR)/man8 \
	  $(DESTDIR)$(BASHCOMPDIR) $(DESTDIR)$(ZSHCOMPDIR) $(DESTDIR)$(FISHCOMPDIR) $(DESTDIR)$(DOCDIR)/examples \
	  $(DESTDIR)$(SYSUSERSDIR) $(DESTDIR)$(MODLOADDIR) \
	  $(DESTDIR)$(SYSCONFDIR)/dnbd3-server $(DESTDIR)$(SYSCONFDIR)/dnbd3-merger $(DESTDIR)$(SYSCONFDIR)/dnbd3-nbd
	install -m 0755 $(STATIC)/bin/dnbd3-server $(STATIC)/bin/dnbd3-nbd $(STATIC)/bin/dnbd3-merger \
	  $(STATIC)/bin/dnbd3-bench $(STATIC)/bin/dnbd3-cowtest $(DESTDIR)$(BINDIR)/
	for u in examples/*.service; do \
	  sed 's#/usr/bin/#$(BINDIR)/#g' $$u > $(DESTDIR)$(UNITDIR)/$$(basename $$u) && chmod 0644 $(DESTDIR)$(UNITDIR)/$$(basename $$u) || exit 1; \
	done
	install -m 0644 $(STATIC)/man/*.1.gz $(DESTDIR)$(MANDIR)/man1/
	install -m 0644 $(STATIC)/man/*.8.gz $(DESTDIR)$(MANDIR)/man8/
	install -m 0644 $(STATIC)/completions/bash/* $(DESTDIR)$(BASHCOMPDIR)/
	install -m 0644 $(STATIC)/completions/zsh/* $(DESTDIR)$(ZSHCOMPDIR)/
	install -m 0644 $(STATIC)/completions/fish/* $(DESTDIR)$(FISHCOMPDIR)/
	install -m 0644 packaging/files/dnbd3-merger.sysusers $(DESTDIR)$(SYSUSERSDIR)/dnbd3-merger.conf
	install -m 0644 packaging/files/nbd.modules-load $(DESTDIR)$(MODLOADDIR)/dnbd3go-client.conf
	install -m 0644 packaging/files/copyright docs/compat.md $(DESTDIR)$(DOCDIR)/
	install -m 0644 packaging/files/dnbd3-nbd-instance.conf $(DESTDIR)$(DOCDIR)/examples/
	@for f in examples/dnbd3-server/server.conf examples/dnbd3-server/alt-servers examples/dnbd3-server/rpc.acl \
	          examples/merger/appsettings.json; do \
	  case $$f in *merger*) d=dnbd3-merger ;; *) d=dnbd3-server ;; esac; \
	  dst=$(DESTDIR)$(SYSCONFDIR)/$$d/$$(basename $$f); \
	  if [ -e $$dst ]; then echo "keeping $$dst"; else install -m 0644 $$f $$dst || exit 1; fi; \
	done
	@if [ -z "$(DESTDIR)" ]; then \
	  echo "installed. Next: systemd-sysusers; systemctl daemon-reload; see README \"Install\""; fi

# .deb and .rpm packages of the installed tree, one per role (see README).
package: deps
	rm -rf out/pkgroot out/scripts out/packages
	$(MAKE) --no-print-directory install DESTDIR=$(CURDIR)/out/pkgroot PREFIX=/usr \
	  ZSHCOMPDIR=/usr/share/zsh/vendor-completions DOCDIR=/usr/share/doc/dnbd3go
	@mkdir -p out/packages
	@for p in $(PACKAGES); do \
	  mkdir -p out/scripts/$$p; \
	  case $$p in \
	    dnbd3go-server) units=dnbd3-server.service; inst=; sysusers=; purge=/var/log/dnbd3-server ;; \
	    dnbd3go-client) units=; inst='dnbd3-nbd@*.service'; sysusers=; \
	      purge='/var/lib/dnbd3-nbd /var/log/dnbd3-nbd /etc/systemd/system/multi-user.target.wants/dnbd3-nbd@*.service' ;; \
	    dnbd3go-merger) units=dnbd3-merger.service; inst=; sysusers=/usr/lib/sysusers.d/dnbd3-merger.conf; \
	      purge=/var/lib/dnbd3-merger ;; \
	  esac; \
	  for s in packaging/scripts/*.in; do \
	    sed -e "s#@PACKAGE@#$$p#g; s#@UNITS@#$$units#g; s#@INSTANCES@#$$inst#g; s#@SYSUSERS@#$$sysusers#g; s#@USER@#dnbd3-merger#g; s#@PURGE@#$$purge#g" \
	      $$s > out/scripts/$$p/$$(basename $$s .in) || exit 1; \
	  done; \
	  printf '%s (%s) unstable; urgency=medium\n\n  * Build of dnbd3go %s.\n\n -- dnbd3go maintainers <dnbd3go@example.org>  %s\n' \
	    $$p '$(PKG_VERSION)' "$(VERSION)" "$$(date -R -d @$$(git log -1 --format=%ct 2>/dev/null || date +%s))" \
	    | gzip -9n > out/scripts/$$p/changelog.gz; \
	  for fmt in deb rpm; do \
	    PKGROOT=$(CURDIR)/out/pkgroot SCRIPTS=$(CURDIR)/out/scripts PKG_VERSION='$(PKG_VERSION)' GOARCH=$$($(GO) env GOARCH) \
	      $(NFPM) package -f packaging/nfpm-$${p#dnbd3go-}.yaml -p $$fmt -t out/packages/ || exit 1; \
	  done; \
	done
	@ls -l out/packages

# Builds the packages, checks them (lintian, rpm -qpl), installs the .debs
# with dpkg, runs the installed server from its unit's ExecStart line,
# verifies the units and purges again (root only; skipped otherwise).
test-packages: package
	packaging/test-packages.sh out/packages

bench: deps build
	./bench/run.sh

demo: build
	./scripts/demo.sh

clean:
	rm -rf $(BIN) out
