# Global limits across Envoy replicas (issue 14): a real Redis (Debian `redis-server`) and the
# test-only rate-limit service double `rls-double` (tests/rls-double/, a TEST FIXTURE standing in
# for envoyproxy/ratelimit). `make test-global` runs the double's own tests against a real Redis,
# the harness pieces (tests/src/global.rs: Redis, RlsDouble; tests/tests/global_harness.rs) and the
# e2e multi-replica module `global::` (tests/tests/e2e/). Part of `make test`.
# `make redis` installs redis-server when it is missing (no systemd here: tests start their own
# redis-server on a free loopback port with `--save '' --appendonly no` and stop it).

TEST_TARGETS += test-global
SUDO ?= $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: redis test-global

redis:
	@command -v redis-server >/dev/null || { \
	  echo "installing redis-server (Debian package)"; \
	  $(SUDO) apt-get install -y redis-server || { $(SUDO) apt-get update && $(SUDO) apt-get install -y redis-server; }; }

test-global: wasm venv redis
	@# Its integration tests make cargo build the binary too, into target/debug/rls-double, where
	@# the harness (e2e::global) finds it (a separate `cargo build` would resolve features anew and
	@# rebuild half the tree).
	$(CARGO) test -p rls-double
	$(CARGO) test -p e2e --features e2e --test global_harness
	@# The e2e multi-replica suite (module `global`); zero matching tests is a success.
	$(CARGO) test -p e2e --features e2e --test e2e -- global::
