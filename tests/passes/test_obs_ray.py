"""sparsify.obs with ``--executor ray``: the independent (layer, conv group) solves of a capture run
as executor tasks and the result is bit-identical to the local run (same model.onnx bytes, same
masks, same reported reconstruction errors). Exercised twice: in-process with a stand-in session
whose executor has 2 slots (fast: the chunking and re-assembly code), and on a two-node Ray cluster
on loopback only (slow)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compressor.data import Samples
from compressor.executor import LocalExecutor, RunExecutor
from compressor.pass_base import PassContext, make_config
from compressor.pass_manager import PassManager
from passes import PASSES
from tests.conftest import make_model
from tests.ray_cluster import VENV_BIN, netns_cluster


def branchy_model(seed: int = 0) -> onnx.ModelProto:
    """x[1,8,8,8] -> {Conv A (groups=2), Conv B} -> Add -> Relu -> Conv C (groups=4) -> Relu -> Conv D:
    A and B share one capture (independent), A and C have several groups."""
    rng = np.random.default_rng(seed)
    f = lambda *s: (rng.standard_normal(s) * 0.3).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["a"], pads=[1, 1, 1, 1], group=2, name="conv_a"),
        helper.make_node("Conv", ["x", "wb"], ["b"], pads=[1, 1, 1, 1], name="conv_b"),
        helper.make_node("Add", ["a", "b"], ["s"]),
        helper.make_node("Relu", ["s"], ["r"]),
        helper.make_node("Conv", ["r", "wc"], ["c"], pads=[1, 1, 1, 1], group=4, name="conv_c"),
        helper.make_node("Relu", ["c"], ["rc"]),
        helper.make_node("Conv", ["rc", "wd"], ["y"], name="conv_d"),
    ]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 8, 8])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 8, 8])],
                      {"wa": f(16, 4, 3, 3), "wb": f(16, 8, 3, 3), "wc": f(16, 4, 3, 3), "wd": f(6, 16, 1, 1)})


def wide_model(seed: int = 0, d: int = 256) -> onnx.ModelProto:
    """x[16,d] -> {MatMul A, MatMul B} -> Add -> Relu -> MatMul C: d x d solves, large enough for
    OpenBLAS to multi-thread (results then depend on the BLAS thread count: on this 2-core host the
    fanned-out run differs from the local one when the tasks do not pin their BLAS threads; checked)."""
    rng = np.random.default_rng(seed)
    f = lambda *s: (rng.standard_normal(s) / np.sqrt(d)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "wa"], ["a"], name="mm_a"), helper.make_node("MatMul", ["x", "wb"], ["b"], name="mm_b"),
             helper.make_node("Add", ["a", "b"], ["s"]), helper.make_node("Relu", ["s"], ["r"]),
             helper.make_node("MatMul", ["r", "wc"], ["y"], name="mm_c")]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [16, d])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [16, d])], {"wa": f(d, d), "wb": f(d, d), "wc": f(d, d)})


def _one_blas_thread(fn, *args):
    """Run a task like a Ray worker granted one CPU does (Ray sets OMP_NUM_THREADS=1 there)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, user_api="blas"):
        return fn(*args)


class _TwoSlotLocal(LocalExecutor):
    name = "ray"  # stands in for a Ray executor: the pass takes its fan-out path

    @property
    def slots(self) -> int:
        return 2

    def map(self, fn, tasks, shared=(), **kw):
        return super().map(_one_blas_thread, tasks, (fn, *shared), **kw)


class _Session(RunExecutor):
    def __init__(self) -> None:
        super().__init__("ray")
        self._ex = _TwoSlotLocal()


def _calib(n: int = 12) -> Samples:
    rng = np.random.default_rng(1)
    return Samples([{"x": rng.standard_normal((1, 8, 8, 8)).astype(np.float32)} for _ in range(n)], None, "test")


def _calib_wide(n: int = 8, d: int = 256) -> Samples:
    rng = np.random.default_rng(2)
    return Samples([{"x": rng.standard_normal((16, d)).astype(np.float32)} for _ in range(n)], None, "test")


def test_fanned_out_wide_solves_equal_local_with_one_blas_thread_per_task():
    m, calib = wide_model(), _calib_wide()
    cls = PASSES.get("sparsify.obs")
    cfg = make_config(cls, dict(sparsity=0.5, keep_classifier=False, calib_samples=0))
    local, rec_l = PassManager([(cls(cfg), "builtin:test")]).run(m, PassContext(calib=calib, template=m))
    fanned, rec_f = PassManager([(cls(cfg), "builtin:test")]).run(
        m, PassContext(calib=calib, template=m, executor_session=_Session()))
    wl = {i.name: numpy_helper.to_array(i) for i in local.graph.initializer}
    wf = {i.name: numpy_helper.to_array(i) for i in fanned.graph.initializer}
    assert all(np.array_equal(wl[k], wf[k]) for k in wl) and np.count_nonzero(wl["wa"] == 0) == wl["wa"].size // 2
    st = dict(rec_f[0].stats)
    assert st.pop("executor")["tasks"] == 3 and st == rec_l[0].stats


@pytest.mark.parametrize("pattern,s", [("unstructured", 0.6), ("2:4", 0.5), ("4x1", 0.5)])
def test_fanned_out_solves_equal_local(pattern, s):
    m, calib = branchy_model(), _calib()
    cls = PASSES.get("sparsify.obs")
    cfg = make_config(cls, dict(sparsity=s, pattern=pattern, keep_classifier=False, calib_samples=0))
    local, rec_l = PassManager([(cls(cfg), "builtin:test")]).run(m, PassContext(calib=calib, template=m))
    session = _Session()
    fanned, rec_f = PassManager([(cls(cfg), "builtin:test")]).run(
        m, PassContext(calib=calib, template=m, executor_session=session))
    assert session.uses == ["sparsify.obs"]
    wl = {i.name: numpy_helper.to_array(i) for i in local.graph.initializer}
    wf = {i.name: numpy_helper.to_array(i) for i in fanned.graph.initializer}
    assert wl.keys() == wf.keys() and all(np.array_equal(wl[k], wf[k]) for k in wl)
    assert np.count_nonzero(wl["wa"] == 0) > 0  # something was pruned
    st_l, st_f = rec_l[0].stats, dict(rec_f[0].stats)
    ex = st_f.pop("executor")
    # 2 captures: {A, B} then C then D -> A: 2 groups -> 2 tasks, B: 1, C: 4 groups in 2 chunks, D: 1
    assert ex["tasks"] == 6 and ex["slots"] == 2
    assert st_f == st_l  # per-layer sparsities and reconstruction errors, bit for bit


@pytest.fixture(scope="module")
def cluster(request):
    yield from netns_cluster(request)


@pytest.mark.slow
def test_obs_on_two_node_cluster_is_bit_identical(cluster, cli, tmp_path):
    model = tmp_path / "wide.onnx"
    onnx.save(wide_model(), str(model))
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.concatenate([f["x"] for f in _calib_wide(2).feeds]).reshape(2, 16, 256))
    flags = ["--method", "obs", "--allocation", "uniform", "--sparsity", "0.6", "--calib", calib, "--no-compile", "--no-latency", "--verify-samples", "4",
             "--no-gate"]
    loc = cli(model, *flags, "-o", tmp_path / "local")
    assert loc.code == 0, loc
    r = cluster.run(VENV_BIN / "compress", model, *flags, "-o", tmp_path / "ray", "--executor", "ray",
                    "--ray-address", cluster.address)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (tmp_path / "ray" / "model.onnx").read_bytes() == (tmp_path / "local" / "model.onnx").read_bytes()
    pl = next(p for p in json.loads((tmp_path / "local" / "report.json").read_text())["passes"] if p["name"] == "sparsify.obs")
    pr = next(p for p in json.loads((tmp_path / "ray" / "report.json").read_text())["passes"] if p["name"] == "sparsify.obs")
    ex = pr["stats"].pop("executor")
    assert ex["name"] == "ray" and ex["slots"] == 2 and ex["tasks"] == 2 and ex["retries"] == 0  # mm_c: classifier, kept dense
    assert pr["stats"] == pl["stats"]
    assert not any("no stage of this run fans out" in w for w in json.loads((tmp_path / "ray" / "report.json").read_text())["warnings"])


@pytest.mark.slow
def test_scale_bench_obs_smoke(cluster, tmp_path):
    """bench/scale.py's OBS part in its tiny configuration (its private Ray instances run inside the namespace)."""
    repo = Path(__file__).resolve().parents[2]
    out = tmp_path / "scale.md"
    r = cluster.run(VENV_BIN / "python", repo / "bench" / "scale.py", "--smoke", "--parts", "obs", "--out", out)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    text = out.read_text()
    assert "bit-identical to the local run: **yes**" in text and "| ray 2 workers |" in text
