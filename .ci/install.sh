#!/usr/bin/env bash
# The README's install step: engine_tools, its CPU engines, the test tools and the weights the tests read,
# into the current Python (a virtual environment is best). Every package comes from pyproject.toml, the
# project's one list of dependencies; nothing here names a package of its own.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

pip_quiet() {  # pip, without its root/location chatter; fails when pip fails
  "$PY" -m pip install -q --disable-pip-version-check "$@" 2>&1 \
    | { grep -v -e "^WARNING: Location" -e "Running pip as the 'root'" -e "is ignored: it is neither" || true; }
  return "${PIPESTATUS[0]}"
}
install_spec() {  # a value of [tool.medquant.install] in pyproject.toml, space separated
  "$PY" -c 'import sys, tomllib
v = tomllib.load(open("pyproject.toml", "rb"))["tool"]["medquant"]["install"][sys.argv[1]]
print(" ".join(v) if isinstance(v, list) else v)' "$1"
}

# 1. PyTorch first: a bare `torch` requirement would otherwise pull a multi-GB CUDA build.
"$PY" -c "import torch" 2>/dev/null || pip_quiet $(install_spec torch)
# 2. The package, its CPU engines, ModelOpt's ONNX quantizer, Dask and the test tools.
pip_quiet -e ".[test]"
# 3. Packages whose own pins would replace the CPU PyTorch.
pip_quiet --no-deps $(install_spec no-deps)
# 4. Weights shipped in package wheels (deepbet): downloaded, SHA-256 checked, cached.
"$PY" -m engine_tools fetch $(install_spec weights) --progress none
"$PY" -c "import torch, openvino, nncf, onnxruntime, modelopt.onnx.quantization; print('installed: torch', torch.__version__, '| openvino', openvino.__version__, '| nncf', nncf.__version__, '| onnxruntime', onnxruntime.__version__, '| modelopt', __import__('modelopt').__version__)"
