"""onnx2torch: the interpreter module equals onnxruntime; write-back and re-export keep outputs."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from compressor import ir, runtime
from compressor.errors import UsageError
from compressor.training.onnx2torch import OnnxModule, export_onnx, unsupported_ops
from models.zoo import ensure_built, shared_cache_dir
from tests.conftest import make_model, ort_run


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    cache = shared_cache_dir(tmp_path_factory)
    return lambda name: ensure_built(name, cache)


def _feeds(model: onnx.ModelProto, n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{s.name: rng.standard_normal(s.shape).astype(np.float32) for s in ir.input_specs(model)} for _ in range(n)]


def _torch_run(mod: OnnxModule, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    with torch.no_grad():
        out = mod(*[torch.from_numpy(feed[n]) for n in mod.input_names])
    return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet", "mobilenetv2", "densenet", "transformer", "gru", "lstm", "digits_cnn"])
def test_round_trip_equals_onnxruntime(zoo, name):
    model = ir.load(zoo(name))  # as the pipeline loads it (constants lifted, BN not yet folded)
    mod = OnnxModule(model)
    sess = runtime.session(model)
    for feed in _feeds(model, 2):
        ref = sess.run(None, feed)
        got = _torch_run(mod, feed)
        assert len(got) == len(ref)
        for g, r in zip(got, ref):
            assert g.shape == r.shape
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
    assert len(mod.named_onnx_parameters()) > 0


def test_write_back_changes_only_constants(zoo):
    model = ir.load(zoo("cnn"))
    mod = OnnxModule(model)
    with torch.no_grad():
        for p in mod.parameters():
            p.mul_(0.5)
    graph = ir.to_graph(model)
    n_nodes = len(graph.nodes)
    assert mod.write_back(graph) == len(mod.named_onnx_parameters())
    new = ir.to_model(graph, model)
    assert len(new.graph.node) == n_nodes
    feed = _feeds(model, 1)[0]
    np.testing.assert_allclose(runtime.session(new).run(None, feed)[0], _torch_run(mod, feed)[0], rtol=1e-5, atol=1e-5)
    # BN statistics are buffers, not trained
    bn_stats = {n.inputs[k].name for n in graph.nodes if n.op == "BatchNormalization" for k in (3, 4)}
    assert bn_stats and not bn_stats & set(mod.named_onnx_parameters())


def test_export_onnx_keeps_names_and_outputs(zoo, tmp_path):
    model = ir.load(zoo("mlp"))
    mod = OnnxModule(model)
    feed = _feeds(model, 1)[0]
    export_onnx(mod, feed, tmp_path / "re.onnx")
    re = onnx.load(tmp_path / "re.onnx")
    assert [i.name for i in re.graph.input] == mod.input_names and [o.name for o in re.graph.output] == mod.output_names
    np.testing.assert_allclose(ort_run(re, feed)[0], runtime.session(model).run(None, feed)[0], rtol=1e-5, atol=1e-5)


def test_unsupported_ops_are_listed():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    m = make_model([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Hardmax", ["r"], ["s"]),
                    helper.make_node("Softsign", ["s"], ["y"])], [x], [y], {})
    assert unsupported_ops(m) == ["Hardmax", "Softsign"]
    with pytest.raises(UsageError, match="Hardmax, Softsign"):
        OnnxModule(m)


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge"])
def test_pad_masks_and_reductions_equal_onnxruntime(mode):
    """The ops the real-suite models need for --finetune (silero-vad: reflect Pad; magika: Equal/Max;
    MiniLM: And/Where/ReduceL2), against onnxruntime."""
    f32 = TensorProto.FLOAT
    x = helper.make_tensor_value_info("x", f32, [2, 6])
    z = helper.make_tensor_value_info("z", f32, [2, 6])
    outs = [helper.make_tensor_value_info(n, f32, s) for n, s in (("p", [2, 11]), ("w", [2, 6]), ("l2", [2, 1]), ("mx", [2, 6]))]
    inits = {"pads": np.array([0, 2, 0, 3], np.int64), "c": np.array(0.5, np.float32), "zero": np.array(0.0, np.float32)}
    nodes = [
        helper.make_node("Pad", ["x", "pads", "c"] if mode == "constant" else ["x", "pads"], ["p"], mode=mode),
        helper.make_node("Greater", ["x", "zero"], ["gt"]), helper.make_node("Less", ["z", "c"], ["lt"]),
        helper.make_node("And", ["gt", "lt"], ["both"]), helper.make_node("Not", ["both"], ["nb"]),
        helper.make_node("Or", ["nb", "gt"], ["any"]), helper.make_node("Equal", ["any", "gt"], ["eq"]),
        helper.make_node("Where", ["eq", "x", "z"], ["w"]),
        helper.make_node("ReduceL2", ["w"], ["l2"], axes=[1], keepdims=1),
        helper.make_node("Max", ["x", "z", "c"], ["m1"]), helper.make_node("Min", ["m1", "x"], ["mx"]),
    ]
    m = make_model(nodes, [x, z], outs, inits, opset=17)
    assert unsupported_ops(m) == []
    mod = OnnxModule(m)
    rng = np.random.default_rng(5)
    feed = {"x": rng.standard_normal((2, 6)).astype(np.float32), "z": rng.standard_normal((2, 6)).astype(np.float32)}
    ref = ort_run(m, feed)
    got = _torch_run(mod, feed)
    for r, g in zip(ref, got):
        np.testing.assert_allclose(g, r, rtol=1e-6, atol=1e-6)


def test_batch_1_reshapes_run_batched_and_equal_single_samples():
    """Reshape targets with a baked-in batch 1 ([1, 24] and [1, -1, 4] on a batch-1 input, [1, 2, 4, 3] on a
    batch-folded [8, 3] input) are marked; stacked samples then run in one batch with the outputs of one
    sample at a time, and a single sample still equals onnxruntime."""
    from compressor.training.distill import _Runner
    from compressor.training.onnx2torch import batch_1_reshapes

    rng = np.random.default_rng(0)
    inits = {"s1": np.array([1, 24], np.int64), "w": rng.standard_normal((24, 8)).astype(np.float32),
             "s2": np.array([1, -1, 4], np.int64), "s3": np.array([-1, 3], np.int64), "s4": np.array([1, 2, 4, 3], np.int64)}
    nodes = [helper.make_node("Reshape", ["x", "s1"], ["f"], name="flat"),
             helper.make_node("MatMul", ["f", "w"], ["h"], name="mm"),
             helper.make_node("Reshape", ["h", "s2"], ["h3"], name="split"),
             helper.make_node("Reshape", ["x", "s3"], ["x2"], name="fold"),
             helper.make_node("Softmax", ["x2"], ["p"], axis=-1),
             helper.make_node("Reshape", ["p", "s4"], ["y2"], name="unfold")]
    m = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6])],
                   [helper.make_tensor_value_info("h3", TensorProto.FLOAT, [1, 2, 4]),
                    helper.make_tensor_value_info("y2", TensorProto.FLOAT, [1, 2, 4, 3])], inits)
    assert batch_1_reshapes(m) == {"f": "count", "h3": "copy", "y2": "count"}
    mod = OnnxModule(m)
    feeds = [{"x": rng.standard_normal((1, 4, 6)).astype(np.float32)} for _ in range(5)]
    r = _Runner(mod, ["x"], feeds)
    assert r.mode == "batched" and r.batched is True
    with torch.no_grad():
        both = r(torch.arange(5))
        for i in range(5):
            one = mod(torch.from_numpy(feeds[i]["x"]))
            ref = ort_run(m, feeds[i])
            for k in range(2):
                np.testing.assert_allclose(both[k][i:i + 1].numpy(), one[k].numpy(), rtol=1e-5, atol=1e-6)
                np.testing.assert_allclose(one[k].numpy(), ref[k], rtol=1e-5, atol=1e-6)


def test_runner_vmaps_a_graph_that_bakes_batch_1_into_gather_indices():
    """transformers 5 exports build the attention mask with a Gather whose constant indices assume batch 1
    (Flatten [B*S, 1] then indices arange(S)): stacked samples give wrong outputs, so the runner vectorizes
    the batch-1 graph over samples with torch.func.vmap instead, checked against single-sample runs."""
    from compressor.training.distill import _Runner

    rng = np.random.default_rng(3)
    inits = {"idx": np.arange(4, dtype=np.int64).reshape(1, 4), "w": rng.standard_normal((1, 3)).astype(np.float32)}
    nodes = [helper.make_node("Flatten", ["x"], ["f"], axis=2), helper.make_node("Gather", ["f", "idx"], ["g"], axis=0),
             helper.make_node("MatMul", ["g", "w"], ["y"])]
    m = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 3])], inits)
    mod = OnnxModule(m)
    feeds = [{"x": rng.standard_normal((1, 4)).astype(np.float32)} for _ in range(6)]
    r = _Runner(mod, ["x"], feeds)
    assert r.mode == "vmap" and r.batched == "vmap"
    out = r(torch.arange(6))[0]
    for i in range(6):
        np.testing.assert_allclose(out[i:i + 1].detach().numpy(), ort_run(m, feeds[i])[0], rtol=1e-5, atol=1e-6)
    out.pow(2).mean().backward()  # gradients flow through vmap to the trainable weight
    assert mod.named_onnx_parameters()["w"].grad is not None


def test_distill_backs_off_a_learning_rate_that_hurts_the_held_out_loss():
    """A first epoch that leaves the held-out loss above the untrained one restarts from the untrained weights
    at lr / 10 (at most twice): a pretrained transformer at Adam 1e-3 lost 10x of its held-out loss."""
    from compressor.training.distill import distill

    rng = np.random.default_rng(5)
    w = rng.standard_normal((6, 4)).astype(np.float32)
    m = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], {"w": w})
    feeds = [{"x": rng.standard_normal((1, 6)).astype(np.float32)} for _ in range(32)]
    teacher = [[f["x"] @ w] for f in feeds]
    student = OnnxModule(m)
    with torch.no_grad():
        student.named_onnx_parameters()["w"].add_(torch.from_numpy(0.01 * rng.standard_normal((6, 4)).astype(np.float32)))
    res = distill(student, ["x"], feeds, teacher, epochs=2, lr=30.0, batch_size=8, holdout=0.25, classifier=[False])
    assert res.lr_backoffs == [30.0, 3.0] and res.lr == pytest.approx(0.3), (res.lr_backoffs, res.lr)
    assert res.to_dict()["lr_backoffs"] == [30.0, 3.0]
    assert res.best_epoch == 0 or min(res.val_losses) < res.val_before  # never worse than untrained on held-out
