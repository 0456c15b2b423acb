"""``compress MODEL ... --executor local|ray [--ray-address ADDR]``: the sensitivity sweep of
``--allocation sensitivity`` runs on the run's executor, started once per run, recorded in the pass
stats, and the bundle is byte-identical to a local run. The Ray runs use the loopback-only network
namespace and two-node cluster of tests/compressor/test_executor.py."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml

from models.zoo import DIGITS_CALIB, DIGITS_EVAL, DIGITS_ONNX
from tests.compressor.test_executor import VENV_BIN, cluster, zoo  # noqa: F401  (module fixtures)


FAST = ["--no-compile", "--no-latency", "--verify-samples", "4"]


def _report(bundle: Path) -> dict:
    return json.loads((bundle / "report.json").read_text())


def _sweep_pass(rep: dict) -> dict:
    (p,) = [p for p in rep["passes"] if "sensitivity_run" in p.get("stats", {})]
    return p


def test_missing_ray_exits_5_and_flag_checks(cli, tiny_models, tmp_path, monkeypatch):
    model = tiny_models["mlp"]
    r = cli(model, "--ray-address", "127.0.0.1:1", "-o", tmp_path / "a")
    assert r.code == 2 and "--ray-address needs --executor ray" in r.err, r
    r = cli(model, "--executor", "dask", "-o", tmp_path / "a")
    assert r.code == 2 and "dask" in r.err, r
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    r = cli(model, "--sparsity", "0.5", "--executor", "ray", "-o", tmp_path / "b", *FAST)
    assert r.code == 5 and "compressor[ray]" in r.err, r
    assert not (tmp_path / "b").exists()  # failed before any work
    recipe = tmp_path / "r.yaml"
    assert cli(model, "--sparsity", "0.5", "--dry-run", "--save-recipe", recipe).code == 0
    r = cli("run", recipe, "--executor", "ray", "-o", tmp_path / "c")
    assert r.code == 5 and "compressor[ray]" in r.err, r


def test_executor_not_in_recipe_and_local_stats(cli, tmp_path):
    recipe = tmp_path / "r.yaml"
    args = [DIGITS_ONNX, "--sparsity", "0.5", "--allocation", "sensitivity", "--calib", DIGITS_CALIB]
    r = cli(*args, "--executor", "ray", "--ray-address", "10.0.0.1:6379", "--dry-run", "--save-recipe", recipe)
    assert r.code == 0, r
    keys = yaml.safe_load(recipe.read_text())
    assert "executor" not in keys and "ray-address" not in keys and keys["allocation"] == "sensitivity"
    out = tmp_path / "local.bundle"
    r = cli(*args, "-o", out, *FAST)
    assert r.code == 0, r
    p = _sweep_pass(_report(out))
    run, curves = p["stats"]["sensitivity_run"], p["stats"]["sensitivity"]
    n_levels = len(next(iter(curves.values()))["levels"])
    # one task per (swept layer, nonzero level), all in this process
    assert run["executor"] == "local" and run["describe"] == "local" and run["slots"] == 1
    assert run["tasks"] == len(curves) * (n_levels - 1) and run["failed"] == 0 and run["retries"] == 0
    assert "executor" not in (out / "recipe.yaml").read_text()


def test_ray_without_a_fanned_out_stage_is_a_warning(cli, tiny_models, tmp_path):
    pytest.importorskip("ray")
    out = tmp_path / "u.bundle"
    r = cli(tiny_models["mlp"], "--sparsity", "0.5", "--executor", "ray", "--no-gate", "-o", out, *FAST)
    assert r.code == 0, r
    assert any("--executor ray: no stage of this run fans out" in w for w in _report(out)["warnings"])


@pytest.mark.slow
def test_compress_ray_equals_local(cluster, cli, zoo, tmp_path):  # noqa: F811
    """The same compress run, local vs Ray (a two-node cluster / a private instance): identical model.onnx
    bytes and per-layer sparsities; the report says where the sweep ran."""
    cnn = zoo("cnn")
    inp = onnx.load(cnn).graph.input[0]
    shape = [d.dim_value for d in inp.type.tensor_type.shape.dim]
    cnn_calib = tmp_path / "cnn_calib.npz"
    np.savez(cnn_calib, **{inp.name: np.random.default_rng(0).standard_normal((8, *shape[1:])).astype(np.float32)})
    cases = [("digits", [DIGITS_ONNX, "--calib", DIGITS_CALIB, "--eval", DIGITS_EVAL, "--method", "magnitude"],
              ["--ray-address", cluster.address], 2),
             ("cnn", [cnn, "--calib", cnn_calib, "--method", "wanda", "--no-gate"], [], None)]  # private instance
    for name, args, extra, nodes in cases:
        common = [*args, "--sparsity", "0.6", "--allocation", "sensitivity", *FAST]
        t0 = time.perf_counter()
        loc = cli(*common, "-o", tmp_path / f"{name}.local")
        t_local = time.perf_counter() - t0
        assert loc.code == 0, loc
        t0 = time.perf_counter()
        r = cluster.run(VENV_BIN / "compress", *common, "-o", tmp_path / f"{name}.ray", "--executor", "ray", *extra)
        t_ray = time.perf_counter() - t0
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        print(f"{name}: local {t_local:.1f}s, ray {t_ray:.1f}s (incl. process + Ray start)")
        assert (tmp_path / f"{name}.ray" / "model.onnx").read_bytes() == (tmp_path / f"{name}.local" / "model.onnx").read_bytes()
        pl, pr = _sweep_pass(_report(tmp_path / f"{name}.local")), _sweep_pass(_report(tmp_path / f"{name}.ray"))
        assert pr["stats"]["layers"] == pl["stats"]["layers"] and len(pl["stats"]["layers"]) >= 2
        assert len({v["sparsity"] for v in pl["stats"]["layers"].values()}) > 1  # really a non-uniform allocation
        assert pr["stats"]["sensitivity"] == pl["stats"]["sensitivity"]
        run = pr["stats"]["sensitivity_run"]
        assert run["executor"] == "ray" and run["failed"] == 0 and run["slots"] == 2
        assert run["tasks"] == pl["stats"]["sensitivity_run"]["tasks"]
        if nodes:
            assert f"{nodes} node(s)" in run["describe"] and cluster.address in run["describe"]
        else:
            assert "local instance" in run["describe"]
