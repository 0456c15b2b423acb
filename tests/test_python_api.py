"""The Python API (compressor/api.py, docs/python-api.md): the documented example runs, the model object is
never modified, options are the CLI's, errors carry the CLI's exit codes."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import compressor
from compressor.errors import EXIT_USAGE, InputError, UsageError

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "digits_cnn.onnx"
CALIB = REPO / "models" / "digits_calib.npz"


def test_documented_example_runs(tmp_path):
    p = subprocess.run([sys.executable, str(REPO / "examples" / "python_api.py"), str(tmp_path / "o")], cwd=tmp_path,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    out = p.stdout
    assert "status PASSED (exit 0), sparsity 0.50" in out, out[-2000:]
    assert "int8: PASSED" in out and "example.count_convs: {'convs': 2}" in out
    assert "97%: exit 3 (FAILED)" in out and "bad input: exit 2: --sparsity must be in [0, 1)" in out
    bundle = tmp_path / "o" / "s50"
    assert {"model.onnx", "report.json", "manifest.json", "recipe.yaml"} <= {f.name for f in bundle.iterdir()}
    assert any(f.suffix == ".so" for f in bundle.iterdir())  # compiled, as the CLI's default run


def test_model_proto_and_mapping_inputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = onnx.load(MODEL)
    before = model.SerializeToString()
    data = dict(np.load(CALIB))
    res = compressor.compress(model, sparsity=0.5, calib=data, no_compile=True, progress=lambda s: None)
    assert model.SerializeToString() == before
    assert res.ok and res.exit_code == 0 and res.status == "PASSED"
    assert res.bundle.parent == tmp_path and res.bundle.name.endswith(".x86.s50.bundle"), res.bundle
    assert 0.45 < res.sparsity < 0.55 and res.min_cosine > 0.99
    # the same run through the CLI gives the same weights (the CLI calls compressor.api.run)
    from compressor.cli import main

    assert main([str(MODEL), "--sparsity", "0.5", "--calib", str(CALIB), "--no-compile", "-o", str(tmp_path / "cli")]) == 0
    a = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(res.bundle / "model.onnx").graph.initializer}
    b = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(tmp_path / "cli" / "model.onnx").graph.initializer}
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_bad_options_raise_with_exit_codes(tmp_path):
    with pytest.raises(UsageError) as e:
        compressor.compress(MODEL, sparsty=0.5)
    assert "did you mean 'sparsity'" in e.value.one_line() and e.value.exit_code == EXIT_USAGE
    with pytest.raises(UsageError):
        compressor.compress(MODEL, sparsity=1.5)
    with pytest.raises(InputError):
        compressor.compress(tmp_path / "missing.onnx")
    with pytest.raises(UsageError):
        compressor.compress(MODEL, calib=[1, 2, 3])
    with pytest.raises(UsageError):
        compressor.register_pass(int)


def test_dry_run_and_recipe_round_trip(tmp_path):
    res = compressor.compress(MODEL, sparsity=0.9, dry_run=True, save_recipe=tmp_path / "r.yaml")
    assert res.bundle is None and res.status == "DRY-RUN"
    assert any("sparsify" in ln for ln in res.pipeline), res.pipeline
    opts = compressor.load_recipe(tmp_path / "r.yaml")
    assert opts.sparsity == 0.9
    res2 = compressor.run_recipe(tmp_path / "r.yaml", output=str(tmp_path / "o"), no_compile=True, force=True)
    assert res2.exit_code in (0, 3) and (tmp_path / "o" / "report.json").is_file()


def test_core_import_does_not_load_the_application():
    code = ("import sys, compressor.errors, compressor.ir; "
            "bad = [m for m in ('compressor.api', 'compressor.pipeline', 'passes', 'targets') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
