"""Registries and plugins: duplicates name both providers, --plugin files,
entry-point packages (the shipped example installed into a temp dir)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from onnx import numpy_helper

from compressor.errors import PluginError
from compressor.registry import Registry
from tests.conftest import REPO, mlp_model, run_cli_subprocess


def test_duplicate_name_names_both_providers():
    reg = Registry("pass", "compressor.test_nothing")
    reg.register("a.b", object(), "builtin:one")
    with pytest.raises(PluginError, match="builtin:one.*file:two"):
        reg.register("a.b", object(), "file:two")


def test_plugin_file_duplicate_of_builtin_is_error(cli, tmp_path):
    plug = tmp_path / "dup.py"
    plug.write_text("from compressor.pass_base import Pass\nclass D(Pass):\n    name = 'cleanup.dead_code'\n")
    onnx.save(mlp_model(), tmp_path / "m.onnx")
    r = cli(tmp_path / "m.onnx", "--plugin", plug, "-o", tmp_path / "o")
    assert r.code == 2, r
    assert "duplicate pass name 'cleanup.dead_code'" in r.err and "builtin:passes.cleanup_dead_code" in r.err and str(plug) in r.err


def test_list_passes_and_targets(cli):
    r = cli("list", "passes")
    assert r.code == 0
    for name in ("cleanup.fold_constants", "cleanup.remove_identity", "cleanup.fold_batchnorm", "cleanup.dead_code", "sparsify.magnitude"):
        assert name in r.out
    r = cli("list", "targets")
    assert r.code == 0 and all(t in r.out for t in ("x86", "arm", "cuda"))


def test_plugin_target_example_compiles_verifies_and_times(tmp_path):
    """examples/plugin_target_example.py: a target outside the code base goes through the whole pipeline --
    compile with CompileOptions, the artifact verified against the compressed model, latency measured."""
    import json

    plug = REPO / "examples" / "plugin_target_example.py"
    r = run_cli_subprocess(REPO / "models" / "digits_cnn.onnx", "--plugin", plug, "--target", "ort-cpu",
                           "--sparsity", "0.5", "-o", tmp_path / "o", cwd=tmp_path)
    assert r.code == 0, r
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert rep["target"]["tag"] == "ort-cpu" and rep["artifact"]["kind"] == "onnxruntime-optimized-onnx"
    assert (tmp_path / "o" / rep["artifact"]["path"]).is_file()
    comp = next(c for c in rep["verification"] if c["candidate"].startswith("artifact") and c["reference"] == "compressed.onnx")
    assert comp["passed"] and min(o["cosine"] for o in comp["outputs"]) > 0.9999
    assert rep["latency"]["artifact_s"] > 0


def test_single_file_plugin_runs_through_cli(cli, tmp_path):
    onnx.save(mlp_model(), tmp_path / "m.onnx")
    plug = REPO / "examples" / "plugin_file_example.py"
    try:
        r = cli(tmp_path / "m.onnx", "--plugin", plug, "--pass", "example.report_ops", "-o", tmp_path / "o", "--no-compile", "--no-latency")
        assert r.code == 0, r
        assert "example.report_ops" in r.out
        import json

        rep = json.loads((tmp_path / "o" / "report.json").read_text())
        assert rep["passes"][0]["stats"]["ops"] == {"MatMul": 2, "Add": 1, "Relu": 1}
        assert rep["passes"][0]["provider"] == f"file:{plug}"
    finally:
        from passes import PASSES

        PASSES.unregister("example.report_ops")


@pytest.mark.slow
def test_example_plugin_package_installs_and_runs(tmp_path):
    """pip-install the example package into a private dir and use its entry point from the CLI."""
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(site),
                    str(REPO / "examples" / "plugin_package")], check=True, capture_output=True)
    onnx.save(mlp_model(), tmp_path / "m.onnx")
    env = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    r = run_cli_subprocess("list", "passes", env=env)
    assert r.code == 0 and "example.threshold" in r.out and "compressor-plugin-example" in r.out, r
    r = run_cli_subprocess(tmp_path / "m.onnx", "--pass", "example.threshold:threshold=0.5", "-o", tmp_path / "o",
                           "--no-compile", "--no-latency", "--no-gate", env=env)
    assert r.code == 0, r
    w = {t.name: numpy_helper.to_array(t) for t in onnx.load(tmp_path / "o" / "model.onnx").graph.initializer}
    assert (abs(w["w1"]) >= 0.5).sum() == (w["w1"] != 0).sum()  # everything below 0.5 zeroed
    assert (w["w1"] == 0).any()


def test_provider_knows_builtin_from_plugin():
    from compressor.registry import Provider, builtin
    from passes import PASSES

    assert PASSES.entry("cleanup.dead_code").provider == builtin("passes.cleanup_dead_code")
    assert PASSES.entry("cleanup.dead_code").provider.builtin
    assert str(builtin("passes.x")) == "builtin:passes.x"
    assert not Provider.of("file:/p.py").builtin and str(Provider.of("file:/p.py")) == "file:/p.py"
    assert not Provider.of("builtin").builtin  # a label without the module is not a built-in


def test_failing_builtin_pass_in_analyze_is_a_pass_error_not_a_plugin_error(cli, tmp_path, monkeypatch):
    """compress analyze runs the cleanup passes with their registered (built-in) providers: a failure there
    is an internal pass error (exit 1), not blamed on a plugin (exit 2)."""
    import numpy as np
    from passes.cleanup_fold_constants import FoldConstants

    def boom(self, graph, ctx):
        raise RuntimeError("boom")

    monkeypatch.setattr(FoldConstants, "run", boom)
    onnx.save(mlp_model(), tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32))
    r = cli("analyze", tmp_path / "m.onnx", "--calib", tmp_path / "c.npz", "-o", tmp_path / "an")
    assert r.code == 1, r
    assert "pass cleanup.fold_constants (builtin:passes.cleanup_fold_constants) raised RuntimeError" in r.err
    assert "plugin" not in r.err
