# host-sim: the filter's behaviour suite on a wasmtime proxy-wasm host (issue 3), and its bench.
TEST_TARGETS += test-hostsim
BENCH_TARGETS += bench-hostsim

.PHONY: test-hostsim bench-hostsim
test-hostsim: wasm
	HOSTSIM_WASM=$(CURDIR)/$(WASM) $(CARGO) test -p host-sim

bench-hostsim: wasm
	@mkdir -p target/bench
	@# The test build's wasmtime (optimised in dev, see Cargo.toml), not a second optimised build of
	@# it: built with --tests so features resolve as in `cargo test -p host-sim` and nothing rebuilds.
	$(CARGO) build -p host-sim --bins --tests
	HOSTSIM_WASM=$(CURDIR)/$(WASM) target/debug/hostsim-bench target/bench/hostsim.md
