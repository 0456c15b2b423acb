"""Tiny ONNX models (opset 17, built in code) and helpers for the target tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _save(graph, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("onnx_models")


@pytest.fixture(scope="session")
def gemm_relu(models_dir) -> Path:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 16)).astype(np.float32)
    b = rng.standard_normal(32).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W", "B"], ["y"], transB=1), helper.make_node("Relu", ["y"], ["z"])],
        "gemm_relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [4, 32])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
    )
    return _save(g, models_dir / "gemm_relu.onnx")


@pytest.fixture(scope="session")
def gemm_softmax(models_dir) -> Path:
    """Gemm -> Softmax: the Softmax is a tuning task (a reduction; the Gemm has a kernel and
    all-elementwise functions are not tuned)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 16)).astype(np.float32)
    b = rng.standard_normal(32).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W", "B"], ["y"], transB=1), helper.make_node("Softmax", ["y"], ["z"], axis=-1)],
        "gemm_softmax",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [4, 32])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
    )
    return _save(g, models_dir / "gemm_softmax.onnx")


@pytest.fixture(scope="session")
def conv_relu(models_dir) -> Path:
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    g = helper.make_graph(
        [
            helper.make_node("Conv", ["img", "W", "B"], ["c"], pads=[1, 1, 1, 1], strides=[1, 1]),
            helper.make_node("Relu", ["c"], ["out"]),
        ],
        "conv_relu",
        [helper.make_tensor_value_info("img", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 8, 16, 16])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
    )
    return _save(g, models_dir / "conv_relu.onnx")


@pytest.fixture(scope="session")
def two_in_two_out(models_dir) -> Path:
    """Two inputs (one with a '.' in its name, declared second) and two outputs:
    checks input ordering by name and tuple-output flattening."""
    g = helper.make_graph(
        [
            helper.make_node("Sub", ["b.1", "a"], ["d"]),
            helper.make_node("Sigmoid", ["d"], ["s"]),
            helper.make_node("ReduceSum", ["a"], ["r"], keepdims=0),
        ],
        "two_io",
        [
            helper.make_tensor_value_info("b.1", TensorProto.FLOAT, [2, 5]),
            helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 5]),
        ],
        [
            helper.make_tensor_value_info("s", TensorProto.FLOAT, [2, 5]),
            helper.make_tensor_value_info("r", TensorProto.FLOAT, []),
        ],
    )
    return _save(g, models_dir / "two_io.onnx")


@pytest.fixture(scope="session")
def lstm_model(models_dir) -> Path:
    rng = np.random.default_rng(2)
    hidden, inp = 4, 3
    w = rng.standard_normal((1, 4 * hidden, inp)).astype(np.float32)
    r = rng.standard_normal((1, 4 * hidden, hidden)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("LSTM", ["x", "W", "R"], ["y"], hidden_size=hidden)],
        "lstm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 1, inp])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, 1, 1, hidden])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(r, "R")],
    )
    return _save(g, models_dir / "lstm.onnx")


def random_inputs(model_path: Path, seed: int = 0) -> dict[str, np.ndarray]:
    model = onnx.load(str(model_path))
    inits = {t.name for t in model.graph.initializer}
    rng = np.random.default_rng(seed)
    out = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        shape = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        out[vi.name] = rng.standard_normal(shape).astype(np.float32)
    return out


def ort_reference(model_path: Path, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, inputs)


@pytest.fixture(scope="session")
def make_inputs():
    return random_inputs


@pytest.fixture(scope="session")
def ort_run():
    return ort_reference


def _negate_expected(bundle: Path, dst: Path, rehash: bool = True) -> Path:
    """Copy ``bundle`` to ``dst`` with its self-check reference outputs negated; with
    ``rehash`` the manifest's hash of expected.npz is updated so only the numbers are wrong."""
    import hashlib
    import json
    import shutil

    shutil.copytree(bundle, dst)
    exp = dst / "selfcheck" / "expected.npz"
    with np.load(exp) as z:
        bad = {k: -z[k] for k in z.files}
    np.savez(exp, **bad)
    if rehash:
        m = json.loads((dst / "manifest.json").read_text())
        m["files"]["selfcheck/expected.npz"]["sha256"] = hashlib.sha256(exp.read_bytes()).hexdigest()
        (dst / "manifest.json").write_text(json.dumps(m))
    return dst


@pytest.fixture
def wrong_expected():
    """``wrong_expected(bundle, dst, rehash=True)``: a copy of the bundle whose self-check
    must fail (negated reference outputs)."""
    return _negate_expected
