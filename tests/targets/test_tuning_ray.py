"""meta_schedule tuning on a Ray cluster (targets/tuning_ray.py): ``compress --tune-trials N
--executor ray`` builds and measures the candidates on the workers of a two-node cluster (inside a
loopback-only network namespace, see tests/compressor/test_executor.py), the tuned artifact
computes the model (checked against onnxruntime), the records land in the persistent database on
the driver, and a later (local) run reuses them without a new trial."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.ray_cluster import VENV_BIN, netns_cluster

@pytest.fixture(scope="module")
def cluster(request):
    yield from netns_cluster(request)


def _records(path: Path) -> list[str]:
    return [ln for ln in path.read_text().splitlines() if ln.strip()]


@pytest.mark.slow
def test_tuning_on_two_node_cluster_merges_into_db_and_is_reused(cluster, cli, gemm_softmax, tmp_path):
    from targets import tuning, tvm_backend
    from tests.targets.conftest import ort_reference, random_inputs

    db_root = tmp_path / "db"
    r = cluster.run(VENV_BIN / "compress", gemm_softmax, "--target", "x86", "--tune-trials", "4", "--tuning-db", db_root,
                    "-o", tmp_path / "b1", "--verify-samples", "4", "--no-latency", "--executor", "ray",
                    "--ray-address", cluster.address)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "candidates built and measured on ray (cluster" in r.stdout and "2 CPU slots" in r.stdout
    rep = json.loads((tmp_path / "b1" / "report.json").read_text())
    tun = rep["artifact"]["tuning"]
    assert tun["mode"] == "tune" and tun["executor"] == "ray" and tun["workers"] == 2
    assert tun["tasks"] >= 1 and tun["tasks_tuned"] == tun["tasks"] and 1 <= tun["trials_run"] <= 4
    remote = tun["remote"]
    # every trial and every default-schedule measurement was one build task and one measure task on the cluster
    assert remote["build_tasks"] == remote["run_tasks"] == tun["trials_run"] + tun["tasks"]
    assert remote["failed_tasks"] == 0 and remote["bytes_from_workers"] > 0
    # timed with every core of the machine, like the local runner (Ray workers start with OMP_NUM_THREADS=1)
    assert remote["measure_threads"] == [tuning._num_cores()]
    man = json.loads((tmp_path / "b1" / "manifest.json").read_text())
    assert man["artifact"]["tuning"]["executor"] == "ray" and man["artifact"]["tuning"]["workers"] == 2
    # the scheduler on the driver committed every measured candidate to the persistent database
    db_dir = Path(tun["database"])
    db_records = _records(db_dir / tuning.RECORD_FILE)
    assert db_dir.parent == db_root and len(db_records) == tun["trials_run"] + tun["tasks"]
    assert all(json.loads(x)[1][1] for x in db_records)  # each record carries measured run_secs

    # the artifact tuned on the cluster computes the model (explicit tolerance vs onnxruntime)
    feeds = random_inputs(gemm_softmax, seed=5)
    got = tvm_backend.run_library(tmp_path / "b1" / rep["artifact"]["path"], feeds)
    np.testing.assert_allclose(got[0], ort_reference(gemm_softmax, feeds)[0], rtol=1e-4, atol=1e-4)
    assert all(c["passed"] for c in rep["verification"])

    # a later run (here: local) reuses the records tuned on the cluster: no new trial, database unchanged
    r2 = cli(gemm_softmax, "--target", "x86", "--tune-trials", "4", "--tuning-db", db_root, "-o", tmp_path / "b2",
             "--verify-samples", "2", "--no-latency")
    assert r2.code == 0, r2
    tun2 = json.loads((tmp_path / "b2" / "report.json").read_text())["artifact"]["tuning"]
    assert tun2["trials_run"] == 0 and tun2["tasks_reused"] == tun["tasks"] and tun2["records_applied"] == tun["records_applied"]
    assert _records(db_dir / tuning.RECORD_FILE) == db_records
    assert (tmp_path / "b2" / "tuning" / tuning.RECORD_FILE).read_text() == (tmp_path / "b1" / "tuning" / tuning.RECORD_FILE).read_text()
