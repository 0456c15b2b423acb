"""Smoke runs of bench/training.py (--smoke) and examples/train_sparse.py."""
from __future__ import annotations

import math
import re

import pytest

pytestmark = pytest.mark.slow


def test_bench_training_smoke(tmp_path, capsys):
    from bench.training import main

    out = tmp_path / "training.md"
    assert main(["--smoke", "--out", str(out)]) == 0
    text = out.read_text()
    for heading in ("## (a) CNN on scikit-learn digits", "## (b) GRU character-level language model", "## Verdicts",
                    "SSL + channel removal", "Pruned larger vs dense smaller"):
        assert heading in text
    rows = [r for r in text.splitlines() if re.match(r"\| (80|90)% \|", r)]
    assert len(rows) == 2 * 5 + 2 * 4  # CNN: 5 methods x 2 sparsities; GRU: 4 methods x 2
    for r in rows:
        value = float(r.split("|")[5])  # the metric column
        assert math.isfinite(value)


def test_example_train_sparse(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "train_sparse.py"
    spec = importlib.util.spec_from_file_location("train_sparse_example", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--out", str(tmp_path / "m.onnx")]) == 0
    out = capsys.readouterr().out
    for kind in ("gradual", "cubic", "gap"):
        m = re.search(rf"{kind}\s+test accuracy ([0-9.]+)\s+sparsity ([0-9.]+)", out)
        assert m and float(m.group(1)) > 0.85 and abs(float(m.group(2)) - 0.9) < 0.01, out
    import onnx
    from onnx import numpy_helper

    model = onnx.load(tmp_path / "m.onnx")
    weights = [numpy_helper.to_array(t) for t in model.graph.initializer if t.dims and len(t.dims) == 2]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.size for w in weights)
    assert zeros >= 0.9 - 1e-3  # the masks are exact zeros in the exported ONNX
