"""End-to-end wall time of `compress` per model and target, with the latencies
the run measured (onnxruntime original vs compressed, TVM artifact), side by
side in one run. Writes bench/pipeline.md.

    .venv/bin/python -m bench.pipeline [--targets x86,arm,cuda] [--sparsity 0.5] [--models mlp,cnn]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from compressor.cli import main as compress  # noqa: E402
from models.build import MODEL_NAMES  # noqa: E402
from models.zoo import ensure_built  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", default="x86,arm,cuda")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--models", default=",".join(["digits_cnn"] + list(MODEL_NAMES)))
    ap.add_argument("--out", default=str(REPO / "bench" / "pipeline.md"))
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.models.split(","):
            model = ensure_built(name, Path(tmp) / "zoo")
            for target in a.targets.split(","):
                out = Path(tmp) / f"{name}.{target}"
                extra = ["--eval", str(REPO / "models" / "digits_eval.npz")] if name == "digits_cnn" else []
                t0 = time.perf_counter()
                code = compress([str(model), "--target", target, "--sparsity", str(a.sparsity), "-o", str(out), "--no-gate", *extra])
                wall = time.perf_counter() - t0
                rep = json.loads((out / "report.json").read_text())
                lat = rep.get("latency") or {}
                st = rep["stats"]
                rows.append([name, target, str(code), f"{wall:.1f}", f"{st['original']['params']}", f"{st['compressed']['sparsity']:.3f}",
                             f"{lat.get('ort_original_s', 0) * 1e3:.3f}", f"{lat.get('ort_compressed_s', 0) * 1e3:.3f}",
                             "-" if lat.get("artifact_s") is None else f"{lat['artifact_s'] * 1e3:.3f}",
                             f"{min(o['cosine'] for c in rep['verification'] for o in c['outputs']):.5f}"])
                print(" | ".join(rows[-1]), flush=True)
    from compressor.report import table
    from targets.host import detect_host

    h = detect_host()
    lines = [f"# compress wall time per model (sparsity {a.sparsity})", "",
             f"Host: {h.model_name} ({h.simd_summary}). Latencies: median, onnxruntime ORT_ENABLE_ALL vs the TVM artifact (untuned), batch 1.", ""]
    lines += table(rows, ["model", "target", "exit", "wall s", "params", "sparsity", "ORT orig ms", "ORT comp ms", "TVM ms", "min cosine"])
    lines += ["", "Wall time and peak resident memory of whole runs at 16M, 140M and 1B parameters (sparsity, structured, "
              "int8; x86), with the time and memory of each stage: `bench/memory_scale.md` (`bench/memory_scale.py`)."]
    Path(a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
