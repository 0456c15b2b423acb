"""Tests for the model zoo (models/): exported graphs, numerics vs torch, the trained digits model."""

from __future__ import annotations

import collections
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")

from models import build as B  # noqa: E402
from models import zoo  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

EXPECTED_INPUT_SHAPES = {
    "mlp": [1, 64],
    "cnn": [1, 3, 32, 32],
    "resnet": [1, 3, 32, 32],
    "mobilenetv2": [1, 3, 32, 32],
    "densenet": [1, 3, 32, 32],
    "gru": [1, 16, 8],
    "lstm": [1, 16, 8],
    "transformer": [1, 16, 32],
}
HAS_BN = {"cnn", "resnet", "mobilenetv2", "densenet"}


def _session(path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _dims(value_info) -> list[int]:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value_info.type.tensor_type.shape.dim]


def _ops(path) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


@pytest.fixture(scope="session")
def zoo_path(tmp_path_factory):
    cache = zoo.shared_cache_dir(tmp_path_factory)
    return lambda name: zoo.ensure_built(name, cache)


def test_model_names():
    assert B.MODEL_NAMES == list(EXPECTED_INPUT_SHAPES)


@pytest.mark.parametrize("name", list(EXPECTED_INPUT_SHAPES))
def test_build_check_and_match_torch(name, tmp_path):
    path = B.build(name, tmp_path)
    assert path == tmp_path / f"{name}.onnx" and path.is_file()
    assert path.stat().st_size < 2 * 1024 * 1024
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp files left behind

    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == 17
    (inp,), (out,) = model.graph.input, model.graph.output
    assert (inp.name, _dims(inp)) == ("input", EXPECTED_INPUT_SHAPES[name])  # static shapes
    assert (out.name, _dims(out)) == ("logits", [1, 10])

    torch_model, inputs = B.make_model(name)
    assert not torch_model.training
    for seed in (0, 1):
        feeds = B.example_inputs(name, seed=seed)
        with torch.no_grad():
            expected = torch_model(*feeds.values()).numpy()
        (got,) = _session(path).run(None, {k: v.numpy() for k, v in feeds.items()})
        assert got.shape == expected.shape == (1, 10)
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(B.reference_output(name), B.reference_output(name))  # seeded

    if name in HAS_BN:
        # BN must be left unfused (the compressor's cleanup pass folds it), in inference mode.
        bns = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
        assert bns and all(
            onnx.helper.get_attribute_value(a) == 0 for n in bns for a in n.attribute if a.name == "training_mode"
        )
        assert all(len(n.output) == 1 for n in bns)


def test_build_is_deterministic(tmp_path):
    a = B.build("resnet", tmp_path / "a").read_bytes()
    b = B.build("resnet", tmp_path / "b").read_bytes()
    assert a == b


def test_bn_running_stats_nontrivial():
    model, _ = B.make_model("resnet")
    bn = model.layer1.bn1
    assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
    assert not torch.allclose(bn.weight, torch.ones_like(bn.weight))


def test_recurrent_ops(zoo_path):
    gru, lstm = _ops(zoo_path("gru")), _ops(zoo_path("lstm"))
    assert gru["GRU"] == 1 and "LSTM" not in gru
    assert lstm["LSTM"] == 1 and "GRU" not in lstm
    for name in ("gru", "lstm"):
        m = onnx.load(str(zoo_path(name)))
        rnn = next(n for n in m.graph.node if n.op_type in ("GRU", "LSTM"))
        inits = {i.name for i in m.graph.initializer}
        # W, R, B are plain initializers (no runtime weight reshuffling).
        assert all(x in inits for x in rnn.input[1:4])


def test_densenet_concat(zoo_path):
    assert _ops(zoo_path("densenet"))["Concat"] >= 4


def test_resnet_and_mobilenet_topology(zoo_path):
    res = _ops(zoo_path("resnet"))
    assert res["Add"] == 3 and res["BatchNormalization"] == res["Conv"] == 8
    m = onnx.load(str(zoo_path("resnet")))
    assert any(n.op_type == "Conv" and list(onnx.helper.get_attribute_value(a) for a in n.attribute
                                            if a.name == "kernel_shape")[0] == [1, 1] for n in m.graph.node)
    mb = onnx.load(str(zoo_path("mobilenetv2")))
    groups = [onnx.helper.get_attribute_value(a) for n in mb.graph.node if n.op_type == "Conv"
              for a in n.attribute if a.name == "group"]
    assert any(g > 1 for g in groups)  # depthwise
    assert _ops(zoo_path("mobilenetv2"))["Clip"] >= 1  # ReLU6


def test_transformer_ops(zoo_path):
    ops = _ops(zoo_path("transformer"))
    assert ops["Softmax"] == 2 and ops["MatMul"] >= 8 and ops["Reshape"] >= 8 and ops["Transpose"] >= 4
    assert ops["LayerNormalization"] >= 4
    fused = {"Attention", "MultiHeadAttention", "GroupQueryAttention", "SkipLayerNormalization"}
    assert not fused & set(ops)
    assert all(n.domain in ("", "ai.onnx") for n in onnx.load(str(zoo_path("transformer"))).graph.node)


def test_zoo_cache_and_concurrency(tmp_path):
    paths, errors = [], []

    def worker():
        try:
            paths.append(zoo.ensure_built("mlp", tmp_path))
        except Exception as e:  # pragma: no cover - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(paths)) == 1
    p = paths[0]
    onnx.checker.check_model(onnx.load(str(p)), full_check=True)
    mtime = p.stat().st_mtime_ns
    assert zoo.ensure_built("mlp", tmp_path) == p and p.stat().st_mtime_ns == mtime  # cached
    assert [q.name for q in p.parent.iterdir()] == ["mlp.onnx"]  # temp files cleaned up
    assert zoo.ensure_built("digits_cnn", tmp_path) == zoo.DIGITS_ONNX
    with pytest.raises(ValueError):
        zoo.ensure_built("nope", tmp_path)


def test_cli_only_out(tmp_path):
    r = subprocess.run([sys.executable, "-m", "models.build", "--only", "mlp", "--only", "gru",
                        "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gru.onnx", "mlp.onnx"]


# ---- the committed, trained default model ---------------------------------------------


def test_digits_files_committed_and_small():
    for p in (zoo.DIGITS_ONNX, zoo.DIGITS_EVAL, zoo.DIGITS_CALIB):
        assert p.is_file(), p
        assert p.stat().st_size < 1024 * 1024


def test_digits_model_graph():
    m = onnx.load(str(zoo.DIGITS_ONNX))
    onnx.checker.check_model(m, full_check=True)
    (inp,), (out,) = m.graph.input, m.graph.output
    assert (inp.name, _dims(inp)) == ("input", [1, 1, 8, 8])
    assert (out.name, _dims(out)) == ("logits", [1, 10])
    ops = _ops(zoo.DIGITS_ONNX)
    assert ops["Conv"] == 2 and ops["BatchNormalization"] == 2 and ops["Gemm"] == 2


def test_digits_eval_and_calib_data():
    ev, cal = np.load(zoo.DIGITS_EVAL), np.load(zoo.DIGITS_CALIB)
    assert set(ev.files) == {"input", "labels"} and set(cal.files) == {"input"}
    x, y = ev["input"], ev["labels"]
    assert x.dtype == np.float32 and x.ndim == 4 and x.shape[1:] == (1, 8, 8)
    assert y.dtype == np.int64 and y.shape == (len(x),) and set(y.tolist()) == set(range(10))
    assert 0.0 <= x.min() and x.max() <= 1.0
    c = cal["input"]
    assert c.dtype == np.float32 and c.shape[1:] == (1, 8, 8) and 100 <= len(c) <= 1000


def test_digits_accuracy_onnxruntime():
    from models.train_digits import onnx_accuracy

    ev = np.load(zoo.DIGITS_EVAL)
    acc = onnx_accuracy(zoo.DIGITS_ONNX, ev["input"], ev["labels"])
    assert acc >= 0.95, acc
