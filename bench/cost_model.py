"""Calibration of ``lower.sparse``'s CPU cost model against the kernels a compiled model runs.

``targets/lower_sparse.py`` turns a layer sparse when the BSR kernel beats the *dense TIR
kernel* the TVM build would otherwise run for it (``targets/dense_kernels.py`` packed
MatMul/Gemm, ``targets/conv_kernels.py`` dense 1x1 conv). This script measures both kernels
side by side over a grid of layers and prints, per point: shape, batch (GEMM rows, or
pixels for a 1x1 conv), sparsity, block, dense-kernel ms, sparse-kernel ms, measured ratio
(dense / sparse), the ratio the pass's model predicts now and the one the previous model
(ratios against onnxruntime, kept below as ``OLD_*``) predicted. Then the confusion of
both models' decisions against the measurements and, with ``--fit``, a least-squares fit
of the per-kernel time models' constants (what ``targets/lower_sparse.py`` carries).

    .venv/bin/python bench/cost_model.py --quick                     # smoke (~1 min)
    .venv/bin/python bench/cost_model.py --save /tmp/cm.json         # full grid (~15 min, 2 cores)
    .venv/bin/python bench/cost_model.py --save /tmp/cm2.json        # a second run (same weights)
    .venv/bin/python bench/cost_model.py --load /tmp/cm.json /tmp/cm2.json --fit --md bench/cost_model.md

Timing: per layer shape, the dense kernel and every sparse variant are compiled, checked
against numpy (float64), warmed up (``compressor.runtime.warm_up``) and timed interleaved in
rounds (``compressor.runtime.compare_latency``: a ``settle()`` pause before each engine),
median per call; ``--load`` of several runs keeps each point's minimum (``merge_runs``).
Weights: random normal with an exact fraction of blocks zeroed. TVM's
pool: one thread per physical core (``default_runtime_threads`` before tvm is imported).

Decision rule scored (the pass's): sparse iff predicted ratio >= ``min_speedup``. A point
is decided *wrongly* when the model picks sparse and the measured ratio is < 1 (slower than
the dense build: what issue #5 forbids), or keeps it dense while the measured ratio is
>= ``min_speedup``. Regret of a wrong point: time(chosen) / time(best) - 1.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.sparse_kernels import random_block_sparse  # noqa: E402

BLOCKS = ("1x1", "4x1", "8x1", "16x1")
GEMM_SIZES = (64, 256, 512, 1024, 2048, 4096)
BATCHES = (1, 4, 16)
SPARSITIES = (0.5, 0.7, 0.9, 0.95)
# (channels in = out, pixels H x W): late small images .. early large ones (MobileNet/ResNet)
CONV_SHAPES = ((64, 4, 4), (256, 4, 4), (1024, 4, 4), (64, 14, 14), (256, 14, 14), (512, 7, 7),
               (128, 28, 28), (256, 28, 28), (64, 56, 56))

# the model before this calibration (ratios against onnxruntime dense), for the "before" column
OLD_R90 = {"1x1": {1: 2.0, 4: 2.0, 16: 1.5}, "4x1": {1: 4.0, 4: 4.5, 16: 3.0},
           "8x1": {1: 6.0, 4: 8.0, 16: 5.0}, "16x1": {1: 7.0, 4: 10.0, 16: 6.0}}
OLD_R90_CONV = {"1x1": {64: 2.0, 256: 3.0, 1024: 2.5}, "4x1": {64: 4.0, 256: 3.2, 1024: 2.8},
                "8x1": {64: 4.0, 256: 3.0, 1024: 2.8}, "16x1": {64: 4.0, 256: 3.0, 1024: 2.8}}


def old_predict(op: str, n: int, k: int, m: int, d: float, block: str) -> float:
    if op == "Conv":
        r90 = OLD_R90_CONV[block][64 if m < 128 else (256 if m < 1024 else 1024)]
        t_dense = n * k * m / 3.5e10
    else:
        r90 = OLD_R90[block][1 if m < 4 else (4 if m < 16 else 16)]
        t_dense = n * k * m / 7.3e9
    return t_dense / (t_dense * (d / 0.1) / r90 + 5e-6)


def host_target(tag: str = "x86") -> dict:
    from targets import resolve

    return resolve(tag)[1].tvm_target


def _check(got: np.ndarray, ref: np.ndarray, what: str, tol: float = 1e-4) -> None:
    scale = float(np.abs(ref).max()) or 1.0
    err = float(np.abs(got - ref).max()) / scale
    if err > tol:
        raise RuntimeError(f"{what}: max relative error {err:.2e} > {tol}")


def bench_gemm_shape(n: int, m: int, tgt, rng, sparsities, blocks, rounds: int) -> list[dict]:
    """One [M, N=K] layer: the dense packed kernel and every (sparsity, block) BSR kernel."""
    import tvm

    from compressor.runtime import compare_latency
    from targets import dense_kernels as dk
    from targets import sparse_kernels as sk

    dev = tvm.cpu()
    k = n
    x = rng.standard_normal((m, k)).astype(np.float32)
    wd = rng.standard_normal((n, k)).astype(np.float32)
    fd, pd = dk.build(m, n, k, "none", tgt)
    dargs = [tvm.runtime.tensor(a, dev) for a in dk.kernel_args(x, wd, None, pd)]
    dargs.append(tvm.runtime.tensor(np.zeros((m, n), np.float32), dev))
    fd(*dargs)
    _check(dargs[-1].numpy(), dk.reference(x, wd), f"dense {n} M={m}")
    engines = {"dense": lambda: fd(*dargs)}
    meta = {}
    for s, pat in itertools.product(sparsities, blocks):
        block = sk.parse_block(pat)
        if n % block[0]:
            continue
        w = random_block_sparse(n, k, block, s, rng)
        b = sk.to_bsr(w, block, sk.lanes_group(block, tgt))
        params = sk.kernel_params(block, m, tgt, n, k)
        if params.variant == "perm":
            b = sk.to_bsr(w, block, 1)  # what lower.sparse stores for a perm layer
        f = sk.build(m, b, "none", tgt, params)
        args = [tvm.runtime.tensor(a, dev) for a in sk.kernel_args(x, b, None, params)]
        args.append(tvm.runtime.tensor(np.zeros((m, n), np.float32), dev))
        f(*args)
        _check(args[-1].numpy(), sk.reference(x, b), f"sparse {n} M={m} {s} {pat}")
        key = f"{s}:{pat}"
        engines[key] = (lambda f=f, a=args: f(*a))
        meta[key] = (s, pat, b.density(), params.variant)
    t = compare_latency(engines, rounds=rounds)
    return [{"op": "MatMul", "n": n, "k": k, "m": m, "bsz": 1, "sparsity": s, "block": pat, "density": d,
             "kernel": var, "dense_ms": t["dense"] * 1e3, "sparse_ms": t[key] * 1e3}
            for key, (s, pat, d, var) in meta.items()]


def bench_conv_shape(ch: int, h: int, w_: int, tgt, rng, sparsities, blocks, rounds: int) -> list[dict]:
    """One 1x1 conv (batch 1, ch -> ch channels, h x w pixels): dense conv_kernels vs BSR."""
    import tvm

    from compressor.runtime import compare_latency
    from targets import conv_kernels as ck
    from targets import sparse_kernels as sk

    dev = tvm.cpu()
    n = k = ch
    m = h * w_
    s_ = ck.ConvShape(1, k, h, w_, n, 1, 1)
    x = rng.standard_normal((1, k, h, w_)).astype(np.float32)
    wd = rng.standard_normal((n, k, 1, 1)).astype(np.float32)
    lib = ck.build(s_, ck.NONE, tgt)
    fd = lib["conv_kernel"]
    wk, bk = ck.kernel_weights(s_, wd, None, tgt)
    dargs = [tvm.runtime.tensor(a, dev) for a in (x, wk, bk, np.zeros((1, n, h, w_), np.float32))]
    fd(*dargs)
    _check(dargs[-1].numpy(), ck.reference(x, wd, None, s_), f"dense conv {ch} {h}x{w_}")
    engines = {"dense": lambda: fd(*dargs)}
    meta = {}
    x3 = x.reshape(1, k, m)
    for s, pat in itertools.product(sparsities, blocks):
        block = sk.parse_block(pat)
        if n % block[0]:
            continue
        w = random_block_sparse(n, k, block, s, rng)
        b = sk.to_bsr(w, block, 1)
        f = sk.build_conv1x1(1, m, b, "none", tgt)
        args = [tvm.runtime.tensor(a, dev) for a in sk.kernel_args(x3, b, None)]
        args.append(tvm.runtime.tensor(np.zeros((1, n, m), np.float32), dev))
        f(*args)
        _check(args[-1].numpy(), sk.reference_conv1x1(x3, b), f"sparse conv {ch} {h}x{w_} {s} {pat}")
        key = f"{s}:{pat}"
        engines[key] = (lambda f=f, a=args: f(*a))
        meta[key] = (s, pat, b.density())
    t = compare_latency(engines, rounds=rounds)
    return [{"op": "Conv", "n": n, "k": k, "m": m, "bsz": 1, "sparsity": s, "block": pat, "density": d,
             "kernel": "cm", "dense_ms": t["dense"] * 1e3, "sparse_ms": t[key] * 1e3}
            for key, (s, pat, d) in meta.items()]


# ------------------------------------------------------------------ scoring and fitting


def predictions(rows: list[dict]) -> None:
    """Add ``measured``, ``pred_new`` (targets.lower_sparse.predict) and ``pred_old`` to rows."""
    from targets.lower_sparse import predict
    from targets.sparse_kernels import parse_block

    for r in rows:
        r["measured"] = r["dense_ms"] / r["sparse_ms"]
        r["pred_new"] = predict(r["op"], r["n"], r["k"], r["m"], r["bsz"], r["density"], parse_block(r["block"]),
                                "x86", r.get("kernel") == "perm")[0]
        r["pred_old"] = old_predict(r["op"], r["n"], r["k"], r["m"] * r["bsz"], r["density"], r["block"])


def confusion(rows: list[dict], key: str, min_speedup: float) -> dict:
    """Counts of the decisions ``pred >= min_speedup`` against the measurements (module doc)."""
    out = {"points": len(rows), "sparse_but_slower": 0, "dense_but_faster": 0, "worst_regret": 0.0,
           "worst": None, "chosen_sparse": 0, "worst_slowdown": 0.0}
    for r in rows:
        sparse = r[key] >= min_speedup
        out["chosen_sparse"] += sparse
        if sparse and r["measured"] < 1.0:
            out["sparse_but_slower"] += 1
            regret = 1.0 / r["measured"] - 1.0
            out["worst_slowdown"] = max(out["worst_slowdown"], regret)
        elif not sparse and r["measured"] >= min_speedup:
            out["dense_but_faster"] += 1
            regret = r["measured"] - 1.0
        else:
            continue
        if regret > out["worst_regret"]:
            out["worst_regret"], out["worst"] = regret, _label(r)
    out["wrong"] = out["sparse_but_slower"] + out["dense_but_faster"]
    return out


def _label(r: dict) -> str:
    what = f"conv {r['n']}x{r['k']} {r['m']}px" if r["op"] == "Conv" else f"{r['n']}x{r['k']} M={r['m']}"
    return f"{what} {r['sparsity']:.0%} {r['block']}"


def features(op: str, kind: str, n: int, k: int, m: int, density: float, block: tuple[int, int],
             perm: bool = False, caches: tuple[int, int] | None = None) -> np.ndarray:
    """Regressors of the time models (targets.lower_sparse.kernel_time): the same function
    the pass evaluates, so the fit and the pass cannot disagree."""
    from targets.lower_sparse import time_features

    return np.asarray(time_features(op, kind, n, k, m, density, block, perm, caches), np.float64)


def fit(rows: list[dict], caches: tuple[int, int] | None = None) -> dict[str, list[float]]:
    """Non-negative least squares of every kernel's time model on relative error (each row
    of the system divided by the measured time), per model key of
    ``targets.lower_sparse.model_key``."""
    from scipy.optimize import nnls

    from targets.lower_sparse import model_key
    from targets.sparse_kernels import parse_block

    systems: dict[str, tuple[list, list]] = {}
    seen_dense = set()
    for r in rows:
        block = parse_block(r["block"])
        n, k, m = r["n"], r["k"], r["m"] * r["bsz"]
        dkey = (r["op"], n, k, m)
        for kind, t in (("dense", r["dense_ms"]), ("sparse", r["sparse_ms"])):
            if kind == "dense":
                if dkey in seen_dense:
                    continue
                seen_dense.add(dkey)
            perm = kind == "sparse" and r.get("kernel") == "perm"
            key = model_key(r["op"], kind, m, block, perm)
            a, y = systems.setdefault(key, ([], []))
            a.append(features(r["op"], kind, n, k, m, r["density"], block, perm, caches) / (t * 1e-3))
            y.append(1.0)
    out = {}
    for key, (a, y) in sorted(systems.items()):
        a = np.asarray(a)
        scale = np.abs(a).max(axis=0)
        scale[scale == 0] = 1.0  # a feature this kernel never has (e.g. serial sparse GEMM): constant 0
        coef, _ = nnls(a / scale, np.asarray(y))
        out[key] = [float(f"{c:.4g}") for c in coef / scale]
    return out


def merge_runs(runs: list[list[dict]]) -> list[dict]:
    """Per grid point, the minimum of each kernel's time over several runs: contention from
    other work on the shared host only ever adds time (a parallel kernel whose pool thread
    finds its core busy ran 5-10x slower here), so the minimum is the kernel's own time."""
    merged: dict[tuple, dict] = {}
    for rows in runs:
        for r in rows:
            key = (r["op"], r["n"], r["k"], r["m"], r["bsz"], r["sparsity"], r["block"], r.get("kernel"))
            if key not in merged:
                merged[key] = dict(r)
            else:
                for t in ("dense_ms", "sparse_ms"):
                    merged[key][t] = min(merged[key][t], r[t])
    if len(runs) > 1:  # one dense time per layer shape: the minimum over all its rows
        dense: dict[tuple, float] = {}
        for r in merged.values():
            sk = (r["op"], r["n"], r["k"], r["m"], r["bsz"])
            dense[sk] = min(dense.get(sk, float("inf")), r["dense_ms"])
        for r in merged.values():
            r["dense_ms"] = dense[(r["op"], r["n"], r["k"], r["m"], r["bsz"])]
    return list(merged.values())


def predict_with(rows: list[dict], coef: dict[str, list[float]], key: str) -> None:
    """Store under ``key`` the ratios ``targets.lower_sparse.predict`` gives with constants ``coef``."""
    from targets import lower_sparse as ls
    from targets.sparse_kernels import parse_block

    saved = dict(ls.CPU_TIME_MODELS)
    ls.CPU_TIME_MODELS.update(coef)
    try:
        for r in rows:
            r[key] = ls.predict(r["op"], r["n"], r["k"], r["m"], r["bsz"], r["density"], parse_block(r["block"]),
                                "x86", r.get("kernel") == "perm")[0]
    finally:
        ls.CPU_TIME_MODELS.clear()
        ls.CPU_TIME_MODELS.update(saved)


def cross_validate(rows: list[dict]) -> None:
    """Two-fold by layer shape (alternate (op, N, K, M) groups): each half predicted by the
    constants fitted on the other half, stored as ``pred_cv``."""
    shapes = sorted({(r["op"], r["n"], r["k"], r["m"]) for r in rows})
    fold = {s: i % 2 for i, s in enumerate(shapes)}
    for f in (0, 1):
        train = [r for r in rows if fold[(r["op"], r["n"], r["k"], r["m"])] != f]
        test = [r for r in rows if fold[(r["op"], r["n"], r["k"], r["m"])] == f]
        predict_with(test, fit(train), "pred_cv")


def fmt_table(rows: list[dict]) -> str:
    head = ("| op | N x K | batch/px | sparsity | block | kernel | dense ms | sparse ms | measured | "
            "predicted | predicted (old) |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(f"| {r['op']} | {r['n']}x{r['k']} | {r['m']} | {r['sparsity']:.2f} | {r['block']} | "
                     f"{r['kernel']} | {r['dense_ms']:.4f} | {r['sparse_ms']:.4f} | {r['measured']:.2f} | "
                     f"{r['pred_new']:.2f} | {r['pred_old']:.2f} |")
    return "\n".join(lines)


def fmt_confusion(rows: list[dict], min_speedup: float) -> str:
    out = [f"Decisions at min_speedup = {min_speedup} ({len(rows)} points; wrong = sparse chosen but "
           f"measured < 1, or dense kept but measured >= {min_speedup}):", "",
           "| model | op | chosen sparse | sparse but slower | dense but faster | wrong | worst regret | worst point "
           "| worst slowdown vs dense |", "|---|---|---|---|---|---|---|---|---|"]
    models = (("pred_old", "before (vs onnxruntime)"), ("pred_new", "after (pass constants)"),
              ("pred_fit", "this run's fit (in-sample)"), ("pred_cv", "this run's fit (2-fold by shape)"))
    for key, name in models:
        if key not in rows[0]:
            continue
        for op in ("MatMul", "Conv", "all"):
            sub = [r for r in rows if op == "all" or r["op"] == op]
            if not sub:
                continue
            c = confusion(sub, key, min_speedup)
            out.append(f"| {name} | {op} | {c['chosen_sparse']} | {c['sparse_but_slower']} | {c['dense_but_faster']} "
                       f"| {c['wrong']} | {c['worst_regret']:.0%} | {c['worst'] or '-'} | {c['worst_slowdown']:.0%} |")
    wrong = [r for r in rows if (r["pred_new"] >= min_speedup) != (r["measured"] >= 1.0)
             and (r["pred_new"] >= min_speedup or r["measured"] >= min_speedup)]
    out += ["", f"Points the pass's constants decide wrongly ({len(wrong)}):", ""]
    out += [f"- {_label(r)}: measured {r['measured']:.2f}x, predicted {r['pred_new']:.2f}x "
            f"({'sparse' if r['pred_new'] >= min_speedup else 'dense'} chosen)" for r in wrong]
    return "\n".join(out)


MD_NOTES = """\
What is compared: for every grid point the dense TIR kernel the TVM build runs for the layer
(`targets/dense_kernels.py` packed GEMM/GEMV; `targets/conv_kernels.py` dense 1x1 conv) and
the BSR kernel `lower.sparse` would put there (`targets/sparse_kernels.py` `make_primfunc` /
`make_conv1x1_primfunc`), both checked against numpy, timed interleaved on the same host.
`measured` = dense ms / sparse ms; `predicted` = the ratio of the two kernels' modelled times
with the constants now in `targets/lower_sparse.py` (`CPU_TIME_MODELS`); `predicted (old)` =
the previous model (measured ratios against onnxruntime dense, scaled by stored density).

Model (one per kernel; docstring of `targets/lower_sparse.py`): time = per-call overhead
(serial or parallel, by the kernel's own threshold) + weight bytes from L2 / L3 / DRAM
(2 MiB / 32 MiB tiers) + MACs + activation bytes, each with a non-negative constant; fitted by
non-negative least squares on relative error (`--fit`). "2-fold by shape": every layer shape
predicted by constants fitted without it, the generalisation estimate.

Caveats: a microbenchmark calls one layer in a loop, so a weight that fits the 32 MiB L3
stays there (a 95%-sparse 4096x4096 BSR weight, 3.4 MiB, runs from cache while the 64 MiB
dense one streams from DRAM); in a model whose weights together exceed the L3 both kernels
stream more from DRAM than modelled. Sparse weights reach the DRAM tier only at 4096x4096,
50%, so the sparse kernels' DRAM constants are loosely determined (they err towards dense).
The host's 2 cores are shared with other work; contention only adds time, so rows are the
per-point minimum over the runs. Decisions use `min_speedup` = 1.2 (the pass default)."""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke: two small shapes, two sparsities, 1x1/8x1")
    ap.add_argument("--sizes", type=int, nargs="+", default=list(GEMM_SIZES))
    ap.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    ap.add_argument("--sparsities", type=float, nargs="+", default=list(SPARSITIES))
    ap.add_argument("--blocks", nargs="+", default=list(BLOCKS))
    ap.add_argument("--conv", nargs="*", default=None, help="conv shapes C:H:W (default: the built-in list)")
    ap.add_argument("--no-gemm", action="store_true")
    ap.add_argument("--no-conv", action="store_true")
    ap.add_argument("--target", default="x86", help="CPU target whose kernels are measured (x86 = the host's ISA, "
                    "x86-avx2: AVX2 code, which runs on AVX-512 hosts too); the fit is written for its ISA")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-speedup", type=float, default=1.2)
    ap.add_argument("--save", type=Path, help="write the measured rows (JSON)")
    ap.add_argument("--load", type=Path, nargs="+",
                    help="score / fit rows measured earlier instead of measuring (several files: per point "
                         "the minimum of each kernel's times over the runs)")
    ap.add_argument("--fit", action="store_true", help="print the fitted time-model constants")
    ap.add_argument("--md", type=Path, help="also write the table, confusion and fit to this markdown file")
    ap.add_argument("--write", type=Path, help="with --fit: write the constants as the cost-model data file that "
                    "lower.sparse reads (targets/cost_models/<isa>.json: version, ISA, host, command)")
    ap.add_argument("--note", default="", help="a line for the markdown file (how the loaded runs were measured)")
    a = ap.parse_args(argv)
    conv_shapes = [tuple(int(v) for v in s.split(":")) for s in a.conv] if a.conv else list(CONV_SHAPES)
    if a.quick:
        a.sizes, a.batches, a.sparsities, a.blocks, a.rounds = [64, 512], [1], [0.5, 0.9], ["1x1", "8x1"], 2
        conv_shapes = [(64, 4, 4)]
    from targets.dense_kernels import default_runtime_threads

    default_runtime_threads()  # TVM's pool: one thread per physical core (before tvm loads)
    from targets.lower_sparse import cost_isa
    if a.load:
        rows = merge_runs([json.loads(p.read_text()) for p in a.load])
    else:
        rng = np.random.default_rng(a.seed)
        tgt = host_target(a.target)
        rows = []
        jobs = [] if a.no_gemm else [("gemm", n, m) for n in a.sizes for m in a.batches]
        jobs += [] if a.no_conv else [("conv", *cs) for cs in conv_shapes]
        for job in jobs:
            if job[0] == "gemm":
                got = bench_gemm_shape(job[1], job[2], tgt, rng, a.sparsities, a.blocks, a.rounds)
            else:
                got = bench_conv_shape(*job[1:], tgt, rng, a.sparsities, a.blocks, a.rounds)
            rows += got
            best = max(got, key=lambda r: r["dense_ms"] / r["sparse_ms"]) if got else None
            print(f"{job}: dense {got[0]['dense_ms']:.4f} ms, best sparse {best['sparse_ms']:.4f} ms "
                  f"({best['sparsity']} {best['block']})" if got else f"{job}: nothing", flush=True)
            if a.save:
                a.save.write_text(json.dumps(rows))
    predictions(rows)
    coef = None
    if a.fit:
        coef = fit(rows)
        predict_with(rows, coef, "pred_fit")
        cross_validate(rows)
    parts = [fmt_table(rows), fmt_confusion(rows, a.min_speedup)]
    if coef and a.write:
        write_cost_model(a.write, coef, list(argv if argv is not None else sys.argv[1:]), cost_isa(host_target(a.target)))
    if coef:
        parts.append("Fitted time-model constants (targets/cost_models/<isa>.json, written with --write):\n\n```\n"
                     + "\n".join(f"{k!r}: {v}," for k, v in coef.items()) + "\n```")
    text = "\n\n".join(parts)
    print(text)
    if a.md:
        from targets.host import detect_host

        args = list(argv if argv is not None else sys.argv[1:])
        if "--note" in args:
            i = args.index("--note")
            del args[i:i + 2]
        cmd = " ".join(["bench/cost_model.py", *args])
        h = detect_host()
        host = f"{h.arch}, {h.model_name}, {len(os.sched_getaffinity(0))} CPUs, AVX-512: {'avx512f' in h.features}"
        a.md.write_text(f"# lower.sparse cost model calibration\n\nhost: {host}\n\ncommand: `{cmd}`\n\n"
                        f"{a.note + chr(10) + chr(10) if a.note else ''}{MD_NOTES}\n\n{text}\n")
    return 0


def write_cost_model(path: Path, coef: dict[str, list[float]], args: list[str], isa: str | None = None) -> None:
    """The fitted constants as lower.sparse's data file for ``isa`` (default: the host's; ``--target
    x86-avx2`` measures AVX2 code on any AVX2-capable host). Atomic: a half-written file would be read as
    a broken cost model."""
    import datetime

    from targets import lower_sparse as ls
    from targets.host import detect_host

    h = detect_host()
    isa = isa or ("x86-avx512" if "avx512f" in h.features else ("x86-avx2" if "avx2" in h.features else h.arch))
    d = {"version": ls.COST_MODEL_VERSION, "kind": "cpu-kernel-time-model", "isa": isa,
         "fitted": datetime.date.today().isoformat(),
         "host": f"{h.model_name}, {len(os.sched_getaffinity(0))} logical CPUs ({h.arch})",
         "command": " ".join([".venv/bin/python bench/cost_model.py", *args]),
         "features": list(ls.TIME_FEATURES), "cache_bytes": ls.CACHE_BYTES, "llc_bytes": ls.LLC_BYTES,
         "models": {k: [float(f"{x:.4g}") for x in v] for k, v in coef.items()}}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(d, indent=1) + "\n")
    os.replace(tmp, path)
    print(f"cost model for {isa} written to {path}")


if __name__ == "__main__":
    sys.exit(main())
