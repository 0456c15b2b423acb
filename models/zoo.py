"""Build-once cache of zoo models for tests (safe under pytest-xdist).

Typical use in a ``conftest.py``::

    import pytest
    from models.zoo import ensure_built, shared_cache_dir

    @pytest.fixture(scope="session")
    def zoo(tmp_path_factory):
        cache = shared_cache_dir(tmp_path_factory)
        return lambda name: ensure_built(name, cache)

    def test_something(zoo):
        path = zoo("resnet")          # Path to resnet.onnx, built at most once per cache dir

``ensure_built("digits_cnn", ...)`` returns the committed trained model ``models/digits_cnn.onnx``
(nothing is built); ``DIGITS_EVAL`` / ``DIGITS_CALIB`` point at its committed data sets.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent
DIGITS_ONNX = MODELS_DIR / "digits_cnn.onnx"
DIGITS_EVAL = MODELS_DIR / "digits_eval.npz"
DIGITS_CALIB = MODELS_DIR / "digits_calib.npz"


def _builder_fingerprint() -> str:
    """Short hash of build.py so a persistent cache dir never serves a stale model."""
    return hashlib.sha256((MODELS_DIR / "build.py").read_bytes()).hexdigest()[:10]


def shared_cache_dir(tmp_path_factory) -> Path:
    """A cache dir shared by all xdist workers of one pytest run.

    Under xdist each worker's ``getbasetemp()`` is ``<run-root>/popen-gw<N>``; its parent is
    common to all workers of the run.  Without xdist the base temp dir itself is used.
    """
    base = Path(tmp_path_factory.getbasetemp())
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    d = root / "model-zoo-cache"
    d.mkdir(parents=True, exist_ok=True)
    return d


def ensure_built(name: str, cache_dir: Path | str) -> Path:
    """Return the path of model ``name``'s ONNX file in ``cache_dir``, building it if missing.

    Concurrent callers (threads, processes, xdist workers) may race to build the same model;
    each builds into its own temp file in ``cache_dir`` and ``os.replace``s it into place, so
    readers only ever see complete files (and the builds are deterministic, so any winner is
    fine).
    """
    if name in ("digits", "digits_cnn"):
        return DIGITS_ONNX
    from models import build as _build  # torch import deferred until a build is needed

    if name not in _build.MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(_build.MODEL_NAMES)}")
    cache = Path(cache_dir) / _builder_fingerprint()
    dest = cache / f"{name}.onnx"
    if dest.is_file():
        return dest
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}.", dir=cache) as tmp:
        built = _build.build(name, tmp)
        os.replace(built, dest)
    return dest
