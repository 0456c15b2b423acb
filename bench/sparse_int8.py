"""Int8 sparse vs the alternatives on a 4 x 2048 MLP (batch 1): kernel chains beside onnxruntime.

    .venv/bin/python bench/sparse_int8.py [--width 2048] [--layers 4] [--rounds 7] [--md bench/sparse_int8.md]

Per sparsity (0 / 80 / 90%, 16x4 blocks: what the int8 kernel runs; the fp32 sparse kernel gets the
same zeros as 16x1 blocks), side by side, interleaved rounds, median of 50 calls, best round:

* onnxruntime fp32 dense (ORT_ENABLE_ALL) on the float MLP;
* onnxruntime static int8 (``quantize_static``, QDQ, per-channel weights, MinMax on 32 samples): the
  fastest dense int8 a user gets today (the issue's baseline);
* ours fp32 sparse: the chain of ``targets.sparse_kernels`` BSR kernels (16x1 rows kernel, ReLU fused);
* ours int8 sparse: the input quantized once (numpy, timed), then the chain of
  ``targets.sparse_int8`` kernels, each requantizing its output to the next layer's uint8 input in its
  epilogue, the last one dequantizing to float32.

Both of ours are standalone kernel chains called from Python (one TVM call per layer, the same for
both), not a compiled bundle: the int8 path has no lowering yet (issue 21's next step). Quality: the
int8 chain's output against the float model's (cosine), beside onnxruntime int8's.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def mlp_weights(width: int, layers: int, sparsity: float, rng) -> list[np.ndarray]:
    """Layer weights ``[N, K]`` with ``sparsity`` of their 16x4 blocks zero (largest-norm blocks kept)."""
    ws = []
    for _ in range(layers):
        w = (rng.standard_normal((width, width)) * np.sqrt(2.0 / width)).astype(np.float32)
        if sparsity > 0:
            nb = np.sqrt((w.reshape(width // 16, 16, width // 4, 4) ** 2).sum(axis=(1, 3)))
            keep = nb >= np.quantile(nb, sparsity)
            w *= np.repeat(np.repeat(keep, 16, 0), 4, 1)
        ws.append(w)
    return ws


def onnx_mlp(ws: list[np.ndarray], path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, cur = [], [], "x"
    for i, w in enumerate(ws):
        inits.append(numpy_helper.from_array(w.T.copy(), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [cur, f"w{i}"], [f"h{i}"]))
        cur = f"h{i}"
        if i < len(ws) - 1:
            nodes.append(helper.make_node("Relu", [cur], [f"r{i}"]))
            cur = f"r{i}"
    width = ws[0].shape[1]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
                          [helper.make_tensor_value_info(cur, TensorProto.FLOAT, [1, ws[-1].shape[0]])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def ort_int8(fp32: Path, calib: np.ndarray, out: Path) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"x": c[None]} for c in calib])

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(fp32), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) or 1.0))


def encoder(work: Path, rounds: int, target: str = "x86") -> str:
    """The BERT-base-width encoder (``bench/cnn_zoo.py`` ``encoder-base``: d_model 768, 12 heads, MLP 3072,
    seq 128, 2 layers, seeded weights) through the CLI at 90% 16x4: fp32 sparse and int8 sparse bundles,
    timed interleaved beside onnxruntime fp32 and static int8 (QDQ, per-channel) on the dense model and
    onnxruntime on the int8 compressed model (dynamic int8 MatMuls: quantize.int8's choice here)."""
    import onnxruntime as ort

    from bench.cnn_zoo import materialize
    from compressor.cli import main as compress
    from compressor.runtime import compare_latency
    from targets import tvm_backend

    work.mkdir(parents=True, exist_ok=True)
    model = materialize("encoder-base", work / "encoder.onnx")
    rng = np.random.default_rng(0)
    calib = rng.standard_normal((32, 128, 768)).astype(np.float32)
    np.savez(work / "calib.npz", x=calib)
    common = ["--target", target, "--sparsity", "0.9", "--pattern", "16x4", "--calib", str(work / "calib.npz"),
              "--no-gate", "--force"]
    for name, extra in (("fp32", []), ("int8", ["--quantize", "int8"])):
        if compress([str(model), *common, *extra, "-o", str(work / name), "--quiet"]) != 0:
            raise RuntimeError(f"compress {name} failed")
    s8 = ort_int8(model, calib[:16], work / "encoder.static_int8.onnx")
    x = {"x": rng.standard_normal((1, 128, 768)).astype(np.float32)}
    sess = {k: ort.InferenceSession(str(p)) for k, p in (("ort_fp32", model), ("ort_static_int8", s8),
                                                           ("ort_on_int8_compressed", work / "int8" / "model.onnx"))}
    libs = {k: next((work / k).glob("model_*.so")) for k in ("fp32", "int8")}
    fns = {k: (lambda s_=s_: s_.run(None, x)) for k, s_ in sess.items()}
    import tvm

    for k, path in libs.items():
        lib = tvm_backend.LoadedLibrary(path, "cpu")
        args = [tvm.runtime.tensor(np.ascontiguousarray(a), lib.device) for a in lib.order_inputs(x)]
        fns[f"ours_{k}_sparse"] = (lambda lib=lib, args=args: lib.call_raw(args))
    t = compare_latency(fns, rounds=rounds)
    rep = json.loads((work / "int8" / "report.json").read_text())
    low = [L for p in rep["target_passes"] if p["name"] == "lower.sparse" for L in p["stats"]["layers"] if L["lowered"]]
    head = ("| ORT fp32 dense | ORT static int8 dense | ORT on the int8 compressed model | ours fp32 sparse (16x4 zeros) | "
            "ours int8 sparse | x ORT static int8 | x ORT on the compressed |\n|---|---|---|---|---|---|---|\n")
    ms = {k: v * 1e3 for k, v in t.items()}
    row = (f"| {ms['ort_fp32']:.2f} | {ms['ort_static_int8']:.2f} | {ms['ort_on_int8_compressed']:.2f} | "
           f"{ms['ours_fp32_sparse']:.2f} | {ms['ours_int8_sparse']:.2f} | "
           f"{ms['ort_static_int8'] / ms['ours_int8_sparse']:.2f}x | {ms['ort_on_int8_compressed'] / ms['ours_int8_sparse']:.2f}x |")
    kinds = sorted({L.get("precision") or "fp32" for L in low})
    return (f"Encoder, target {target}, milliseconds per inference (lower is better), {len(low)} lowered layers "
            f"({', '.join(kinds)}):\n\n" + head + row + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--sparsities", default="0,0.8,0.9")
    ap.add_argument("--target", default="x86")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--md")
    ap.add_argument("--encoder", metavar="WORK", help="instead: the BERT-base-width encoder rows (see encoder())")
    a = ap.parse_args(argv)
    from targets.dense_kernels import default_runtime_threads, physical_cores

    default_runtime_threads()
    if a.encoder:
        text = encoder(Path(a.encoder), a.rounds, a.target)
        print(text)
        if a.md:
            Path(a.md).write_text(text)
        return 0
    import onnxruntime as ort
    import tvm

    from bench.cost_model import host_target
    from bench.real_models import host_cpu, host_isa
    from compressor.runtime import compare_latency
    from targets import sparse_int8 as si
    from targets import sparse_kernels as sk

    tgt = host_target(a.target)
    variant = si.variant_for(tvm.target.Target(tgt))
    rng = np.random.default_rng(0)
    calib = rng.standard_normal((32, a.width)).astype(np.float32)
    x = rng.standard_normal((1, a.width)).astype(np.float32)
    rows = []
    for sp in (float(s) for s in a.sparsities.split(",")):
        ws = mlp_weights(a.width, a.layers, sp, rng)
        with tempfile.TemporaryDirectory() as tmp:
            fp = onnx_mlp(ws, Path(tmp) / "mlp.onnx")
            q8 = ort_int8(fp, calib, Path(tmp) / "mlp.int8.onnx")
            s32, s8 = ort.InferenceSession(str(fp)), ort.InferenceSession(str(q8))
        ref = s32.run(None, {"x": x})[0]
        ort8_out = s8.run(None, {"x": x})[0]
        # activation ranges from the calibration samples through the float model (per layer input)
        acts, h = [calib], calib
        for i, w in enumerate(ws):
            h = h @ w.T
            if i < len(ws) - 1:
                h = np.maximum(h, 0)
            acts.append(h)
        qp = [si.quantize_activation(t)[1:] for t in acts]  # (scale, zero point) per layer input / output
        dev = tvm.cpu()
        # ours int8: one kernel per layer, requantized outputs
        fns8, bufs8 = [], []
        for i, w in enumerate(ws):
            wq, sw = si.quantize_weight(w)
            b = si.to_bsr_int8(wq, sw, si.BLOCK_ROWS.get(variant, 16))
            last = i == len(ws) - 1
            f = si.build(1, b, tgt, relu=not last, requant=None if last else qp[i + 1])
            sx, zx = qp[i]
            args = si.kernel_args(np.zeros((1, a.width), np.uint8), b, sx, zx, variant=variant)
            bufs8.append([tvm.runtime.tensor(t, dev) for t in args])
            fns8.append(f)
        for i in range(len(ws) - 1):  # layer i's output buffer is layer i+1's input
            bufs8[i].append(bufs8[i + 1][0])
        bufs8[-1].append(tvm.runtime.tensor(np.zeros((1, ws[-1].shape[0]), np.float32), dev))
        sx0, zx0 = qp[0]

        def ours8():
            bufs8[0][0].copyfrom(np.clip(np.rint(x / sx0) + zx0, 0, 255).astype(np.uint8))
            for f, bb in zip(fns8, bufs8):
                f(*bb)

        # ours fp32 sparse: the rows kernel on 16x1 blocks (the same zeros)
        fns32, bufs32 = [], []
        for i, w in enumerate(ws):
            b = sk.to_bsr(w, (16, 1), 1)
            params = sk.kernel_params((16, 1), 1, tgt, *w.shape)
            f = sk.build(1, b, "relu" if i < len(ws) - 1 else "none", tgt, params)
            bufs32.append([tvm.runtime.tensor(t, dev) for t in sk.kernel_args(np.zeros((1, a.width), np.float32), b,
                                                                               None, params)])
            fns32.append(f)
        for i in range(len(ws) - 1):
            bufs32[i].append(bufs32[i + 1][0])
        bufs32[-1].append(tvm.runtime.tensor(np.zeros((1, ws[-1].shape[0]), np.float32), dev))

        def ours32():
            bufs32[0][0].copyfrom(x)
            for f, bb in zip(fns32, bufs32):
                f(*bb)

        ours8()
        ours32()
        out8, out32 = bufs8[-1][-1].numpy(), bufs32[-1][-1].numpy()
        assert cosine(out32, ref) > 0.9999, "fp32 sparse chain disagrees with onnxruntime"
        t = compare_latency({"ort_fp32": lambda: s32.run(None, {"x": x}), "ort_int8": lambda: s8.run(None, {"x": x}),
                             "ours_fp32_sparse": ours32, "ours_int8_sparse": ours8}, rounds=a.rounds)
        rows.append({"sparsity": sp, **{k: v * 1e6 for k, v in t.items()}, "cos_ours8": cosine(out8, ref),
                     "cos_ort8": cosine(ort8_out, ref)})
        r = rows[-1]
        print(f"{sp:.0%}: ORT fp32 {r['ort_fp32']:.1f} us, ORT int8 {r['ort_int8']:.1f} us, ours fp32 sparse "
              f"{r['ours_fp32_sparse']:.1f} us, ours int8 sparse {r['ours_int8_sparse']:.1f} us "
              f"({r['ort_int8'] / r['ours_int8_sparse']:.2f}x ORT int8); cosine ours int8 {r['cos_ours8']:.5f}, "
              f"ORT int8 {r['cos_ort8']:.5f}", flush=True)
    head = (f"Host: {host_cpu()}, {host_isa()}; target {a.target} (int8 kernel variant: {variant}); TVM threads "
            f"{physical_cores()}, onnxruntime default threads. Command: `.venv/bin/python bench/sparse_int8.py "
            f"{' '.join(argv if argv is not None else sys.argv[1:])}`. MLP {a.layers} x {a.width}, batch 1, "
            "microseconds per inference (lower is better); x = onnxruntime static int8 time / ours int8 sparse "
            "time (higher is better).\n")
    table = [f"| sparsity | ORT fp32 dense | ORT static int8 dense | ours fp32 sparse (16x1) | ours int8 sparse ({si.BLOCK_ROWS.get(variant, 16)}x4) | "
             "x ORT int8 | cosine ours int8 | cosine ORT int8 |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['sparsity']:.0%} | {r['ort_fp32']:.1f} | {r['ort_int8']:.1f} | {r['ours_fp32_sparse']:.1f} | "
                     f"{r['ours_int8_sparse']:.1f} | {r['ort_int8'] / r['ours_int8_sparse']:.2f}x | {r['cos_ours8']:.5f} | "
                     f"{r['cos_ort8']:.5f} |")
    text = head + "\n" + "\n".join(table) + "\n"
    print(text)
    if a.md:
        Path(a.md).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
