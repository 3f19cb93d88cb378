#!/usr/bin/env bash
# One-time install of engine_tools, its CPU engines and the test tools into the current Python
# (the README's setup step; .ci/run calls it). Works offline from the package index alone.
set -euo pipefail
cd "$(dirname "$0")/.."
pip_quiet() { python3 -m pip install -q --disable-pip-version-check "$@" 2>&1 | grep -v -e "^WARNING: Location" -e "Running pip as the 'root'" || true; }
# CPU PyTorch first: a bare `torch` requirement would otherwise pull a multi-GB CUDA build.
python3 -c "import torch" 2>/dev/null || pip_quiet "torch==2.13.0"
pip_quiet -e ".[test]"
# nnU-Net's network package without its timm/torchvision pins (they would replace the CPU torch).
pip_quiet --no-deps "dynamic-network-architectures==0.4.4"
# NVIDIA ModelOpt's ONNX quantizer (TensorRT Q/DQ path) without its [onnx] extra: see docs/TENSORRT.md.
pip_quiet pydantic regex
bash .ci/install-modelopt.sh
