"""Shared fixtures: tiny in-code ONNX models, the CLI runner, and an autouse
check that no test modified a model file it was given (hash before/after)."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

OPSET = 17


def make_model(nodes, inputs, outputs, inits, opset=OPSET) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def conv_bn_model(seed: int = 0) -> onnx.ModelProto:
    """x[1,3,8,8] -> Conv(8) -> BN -> Relu -> Identity -> GlobalAveragePool -> Flatten -> Gemm(10) -> Dropout."""
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)
    inits = {
        "w": f(8, 3, 3, 3), "b": f(8),
        "gamma": (rng.random(8) + 0.5).astype(np.float32), "beta": f(8), "mean": f(8),
        "var": (rng.random(8) + 0.5).astype(np.float32),
        "fc_w": f(10, 8), "fc_b": f(10),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["bn"], name="bn", epsilon=1e-5),
        helper.make_node("Relu", ["bn"], ["r"], name="relu"),
        helper.make_node("Identity", ["r"], ["ri"], name="ident"),
        helper.make_node("GlobalAveragePool", ["ri"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["fl"], name="flatten"),
        helper.make_node("Gemm", ["fl", "fc_w", "fc_b"], ["logits"], name="fc", transB=1),
        helper.make_node("Dropout", ["logits"], ["y"], name="drop"),
    ]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)


def mlp_model(seed: int = 0, dynamic: bool = False) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits = {"w1": rng.standard_normal((16, 32)).astype(np.float32), "b1": rng.standard_normal(32).astype(np.float32),
             "w2": rng.standard_normal((32, 4)).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
             helper.make_node("Add", ["h", "b1"], ["hb"], name="add1"),
             helper.make_node("Relu", ["hb"], ["hr"], name="relu1"),
             helper.make_node("MatMul", ["hr", "w2"], ["y"], name="mm2")]
    dim0 = "batch" if dynamic else 1
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [dim0, 16])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [dim0, 4])], inits)


def ort_run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def tiny_models(tmp_path) -> dict[str, Path]:
    paths = {}
    for name, m in {"convbn": conv_bn_model(), "mlp": mlp_model(), "mlp_dynamic": mlp_model(dynamic=True)}.items():
        p = tmp_path / f"{name}.onnx"
        onnx.save(m, p)
        paths[name] = p
    return paths


class CliResult:
    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err

    def __repr__(self):
        return f"CliResult(code={self.code}, err={self.err[-500:]!r}, out_tail={self.out[-1500:]!r})"


@pytest.fixture
def cli(capsys):
    """Run ``compress`` in-process (fast: TVM is imported once per worker)."""
    from compressor.cli import main

    def run(*args: str) -> CliResult:
        code = main([str(a) for a in args])
        cap = capsys.readouterr()
        return CliResult(code, cap.out, cap.err)

    return run


def run_cli_subprocess(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600) -> CliResult:
    exe = Path(sys.executable).with_name("compress")
    e = dict(os.environ, **(env or {}))
    p = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, cwd=cwd, env=e, timeout=timeout)
    return CliResult(p.returncode, p.stdout, p.stderr)
