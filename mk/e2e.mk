# End-to-end suite on a real Envoy (issue 5, plus the hostile-request table and fail-closed check
# of issue 8, the e2e parts of issue 6): `make test-e2e`, part of `make test`.
#
# The suite is the `e2e` test target of the tests/ crate (tests/tests/e2e/), declared with
# `required-features = ["e2e"]`: `cargo test -p e2e` without the feature runs only the mock
# provider's unit tests. Here they run too (--lib --bins), so the suite and they run once. It
# needs the release filter.wasm, the fault-injection build (fail-closed test), and .venv (Envoy
# 1.40 + openai).
# Envoy: $(ENVOY_BIN) if set, else .venv. Everything binds 127.0.0.1 on free ports.
#
# `make soak` (issue 8, not in CI): 70 s (SOAK_SECONDS) under contention — past one 60 s window so the
# windows slide — 64 keep-alive connections, mixed models, a mock failing 5 %; prints a report.

TEST_TARGETS += test-e2e
E2E_THREADS ?= 3

.PHONY: test-e2e soak
test-e2e: wasm wasm-fault venv
	@# The multi-replica module `global::` needs Redis and the rls-double: `make test-global` runs it.
	$(CARGO) test -p e2e --features e2e --lib --bins --test e2e -- --test-threads $(E2E_THREADS) --skip global::

SOAK_SECONDS ?= 70
soak: wasm venv
	SOAK_SECONDS=$(SOAK_SECONDS) $(CARGO) test -p e2e --features e2e --test soak -- --ignored --nocapture
