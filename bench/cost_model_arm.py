"""Calibration of ``lower.sparse``'s cost model for aarch64 cores, from instruction counts under qemu.

The x86 fits (``bench/cost_model.py``) time the kernels on the host. There is no ARM hardware, so
for aarch64 this script compiles the same kernel grid for ``--target arm`` (the TIR kernels
``lower.sparse`` chooses between: dense packed GEMM, BSR GEMM variants, dense and BSR 1x1 conv),
runs every kernel once in the aarch64 guest (``targets.device_qemu``: Debian's qemu-user with the
instruction-count plugin), checks its output against numpy, and records the executed instructions
of the call by class. Each named core's model (``targets.arm_cores``) turns the counts and the
kernel's weight bytes into seconds; the per-kernel time models of ``targets.lower_sparse`` are fitted
to those seconds per core (``bench/cost_model.py``'s ``fit``, with the core's cache sizes) and
written to ``targets/cost_models/arm-<core>.json``.

    .venv/bin/python bench/cost_model_arm.py --work /tmp/cma --save /tmp/cma.json        # ~15 min, 2 cores
    .venv/bin/python bench/cost_model_arm.py --load /tmp/cma.json --fit --write --md bench/cost_model_arm.md
    .venv/bin/python bench/cost_model_arm.py --quick --work /tmp/cmq                       # smoke (~2 min)

Validation: the table in ``--md`` gives, per core, the decisions of the fitted linear model against
the modelled kernel times (in sample and 2-fold by shape), and the share of wrong decisions; the
whole-model check (fitted prediction beside the measured dense/sparse instruction and modelled-time
ratios of ResNet-50 and the encoder) is in ``bench/arm.md``.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.sparse_kernels import random_block_sparse  # noqa: E402

BLOCKS = ("1x1", "4x1", "8x1", "16x1")
GEMM_SIZES = (64, 256, 1024, 2048, (64, 2048), (512, 2048), (2048, 512))  # N = K, or (N, K)
BATCHES = (1, 4, 16)
SPARSITIES = (0.5, 0.7, 0.9, 0.95)
CONV_SHAPES = ((64, 4, 4), (256, 4, 4), (64, 14, 14), (256, 14, 14), (512, 7, 7), (128, 28, 28), (64, 56, 56))
QUICK = dict(sizes=(256,), batches=(1,), sparsities=(0.9,), blocks=("1x1", "8x1"), conv=((64, 14, 14),))


def arm_target() -> dict:
    from targets import resolve

    return resolve("arm")[1].tvm_target


def make_grid(sizes, batches, sparsities, blocks, conv, tgt, rng) -> list[dict]:
    """Every kernel of the grid: its PrimFunc, arguments (output last), numpy reference, weight bytes."""
    from targets import conv_kernels as ck
    from targets import dense_kernels as dk
    from targets import sparse_kernels as sk

    out = []

    def add(kind, op, n, k, m, s, pat, density, variant, f, args, ref, wbytes):
        name = f"k{len(out)}"
        out.append({"name": name, "kind": kind, "op": op, "n": n, "k": k, "m": m, "bsz": 1, "sparsity": s,
                    "block": pat, "density": density, "kernel": variant, "weight_bytes": int(wbytes),
                    "func": f.with_attr("global_symbol", name), "args": args, "ref": ref})

    for size in sizes:
        n, k = size if isinstance(size, tuple) else (size, size)
        wd = rng.standard_normal((n, k)).astype(np.float32)
        for m in batches:
            x = rng.standard_normal((m, k)).astype(np.float32)
            pd = dk.kernel_params(m, n, k, tgt)
            args = dk.kernel_args(x, wd, None, pd) + [np.zeros((m, n), np.float32)]
            add("dense", "MatMul", n, k, m, 0.0, "dense", 1.0, "dense", dk.make_primfunc(m, n, k, "none", tgt, pd),
                args, dk.reference(x, wd), args[1].nbytes)
            for s, pat in itertools.product(sparsities, blocks):
                block = sk.parse_block(pat)
                if n % block[0]:
                    continue
                w = random_block_sparse(n, k, block, s, rng)
                b = sk.to_bsr(w, block, sk.lanes_group(block, tgt))
                params = sk.kernel_params(block, m, tgt, n, k)
                wts = sk.kernel_weights(b, params)
                f = sk.make_primfunc(m, n, k, block, len(wts[0]), "none", tgt, params)
                args = sk.kernel_args(x, b, None, params) + [np.zeros((m, n), np.float32)]
                add("sparse", "MatMul", n, k, m, s, pat, b.density(), params.variant, f, args, sk.reference(x, b),
                    sum(a.nbytes for a in wts))
    for ch, h, w_ in conv:
        n = k = ch
        m = h * w_
        shape = ck.ConvShape(1, k, h, w_, n, 1, 1)
        x = rng.standard_normal((1, k, h, w_)).astype(np.float32)
        wd = rng.standard_normal((n, k, 1, 1)).astype(np.float32)
        wk, bk = ck.kernel_weights(shape, wd, None, tgt)
        add("dense", "Conv", n, k, m, 0.0, "dense", 1.0, "dense", ck.make_primfunc(shape, ck.NONE, tgt),
            [x, wk, bk, np.zeros((1, n, h, w_), np.float32)], ck.reference(x, wd, None, shape), wk.nbytes)
        x3 = x.reshape(1, k, m)
        for s, pat in itertools.product(sparsities, blocks):
            block = sk.parse_block(pat)
            if n % block[0]:
                continue
            w = random_block_sparse(n, k, block, s, rng)
            b = sk.to_bsr(w, block, 1)
            f = sk.make_conv1x1_primfunc(1, m, n, k, block, b.nnzb, "none", tgt)
            args = sk.kernel_args(x3, b, None) + [np.zeros((1, n, m), np.float32)]
            add("sparse", "Conv", n, k, m, s, pat, b.density(), "cm", f, args, sk.reference_conv1x1(x3, b),
                sum(a.nbytes for a in args[1:4]))
    return out


def measure(grid: list[dict], tgt: dict, work: Path, say=print) -> list[dict]:
    """Run the grid once in the aarch64 guest with the instruction counter
    (``targets.device_qemu.run_kernels``); one record per kernel with its class counts (``insns``) and
    relative error against numpy (above 1e-4: an error)."""
    from targets import device_qemu

    t0 = time.perf_counter()
    got = device_qemu.run_kernels(grid, tgt, work, count=True, say=say)
    say(f"guest: {len(grid)} kernels in {time.perf_counter() - t0:.0f} s (compile and run under qemu)")
    rows = []
    for g, (counts, err) in zip(grid, got):
        if err > 1e-4:
            raise RuntimeError(f"{g['name']} ({g['op']} {g['n']}x{g['k']} m={g['m']} {g['block']}): "
                               f"relative error {err:.2e} on aarch64")
        rows.append({k: v for k, v in g.items() if k not in ("func", "args", "ref")} | {"insns": counts, "rel_err": err})
    return rows


def paired_rows(kernels: list[dict], core) -> list[dict]:
    """``bench/cost_model.py``-style rows (dense_ms / sparse_ms per sparse kernel) with the core
    model's seconds of each kernel."""
    dense = {(r["op"], r["n"], r["k"], r["m"]): r for r in kernels if r["kind"] == "dense"}
    rows = []
    for r in kernels:
        if r["kind"] != "sparse":
            continue
        d = dense[(r["op"], r["n"], r["k"], r["m"])]
        rows.append({**{k: r[k] for k in ("op", "n", "k", "m", "bsz", "sparsity", "block", "density", "kernel")},
                     "dense_ms": core.seconds(d["insns"], d["weight_bytes"]) * 1e3,
                     "sparse_ms": core.seconds(r["insns"], r["weight_bytes"]) * 1e3,
                     "dense_insns": d["insns"]["total"], "sparse_insns": r["insns"]["total"]})
    return rows


def fit_core(kernels: list[dict], core) -> tuple[dict, list[dict]]:
    """Per-kernel time-model constants for ``core`` (its cache sizes as the model's L2/L3) and the
    rows with the in-sample (``pred_fit``) and 2-fold (``pred_cv``) predictions."""
    from bench import cost_model as cm
    from targets import lower_sparse as ls

    rows = paired_rows(kernels, core)
    caches = (core.l2_bytes, core.l3_bytes)
    coef = cm.fit(rows, caches)
    for r in rows:
        r["measured"] = r["dense_ms"] / r["sparse_ms"]
    _predict(rows, coef, "pred_fit", caches)
    shapes = sorted({(r["op"], r["n"], r["k"], r["m"]) for r in rows})
    fold = {s: i % 2 for i, s in enumerate(shapes)}
    for f in (0, 1):
        train = [r for r in rows if fold[(r["op"], r["n"], r["k"], r["m"])] != f]
        test = [r for r in rows if fold[(r["op"], r["n"], r["k"], r["m"])] == f]
        _predict(test, {**coef, **cm.fit(train, caches)}, "pred_cv", caches)  # a kernel only in this fold: full fit
    return coef, rows


def _predict(rows: list[dict], coef: dict, key: str, caches: tuple[int, int]) -> None:
    from targets import lower_sparse as ls
    from targets.sparse_kernels import parse_block

    for r in rows:
        blk = parse_block(r["block"])
        feats = lambda kind, d: ls.time_features(r["op"], kind, r["n"], r["k"], r["m"], d, blk, caches=caches)  # noqa: E731
        t = {kind: max(sum(a * b for a, b in zip(coef[ls.model_key(r["op"], kind, r["m"], blk)], feats(kind, d))), 1e-12)
             for kind, d in (("dense", 1.0), ("sparse", r["density"]))}
        r[key] = t["dense"] / t["sparse"]


def write_fit(core, coef: dict, path: Path, command: str) -> None:
    from targets import lower_sparse as ls

    d = {"version": ls.COST_MODEL_VERSION, "kind": "cpu-kernel-time-model", "isa": f"arm-{core.llvm_cpu}",
         "fitted": time.strftime("%Y-%m-%d"),
         "host": f"modelled {core.llvm_cpu} ({core.ghz} GHz, issue {core.issue}, {core.simd_pipes} ASIMD pipes, "
                 f"{'out-of-order' if core.out_of_order else 'in-order'}): targets.arm_cores over qemu-aarch64 "
                 "instruction counts of the kernels compiled for --target arm",
         "command": command,
         "notes": "no ARM hardware: times are the core model's, not measurements; table: bench/cost_model_arm.md",
         "features": list(ls.TIME_FEATURES), "cache_bytes": core.l2_bytes, "llc_bytes": core.l3_bytes,
         "models": coef}
    path.write_text(json.dumps(d, indent=1) + "\n")


def render(kernels: list[dict], fits: dict, min_speedup: float = 1.2) -> str:
    from bench import cost_model as cm

    lines = ["| core | op | points | sparse chosen (fit) | wrong in sample | wrong 2-fold | best-pattern at 90% (median modelled ratio) |",
             "|---|---|---|---|---|---|---|"]
    for name, (core, coef, rows) in fits.items():
        for op in ("MatMul", "Conv", "all"):
            sub = [r for r in rows if op == "all" or r["op"] == op]
            c_in = cm.confusion(sub, "pred_fit", min_speedup)
            c_cv = cm.confusion(sub, "pred_cv", min_speedup)
            by_block = {}
            for r in sub:
                if r["sparsity"] == 0.9:
                    by_block.setdefault(r["block"], []).append(r["measured"])
            best = ", ".join(f"{b} {np.median(v):.2f}x" for b, v in sorted(by_block.items(), key=lambda kv: -np.median(kv[1])))
            lines.append(f"| {name} | {op} | {len(sub)} | {c_in['chosen_sparse']} | {c_in['wrong']} | {c_cv['wrong']} | {best} |")
    lines += ["", "Per kernel (modelled ms per core; instructions from qemu):", "",
              "| op | N x K | batch/px | sparsity | block | kernel | dense insns | sparse insns | insn ratio | "
              + " | ".join(f"{n} ratio (fit)" for n in fits) + " |",
              "|" + "---|" * (9 + len(fits))]
    per = {n: {(r["op"], r["n"], r["m"], r["sparsity"], r["block"]): r for r in rows} for n, (_, _, rows) in fits.items()}
    first = next(iter(fits))
    for key, r in per[first].items():
        cells = " | ".join(f"{per[n][key]['measured']:.2f} ({per[n][key]['pred_fit']:.2f})" for n in fits)
        lines.append(f"| {r['op']} | {r['n']}x{r['k']} | {r['m']} | {r['sparsity']:.2f} | {r['block']} | {r['kernel']} | "
                     f"{r['dense_insns']} | {r['sparse_insns']} | {r['dense_insns'] / r['sparse_insns']:.2f} | {cells} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/cost_model_arm")
    ap.add_argument("--save")
    ap.add_argument("--load")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--fit", action="store_true")
    ap.add_argument("--write", action="store_true", help="write targets/cost_models/arm-<core>.json")
    ap.add_argument("--md")
    a = ap.parse_args(argv)
    from targets import lower_sparse as ls
    from targets.arm_cores import CORES

    if a.load:
        kernels = json.loads(Path(a.load).read_text())
    else:
        tgt = arm_target()
        grid_args = QUICK if a.quick else dict(sizes=GEMM_SIZES, batches=BATCHES, sparsities=SPARSITIES,
                                               blocks=BLOCKS, conv=CONV_SHAPES)
        import tvm

        with tvm.target.Target(tgt):
            grid = make_grid(grid_args["sizes"], grid_args["batches"], grid_args["sparsities"], grid_args["blocks"],
                             grid_args["conv"], tgt, np.random.default_rng(0))
        kernels = measure(grid, tgt, Path(a.work))
        if a.save:
            Path(a.save).write_text(json.dumps(kernels))
    fits = {}
    for name, core in CORES.items():
        coef, rows = fit_core(kernels, core)
        fits[name] = (core, coef, rows)
        if a.write:
            cmd = " ".join(["bench/cost_model_arm.py", *(argv if argv is not None else sys.argv[1:])])
            write_fit(core, coef, ls.COST_MODEL_DIR / f"arm-{core.llvm_cpu}.json", cmd)
    text = render(kernels, fits)
    print(text)
    if a.md:
        Path(a.md).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
