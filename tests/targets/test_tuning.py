"""meta_schedule tuning (targets/tuning.py) through ``compress --tune-trials``: a tiny run
creates a database, a second run reuses it without new trials, the tuned artifact still
matches onnxruntime, and the bundle carries (and lists) the records it used."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from compressor.errors import UsageError


def _records(path: Path) -> list[str]:
    return [ln for ln in path.read_text().splitlines() if ln.strip()]


@pytest.mark.slow
def test_tune_reuse_and_bundle(cli, gemm_softmax, tmp_path):
    from targets import tuning, tvm_backend
    from tests.targets.conftest import ort_reference, random_inputs

    db_root = tmp_path / "db"
    r1 = cli(gemm_softmax, "--target", "x86", "--tune-trials", "4", "--tuning-db", db_root, "-o", tmp_path / "b1",
             "--verify-samples", "4")
    assert r1.code == 0, r1
    # progress lines from the measure callback (the Gemm runs the packed dense kernel, which is
    # not a tuning task: the Softmax left may have fewer than 4 distinct candidates)
    assert re.search(r"tuning [1-4]/4 trials", r1.out)
    rep1 = json.loads((tmp_path / "b1" / "report.json").read_text())
    tun1 = rep1["artifact"]["tuning"]
    assert tun1["mode"] == "tune" and tun1["trials_requested"] == 4
    assert tun1["tasks"] >= 1 and tun1["tasks_tuned"] == tun1["tasks"] and tun1["tasks_reused"] == 0
    assert 1 <= tun1["trials_run"] <= 4
    assert tun1["records_applied"] == tun1["tasks"]
    db_dir = Path(tun1["database"])
    assert db_dir.parent == db_root
    db_records = _records(db_dir / tuning.RECORD_FILE)
    # every measured candidate is kept, plus the untuned build's schedule of each function (the
    # targets/cpu_schedules rule's trace, or an identity trace where no rule applies)
    assert len(db_records) == tun1["trials_run"] + tun1["tasks"]
    import tvm.s_tir as s_tir

    ms = tuning._ms()
    db = ms.database.JSONDatabase(path_workload=str(db_dir / tuning.WORKLOAD_FILE),
                                  path_tuning_record=str(db_dir / tuning.RECORD_FILE))
    defaults = [r for r in db.get_all_tuning_records()
                if tuning._is_default(s_tir, r.trace, r.workload.mod, r.target)]
    assert len(defaults) == tun1["tasks"]
    # the Softmax gets targets/cpu_schedules' default (dlight Reduction) schedule
    assert any(not tuning._is_identity(r.trace) for r in defaults)
    assert sum(1 for t in tun1["task_table"] if t["schedule"] == "default") == tun1["default_kept"]
    bundle_recs = _records(tmp_path / "b1" / "tuning" / tuning.RECORD_FILE)
    assert len(bundle_recs) == tun1["records_applied"]  # only the best one per function
    manifest = json.loads((tmp_path / "b1" / "manifest.json").read_text())
    for f in tun1["files"]:
        assert f in manifest["files"] and (tmp_path / "b1" / f).is_file()
    assert f"tuned {tun1['trials_run']} new trials" in (tmp_path / "b1" / "report.md").read_text()

    # the tuned artifact still computes the model (explicit tolerance vs onnxruntime)
    feeds = random_inputs(gemm_softmax, seed=3)
    got = tvm_backend.run_library(tmp_path / "b1" / rep1["artifact"]["path"], feeds)
    ref = ort_reference(gemm_softmax, feeds)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-4, atol=1e-4)
    assert all(c["passed"] for c in rep1["verification"])

    # second run: everything reused, no new trial, database unchanged, same records shipped
    r2 = cli(gemm_softmax, "--target", "x86", "--tune-trials", "4", "--tuning-db", db_root, "-o", tmp_path / "b2",
             "--verify-samples", "4")
    assert r2.code == 0, r2
    tun2 = json.loads((tmp_path / "b2" / "report.json").read_text())["artifact"]["tuning"]
    assert tun2["trials_run"] == 0 and tun2["tasks_tuned"] == 0
    assert tun2["tasks_reused"] == tun1["tasks"] and tun2["records_applied"] == tun1["records_applied"]
    assert _records(db_dir / tuning.RECORD_FILE) == db_records
    assert _records(tmp_path / "b2" / "tuning" / tuning.RECORD_FILE) == bundle_recs
    assert not re.search(r"tuning \d/4 trials", r2.out) and "reused" in r2.out

    # a larger budget tunes again (the ledger remembers 4 trials per function, not 8)
    r3 = cli(gemm_softmax, "--target", "x86", "--tune-trials", str(8 * tun1["tasks"]), "--tuning-db", db_root,
             "-o", tmp_path / "b3", "--no-latency", "--verify-samples", "2")
    assert r3.code == 0, r3
    tun3 = json.loads((tmp_path / "b3" / "report.json").read_text())["artifact"]["tuning"]
    assert tun3["tasks_tuned"] == tun1["tasks"] and tun3["trials_run"] > 0


def test_elementwise_functions_are_not_tuned(cli, gemm_relu, tmp_path):
    """The Relu the dense kernel leaves is all-injective: its default schedule (fused, vectorized)
    is kept and no trial is spent on it (the search spun for minutes on such functions)."""
    r = cli(gemm_relu, "--target", "x86", "--tune-trials", "8", "--tuning-db", tmp_path / "db", "-o", tmp_path / "b",
            "--no-gate")
    assert r.code == 0, r
    tun = json.loads((tmp_path / "b" / "report.json").read_text())["artifact"]["tuning"]
    assert tun["skipped_elementwise"] == 1 and tun["tasks"] == 0 and tun["trials_run"] == 0


def test_untuned_default_is_reported(cli, gemm_softmax, tmp_path):
    r = cli(gemm_softmax, "--target", "x86", "-o", tmp_path / "b", "--verify-samples", "2")
    assert r.code == 0, r
    rep = json.loads((tmp_path / "b" / "report.json").read_text())
    assert rep["artifact"]["tuning"] == {"mode": "untuned", "trials_run": 0}
    assert not (tmp_path / "b" / "tuning").exists()
    assert "TVM, untuned" in r.out


def test_bad_trials_is_usage_error(cli, gemm_softmax, tmp_path):
    r = cli(gemm_softmax, "--target", "x86", "--tune-trials", "-1", "-o", tmp_path / "b")
    assert r.code == 2 and "--tune-trials" in r.err


def test_recipe_keeps_trials_not_db(cli, gemm_softmax, tmp_path):
    import yaml

    rec = tmp_path / "r.yaml"
    r = cli(gemm_softmax, "--target", "x86", "--tune-trials", "16", "--tuning-db", tmp_path / "db", "--dry-run",
            "--save-recipe", rec)
    assert r.code == 0, r
    data = yaml.safe_load(rec.read_text())
    assert data["tune-trials"] == 16 and "tuning-db" not in data


def test_db_dir_is_keyed_by_target(tmp_path, monkeypatch):
    from targets import tuning

    a = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64-v3"}
    b = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64-v4"}
    assert tuning.db_dir_for(a, tmp_path) == tuning.db_dir_for(dict(a), tmp_path)
    assert tuning.db_dir_for(a, tmp_path) != tuning.db_dir_for(b, tmp_path)
    assert tuning.db_dir_for(a, tmp_path).parent == tmp_path
    monkeypatch.setenv("COMPRESSOR_TUNING_DB", str(tmp_path / "env"))
    assert tuning.db_dir_for(a).parent == tmp_path / "env"
    monkeypatch.delenv("COMPRESSOR_TUNING_DB")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert tuning.db_dir_for(a).parent == tmp_path / "xdg" / "compressor" / "tuning"
    with pytest.raises(UsageError):
        tuning.tune(None, a, -1)


def test_target_without_options_is_refused_at_registration_and_cuda_warns_on_tuning(tmp_path):
    """Every target takes ``options`` (targets.base.CompileOptions): a (plugin) target whose compile lacks
    it is refused when registered, with a one-line plugin error; the pipeline passes typed options."""
    from compressor.errors import PluginError
    from compressor.registry import Registry
    from targets.base import CompileOptions, check_target

    class OldTarget:
        name = "old"

        def compile(self, model_path, spec, out_dir, input_shapes):
            return "artifact"

    reg = Registry("target", "compressor.test_nothing", check=check_target)
    with pytest.raises(PluginError, match="must take options"):
        reg.register("old", OldTarget(), "file:/old.py")
    assert "old" not in reg
    assert CompileOptions.of({"tune_trials": 3}).tuning_requested
    assert not CompileOptions.of(None).tuning_requested
    with pytest.raises(TypeError, match="unknown compile option"):
        CompileOptions.of({"trials": 3})


def test_end_to_end_bench_smoke(tmp_path, capsys):
    """bench/end_to_end.py in its smallest configuration (untuned only): the table is written
    from the bundles' reports."""
    from bench import end_to_end

    md = tmp_path / "e2e.md"
    assert end_to_end.main(["--models", "mlp", "--sparsities", "0", "--trials", "0", "--md", str(md),
                            "--work", str(tmp_path / "w"), "--rounds", "2"]) == 0
    assert "re-timed (best of 2 interleaved rounds): untuned 0% " in capsys.readouterr().out
    text = md.read_text()
    row = next(ln for ln in text.splitlines() if ln.startswith("| mlp"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "0%" and float(cells[4]) > 0 and float(cells[5]) > 0  # ORT and TVM latencies in ms
    assert "mlp 0.0: 0%:" in text


def test_arm_applies_database_only_and_says_so(cli, gemm_softmax, tmp_path):
    """arm artifacts cannot be measured here: --tune-trials only applies existing records, with a warning."""
    out = tmp_path / "b"
    r = cli(gemm_softmax, "--target", "arm", "--tune-trials", "4", "--tuning-db", tmp_path / "db", "-o", out, "--no-gate")
    assert r.code == 0, r
    rep = json.loads((out / "report.json").read_text())
    assert rep["artifact"]["tuning"]["mode"] == "apply-only" and rep["artifact"]["tuning"]["trials_run"] == 0
    assert any("tuning needs to measure on the target device" in w for w in rep["warnings"])


@pytest.mark.slow
def test_database_with_an_unloadable_record_is_repaired(cli, gemm_softmax, tmp_path):
    """A record TVM cannot reload must not break later builds: it is dropped (kept aside), the rest reused."""
    from targets import tuning

    db_root = tmp_path / "db"
    r1 = cli(gemm_softmax, "--target", "x86", "--tune-trials", "2", "--tuning-db", db_root, "-o", tmp_path / "b1",
             "--no-latency", "--verify-samples", "2")
    assert r1.code == 0, r1
    db_dir = Path(json.loads((tmp_path / "b1" / "report.json").read_text())["artifact"]["tuning"]["database"])
    rec_file = db_dir / tuning.RECORD_FILE
    good = _records(rec_file)
    with open(rec_file, "a") as f:
        f.write('[0, [[["NoSuchInstruction", [], [], []]], []], [1.0], null, null]\n')
    r2 = cli(gemm_softmax, "--target", "x86", "--tune-trials", "2", "--tuning-db", db_root, "-o", tmp_path / "b2",
             "--no-latency", "--verify-samples", "2")
    assert r2.code == 0, r2
    rep2 = json.loads((tmp_path / "b2" / "report.json").read_text())
    assert rep2["artifact"] is not None and rep2["artifact"]["tuning"]["trials_run"] == 0  # the good records were reused
    assert _records(rec_file) == good
    assert "NoSuchInstruction" in (rec_file.with_name(rec_file.name + ".dropped")).read_text()
