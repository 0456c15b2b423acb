"""Executors: local vs Ray give identical sweeps, a killed worker is survived, a batch runs on a
two-node Ray cluster, and a missing Ray is exit 5.

Every Ray process of these tests runs inside a private network namespace that has only ``lo``
(``ip netns add``), so nothing listens beyond loopback: a two-node cluster (``ray start --head`` +
``ray start --address``) and the drivers (``ip netns exec NS compress ...``). The namespace and
every process in it are removed at the end (by pid, from ``ip netns pids``)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from compressor.executor import LocalExecutor
from models.zoo import DIGITS_CALIB, DIGITS_ONNX, ensure_built, shared_cache_dir
from tests.ray_cluster import VENV_BIN, netns_cluster



def _div(a: int, b: int) -> float:
    return a / b


def test_local_executor_reports_failures_and_progress():
    seen: list[tuple] = []
    outs = LocalExecutor().map(_div, [(1, 2), (1, 0), (3, 4)], label="t", progress=lambda p: seen.append((p.done, p.failed, p.eta)))
    assert [o.ok for o in outs] == [True, False, True]
    assert outs[0].value == 0.5 and outs[2].value == 0.75
    assert outs[1].error == "ZeroDivisionError: division by zero"
    assert [x[:2] for x in seen] == [(1, 0), (1, 1), (2, 1)] and seen[-1][2] == 0
    shared = LocalExecutor().map(_div, [(2,), (4,)], shared=(8,))
    assert [o.value for o in shared] == [4.0, 2.0]


def test_missing_ray_exits_5(cli, tiny_models, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.zeros((2, 16), np.float32))
    r = cli("analyze", tiny_models["mlp"], "--calib", calib, "--executor", "ray", "-o", tmp_path / "an")
    assert r.code == 5 and "pip install" in r.err and "ray" in r.err, r
    r = cli("batch", tiny_models["mlp"], "--target", "x86", "-o", tmp_path / "b", "--executor", "ray")
    assert r.code == 5 and "compressor[ray]" in r.err, r
    r = cli("analyze", tiny_models["mlp"], "--calib", calib, "--ray-address", "127.0.0.1:1")
    assert r.code == 2 and "--executor ray" in r.err, r


# ---------------------------------------------------------------- Ray on loopback only


@pytest.fixture(scope="module")
def cluster(request):
    yield from netns_cluster(request)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    cache = shared_cache_dir(tmp_path_factory)
    return lambda name: ensure_built(name, cache)


def _sweep(path: Path) -> dict:
    d = json.loads((path / "sensitivity.json").read_text())
    return {"curves": d["curves"], "allocation": d["allocation"], "pattern": d["pattern"]}


def _table(out: str) -> list[str]:
    return [l for l in out.splitlines() if l.startswith("|") or l.startswith("allocation for")]


@pytest.mark.slow
def test_analyze_ray_equals_local_on_two_models(cluster, cli, zoo, tmp_path):
    cnn = zoo("cnn")
    rng = np.random.default_rng(0)
    cnn_calib = tmp_path / "cnn_calib.npz"
    import onnx

    inp = onnx.load(cnn).graph.input[0]
    shape = [d.dim_value for d in inp.type.tensor_type.shape.dim]
    np.savez(cnn_calib, **{inp.name: rng.standard_normal((8, *shape[1:])).astype(np.float32)})
    for name, model, calib, extra in [("digits", DIGITS_ONNX, DIGITS_CALIB, ["--ray-address", cluster.address]),
                                      ("cnn", cnn, cnn_calib, ["--num-cpus", "2"])]:  # a private instance, started and stopped
        args = ["analyze", model, "--calib", calib, "--samples", "8", "--sparsity", "0.5"]
        loc = cli(*args, "-o", tmp_path / f"{name}.local")
        assert loc.code == 0, loc
        r = cluster.run(VENV_BIN / "compress", *args, "-o", tmp_path / f"{name}.ray", "--executor", "ray", *extra)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "sweep on ray" in r.stdout and " 0 failed" in r.stdout
        assert _sweep(tmp_path / f"{name}.ray") == _sweep(tmp_path / f"{name}.local")
        assert _table(r.stdout) == _table(loc.out) and len(_table(loc.out)) >= 4
        run = json.loads((tmp_path / f"{name}.ray" / "sensitivity.json").read_text())["run"]
        assert run["executor"] == "ray" and run["tasks"] == json.loads((tmp_path / f"{name}.local" / "sensitivity.json").read_text())["run"]["tasks"]
        assert run["slots"] == 2


KILLER = '''
import os, signal, sys
from pathlib import Path
from compressor import sensitivity
from compressor.executor import RayExecutor


address, model, calib, marker, out = sys.argv[1:6]
orig = sensitivity._probe

def killing_probe(*args):
    """The first probe to start kills its own worker process (SIGKILL): Ray must retry it."""
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return orig(*args)
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)

sensitivity._probe = killing_probe
with RayExecutor(address=address, max_retries=2) as ex:
    sys.exit(sensitivity.run_analyze(Path(model), Path(calib), Path(out), print, sparsity=0.5, samples=8, executor=ex))
'''


@pytest.mark.slow
def test_killed_worker_is_retried_with_identical_results(cluster, cli, tmp_path):
    loc = cli("analyze", DIGITS_ONNX, "--calib", DIGITS_CALIB, "--samples", "8", "--sparsity", "0.5", "-o", tmp_path / "local")
    assert loc.code == 0, loc
    script, marker = tmp_path / "killer.py", tmp_path / "killed.pid"
    script.write_text(KILLER)
    r = cluster.run(VENV_BIN / "python", script, cluster.address, DIGITS_ONNX, DIGITS_CALIB, marker, tmp_path / "ray")
    assert r.returncode == 0, r.stderr[-3000:]
    assert marker.read_text().isdigit()  # a worker really killed itself
    data = json.loads((tmp_path / "ray" / "sensitivity.json").read_text())
    assert data["run"]["retries"] >= 1 and data["run"]["failed"] == 0
    assert any("retried after worker failures" in w for w in data["warnings"])
    assert _sweep(tmp_path / "ray") == _sweep(tmp_path / "local")


def _rows(out: Path) -> list[dict]:
    return json.loads((out / "summary.json").read_text())["rows"]


@pytest.mark.slow
def test_batch_on_two_node_cluster(cluster, cli, zoo, tmp_path):
    models = [zoo(n) for n in ("mlp", "cnn", "gru", "mobilenetv2")]
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not a model")
    flags = ["--target", "x86,arm", "--sparsity", "0.3", "--no-latency", "--no-gate", "--verify-samples", "4"]
    loc = cli("batch", *models, *flags, "-o", tmp_path / "local")
    assert loc.code == 0, loc
    out = tmp_path / "ray"
    r = cluster.run(VENV_BIN / "compress", "batch", *models, bad, *flags, "-o", out, "--executor", "ray",
                    "--ray-address", cluster.address)
    assert r.returncode == 3, r.stdout[-3000:] + r.stderr[-3000:]
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("RESULT FAILED batch jobs=10 passed=8 failed=2 reused=0"), last
    rows = _rows(out)
    assert [(x["model"], x["target"]) for x in rows] == [(Path(m).name, t) for m in [*models, bad] for t in ("x86", "arm")]
    for x, ref in zip(rows[:8], _rows(tmp_path / "local")):
        assert x["status"] == "PASSED" and ref["status"] == "PASSED"
        assert (x["size_bytes"], x["sparsity"]) == (ref["size_bytes"], ref["sparsity"])
        man = json.loads((Path(x["bundle"]) / "manifest.json").read_text())
        assert man["source_model"]["path"] == str(zoo(Path(x["model"]).stem))
        assert man["target"]["family"] == x["target"]
        assert (Path(x["bundle"]) / "model.onnx").read_bytes() == (Path(ref["bundle"]) / "model.onnx").read_bytes()
    assert all(x["status"] == "FAILED" and "not an ONNX model" in x["note"] and str(bad) in x["note"] for x in rows[8:])
    md = (out / "summary.md").read_text()
    assert md.count("| PASSED |") == 8 and md.count("| FAILED |") == 2
    info = json.loads((out / "summary.json").read_text())
    assert info["executor"]["slots"] == 2 and "2 node(s)" in info["executor"]["describe"]
    # resumable: an unchanged re-run reuses the 8 bundles and retries only the broken model
    r = cluster.run(VENV_BIN / "compress", "batch", *models, bad, *flags, "-o", out, "--executor", "ray", "--ray-address", cluster.address)
    assert "passed=8 failed=2 reused=8" in r.stdout.strip().splitlines()[-1], r.stdout[-2000:]
    # a changed flag is a different job
    r2 = cli("batch", models[0], "--target", "x86", "--sparsity", "0.2", "--no-latency", "--no-gate", "--verify-samples", "4", "-o", out)
    assert r2.code == 0 and "reused=0" in r2.out.strip().splitlines()[-1], r2


@pytest.mark.slow
def test_scale_bench_smoke(cluster, tmp_path):
    """bench/scale.py in its tiny configuration (its private Ray instances run inside the namespace)."""
    repo = Path(__file__).resolve().parents[2]
    out = tmp_path / "scale.md"
    r = cluster.run(VENV_BIN / "python", repo / "bench" / "scale.py", "--smoke", "--out", out)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    text = out.read_text()
    assert "Curves identical across all executors: **yes**" in text and "| ray, 2 workers" in text
