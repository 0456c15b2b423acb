"""compress bench on this host: ISA/architecture refusal by the bundle runner, and the TVM
RPC path against a server on loopback (127.0.0.1 only), both with a real x86 bundle."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from compressor.errors import DependencyError, UsageError

pytest.importorskip("tvm")


@pytest.fixture(scope="module")
def x86_bundle(gemm_relu, tmp_path_factory) -> Path:
    from compressor.cli import main

    out = tmp_path_factory.mktemp("device_host") / "gemm.x86.bundle"
    assert main([str(gemm_relu), "--target", "x86", "--no-latency", "-o", str(out)]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["artifact"]["path"] and m["runtime"]["name"] == "tvm"
    return out


def _copy_with_manifest(bundle: Path, dst: Path, edit) -> Path:
    shutil.copytree(bundle, dst)
    m = json.loads((dst / "manifest.json").read_text())
    edit(m)
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def _runner(bundle: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(bundle / "run_bundle.py"), str(bundle)], capture_output=True, text=True,
                          timeout=300)


def test_runner_passes_on_host(x86_bundle, cli):
    p = _runner(x86_bundle)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "SELFCHECK PASSED samples=" in p.stdout
    r = cli("bench", x86_bundle)
    assert r.code == 0, r.out + r.err
    assert "RESULT PASSED bench device=host" in r.out and "latency: median" in r.out


def test_runner_refuses_missing_isa_feature(x86_bundle, tmp_path, cli):
    fake = "compressor_nonexistent_isa_feature"
    b = _copy_with_manifest(x86_bundle, tmp_path / "b", lambda m: m["required_isa_features"].append(fake))
    p = _runner(b)
    assert p.returncode == 6
    assert "lacks ISA features the artifact needs" in p.stdout and fake in p.stdout
    r = cli("bench", b)
    assert r.code == 4 and "RESULT FAILED" in r.out and fake in r.out


def test_runner_refuses_other_architecture(x86_bundle, tmp_path):
    b = _copy_with_manifest(x86_bundle, tmp_path / "b", lambda m: m["target"].update(triple="aarch64-linux-gnu"))
    p = _runner(b)
    assert p.returncode == 6 and "cannot run an artifact built for aarch64" in p.stdout


def test_runner_detects_wrong_outputs(x86_bundle, tmp_path, cli, wrong_expected):
    """The self-check is not vacuous: negated reference outputs (hash updated) fail with exit 9 / 3."""
    b = wrong_expected(x86_bundle, tmp_path / "b")
    p = _runner(b)
    assert p.returncode == 9 and "SELFCHECK FAILED" in p.stdout
    assert cli("bench", b).code == 3


def test_bench_qemu_rejects_x86_bundle(x86_bundle, cli):
    r = cli("bench", x86_bundle, "--device", "qemu-aarch64")
    assert r.code == 2 and "runs aarch64 bundles" in r.err


@pytest.fixture
def rpc_server():
    """A TVM RPC server on loopback only, always terminated."""
    from tvm import rpc

    srv = rpc.Server(host="127.0.0.1", port=19090, port_end=19190, key="compressor-test", silent=True)
    try:
        yield srv
    finally:
        srv.terminate()


def test_rpc_round_trip(x86_bundle, rpc_server, cli, tmp_path):
    addr = f"127.0.0.1:{rpc_server.port}"
    out = tmp_path / "rpc.json"
    r = cli("bench", x86_bundle, "--rpc", addr, "--rpc-key", "compressor-test", "--json", out)
    assert r.code == 0, r.out + r.err
    rep = json.loads(out.read_text())
    m = json.loads((x86_bundle / "manifest.json").read_text())
    with np.load(x86_bundle / "selfcheck" / "inputs.npz") as z:
        n = len(z[z.files[0]])
    assert rep["passed"] and rep["samples"] == n and rep["min_cosine"] >= 0.9999
    assert rep["runs"] == 50 and rep["median_ms"] > 0 and rep["address"] == addr
    assert f"RESULT PASSED bench device=rpc={addr}" in r.out
    assert m["artifact"]["path"].endswith(".so")


def test_rpc_detects_wrong_outputs(x86_bundle, rpc_server, tmp_path, wrong_expected):
    from targets import rpc as trpc

    b = wrong_expected(x86_bundle, tmp_path / "b", rehash=False)
    res = trpc.bench_rpc(b, "127.0.0.1", rpc_server.port, key="compressor-test", number=1, repeat=1)
    assert not res.passed and res.min_cosine < 0


def test_rpc_errors(x86_bundle, rpc_server, cli):
    from targets import rpc as trpc

    with pytest.raises(UsageError):
        trpc.parse_address("127.0.0.1")
    with pytest.raises(DependencyError, match="cannot open a TVM RPC session"):  # no key: the server refuses at once
        trpc.bench_rpc(x86_bundle, "127.0.0.1", rpc_server.port, key="")
    r = cli("bench", x86_bundle, "--rpc", "127.0.0.1:1")
    assert r.code == 5 and "cannot open a TVM RPC session" in r.err
