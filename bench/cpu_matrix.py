"""The seed sizes at 90% for every CPU of the ISA matrix (issue 16).

For each CPU profile (``targets.host.CPU_PROFILES``: the x86 target as that CPU's host detection
builds it, ``--target x86-<cpu>``) and the fixed levels, run the CLI on a 4x2048 MLP and a
GRU(256->1024) at ``--sparsity 0.9`` and record: the target expansion, how many layers got
sparse kernels, whether a sparse-kernel crash fell back to dense, the artifact's size and, where
this host can execute that ISA, the artifact's latency beside onnxruntime's on the dense original
(interleaved, same run). Prints a Markdown table (``--md FILE`` writes it).

    python -m bench.cpu_matrix [--cpus znver3 znver4] [--models mlp gru] [--md bench/cpu_matrix.md]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from targets.host import CPU_PROFILES, detect_host  # noqa: E402


def build_models(d: Path, names: list[str]) -> dict[str, Path]:
    from models.large import build_gru_large, build_mlp_large

    out = {}
    if "mlp" in names:
        out["mlp 4x2048"] = build_mlp_large(d / "mlp.onnx", widths=(2048, 2048, 2048, 2048))
    if "gru" in names:
        out["GRU 256->1024"] = build_gru_large(d / "gru.onnx", inp=256, hidden=1024)
    return out


def run_one(model: Path, tag: str, out: Path) -> dict:
    exe = Path(sys.executable).with_name("compress")
    t0 = time.perf_counter()
    p = subprocess.run([str(exe), str(model), "--target", tag, "--sparsity", "0.9", "--no-gate", "-o", str(out), "--force"],
                       capture_output=True, text=True)
    wall = time.perf_counter() - t0
    rec = {"tag": tag, "exit": p.returncode, "wall_s": round(wall, 1)}
    rp = out / "report.json"
    if not rp.exists():
        rec["error"] = (p.stderr.strip().splitlines() or ["?"])[-1][:200]
        return rec
    rep = json.loads(rp.read_text())
    low = [x for x in rep["target_passes"] or [] if x["name"] == "lower.sparse"]
    rnn = [x for x in rep["target_passes"] or [] if x["name"] == "lower.rnn"]
    kernels = (rep.get("artifact") or {}).get("kernels") or {}
    rec.update(
        mcpu=rep["target"]["tvm_target"].get("mcpu"),
        simd=16 if "avx512f" in rep["target"]["isa_features"] else 8,
        sparse_layers=low[0]["stats"].get("lowered", 0) if low else 0,
        rnn_fused=len(kernels.get("rnn_fused") or []),
        rnn_unrolled=rnn[0]["stats"].get("lowered", 0) if rnn else 0,
        fallback=bool(rep.get("sparse_fallback")),
        artifact_kb=round((rep.get("artifact") or {}).get("bytes", 0) / 1024),
        runs_here=rep["target"]["runs_here"],
    )
    lat = rep.get("latency") or {}
    if lat.get("artifact_s"):
        rec["artifact_ms"] = lat["artifact_s"] * 1e3
        rec["ort_dense_ms"] = lat["ort_original_s"] * 1e3
        rec["speedup_vs_ort_dense"] = lat["ort_original_s"] / lat["artifact_s"]
    return rec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpus", nargs="*", default=list(CPU_PROFILES))
    ap.add_argument("--levels", nargs="*", default=["x86-avx2", "x86-avx512"])
    ap.add_argument("--models", nargs="*", default=["mlp", "gru"])
    ap.add_argument("--md")
    a = ap.parse_args(argv)
    host = detect_host()
    tags = [f"x86-{c}" for c in a.cpus] + a.levels
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        models = build_models(Path(tmp), a.models)
        for mname, path in models.items():
            for tag in tags:
                rec = run_one(path, tag, Path(tmp) / f"{tag}.bundle")
                rec["model"] = mname
                rows.append(rec)
                print(json.dumps(rec), flush=True)
    lines = [f"# Seed sizes at 90% for every CPU of the matrix (`python -m bench.cpu_matrix`)", "",
             f"Host: {host.model_name}, {host.simd_summary} ({len(host.features)} cpuinfo flags); "
             "latency is measured only where the host can execute the target's ISA (interleaved with onnxruntime "
             "on the dense original, median of 25, the CLI's own measurement).", "",
             "| model | target | -mcpu | lanes | sparse layers | fused RNN | fallback | exit | artifact KiB | ours ms | ORT dense ms | speedup |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['tag']} | | | | | | {r['exit']} | | | | {r['error']} |")
            continue
        lat = (f"{r['artifact_ms']:.3f} | {r['ort_dense_ms']:.3f} | {r['speedup_vs_ort_dense']:.2f}x"
               if "artifact_ms" in r else "not run (ISA) | | ")
        lines.append(f"| {r['model']} | {r['tag']} | {r['mcpu']} | {r['simd']} | {r['sparse_layers']} | {r['rnn_fused']} | "
                     f"{'yes' if r['fallback'] else 'no'} | {r['exit']} | {r['artifact_kb']} | {lat} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.md:
        Path(a.md).write_text(text)
    bad = [r for r in rows if r.get("exit") not in (0, 3) or r.get("fallback") or not (r.get("sparse_layers") or r.get("rnn_fused"))]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
