# `make bench-envoy` (issue 7): the router filter against plain Envoy, the floor (issue 13) and the
# direct path, with wrk and the mock provider on 127.0.0.1. Writes target/bench/report.md. Part of `make bench`.
#   make bench-envoy BENCH_CONCURRENCY=4 BENCH_ROUNDS=5 BENCH_DURATION=5
# More knobs (connections, cases, access log, log level) are listed at the top of bench/bench.py.

BENCH_TARGETS += bench-envoy
BENCH_CONCURRENCY ?= 2
BENCH_ROUNDS ?= 3
BENCH_DURATION ?= 5
BENCH_PYTHON ?= python3
HOSTSIM_REPORT := target/bench/hostsim.md
# The floor (issue 13): bench/floor, a minimal pause-and-route filter the router is measured against.
FLOOR_WASM := target/$(WASM_TARGET)/release/bench_floor.wasm
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: bench-envoy bench-tools bench-floor

bench-tools:
	@command -v wrk >/dev/null || { \
	  echo "installing wrk (Debian package)"; \
	  $(SUDO) apt-get install -y wrk || { $(SUDO) apt-get update && $(SUDO) apt-get install -y wrk; }; }

bench-floor: wasm-target
	$(CARGO) build --release --target $(WASM_TARGET) -p bench-floor
	@ls -l $(FLOOR_WASM) | awk '{print "bench_floor.wasm: " $$5 " bytes"}'

bench-envoy: wasm bench-floor venv bench-tools redis
	$(CARGO) build --profile bench-tools -p e2e -p auto-ai-router -p rls-double --bins
	@# The report quotes host-sim's figure: make it first if it is registered and stale (mk/*.mk
	@# are included in name order, so bench-hostsim would otherwise run after this target).
	@if [[ " $(BENCH_TARGETS) " == *" bench-hostsim "* ]] && { [ ! -f $(HOSTSIM_REPORT) ] || [ $(HOSTSIM_REPORT) -ot $(WASM) ]; }; then \
	  $(MAKE) --no-print-directory bench-hostsim; fi
	BENCH_CONCURRENCY=$(BENCH_CONCURRENCY) BENCH_ROUNDS=$(BENCH_ROUNDS) BENCH_DURATION=$(BENCH_DURATION) \
	  $(BENCH_PYTHON) bench/bench.py
