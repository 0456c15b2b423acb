"""The real-model suite (models/real_suite.py) through the CLI's defaults and onnxruntime's quantizers.

    .venv/bin/python bench/real_models.py [--only NAME] [--configs int8,sp50,...] [--out bench/real_models.md]
                                          [--results results.json] [--cache DIR] [--timeout 1200]

For each pretrained model of the suite (built and cached with ``models.real_suite.ensure_built``):

  dense          the model itself (task metric against ground truth; agreement 1.0 by definition)
  int8           compress MODEL --calib calib.npz --eval eval.npz --no-compile --quantize int8
  sp50           ... --sparsity 0.5
  sp50-2:4       ... --sparsity 0.5 --pattern 2:4
  struct20       ... --structured 0.2
  ort-static     onnxruntime.quantization.quantize_static(model, out, reader over calib.npz), defaults
  ort-dynamic    onnxruntime.quantization.quantize_dynamic(model, out), defaults

Every CLI run is a subprocess with the default command plus ``--calib`` / ``--eval``, ``--no-compile``,
``--force`` and a fresh ``-o``; its exit code is recorded (3 = the accuracy gate failed, the bundle is
still written) and the bundle's ``model.onnx`` is scored with the suite's metric on eval.npz
(onnxruntime, optimizations off, one thread). Size: ``model.onnx`` on disk and, where the bundle stores
sparse weights (``report.json`` ``sparse_storage``), the stored bytes. This is the baseline of what the
defaults do today; nothing here tunes them.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from models import real_suite as rs  # noqa: E402

CONFIGS: dict[str, list[str]] = {
    "int8": ["--quantize", "int8"],
    "sp50": ["--sparsity", "0.5"],
    "sp50-2:4": ["--sparsity", "0.5", "--pattern", "2:4"],
    "struct20": ["--structured", "0.2"],
}
ORT_CONFIGS = ["ort-static", "ort-dynamic"]


def host_cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} logical CPUs"
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_cli(model_dir: Path, flags: list[str], out: Path, timeout: int) -> dict:
    exe = Path(sys.executable).with_name("compress")
    cmd = [str(exe), str(model_dir / "model.onnx"), "--calib", str(model_dir / "calib.npz"), "--eval", str(model_dir / "eval.npz"),
           "--no-compile", "--force", "-o", str(out), *flags]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        rc, err = p.returncode, (p.stderr.strip().splitlines() or [""])[-1]
    except subprocess.TimeoutExpired:
        rc, err = "timeout", f"> {timeout} s"
    res = {"exit": rc, "wall_s": round(time.perf_counter() - t0, 1), "cmd": " ".join(["compress", "MODEL", "--calib", "calib.npz", "--eval", "eval.npz", "--no-compile", *flags])}
    if rc not in (0, 3):
        res["error"] = err[-300:]
    if (out / "model.onnx").exists():
        res["model"] = str(out / "model.onnx")
        res["onnx_bytes"] = (out / "model.onnx").stat().st_size
        try:
            rep = json.loads((out / "report.json").read_text())
            st = rep.get("sparse_storage") or {}
            if st.get("stored_bytes"):
                res["stored_bytes"] = int(st["stored_bytes"])
            res["warnings"] = len(rep.get("warnings", []))
        except (OSError, ValueError):
            pass
    return res


def run_ort(kind: str, model_dir: Path, out: Path) -> dict:
    import numpy as np
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, quantize_dynamic, quantize_static

    src, dst = model_dir / "model.onnx", out / "model.onnx"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    res = {"cmd": f"onnxruntime.quantization.{'quantize_static(model, out, calib reader)' if kind == 'ort-static' else 'quantize_dynamic(model, out)'}"}
    try:
        if kind == "ort-static":
            shapes = {i.name: i.shape for i in ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).get_inputs()}
            calib = dict(np.load(model_dir / "calib.npz"))

            class Reader(CalibrationDataReader):
                def __init__(self):
                    n = len(next(iter(calib.values())))
                    self.it = iter([{k: calib[k][i].reshape(s) for k, s in shapes.items()} for i in range(n)])

                def get_next(self):
                    return next(self.it, None)

            quantize_static(str(src), str(dst), Reader())
        else:
            quantize_dynamic(str(src), str(dst))
        res.update(exit=0, model=str(dst), onnx_bytes=dst.stat().st_size)
    except Exception as e:  # noqa: BLE001 - a quantizer that fails is a table cell
        res.update(exit="error", error=f"{type(e).__name__}: {str(e)[:200]}")
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    return res


def fmt_metric(v) -> str:
    if v is None:
        return "—"
    return f"{v:.4f}" if 0 < abs(v) < 0.01 else f"{v:.3f}"


def render(results: dict, cpu: str) -> str:
    lines = [
        "# Real pretrained models: the CLI's defaults and onnxruntime's quantizers",
        "",
        f"Measured by `bench/real_models.py` on {cpu} (one onnxruntime thread for scoring). Models, data and metrics: "
        "`models/real_suite.py`, `models/README.md` (\"Real pretrained models\"). Every CLI run is the default command with "
        "`--calib calib.npz --eval eval.npz --no-compile` plus the flags shown; exit 3 = accuracy gate failed (bundle written). "
        "task = the model's task metric against ground truth (↑ higher is better, ↓ lower); agree = agreement with the dense "
        "model (1.000 = identical decisions; for minilm the mean cosine). Size: `model.onnx` on disk (stored: the bundle's "
        "sparse weight storage, where there is one).",
        "",
        "| model | config | exit | task | agree | onnx MB | stored MB | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, rows in results.items():
        spec = rs.SUITE[name]
        arrow = "↑" if spec.higher_is_better else "↓"
        for cfg, r in rows.items():
            m = r.get("metric") or {}
            task = m.get(spec.task_metric)
            agree = m.get(spec.agree_metric)
            stored = f"{r['stored_bytes'] / 1e6:.2f}" if r.get("stored_bytes") else ""
            size = f"{r['onnx_bytes'] / 1e6:.2f}" if r.get("onnx_bytes") else "—"
            ex = r.get("exit", "")
            if r.get("error"):
                ex = f"{ex}: {r['error'][:80]}"
            lines.append(f"| {name} | {cfg} | {ex} | {spec.task_metric} {arrow} {fmt_metric(task)} | {fmt_metric(agree)} | {size} | {stored} | {r.get('wall_s', '')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", action="append", choices=sorted(rs.SUITE))
    ap.add_argument("--configs", default=",".join([*CONFIGS, *ORT_CONFIGS]))
    ap.add_argument("--cache", type=Path, default=rs.DEFAULT_CACHE)
    ap.add_argument("--work", type=Path, default=None, help="where bundles go (default: a temp folder)")
    ap.add_argument("--results", type=Path, default=None, help="JSON with every figure (also resumes: done cells are kept)")
    ap.add_argument("--out", type=Path, default=None, help="write the Markdown table here")
    ap.add_argument("--timeout", type=int, default=1200)
    a = ap.parse_args(argv)
    work = a.work or Path(tempfile.mkdtemp(prefix="real_models_"))
    results: dict = json.loads(a.results.read_text()) if a.results and a.results.exists() else {}
    cpu = host_cpu()
    configs = [c for c in a.configs.split(",") if c]
    for name in a.only or list(rs.SUITE):
        try:
            d = rs.ensure_built(name, a.cache)
        except rs.ModelUnavailable as e:
            print(f"{name}: unavailable: {e}", flush=True)
            continue
        rows = results.setdefault(name, {})
        if "dense" not in rows:
            meta = json.loads((d / "meta.json").read_text())
            rows["dense"] = {"exit": "", "onnx_bytes": meta["onnx_bytes"], "metric": rs.score(name, d / "model.onnx", a.cache)}
        for cfg in configs:
            if cfg in rows and "metric" in rows[cfg]:
                continue
            out = work / f"{name}.{cfg.replace(':', '_')}"
            r = run_ort(cfg, d, out) if cfg in ORT_CONFIGS else run_cli(d, CONFIGS[cfg], out, a.timeout)
            if r.get("model"):
                try:
                    r["metric"] = rs.score(name, r["model"], a.cache)
                except Exception as e:  # noqa: BLE001 - a model that does not run is a table cell
                    r["error"] = f"scoring: {type(e).__name__}: {str(e)[:200]}"
            rows[cfg] = r
            print(f"{name} {cfg}: exit {r.get('exit')} {json.dumps(r.get('metric', {}))} {r.get('error', '')}", flush=True)
            if a.results:
                a.results.write_text(json.dumps(results, indent=1))
    md = render(results, cpu)
    print(md)
    if a.out:
        a.out.write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
