"""Fused recurrence kernel vs unrolled recurrence vs onnxruntime, side by side in one run.

For ONNX GRU (linear_before_reset=1, PyTorch's) and LSTM nodes of several sizes (16 steps,
batch 1) at 0% and 90% sparsity (unstructured and 8x1 blocks), three engines are timed in
interleaved rounds (``compressor.runtime.compare_latency``):

* ``ort``      -- onnxruntime (default graph optimizations, CPU EP) on the ONNX node;
* ``unrolled`` -- the x86 bundle with ``lower.rnn`` forced to unroll (``fuse=never``), then
  ``lower.sparse`` (BSR kernels where its cost model predicts a win): one VM call per op per step;
* ``fused``    -- the x86 bundle with the node kept whole: one call of the fused kernel
  (``targets/rnn_kernels.py``), each weight run dense or as segments by ``SEG_MAX_FRACTION``.

Outputs are checked against onnxruntime. The ``auto`` column says what ``lower.rnn``'s
default (``fuse_max_macs`` against ``rnn_kernels.step_macs``) picks -- the figures here are how it was chosen.

    python -m bench.rnn_kernels --md bench/rnn_kernels.md
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZES = [("GRU", 8, 32), ("GRU", 64, 64), ("GRU", 128, 128), ("GRU", 256, 256),
         ("LSTM", 8, 32), ("LSTM", 64, 64), ("LSTM", 128, 128)]
PATTERNS = [("dense", 0.0, None), ("90% unstructured", 0.9, 1), ("90% 8x1", 0.9, 8)]
SEQ = 16


def make_model(cell: str, inp: int, hidden: int, sparsity: float, block: int | None, seed: int = 0):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    g = 4 if cell == "LSTM" else 3

    def weight(k: int) -> np.ndarray:
        w = (rng.standard_normal((1, g * hidden, k)) / np.sqrt(k)).astype(np.float32)
        if block:
            keep = rng.random((1, g * hidden // block, k)) >= sparsity
            w *= np.repeat(keep, block, axis=1)
        return w

    inits = [numpy_helper.from_array(weight(inp), "W"), numpy_helper.from_array(weight(hidden), "R"),
             numpy_helper.from_array((rng.standard_normal((1, 2 * g * hidden)) * 0.1).astype(np.float32), "B")]
    attrs = {"hidden_size": hidden}
    if cell == "GRU":
        attrs["linear_before_reset"] = 1
    outs = ["Y", "Y_h"] + (["Y_c"] if cell == "LSTM" else [])
    node = helper.make_node(cell, ["x", "W", "R", "B"], outs, name="rnn", **attrs)
    graph = helper.make_graph([node], "rnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [SEQ, 1, inp])],
                              [helper.make_tensor_value_info("Y_h", TensorProto.FLOAT, [1, 1, hidden])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def lowered(model, spec, fuse: str):
    from compressor import ir
    from compressor.pass_base import PassContext, make_config
    from compressor.pass_manager import PassManager
    import targets  # noqa: F401  (registers lower.rnn / lower.sparse)
    from passes import PASSES

    rnn = PASSES.get("lower.rnn")
    sparse = PASSES.get("lower.sparse")
    passes = [(rnn(make_config(rnn, {"fuse": fuse, "fuse_max_macs": 1 << 40})), "bench"), (sparse(), "bench")]
    ctx = PassContext(target=spec, opset=ir.default_opset(model) or 17, template=model)
    out, recs = PassManager(passes, []).run(model, ctx)
    return out, [r.to_dict() for r in recs]


def run(rounds: int, sizes, md: str | None) -> None:
    import onnx
    import onnxruntime as ort

    from compressor.runtime import compare_latency
    from targets.lower_rnn import LowerRNNConfig
    from targets import resolve, tvm_backend
    from targets import rnn_kernels as rk

    tgt, spec = resolve("x86")
    tvm = tvm_backend._tvm()
    fuse_max = LowerRNNConfig().fuse_max_macs
    rows = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for cell, inp, hidden in sizes:
            for pname, sp, block in PATTERNS:
                model = make_model(cell, inp, hidden, sp, block)
                x = np.random.default_rng(1).standard_normal((SEQ, 1, inp)).astype(np.float32)
                sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
                ref = sess.run(None, {"x": x})[0]
                fns = {"ort": lambda s=sess: s.run(None, {"x": x})}
                info = {}
                for eng in ("unrolled", "fused"):
                    m, recs = lowered(model, spec, "never" if eng == "unrolled" else "auto")
                    d = tmp / f"{cell}{hidden}-{pname.replace(' ', '_').replace('%', '')}-{eng}"
                    d.mkdir()
                    onnx.save(m, str(d / "m.onnx"))
                    art = tgt.compile(d / "m.onnx", spec, d, {})
                    lib = tvm_backend.LoadedLibrary(d / art.path)
                    args = [tvm.runtime.tensor(x)]
                    got = tvm_backend.flatten_outputs(lib.call_raw(args))[0]
                    err = float(np.abs(got - ref).max())
                    if err > 1e-4:
                        raise SystemExit(f"{cell} {hidden} {pname} {eng}: max |err| {err:.2e} vs onnxruntime")
                    fns[eng] = lambda lib=lib, args=args: lib.call_raw(args)
                    if eng == "fused":
                        k = art.details["kernels"]["rnn_fused"][0]
                        info["modes"] = (f"W {k['modes'][0]} ({k['stored_w']:.0%}/{k['steps_w']:.0%}), "
                                         f"R {k['modes'][1]} ({k['stored_r']:.0%}/{k['steps_r']:.0%})")
                    else:
                        layers = [r for r in recs if r["name"] == "lower.sparse"][0]["stats"]
                        info["sparse"] = f"{layers.get('lowered', 0)}/{layers.get('lowered', 0) + layers.get('kept_dense', 0)}"
                    info[f"err_{eng}"] = err
                t = compare_latency(fns, rounds=rounds, per_round=20)
                spec_ = rk.RNNSpec(cell, SEQ, 1, inp, hidden, "forward", 1)
                from onnx import numpy_helper

                wr = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
                macs = rk.step_macs(spec_, wr["W"], wr["R"], spec.tvm_target)
                rows.append([cell, str(inp), str(hidden), pname, f"{t['ort'] * 1e6:.1f}", f"{t['unrolled'] * 1e6:.1f}",
                             info["sparse"], f"{t['fused'] * 1e6:.1f}", info["modes"],
                             f"{t['unrolled'] / t['fused']:.2f}x", f"{t['ort'] / t['fused']:.2f}x",
                             f"{t['ort'] / t['unrolled']:.2f}x", f"{macs}",
                             "fused" if macs <= fuse_max else "unrolled",
                             f"{max(info['err_unrolled'], info['err_fused']):.1e}"])
                print(" | ".join(rows[-1]), flush=True)
    head = ["cell", "input", "hidden", "weights", "ORT us", "unrolled us", "unrolled sparse layers", "fused us",
            "fused weights (stored segments / ELL steps)", "fused vs unrolled", "fused vs ORT", "unrolled vs ORT",
            "kernel MACs/step", "auto picks", "max err"]
    from compressor.report import table
    from targets.host import detect_host

    h = detect_host()
    text = "\n".join([
        "# Fused recurrence kernel vs unrolled vs onnxruntime", "",
        f"Host: {h.model_name} ({h.simd_summary}). Generated by "
        f"`python -m bench.rnn_kernels --rounds {rounds}{' --md ' + md if md else ''}` in "
        f"{(time.perf_counter() - t_start) / 60:.1f} min. {SEQ} steps, batch 1, x86 bundles untuned; "
        "times are medians of interleaved rounds (20 calls per round per engine); speedups > 1: the "
        f"fused kernel is faster. `kernel MACs/step`: `rnn_kernels.step_macs` (dense MACs; a weight run as ELL segments "
        f"counts its padded steps x ELL_STEP_COST); `auto picks`: lower.rnn's default (fuse_max_macs = {fuse_max}).", "",
        *table(rows, head), ""])
    print(text)
    if md:
        Path(md).write_text(text)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="the two smallest sizes only")
    ap.add_argument("--md", default=None)
    a = ap.parse_args(argv)
    run(a.rounds, SIZES[:1] + SIZES[4:5] if a.quick else SIZES, a.md)


if __name__ == "__main__":
    main()
