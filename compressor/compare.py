"""``compress compare A.onnx B.onnx [--eval DATA]``: run two models with the same
inputs (onnxruntime, optimisations off) and report per-output error statistics,
the before/after statistics table and measured latency, without compressing.
Both models must have the same input and output names and shapes."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from compressor import data as data_mod
from compressor import ir, runtime, stats, verify
from compressor.errors import InputError


def compare_models(a: Path, b: Path, eval_path: Path | None, samples: int, seed: int,
                   input_shapes: dict[str, list[int]], tol: verify.Tolerances) -> dict[str, Any]:
    ma, mb = ir.load(a, input_shapes), ir.load(b, input_shapes)
    ia, ib = ir.input_specs(ma), ir.input_specs(mb)
    oa, ob = ir.output_specs(ma), ir.output_specs(mb)
    if [s.to_dict() for s in ia] != [s.to_dict() for s in ib]:
        raise InputError(f"inputs differ: {[s.to_dict() for s in ia]} vs {[s.to_dict() for s in ib]}")
    if [s.name for s in oa] != [s.name for s in ob]:
        raise InputError(f"outputs differ: {[s.name for s in oa]} vs {[s.name for s in ob]}")
    verif = data_mod.load_npz(eval_path, ia, "--eval") if eval_path else data_mod.random_samples(ia, samples, seed, model=ma)
    sa, sb = runtime.session(ma), runtime.session(mb)
    ra, rb = runtime.run_all(sa, verif.feeds), runtime.run_all(sb, verif.feeds)
    labelled = verif.labels is not None
    comp = verify.compare(str(b), str(a), "lossy", [s.name for s in oa], rb, ra, tol, not labelled)
    fa, fb = runtime.session(ma, optimized=True), runtime.session(mb, optimized=True)
    feed = verif.feeds[0]
    lat = runtime.compare_latency({"a": lambda: fa.run(None, feed), "b": lambda: fb.run(None, feed)})
    rep: dict[str, Any] = {
        "verification": [comp.to_dict()],
        "verification_data": verif.source,
        "stats": {"original": stats.compute(ma, a.stat().st_size).to_dict(), "compressed": stats.compute(mb, b.stat().st_size).to_dict()},
        "latency": {"ort_original_s": lat["a"], "ort_compressed_s": lat["b"], "artifact_s": None},
        "accuracy": None,
    }
    if labelled:
        rep["accuracy"] = {"original": verify.accuracy(ra, verif.labels), "compressed": verify.accuracy(rb, verif.labels), "n": len(verif.feeds)}
    return rep
