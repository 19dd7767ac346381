# host-sim: the filter's behaviour suite on a wasmtime proxy-wasm host (issue 3), and its bench.
TEST_TARGETS += test-hostsim
BENCH_TARGETS += bench-hostsim

.PHONY: test-hostsim bench-hostsim
test-hostsim: wasm
	HOSTSIM_WASM=$(CURDIR)/$(WASM) $(CARGO) test -p host-sim

bench-hostsim: wasm
	@mkdir -p target/bench
	HOSTSIM_WASM=$(CURDIR)/$(WASM) $(CARGO) run --profile bench-tools -p host-sim --bin hostsim-bench -- target/bench/hostsim.md
