#!/usr/bin/env bash
# Installs NVIDIA ModelOpt's ONNX quantizer next to the CPU onnxruntime, WITHOUT its [onnx] extra:
# that extra would replace onnxruntime by onnxruntime-gpu, pull cupy-cuda12x and downgrade onnx.
# The packages below are exactly what `import modelopt.onnx.quantization` and its INT8 path need on top
# of this project's own dependencies (numpy, onnx, onnxruntime, torch, pydantic, rich, regex, scipy, ...).
set -euo pipefail
python3 -m pip install -q --disable-pip-version-check --no-deps \
  nvidia-modelopt==0.47.0 onnx-graphsurgeon==0.6.1 onnxslim==0.1.98 lief==1.0.0 nvidia-ml-py==13.615.71 \
  2>&1 | grep -v -e "^WARNING: Location" -e "Running pip as the 'root'" || true
python3 -c "import modelopt, modelopt.onnx.quantization, onnx, onnxruntime; print('modelopt', modelopt.__version__, 'onnx', onnx.__version__, 'onnxruntime', onnxruntime.__version__, onnxruntime.get_available_providers())"
