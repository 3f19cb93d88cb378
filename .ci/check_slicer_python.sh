#!/usr/bin/env bash
# Slicer 5.10+ embeds Python 3.12: byte-compile the module and the core with it, and import the module's
# Qt-free library in a bare 3.12 environment (numpy and packaging only, as Slicer ships them; no PyTorch).
set -euo pipefail
cd "$(dirname "$0")/.."
PY312=""
python3.12 -c "" 2>/dev/null && PY312=$(python3.12 -c "import sys; print(sys.executable)")
if [ -z "$PY312" ] && command -v pyenv >/dev/null; then
  PY312=$(ls -d "$(pyenv root)"/versions/3.12*/bin/python3.12 2>/dev/null | sort -V | tail -n 1 || true)
fi
if [ -z "$PY312" ]; then
  echo "Python 3.12 not found (install it, e.g. 'pyenv install 3.12'): the Slicer 5.10 check cannot run" >&2
  exit 1
fi
VENV312=${MEDQUANT_CI_VENV312:-$PWD/.venv-ci312}
rm -rf "$VENV312"
"$PY312" -m venv "$VENV312"
"$VENV312/bin/python" -m pip install -q --disable-pip-version-check numpy packaging 2>&1 \
  | grep -v -e "Running pip as the 'root'" -e "is ignored: it is neither" || true
"$VENV312/bin/python" -m compileall -q MedQuantSlicer engine_tools >/dev/null
"$VENV312/bin/python" .ci/check_slicer_python.py
