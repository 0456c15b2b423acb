#!/usr/bin/env bash
# Create .venv and install compressor with its test/model extras. Idempotent.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
.venv/bin/python -m pip install -q --upgrade pip
# torch==2.13.0 is pinned: any other version pulls multi-GB CUDA builds
.venv/bin/python -m pip install -q -e ".[dev]"
echo "setup done: $(.venv/bin/python -c 'import compressor, tvm, onnxruntime; print("compressor", compressor.__version__, "tvm", tvm.__version__, "onnxruntime", onnxruntime.__version__)')"
