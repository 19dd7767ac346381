# Auto AI Router for Envoy. `make run` runs the router on the bundled example; `make test` runs every test.
SHELL := /bin/bash
.DEFAULT_GOAL := build
CARGO ?= cargo
WASM_TARGET := wasm32-wasip1
WASM := target/$(WASM_TARGET)/release/filter.wasm
# Test targets register themselves here from mk/*.mk; `make test` runs them in order.
TEST_TARGETS := test-unit
# Benchmarks register here likewise; `make bench` runs them (not part of `make test`).
BENCH_TARGETS :=

.PHONY: build wasm wasm-fault wasm-target test test-unit bench clean
build: wasm

wasm-target:
	@rustup target list --installed | grep -qx $(WASM_TARGET) || rustup target add $(WASM_TARGET)

wasm: wasm-target
	AAR_GIT_HASH=$$(git rev-parse --short HEAD 2>/dev/null || echo unknown) $(CARGO) build --release --target $(WASM_TARGET) -p filter
	@ls -l $(WASM) | awk '{print "filter.wasm: " $$5 " bytes"}'

# Test-only build with the fault-injection hook (a header that makes the filter trap), kept apart
# from the release artifact: its own profile (Cargo.toml: release without full LTO), so its own
# output directory.
WASM_FAULT := target/$(WASM_TARGET)/wasm-fault/filter.wasm
wasm-fault: wasm-target
	$(CARGO) build --profile wasm-fault --target $(WASM_TARGET) -p filter --features fault-injection

test-unit:
	$(CARGO) test -p filter

include $(sort $(wildcard mk/*.mk))

test: build
	@set -e; for t in $(TEST_TARGETS); do echo "== make $$t"; $(MAKE) --no-print-directory $$t; done

bench: build
	@set -e; for t in $(BENCH_TARGETS); do echo "== make $$t"; $(MAKE) --no-print-directory $$t; done

clean:
	$(CARGO) clean

# Coverage-guided fuzzing of the parsers and record codecs (not in CI). FUZZ_SECONDS per target.
FUZZ_SECONDS ?= 30
FUZZ_TARGETS := config body headers records usage
.PHONY: fuzz
fuzz:
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	@set -e; cd filter && for t in $(FUZZ_TARGETS); do \
	  echo "== fuzz $$t ($(FUZZ_SECONDS)s)"; \
	  RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run --sanitizer none $$t -- -max_total_time=$(FUZZ_SECONDS) -max_len=4096; \
	done
