"""Quantization side by side, measured in one run on this host.

    .venv/bin/python bench/quantize.py [--models cnn,mobilenetv2,transformer,mlp,digits] [--threads 1] [--quick]

For each model (zoo models built with models.zoo.ensure_built; digits_cnn is the
trained embedded default): the cleaned fp32 model (BatchNorm folded, as the
pipeline sees it) against quantize.int8 static (per-channel QDQ, MinMax
calibration), quantize.int8 dynamic, quantize.fp16 and quantize.int4, all built
with the project's passes for the host x86 target. Columns:

  latency   onnxruntime CPU, default optimizations (ORT_ENABLE_ALL), batch 1,
            median of interleaved rounds (all variants of a model alternate)
  bytes     serialized ONNX size on disk; weight bytes = initializers only (the
            zoo models are tiny, so graph structure and names are a large part of
            the file); zlib-compressed size, where unstructured sparsity shows up
  quality   digits: task accuracy on models/digits_eval.npz; others: output
            cosine vs fp32 on random inputs (zoo models are untrained)

Then the combination table for digits: dense fp32 / 80% sparse fp32 /
80% sparse + int8 static. Nothing here is hard-coded: every figure is measured.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import onnx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from compressor import data as data_mod  # noqa: E402
from compressor import ir, runtime, verify  # noqa: E402
from compressor.pass_base import PassContext, make_config  # noqa: E402
from compressor.pass_manager import PassManager  # noqa: E402
from passes import CLEANUP_PIPELINE, PASSES  # noqa: E402
from passes import quant_common as qc  # noqa: E402
from passes.quantize_int8 import int8_scheme  # noqa: E402

VARIANTS = {
    "fp32": [],
    "int8 static": [("quantize.int8", {"mode": "static"})],
    "int8 dynamic": [("quantize.int8", {"mode": "dynamic"})],
    "fp16": [("quantize.fp16", {})],
    "int4": [("quantize.int4", {})],
}


def run_passes(model: onnx.ModelProto, items: list[tuple[str, dict]], calib, spec) -> tuple[onnx.ModelProto, list]:
    ps = []
    for name, cfg in items:
        cls = PASSES.get(name)
        ps.append((cls(make_config(cls, cfg)), "builtin:bench"))
    return PassManager(ps).run(model, PassContext(target=spec, calib=calib, template=model))


def load_model(name: str, cache: Path, quick: bool):
    """(cleaned fp32 model, calib Samples, eval Samples, labelled?)"""
    from models.zoo import DIGITS_CALIB, DIGITS_EVAL, ensure_built

    path = ensure_built(name, cache)
    raw = ir.load(path)
    inputs = ir.input_specs(raw)
    clean, _ = run_passes(raw, [(n, {}) for n in CLEANUP_PIPELINE], None, None)
    if name in ("digits", "digits_cnn"):
        calib = data_mod.load_npz(DIGITS_CALIB, inputs, "--calib")
        ev = data_mod.load_npz(DIGITS_EVAL, inputs, "--eval")
        if quick:
            calib, ev = calib.head(32), ev.head(64)
        return clean, calib, ev, True
    n = 16 if quick else 64
    return clean, data_mod.random_samples(inputs, n, seed=1), data_mod.random_samples(inputs, n, seed=2), False


def measure(models: dict[str, onnx.ModelProto], ref: onnx.ModelProto, ev, labelled: bool, threads: int,
            rounds: int) -> dict[str, dict]:
    sessions = {k: runtime.session(m, optimized=True, threads=threads) for k, m in models.items()}
    feed = ev.feeds[0]
    lat = runtime.compare_latency({k: (lambda s=s: s.run(None, feed)) for k, s in sessions.items()}, rounds=rounds, per_round=20)
    ref_runs = runtime.run_all(runtime.session(ref, optimized=True, threads=threads), ev.feeds)
    out = {}
    for k, m in models.items():
        blob = m.SerializeToString()
        runs = runtime.run_all(sessions[k], ev.feeds)
        row = {"latency_s": lat[k], "bytes": len(blob), "zbytes": len(zlib.compress(blob, 6)),
               "wbytes": sum(t.ByteSize() for t in m.graph.initializer),
               "cosine": qc.fidelity(runs, ref_runs)}
        if labelled:
            row["accuracy"] = verify.accuracy(runs, ev.labels)
        out[k] = row
    return out


def fmt_table(title: str, rows: dict[str, dict], labelled: bool, notes: dict[str, str]) -> str:
    base = rows.get("fp32") or rows.get("dense fp32")
    lines = [f"\n### {title}", "",
             "| variant | latency ms | speedup vs fp32 | bytes on disk | smaller than fp32 | weight bytes | weights smaller "
             "| zlib bytes | " + ("accuracy |" if labelled else "cosine vs fp32 |") + " note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for k, r in rows.items():
        if "error" in r:
            lines.append(f"| {k} | - | - | - | - | - | - | - | - | failed: {r['error']} |")
            continue
        q = f"{r['accuracy']:.4f}" if labelled else f"{r['cosine']:.6f}"
        lines.append(f"| {k} | {r['latency_s'] * 1e3:.4f} | {base['latency_s'] / r['latency_s']:.2f}x | {r['bytes']:,} | "
                     f"{base['bytes'] / r['bytes']:.2f}x | {r['wbytes']:,} | {base['wbytes'] / r['wbytes']:.2f}x | {r['zbytes']:,} | "
                     f"{q} | {notes.get(k, '')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="cnn,mobilenetv2,transformer,mlp,digits")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (1: stable on a shared host)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="tiny smoke configuration (fewer samples and rounds)")
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "compressor-zoo-cache"))
    args = ap.parse_args(argv)
    import logging

    logging.getLogger().setLevel(logging.ERROR)
    import onnxruntime as ort
    import targets
    from targets.host import detect_host

    host = detect_host()
    _, spec = targets.resolve("x86")
    rounds = 2 if args.quick else args.rounds
    print(f"# bench/quantize.py\n\nhost: {host.model_name} ({host.arch}, {host.simd_summary}); onnxruntime {ort.__version__}, "
          f"CPUExecutionProvider, {args.threads} thread(s), ORT_ENABLE_ALL; int8 scheme for target x86: "
          f"{int8_scheme(spec).kernel}")
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        t0 = time.perf_counter()
        clean, calib, ev, labelled = load_model(name, cache, args.quick)
        built, notes, rows = {}, {}, {}
        for vname, items in VARIANTS.items():
            if not items:
                built[vname] = clean
                continue
            try:
                m, recs = run_passes(clean, items, calib if "dynamic" not in vname else None, spec)
                built[vname] = m
                st = recs[-1].stats
                if vname == "int4":
                    notes[vname] = (f"{st['layers_quantizable']} MatMul/Gemm, weights {st['weight_compression']}x smaller"
                                    if st.get("weight_compression") else "nothing quantized")
                elif vname.startswith("int8"):
                    notes[vname] = ", ".join(f"{k} {v}" for k, v in sorted(st["quantized_ops"].items()))
                elif vname == "fp16":
                    notes[vname] = f"{st['fp16_initializers']} fp16 initializers, {st['casts']} Casts"
            except Exception as exc:  # a variant that cannot be built is a table row, not a crash
                rows[vname] = {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:120]}"}
        measured = measure(built, clean, ev, labelled, args.threads, rounds)
        rows = {k: rows.get(k) or measured[k] for k in VARIANTS}
        src = "accuracy on digits_eval.npz" if labelled else "cosine vs fp32 on random inputs"
        print(fmt_table(f"{name} ({src}; built+measured in {time.perf_counter() - t0:.0f} s)", rows, labelled, notes))

    if "digits" in args.models:
        clean, calib, ev, _ = load_model("digits", cache, args.quick)
        sparse, _ = run_passes(clean, [("sparsify.magnitude", {"sparsity": 0.8})], None, spec)
        sparse_q, recs = run_passes(sparse, [("quantize.int8", {"mode": "static"})], calib, spec)
        sp = recs[-1].stats["sparsity"]
        rows = measure({"dense fp32": clean, "80% sparse fp32": sparse, "80% sparse + int8": sparse_q}, clean, ev, True,
                       args.threads, rounds)
        notes = {"80% sparse + int8": f"zeros preserved: {sp['zeros_preserved']}, weight sparsity after int8 "
                                      f"{sp['sparsity_after']:.3f} (before {sp['sparsity_before']:.3f})"}
        print(fmt_table("digits combination (sparsify.magnitude 0.8, stem/classifier dense by default)", rows, True, notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
