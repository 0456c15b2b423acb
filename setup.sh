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
# qemu-user + a cached aarch64 CPython/numpy/TVM-runtime userland (~/.cache/compressor/aarch64) for
# `compress bench --device qemu-aarch64` and the emulated tests; non-fatal: those tests skip without it
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && ! command -v qemu-aarch64 >/dev/null 2>&1; then
  (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q qemu-user) >/dev/null 2>&1 \
    || echo "setup: qemu-user could not be installed (emulated aarch64 tests will skip)" >&2
fi
# espeak-ng: speech for the real-model suite's voice-activity data (models/real_suite.py); non-fatal: that model skips
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && ! command -v espeak-ng >/dev/null 2>&1; then
  (DEBIAN_FRONTEND=noninteractive apt-get install -y -q espeak-ng || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q espeak-ng)) >/dev/null 2>&1 \
    || echo "setup: espeak-ng could not be installed (the silero_vad real-model data will be skipped)" >&2
fi
if command -v qemu-aarch64 >/dev/null 2>&1; then
  .venv/bin/python -m targets.device_qemu || echo "setup: aarch64 guest runtime not prepared (emulated tests will skip)" >&2
fi
echo "setup done: $(.venv/bin/python -c 'import compressor, tvm, onnxruntime; print("compressor", compressor.__version__, "tvm", tvm.__version__, "onnxruntime", onnxruntime.__version__)')"
