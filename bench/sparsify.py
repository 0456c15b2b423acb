"""Benchmark of the sparsify passes: magnitude (uniform / global / sensitivity allocation), Wanda, OBS.

    python -m bench.sparsify            # writes bench/sparsify.md
    python -m bench.sparsify --smoke    # one model, one setting (used by a test)

Models: the trained digits CNN (task accuracy on models/digits_eval.npz, calibration on
models/digits_calib.npz) and zoo models with random weights (transformer, cnn): output fidelity vs the
dense model on held-out inputs (cosine of the logits, top-1 agreement), calibration on other seeded
random inputs. Every run: load -> cleanup passes -> one sparsify pass, evaluated with onnxruntime
(optimizations disabled). Default rules apply (stem conv and final classifier dense). Also: wall time
and peak memory (tracemalloc, Python + numpy allocations) of sparsify.obs on the largest model in models/.
"""
from __future__ import annotations

import argparse
import platform
import time
import tracemalloc
from pathlib import Path

import numpy as np

from compressor import data as data_mod
from compressor import ir, runtime, verify
from compressor.pass_base import PassContext, make_config
from compressor.pass_manager import PassManager
from models.zoo import DIGITS_CALIB, DIGITS_EVAL, DIGITS_ONNX, ensure_built
from passes import CLEANUP_PIPELINE, PASSES

ROOT = Path(__file__).resolve().parent.parent
METHODS = [("magnitude-uniform", "sparsify.magnitude", {}), ("magnitude-global", "sparsify.magnitude", {"allocation": "global"}),
           ("sensitivity", "sparsify.magnitude", {"allocation": "sensitivity"}), ("wanda", "sparsify.wanda", {}),
           ("obs", "sparsify.obs", {})]
SETTINGS = [(0.5, "unstructured"), (0.7, "unstructured"), (0.9, "unstructured"), (0.5, "2:4")]


def cleaned(path: Path):
    m = ir.load(path)
    out, _ = PassManager([(PASSES.get(n)(), "b") for n in CLEANUP_PIPELINE], []).run(m, PassContext(template=m))
    return out


def sparsify(model, name: str, cfg: dict, calib):
    cls = PASSES.get(name)
    out, recs = PassManager([(cls(make_config(cls, cfg)), "b")], []).run(model, PassContext(calib=calib, template=model))
    return out, recs[0]


def fidelity(model, feeds, ref) -> tuple[float, float]:
    outs = runtime.run_all(runtime.session(model), feeds)
    cos, agree = [], []
    for o, r in zip(outs, ref):
        a, b = o[0].ravel().astype(np.float64), r[0].ravel().astype(np.float64)
        cos.append(float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30)))
        agree.append(int(np.argmax(a) == np.argmax(b)))
    return float(np.mean(cos)), float(np.mean(agree))


def bench_model(label: str, path: Path, calib, heldout, labels, settings, methods, lines: list[str]) -> None:
    model = cleaned(path)
    ref = runtime.run_all(runtime.session(model), heldout)
    metric = "accuracy" if labels is not None else "cosine / top-1 agreement vs dense"
    if labels is not None:
        dense = f"{verify.accuracy(ref, labels):.4f}"
    else:
        dense = "1.0000 / 1.000"
    lines += [f"### {label} ({metric}; dense {dense})", "",
              "| setting | " + " | ".join(m[0] for m in methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for s, pattern in settings:
        row = [f"{s:.0%}" if pattern == "unstructured" else pattern]
        for mlabel, pname, extra in methods:
            t0 = time.perf_counter()
            out, rec = sparsify(model, pname, {"sparsity": s, "pattern": pattern, **extra}, calib)
            dt = time.perf_counter() - t0
            ach = rec.stats["achieved_sparsity"]
            if labels is not None:
                cell = f"{verify.accuracy(runtime.run_all(runtime.session(out), heldout), labels):.4f}"
            else:
                c, a = fidelity(out, heldout, ref)
                cell = f"{c:.4f} / {a:.3f}"
            note = " (=uniform: N:M fixes s)" if pattern != "unstructured" and extra.get("allocation") else ""
            row.append(f"{cell}{note} <sub>s={ach:.3f}, {dt:.1f}s</sub>")
            print(f"{label} {row[0]} {mlabel}: {cell} achieved={ach:.4f} ({dt:.1f}s)", flush=True)
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")


def random_feeds(path: Path, n: int, seed: int):
    return data_mod.random_samples(ir.input_specs(ir.load(path)), n, seed).feeds


def obs_cost(path: Path, calib, lines: list[str]) -> None:
    import resource

    model = cleaned(path)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    t0 = time.perf_counter()
    _, rec = sparsify(model, "sparsify.obs", {"sparsity": 0.5}, calib)
    dt = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    layers = rec.stats["layers"]
    lines += ["### Cost of sparsify.obs on the largest model", "",
              f"`{path.name}` ({path.stat().st_size / 1024:.0f} KiB; largest file in models/), 50% unstructured, "
              f"{rec.stats['calib_samples_used']} calibration samples, {len(layers)} pruned layers "
              f"({rec.stats['prunable_params']} weights), {rec.stats['captures']} sequential captures: "
              f"**{dt:.2f} s wall, peak traced memory {peak / 2**20:.1f} MiB** (tracemalloc; ru_maxrss of the whole "
              f"bench process {rss1 / 1024:.0f} MiB, grew by {(rss1 - rss0) / 1024:.0f} MiB during the run; "
              f"the tracemalloc run itself is slower than untraced).", ""]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("-o", "--output", default=str(ROOT / "bench" / "sparsify.md"))
    a = ap.parse_args(argv)
    import onnxruntime

    lines = ["# sparsify: magnitude vs sensitivity vs Wanda vs OBS", "",
             "Generated by `python -m bench.sparsify` (one run, same machine for every cell). Cells: metric, then achieved "
             "sparsity of the pruned layers and the pass time. Stem conv and final classifier stay dense (default rules); "
             "`sensitivity` = magnitude scores with the sensitivity allocation; N:M rows fix every layer at 1-N/M, so the "
             "allocations coincide with uniform there.", "",
             f"Host: {platform.machine()}, {platform.processor() or platform.system()}; onnxruntime {onnxruntime.__version__}.", ""]
    ins = ir.input_specs(ir.load(DIGITS_ONNX))
    dcal = data_mod.load_npz(DIGITS_CALIB, ins, "--calib")
    dev = data_mod.load_npz(DIGITS_EVAL, ins, "--eval")
    if a.smoke:
        bench_model("digits_cnn", DIGITS_ONNX, data_mod.Samples(dcal.feeds[:16], None, "s"), dev.feeds[:40], dev.labels[:40],
                    [(0.5, "unstructured")], [METHODS[0], METHODS[4]], lines)
        print("\n".join(lines))
        return 0
    bench_model("digits_cnn (trained, 360 eval samples)", DIGITS_ONNX, dcal, dev.feeds, dev.labels, SETTINGS, METHODS, lines)
    cache = ROOT / "models" / "onnx"
    for name in ("transformer", "cnn"):
        path = ensure_built(name, cache)
        calib = data_mod.Samples(random_feeds(path, 128, 1), None, "random(seed=1)")
        bench_model(f"{name} (random weights; 128 random calib inputs, 200 held-out)", path, calib,
                    random_feeds(path, 200, 2), None, SETTINGS, METHODS, lines)
    candidates = [DIGITS_ONNX] + sorted(cache.glob("*.onnx"))
    largest = max(candidates, key=lambda p: p.stat().st_size)
    obs_cost(largest, dcal if largest == DIGITS_ONNX else data_mod.Samples(random_feeds(largest, 128, 1), None, "r"), lines)
    Path(a.output).write_text("\n".join(lines) + "\n")
    print(f"wrote {a.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
