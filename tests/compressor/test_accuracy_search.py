"""Accuracy-aware search (issue 17): when the one-shot result fails the gate, the weights that cause
most of the output error are reverted until it passes; what it gave up is reported."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from compressor import accuracy_search, runtime, verify

REPO = Path(__file__).resolve().parents[2]
DIGITS = REPO / "models" / "digits_cnn.onnx"
CALIB = REPO / "models" / "digits_calib.npz"
EVAL = REPO / "models" / "digits_eval.npz"


def test_digits_at_90_percent_passes_the_gate_after_search(cli, tmp_path):
    out = tmp_path / "b"
    r = cli(DIGITS, "--sparsity", "0.9", "--method", "magnitude", "--allocation", "uniform", "--calib", CALIB, "--eval", EVAL,
            "--no-compile", "--no-latency", "-o", out)
    assert r.code == 0, r.out + r.err
    rep = json.loads((out / "report.json").read_text())
    s = rep["search"]
    touched = s["reverted"] + s["halved"]
    assert s["passed"] and 1 <= len(touched) and s["rounds"] <= s["budget"]
    assert s["error_after"] < s["error_before"] and s["zeros_after"] < s["zeros_before"]
    # fully reverted weights are the original ones again, halved ones kept about half their zeros,
    # the others stay as sparse as the one-shot result
    m = onnx.load(str(out / "model.onnx"))
    w = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    for x in s["reverted"]:
        assert float(np.mean(w[x["weight"]] == 0)) < 0.05
    for x in s["halved"]:
        assert abs(float(np.mean(w[x["weight"]] == 0)) - x["compressed_zeros"] / 2) < 0.05
    kept = [x for x in s["worst"] if x["weight"] not in {y["weight"] for y in touched}]
    assert all(float(np.mean(w[x["weight"]] == 0)) > 0.85 for x in kept)
    acc = rep["accuracy"]
    assert acc["original"] - acc["compressed"] <= 0.01
    assert any(x.startswith("accuracy search: gave weights back") for x in rep["warnings"])


def test_search_budget_zero_keeps_the_failure_and_says_so(cli, tmp_path):
    out = tmp_path / "b"
    r = cli(DIGITS, "--sparsity", "0.9", "--method", "magnitude", "--allocation", "uniform", "--calib", CALIB, "--eval", EVAL,
            "--no-compile", "--no-latency", "--search-budget", "0", "-o", out)
    assert r.code == 3
    rep = json.loads((out / "report.json").read_text())
    # no search rounds, but the layers are ranked so the failure names the worst three and the flag
    assert rep["search"]["rounds"] == 0 and not rep["search"]["passed"] and rep["search"]["worst"]
    off = [x for x in rep["warnings"] if "--search-budget 0" in x]
    assert off and "--ignore '" in off[0] and rep["search"]["worst"][0]["node"] in off[0]


def test_unreachable_bound_names_the_worst_layers_and_the_flag(cli, tmp_path):
    out = tmp_path / "b"
    r = cli(DIGITS, "--sparsity", "0.9", "--method", "magnitude", "--allocation", "uniform", "--calib", CALIB,
            "--no-compile", "--no-latency", "--min-cosine", "1.0", "--search-budget", "1", "-o", out)
    assert r.code == 3
    rep = json.loads((out / "report.json").read_text())
    assert rep["search"]["passed"] is False and rep["search"]["rounds"] == 1
    hint = [x for x in rep["warnings"] if x.startswith("accuracy search: no passing configuration")]
    assert len(hint) == 1 and "--ignore '" in hint[0] and "of the output error" in hint[0]


def test_default_with_calib_is_data_aware_and_keeps_accuracy(cli, tmp_path):
    """--sparsity with --calib and no --method/--allocation: OBS with the measured allocation. On the
    digits CNN at 90% it keeps the dense accuracy where magnitude/uniform lost 14 points."""
    out = tmp_path / "b"
    r = cli(DIGITS, "--sparsity", "0.9", "--calib", CALIB, "--eval", EVAL, "--no-compile", "--no-latency", "-o", out)
    assert r.code == 0, r.out + r.err
    rep = json.loads((out / "report.json").read_text())
    sp = [p for p in rep["passes"] if p["name"].startswith("sparsify.")][0]
    assert sp["name"] == "sparsify.auto" and sp["stats"]["allocation"] == "sensitivity"
    mc = sp["stats"]["method_choice"]
    assert set(mc["errors"]) == {"obs", "wanda"} and mc["chosen"] == min(mc["errors"], key=mc["errors"].get)
    n_calib = len(next(iter(np.load(CALIB).values())))
    used = min(n_calib, 128)  # SparsifyConfig.calib_samples
    assert mc["held_out"] == used // 4 and mc["fit_samples"] + mc["held_out"] == used
    assert sp["stats"]["calib_samples_used"] == mc["fit_samples"]
    assert sp["stats"]["sensitivity_samples"] == 16 and abs(sp["stats"]["achieved_sparsity"] - 0.9) < 0.01
    assert rep["accuracy"]["original"] - rep["accuracy"]["compressed"] <= 0.01 and rep["search"] is None
    # without data the default stays magnitude / uniform
    out2 = tmp_path / "b2"
    assert cli(DIGITS, "--sparsity", "0.5", "--no-compile", "--no-latency", "--no-gate", "-o", out2).code == 0
    rep2 = json.loads((out2 / "report.json").read_text())
    assert [p["name"] for p in rep2["passes"] if p["name"].startswith("sparsify.")] == ["sparsify.magnitude"]


def _mm_model(ws: dict[str, np.ndarray]) -> onnx.ModelProto:
    nodes = [helper.make_node("MatMul", ["x", "a"], ["h"], name="mm_a"), helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "b"], ["y"], name="mm_b")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])],
                          [numpy_helper.from_array(v, k) for k, v in ws.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_search_reverts_the_weight_with_the_largest_error_first():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((16, 16)).astype(np.float32), rng.standard_normal((16, 16)).astype(np.float32)
    orig = _mm_model({"a": a, "b": b})
    a2 = a * (np.abs(a) > 1.5)  # heavily damaged
    b2 = b * (np.abs(b) > 0.05)  # barely touched
    comp = _mm_model({"a": a2, "b": b2})
    feeds = [{"x": rng.standard_normal((1, 16)).astype(np.float32)} for _ in range(16)]
    ref = runtime.run_all(runtime.session(orig), feeds)
    gate = accuracy_search.gate_for(["y"], ref, verify.Tolerances(0.999, 0.95, 0.01), None, None)
    assert gate(runtime.run_all(runtime.session(comp), feeds))  # fails one-shot
    res = accuracy_search.search(orig, comp, feeds, feeds, ref, gate, 6)
    assert [x.weight for x in res.ranking] == ["a", "b"] and res.ranking[0].gain > 10 * res.ranking[1].gain
    assert res.passed and "b" not in {x.weight for x in res.reverted + res.halved}
    got = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}
    assert np.array_equal(got["b"], b2)
    if res.reverted:  # the whole of "a" was needed
        assert np.array_equal(got["a"], a)
    else:  # half of a's pruned weights, the largest originals, are back; the rest stay zero
        pruned = (a2 == 0) & (a != 0)
        back = pruned & (got["a"] != 0)
        assert back.sum() == (pruned.sum() + 1) // 2 and np.array_equal(got["a"][back], a[back])
        assert np.abs(a[back]).min() >= np.abs(a[pruned & ~back]).max()
    assert "mm_a" in res.top3_hint() or "mm_b" in res.top3_hint()


def test_searchable_skips_reshaped_and_quantized():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((16, 16)).astype(np.float32), rng.standard_normal((16, 16)).astype(np.float32)
    orig = _mm_model({"a": a, "b": b})
    comp = _mm_model({"a": a[:, :8].copy(), "b": b})
    changed, notes = accuracy_search.searchable(orig, comp)
    assert changed == {} and any("changed shape" in n for n in notes)


def test_state_and_embedding_outputs_are_not_gated_on_top1():
    """An LSTM's hn/cn and an encoder's embedding look like [batch, classes] but have no classes:
    their argmax is not a decision (the top-1 gate failed silero-vad and MiniLM with their tasks intact)."""
    from compressor.verify import is_classifier_like

    f32 = np.dtype(np.float32)
    assert is_classifier_like((1, 10), f32, "logits") and is_classifier_like((1, 2), f32, "save_infer_model/scale_0.tmp_1")
    for name in ("hn", "cn", "stateN", "embedding", "sentence_embedding", "last_hidden_state", "pooler_output"):
        assert not is_classifier_like((1, 1, 128), f32, name), name


def _qdq(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], tmp_path: Path) -> onnx.ModelProto:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    src, dst = tmp_path / "f.onnx", tmp_path / "q.onnx"
    onnx.save(model, str(src))
    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True)
    return onnx.load(str(dst))


def test_quantized_search_gives_the_worst_int8_layer_back_to_fp32(tmp_path):
    """int8 (QDQ) layers are searchable: ranked by the error that computing each in fp32 removes; the
    worst go back to fp32 (exact float weights, no Q/DQ left on them), the others stay int8."""
    rng = np.random.default_rng(3)
    a = rng.standard_normal((16, 16)).astype(np.float32)
    a[0, :] *= 200.0  # one outlier row: per-channel int8 on the input side cannot help its column scale
    a[:, 3] *= 300.0
    b = rng.standard_normal((16, 16)).astype(np.float32)
    orig = _mm_model({"a": a, "b": b})
    feeds = [{"x": rng.standard_normal((1, 16)).astype(np.float32)} for _ in range(32)]
    comp = _qdq(orig, feeds, tmp_path)
    assert {n.name for n in accuracy_search.qdq_layers(comp)} == {"mm_a", "mm_b"}
    ref = runtime.run_all(runtime.session(orig), feeds)
    comp_err = accuracy_search._rel_error(runtime.run_all(runtime.session(comp), feeds), ref)
    # reverting both layers gives exactly the float model back
    both = accuracy_search.revert_qdq(comp, {"mm_a", "mm_b"}, {"a": a, "b": b})
    assert not [n for n in both.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    out = runtime.run_all(runtime.session(both), feeds)
    # up to the quantizers' saturation (the range ends are rounded to the int8 grid: < one step of 255)
    assert max(float(np.abs(o[0] - r[0]).max() / np.abs(r[0]).max()) for o, r in zip(out, ref)) < 1 / 255
    gate = lambda runs: [] if accuracy_search._rel_error(runs, ref) < 0.6 * comp_err else ["too far"]  # noqa: E731
    res = accuracy_search.search_quantized(orig, comp, feeds, feeds, ref, gate, 6)
    assert res.kind == "quantized" and res.ranking[0].gain > 0 and res.ranking[0].gain >= res.ranking[1].gain
    assert res.passed and len(res.reverted) == 1 and res.error_after < res.error_before
    worst = res.reverted[0].node
    m = res.model
    node = next(n for n in m.graph.node if n.name == worst)
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    assert node.input[1] in inits and np.array_equal(inits[node.input[1]], a if worst == "mm_a" else b)
    other = next(n for n in m.graph.node if n.name in {"mm_a", "mm_b"} - {worst})
    prod = {o: n.op_type for n in m.graph.node for o in n.output}
    assert prod.get(other.input[1]) == "DequantizeLinear"  # still int8
    assert "keep them fp32 with --ignore" in res.top3_hint()
    # budget 0 ranks only
    r0 = accuracy_search.search_quantized(orig, comp, feeds, feeds, ref, gate, 0)
    assert r0.rounds == 0 and not r0.passed and [x.node for x in r0.ranking] == [x.node for x in res.ranking]


def test_ignore_keeps_an_int8_layer_fp32(cli, tmp_path):
    out = tmp_path / "b"
    m = onnx.load(str(DIGITS))
    convs = [n.name for n in m.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    r = cli(DIGITS, "--quantize", "int8", "--calib", CALIB, "--no-compile", "--no-latency", "--no-gate",
            "--ignore", convs[-1], "-o", out)
    assert r.code == 0, r.out + r.err
    rep = json.loads((out / "report.json").read_text())
    q = [p for p in rep["passes"] if p["name"] == "quantize.int8"][0]["stats"]
    rows = {x["layer"]: x["why"] for x in q["fp32_layers"]}
    assert rows.get(convs[-1]) == "ignore (--ignore)"
    got = onnx.load(str(out / "model.onnx"))
    prod = {o: n.op_type for n in got.graph.node for o in n.output}
    node = next(n for n in got.graph.node if n.name == convs[-1])
    assert prod.get(node.input[1]) != "DequantizeLinear"
    assert any(prod.get(n.input[1]) == "DequantizeLinear" for n in got.graph.node if n.name in convs[:-1])


def test_ranking_probes_fan_out_on_an_executor_with_the_local_numbers():
    """--executor ray: the ranking probes are executor tasks. A stand-in executor that pickles every task
    and its shared objects (as Ray would ship them) and runs them in a fresh order gives the same ranking
    and gains, bit for bit, as the in-process search."""
    import pickle

    from compressor.executor import LocalExecutor

    class _Shipping(LocalExecutor):
        name = "ray"

        def __init__(self):
            super().__init__()
            self.tasks = 0

        def map(self, fn, tasks, shared=(), **kw):
            shipped = [pickle.loads(pickle.dumps(t)) for t in tasks]
            self.tasks += len(shipped)
            order = list(reversed(range(len(shipped))))
            outs = super().map(fn, [shipped[i] for i in order], pickle.loads(pickle.dumps(shared)), **kw)
            back = [None] * len(outs)
            for o, i in zip(outs, order):
                o.index = i
                back[i] = o
            return back

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((16, 16)).astype(np.float32), rng.standard_normal((16, 16)).astype(np.float32)
    orig = _mm_model({"a": a, "b": b})
    comp = _mm_model({"a": a * (np.abs(a) > 1.0), "b": b * (np.abs(b) > 0.5)})
    feeds = [{"x": rng.standard_normal((1, 16)).astype(np.float32)} for _ in range(8)]
    ref = runtime.run_all(runtime.session(orig), feeds)
    gate = accuracy_search.gate_for(["y"], ref, verify.Tolerances(0.999, 0.95, 0.01), None, None)
    local = accuracy_search.search(orig, comp, feeds, feeds, ref, gate, 4)
    ex = _Shipping()
    fanned = accuracy_search.search(orig, comp, feeds, feeds, ref, gate, 4, executor=ex)
    assert ex.tasks == 4  # 2 weights x (full, half)
    assert [x.to_dict() for x in fanned.ranking] == [x.to_dict() for x in local.ranking]
    assert fanned.passed == local.passed and [x.weight for x in fanned.reverted] == [x.weight for x in local.reverted]


def test_hint_names_only_layers_whose_revert_lowers_the_error():
    L = accuracy_search.Layer
    res = accuracy_search.SearchResult(False, 0, 0, 0.1, 0.1, ranking=[L("w1", "a", 0.3, 10, 0.5), L("w2", "b", -0.01, 10, 0.5)])
    hint = res.top3_hint()
    assert "--ignore 'a'" in hint and "'b'" not in hint and "30.00%" in hint
    res.ranking = [L("w1", "a", -0.02, 10, 0.5), L("w2", "b", -0.01, 10, 0.5)]
    hint = res.top3_hint()
    assert "--ignore" not in hint and "no single layer" in hint and "--finetune" in hint
    res.ranking = []
    assert res.top3_hint() == ""


def test_finetune_that_misses_the_gate_searches_the_one_shot_model_then_finetunes_again(cli, tmp_path):
    """With --finetune, when the fine-tuned model still misses the gate the search runs on the one-shot model
    (before fine-tuning: per-layer reverts of co-adapted fine-tuned weights only add error) and the
    configuration it finds is fine-tuned again; the result passes and keeps zeros."""
    calib = REPO / "models" / "digits_calib.npz"
    out = tmp_path / "b"
    r = cli(DIGITS, "--calib", calib, "--eval", REPO / "models" / "digits_eval.npz", "--no-compile", "-o", out,
            "--sparsity", "0.95", "--method", "magnitude", "--allocation", "uniform", "--finetune", calib, "--epochs", "1",
            "--max-accuracy-drop", "0.002", "--min-top1", "0.99")
    assert r.code == 0, r.err[-2000:]
    rep = json.loads((out / "report.json").read_text())
    s = rep["search"]
    assert s["passed"] and s["searched"] == "one-shot model (before fine-tuning)" and s["refinetuned"] is True
    assert s["refinetune"]["steps"] >= 1 and s["zeros_after"] > 0.2
    assert any("fine-tuned again: kept" in w for w in rep["warnings"])
    # the fine-tuned configurations are bisected over the search's steps: the first probe is the search's
    # own count, and the kept one is the fewest steps whose fine-tuned model passed
    rounds = s["refinetune_rounds"]
    assert rounds[0]["passed"] and all(x["steps"] <= rounds[0]["steps"] for x in rounds)
    kept = min(x["steps"] for x in rounds if x["passed"])
    assert all(not x["passed"] for x in rounds if x["steps"] < kept)
    assert f"({kept} of the {rounds[0]['steps']} search steps)" in " ".join(rep["warnings"])
    m = onnx.load(str(out / "model.onnx"))
    ws = [numpy_helper.to_array(t) for t in m.graph.initializer if t.data_type == TensorProto.FLOAT and t.dims and len(t.dims) > 1]
    assert sum(int(np.sum(w == 0)) for w in ws) > 0.2 * sum(w.size for w in ws)
