"""Named host CPU vs generic psABI level as ``-mcpu`` (same feature list), measured side by side.

The x86 host target used to be ``-mcpu=<LLVM's host CPU name>`` with every curated feature
switched on or off; on a Zen 3 that combination (``znver3`` + ``-avx512f`` ...) aborted LLVM
(issue 16). It is now ``x86-64-v3``/``x86-64-v4`` plus the same ``+f``/``-f`` list. This script
checks the claim that the named CPU bought nothing: for each model it compresses with the CLI
(``--no-compile``), lowers for x86 (``lower.rnn``, ``lower.sparse``), compiles the lowered model
twice -- ``-mcpu`` = the host's LLVM name and the generic level -- and times both artifacts in
interleaved rounds (median of ``--calls`` each, best of ``--rounds``), checking they agree.

    python -m bench.mcpu_ab [--models mlp-large,mobilenetv2-large] [--sparsities 0,0.9] [--md bench/mcpu_ab.md]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="mlp-large,gru-large,mobilenetv2-large,transformer-large")
    ap.add_argument("--sparsities", default="0,0.9")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=40)
    ap.add_argument("--md")
    a = ap.parse_args(argv)

    import onnx

    import targets
    from compressor import ir, runtime
    from compressor.cli import main as cli
    from compressor.pipeline import lower_for_target
    from models.large import model_path
    from targets import tvm_backend
    from targets.host import detect_host, llvm_host_cpu

    host = detect_host()
    named = llvm_host_cpu()
    target, spec = targets.resolve("x86")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in a.models.split(","):
            src = model_path(name, tmp / "models")
            for sp in [float(v) for v in a.sparsities.split(",")]:
                out = tmp / f"{name}-{sp}.bundle"
                rc = cli([str(src), "--target", "x86", "--sparsity", str(sp), "--no-gate", "--no-compile", "--no-latency",
                          "-o", str(out), "--force"])
                if rc not in (0, 3):
                    print(f"{name} {sp}: compress exit {rc}")
                    continue
                comp = onnx.load(str(out / "model.onnx"))
                lowered, _ = lower_for_target(comp, target, spec, lambda s: None)
                lp = tmp / "lowered.onnx"
                ir.save_model(lowered, lp)
                shapes = {s.name: list(s.shape) for s in ir.input_specs(comp)}
                feed = {k: np.random.default_rng(0).standard_normal(v).astype(np.float32) for k, v in shapes.items()}
                libs = {}
                for label, mcpu in (("named", named), ("generic", spec.tvm_target["mcpu"])):
                    t = dict(spec.tvm_target, mcpu=mcpu)
                    mod = tvm_backend.import_onnx(lp, shapes, target=t)
                    from targets import cpu_schedules

                    so = tmp / f"{label}.so"
                    tvm_backend.compile_library(mod, t, so, relax_pipeline=cpu_schedules.pipeline(tvm_backend.make_target(t)))
                    libs[label] = so
                outs = {k: tvm_backend.run_library(v, feed) for k, v in libs.items()}
                agree = max(float(np.max(np.abs(x - y))) for x, y in zip(outs["named"], outs["generic"]))
                best = {k: float("inf") for k in libs}
                for _ in range(a.rounds):
                    for k, v in libs.items():
                        runtime.settle()
                        best[k] = min(best[k], tvm_backend.time_library(v, feed, "cpu"))
                        time.sleep(0.05)
                rows.append((name, sp, best["named"] * 1e3, best["generic"] * 1e3, best["named"] / best["generic"], agree))
                print(rows[-1], flush=True)
    lines = ["# `-mcpu`: the host's LLVM CPU name vs the generic psABI level (same feature list)", "",
             f"Host: {host.model_name} ({host.simd_summary}); named = `-mcpu={named}`, generic = "
             f"`-mcpu={spec.tvm_target['mcpu']}`, both with the host's `+f`/`-f` list. `python -m bench.mcpu_ab "
             f"{' '.join(argv if argv is not None else sys.argv[1:])}`: best of {a.rounds} interleaved rounds of "
             f"`time_library` medians; > 1 in the ratio column means the generic build is faster.", "",
             "| model | sparsity | named ms | generic ms | named / generic | max abs diff |", "|---|---|---|---|---|---|"]
    for name, sp, n, g, r, d in rows:
        lines.append(f"| {name} | {sp:g} | {n:.4f} | {g:.4f} | {r:.3f} | {d:.1e} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.md:
        Path(a.md).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
