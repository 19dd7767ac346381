# Lints (issue 11): formatting and clippy with warnings as errors, natively for every crate and
# target, and for the filter and bench/floor on wasm32 (their proxy-wasm layers compile only there);
# one feature set per shared dependency (tools/workspace-hack/check.py). The filter
# denies unwrap/expect/panic outside tests (filter/Cargo.toml [lints]). Part of `make test`.
TEST_TARGETS += test-lint

.PHONY: test-lint
test-lint: wasm-target
	@rustup component list --installed | grep -q '^clippy' || rustup component add clippy
	@rustup component list --installed | grep -q '^rustfmt' || rustup component add rustfmt
	$(CARGO) fmt --all --check
	@# make test's builds share one feature set per dependency (tools/workspace-hack).
	$(PYTHON) tools/workspace-hack/check.py
	$(CARGO) clippy --workspace --all-targets --features e2e/e2e -- -D warnings
	$(CARGO) clippy -p filter --target $(WASM_TARGET) -- -D warnings
	$(CARGO) clippy -p bench-floor --target $(WASM_TARGET) -- -D warnings
