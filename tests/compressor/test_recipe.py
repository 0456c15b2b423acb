"""Recipes: --save-recipe, --dry-run, compress run, the bundle's resolved recipe."""
from __future__ import annotations

import json

import onnx
import yaml

from tests.conftest import mlp_model


def test_dry_run_prints_pipeline_and_writes_nothing(cli, tmp_path):
    onnx.save(mlp_model(), tmp_path / "m.onnx")
    r = cli(tmp_path / "m.onnx", "--target", "arm", "--sparsity", "0.5", "--dry-run", "-o", tmp_path / "o")
    assert r.code == 0, r
    assert "aarch64-linux-gnu" in r.out and "sparsify.magnitude {'sparsity': 0.5" in r.out
    assert not (tmp_path / "o").exists()


def test_save_recipe_then_run_reproduces(cli, tmp_path):
    onnx.save(mlp_model(), tmp_path / "m.onnx")
    rec = tmp_path / "r.yaml"
    r = cli(tmp_path / "m.onnx", "--sparsity", "0.6", "--save-recipe", rec, "--dry-run", "--no-compile", "--no-latency", "--no-gate")
    assert r.code == 0, r
    data = yaml.safe_load(rec.read_text())
    assert data["version"] == 1 and data["sparsity"] == 0.6 and data["model"] == "m.onnx"
    assert [p["name"] for p in data["passes"]][-1] == "sparsify.magnitude"
    r = cli("run", rec, "-o", tmp_path / "out")
    assert r.code == 0, r
    assert "RESULT PASSED" in r.out or "RESULT FAILED" in r.out
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert abs(rep["passes"][-1]["stats"]["achieved_sparsity"] - 0.6) < 0.01
    stored = yaml.safe_load((tmp_path / "out" / "recipe.yaml").read_text())
    assert stored["passes"] == data["passes"] and stored["sparsity"] == 0.6


def test_recipe_bad_version_and_unknown_key(cli, tmp_path):
    rec = tmp_path / "r.yaml"
    rec.write_text("version: 7\nmodel: m.onnx\n")
    r = cli("run", rec)
    assert r.code == 4 and "unsupported version 7" in r.err
    rec.write_text("version: 1\nmodel: m.onnx\nsparsityy: 0.5\n")
    r = cli("run", rec)
    assert r.code == 4 and "unknown key 'sparsityy'" in r.err
    rec.write_text("version: 1\nmodel: m.onnx\npasses:\n  - sparsify.magnitude: {sparsity: 3}\n")
    onnx.save(mlp_model(), tmp_path / "m.onnx")
    r = cli("run", rec)
    assert r.code == 2 and "sparsity must be in [0, 1)" in r.err


def test_explain_target(cli):
    r = cli("explain-target", "arm")
    assert r.code == 0, r
    spec = json.loads(r.out)
    assert spec["tvm_target"]["mtriple"] == "aarch64-linux-gnu" and "+neon" in spec["tvm_target"]["mattr"]
    assert spec["family"] == "arm"


def test_data_aware_defaults_follow_calibration_data(cli, tmp_path):
    """Issue 17's defaults: with --calib, --structured scores channels by mean |activation| and refits
    (--reconstruct), --sparsity picks OBS or Wanda on held-out samples (sparsify.auto) with the measured
    allocation, and --ignore also keeps int8 layers fp32; without data the data-free choices stay."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    model, calib = repo / "models" / "digits_cnn.onnx", repo / "models" / "digits_calib.npz"
    r = cli(model, "--structured", "0.2", "--sparsity", "0.5", "--quantize", "int8", "--calib", calib, "--ignore", "fc*",
            "--dry-run", "-o", tmp_path / "o")
    assert r.code == 0, r.err
    lines = {ln.split()[1]: ln for ln in r.out.splitlines() if ln.strip()[:2].rstrip(".").isdigit()}
    assert "'criterion': 'obs'" in lines["prune.channels"] and "'reconstruct': True" in lines["prune.channels"]
    assert "'allocation': 'sensitivity'" in lines["prune.channels"]
    assert "'allocation': 'sensitivity'" in lines["sparsify.auto"] and "'candidates': ['obs', 'wanda']" in lines["sparsify.auto"]
    assert "'ignore': ['fc*']" in lines["quantize.int8"]
    r = cli(model, "--structured", "0.2", "--sparsity", "0.5", "--dry-run", "-o", tmp_path / "o2")
    lines = {ln.split()[1]: ln for ln in r.out.splitlines() if ln.strip()[:2].rstrip(".").isdigit()}
    assert "'criterion': 'l1'" in lines["prune.channels"] and "'reconstruct': False" in lines["prune.channels"]
    assert "'allocation': 'uniform'" in lines["prune.channels"] and "sparsify.magnitude" in lines
    # explicit choices win over the data-aware defaults
    r = cli(model, "--structured", "0.2", "--criterion", "l2", "--no-reconstruct", "--sparsity", "0.5", "--method", "obs",
            "--calib", calib, "--dry-run", "-o", tmp_path / "o3")
    lines = {ln.split()[1]: ln for ln in r.out.splitlines() if ln.strip()[:2].rstrip(".").isdigit()}
    assert "'criterion': 'l2'" in lines["prune.channels"] and "'reconstruct': False" in lines["prune.channels"]
    assert "sparsify.obs" in lines
