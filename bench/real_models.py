"""The real-model suite (models/real_suite.py): the CLI (one-shot, search, fine-tuning) beside onnxruntime's
quantizers and one-shot pruning baselines.

    .venv/bin/python bench/real_models.py [--only NAME] [--configs int8,sp50,...] [--out bench/real_models.md]
                                          [--results results.json] [--cache DIR] [--timeout 1200]

For each pretrained model of the suite (built and cached with ``models.real_suite.ensure_built``), the matrix
{int8, 50% unstructured, 2:4, structured 20%} x {one-shot, search, fine-tune} plus baselines:

  dense            the model itself (task metric against ground truth; agreement 1.0 by definition)
  int8             compress MODEL --calib calib.npz --eval eval.npz --no-compile --quantize int8 --search-budget 0
  sp50             ... --sparsity 0.5 --search-budget 0
  sp50-2:4         ... --sparsity 0.5 --pattern 2:4 --search-budget 0
  struct20         ... --structured 0.2 --search-budget 0
  <base>+search    the base flags alone: the accuracy search is on by default (budget 12)
  <base>+ft        the base flags + --finetune calib.npz (search on); int8+ft is n/a (nothing pruned to recover)
  magnitude50      --sparsity 0.5 --method magnitude --allocation uniform --search-budget 0
  wanda50          --sparsity 0.5 --method wanda --allocation uniform --search-budget 0
  sparsegpt50-dw   --sparsity 0.5 --method obs --allocation uniform --search-budget 0 + --ignore on each depthwise Conv
  tp-struct20      Torch-Pruning MagnitudePruner (L1), 20% of channels per layer, one-shot, via onnx2torch
                   (bench/torch_pruning_baseline.py)
  ort-static       onnxruntime.quantization.quantize_static(model, out, reader over calib.npz), defaults
  ort-dynamic      onnxruntime.quantization.quantize_dynamic(model, out), defaults

Every CLI run is a subprocess with the command plus ``--calib`` / ``--eval``, ``--no-compile``, ``--force`` and a
fresh ``-o``; its exit code is recorded (3 = the accuracy gate failed, the bundle is still written) and the
bundle's ``model.onnx`` is scored with the suite's metric on eval.npz (onnxruntime, optimizations off, one
thread). ``report.json`` gives the whole-model sparsity, the search's rounds / reverted / halved layers and the
fine-tuning pass's before/after figures. Size: ``model.onnx`` on disk and, where the bundle stores sparse weights
(``report.json`` ``sparse_storage``), the stored bytes. Latency: onnxruntime CPU, one intra-op thread,
ORT_ENABLE_ALL, the first eval sample, the row's model and the dense model interleaved (warm-up, then the median
of up to 30 runs each, about 3 s per row); the ratio row / dense is what the table shows (lower is faster).
"""
from __future__ import annotations

import argparse
import glob
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

BASE: dict[str, list[str]] = {
    "int8": ["--quantize", "int8"],
    "sp50": ["--sparsity", "0.5"],
    "sp50-2:4": ["--sparsity", "0.5", "--pattern", "2:4"],
    "struct20": ["--structured", "0.2"],
}
ONE_SHOT = ["--search-budget", "0"]
CONFIGS: dict[str, list[str]] = {}
for _b, _f in BASE.items():
    CONFIGS[_b] = [*_f, *ONE_SHOT]          # the tool's one-shot default
    CONFIGS[f"{_b}+search"] = list(_f)      # the search is on by default (budget 12)
    CONFIGS[f"{_b}+ft"] = [*_f, "--finetune", "{calib}"]  # {calib}: the model's calib.npz
CONFIGS.update({
    "magnitude50": ["--sparsity", "0.5", "--method", "magnitude", "--allocation", "uniform", *ONE_SHOT],
    "wanda50": ["--sparsity", "0.5", "--method", "wanda", "--allocation", "uniform", *ONE_SHOT],
    "sparsegpt50-dw": ["--sparsity", "0.5", "--method", "sparsegpt", "--allocation", "uniform", *ONE_SHOT, "{ignore_depthwise}"],
})
NOT_APPLICABLE = {"int8+ft": "finetune recovers pruned weights; int8 has none"}
for _c in NOT_APPLICABLE:
    CONFIGS.pop(_c, None)
ORT_CONFIGS = ["ort-static", "ort-dynamic"]
TP_CONFIGS = {"tp-struct20": 0.2}
DEFAULT_CONFIGS = [
    "int8", "int8+search", "ort-static", "ort-dynamic",
    "sp50", "sp50+search", "sp50+ft", "magnitude50", "wanda50", "sparsegpt50-dw",
    "sp50-2:4", "sp50-2:4+search", "sp50-2:4+ft",
    "struct20", "struct20+search", "struct20+ft", "tp-struct20",
    "int8+ft",
]
ALL_CONFIGS = [*CONFIGS, *ORT_CONFIGS, *TP_CONFIGS]

LEGEND = [
    ("int8 / sp50 / sp50-2:4 / struct20", "the tool's one-shot default for `--quantize int8` / `--sparsity 0.5` / "
     "`--sparsity 0.5 --pattern 2:4` / `--structured 0.2`, with `--search-budget 0` (no accuracy search)"),
    ("+search", "the same flags with the accuracy search on (the default, budget 12 verification rounds): when the "
     "one-shot result fails the gate, the weights causing most error are reverted / half given back"),
    ("+ft", "the same flags + `--finetune calib.npz` (distillation from the dense model on the calibration inputs: "
     "at least 100 optimizer steps, 1/8 of the samples held out to keep the best epoch; search on). int8+ft is n/a: "
     "fine-tuning recovers pruned weights, int8 has none"),
    ("magnitude50 / wanda50", "`--sparsity 0.5 --method magnitude|wanda --allocation uniform --search-budget 0`: the "
     "textbook one-shot baselines, every prunable layer at 50%"),
    ("sparsegpt50-dw", "`--sparsity 0.5 --method sparsegpt --allocation uniform --search-budget 0` (plain SparseGPT: "
     "OBS masks and updates) with every depthwise Conv kept dense (`--ignore`); the depthwise column says how many"),
    ("tp-struct20", "Torch-Pruning 1.6 `MagnitudePruner` (L1 importance), 20% of the channels of every layer, one "
     "step, no fine-tuning; the ONNX model goes through onnx2torch and back (`bench/torch_pruning_baseline.py`)"),
    ("ort-static / ort-dynamic", "onnxruntime.quantization `quantize_static` (calib.npz reader) / `quantize_dynamic`, "
     "defaults"),
]
NOTES = [
    "onnxsim (onnx-simplifier) folds constants and removes redundant nodes; it never removes weights or channels, "
    "so it is not a pruning baseline and has no row (the CLI's cleanup passes do the same folding).",
    "Torch-Pruning prunes `torch.nn.Module`s and these models ship as ONNX only: tp-struct20 converts them with "
    "onnx2torch (after folding Paddle's Conv + Add(bias) into Conv biases), prunes, and exports back with the same "
    "I/O names. A model that onnx2torch or Torch-Pruning's dependency graph cannot handle gets an error cell.",
]


def host_isa() -> str:
    try:
        flags: set[str] = set()
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        return platform.machine()
    have = [f for f in ("avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "avx2", "fma", "avx_vnni", "asimd", "sve")
            if f in flags]
    return f"{platform.machine()} ({', '.join(have) or 'no avx2/avx512'})"


def depthwise_convs(model_path: Path) -> list[str]:
    """Names (as the CLI's load stage names them) of the Conv nodes with group > 1 and one input channel per group."""
    import onnx

    from compressor.ir import name_nodes

    m = onnx.load(str(model_path))
    name_nodes(m)  # unnamed nodes get the names the CLI gives them (<op>_<k>, same order)
    shapes = {t.name: list(t.dims) for t in m.graph.initializer}
    for n in m.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            shapes[n.output[0]] = list(n.attribute[0].t.dims)
    out = []
    for n in m.graph.node:
        if n.op_type != "Conv" or len(n.input) < 2:
            continue
        group = next((a.i for a in n.attribute if a.name == "group"), 1)
        w = shapes.get(n.input[1])
        if group > 1 and w is not None and len(w) > 1 and w[1] == 1:
            out.append(n.name)
    return out


def cli_flags(cfg: str, model_dir: Path) -> list[str]:
    flags = []
    for f in CONFIGS[cfg]:
        if f == "{calib}":
            flags.append(str(model_dir / "calib.npz"))
        elif f == "{ignore_depthwise}":
            for name in depthwise_convs(model_dir / "model.onnx"):
                flags += ["--ignore", glob.escape(name)]  # globs: [ ] * ? in a name match literally
        else:
            flags.append(f)
    return flags


def weight_zeros(model_path: Path) -> dict:
    """Params / zeros over the float and 8-bit tensors (initializers and Constant nodes, scalars left out)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(model_path))
    kinds = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
    tensors = list(m.graph.initializer) + [n.attribute[0].t for n in m.graph.node
                                            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"]
    params = zeros = 0
    for t in tensors:
        if t.data_type in kinds and len(t.dims) >= 1:
            a = numpy_helper.to_array(t)
            if a.size > 1:
                params += a.size
                zeros += int(a.size - np.count_nonzero(a))
    return {"params": params, "sparsity": round(zeros / params, 4) if params else 0.0}


def latency_pair(dense: Path, cand: Path, feed: dict, runs: int = 30, budget_s: float = 3.0) -> dict:
    """Median latency of ``cand`` and ``dense`` (one intra-op thread, ORT_ENABLE_ALL), interleaved run by run."""
    import numpy as np
    import onnxruntime as ort

    def sess(p):
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        return ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])

    sd, sc = sess(dense), sess(cand)
    fd = {i.name: feed[i.name].reshape(i.shape).astype(feed[i.name].dtype) for i in sd.get_inputs()}
    fc = {i.name: feed[i.name].reshape(i.shape) for i in sc.get_inputs()}
    for _ in range(3):
        sd.run(None, fd)
        sc.run(None, fc)
    td, tc = [], []
    t_end = time.perf_counter() + budget_s
    while len(tc) < runs and (len(tc) < 5 or time.perf_counter() < t_end):
        t0 = time.perf_counter()
        sd.run(None, fd)
        t1 = time.perf_counter()
        sc.run(None, fc)
        t2 = time.perf_counter()
        td.append(t1 - t0)
        tc.append(t2 - t1)
    md, mc = float(np.median(td)), float(np.median(tc))
    return {"latency_ms": round(mc * 1e3, 4), "dense_latency_ms": round(md * 1e3, 4), "latency_ratio": round(mc / md, 3),
            "latency_runs": len(tc)}


def first_eval_sample(model_dir: Path) -> dict:
    import numpy as np

    ev = np.load(model_dir / "eval.npz")
    return {k: ev[k][0] for k in ev.files if k != "labels"}


def host_cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} logical CPUs"
    except OSError:
        pass
    return platform.processor() or "unknown"


def read_report(rep: dict) -> dict:
    """The figures of a bundle's report.json the table shows."""
    res: dict = {"status": rep.get("status"), "warnings": len(rep.get("warnings", []))}
    st = rep.get("sparse_storage") or {}
    if st.get("stored_bytes"):
        res["stored_bytes"] = int(st["stored_bytes"])
    stats = rep.get("stats") or {}
    comp, orig = stats.get("compressed") or {}, stats.get("original") or {}
    if comp:
        res["sparsity"] = comp.get("sparsity")
        if orig.get("params"):
            res["params_ratio"] = round(comp["params"] / orig["params"], 4)
    res["ignored_dense"] = sum(1 for w in rep.get("warnings", []) if "ignored by pattern, kept dense" in w)
    s = rep.get("search")
    if s:
        res["search"] = {"passed": s.get("passed"), "rounds": s.get("rounds"), "budget": s.get("budget"),
                         "reverted": len(s.get("reverted") or []), "halved": len(s.get("halved") or []),
                         "zeros_before": s.get("zeros_before"), "zeros_after": s.get("zeros_after"),
                         "error_before": s.get("error_before"), "error_after": s.get("error_after"),
                         "unsearchable": len(s.get("unsearchable") or [])}
    for pr in rep.get("passes", []):
        if pr.get("name") == "finetune.distill":
            fs = pr.get("stats") or {}
            res["finetune"] = {k: fs[k] for k in ("samples", "epochs", "seconds", "loss_before", "loss_after", "agreement_before",
                                                   "agreement_after", "accuracy_before", "accuracy_after", "restored",
                                                   "batched") if k in fs}
    failures = (rep.get("gate") or {}).get("failures") or []
    if failures:
        res["gate_failures"] = [str(f)[:160] for f in failures[:3]]
    return res


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
    shown = [f.replace(str(model_dir) + os.sep, "") for f in flags]
    res = {"exit": rc, "wall_s": round(time.perf_counter() - t0, 1),
           "cmd": " ".join(["compress", "MODEL", "--calib", "calib.npz", "--eval", "eval.npz", "--no-compile", *shown])}
    if rc not in (0, 3):
        res["error"] = err[-300:]
    if (out / "model.onnx").exists():
        res["model"] = str(out / "model.onnx")
        res["onnx_bytes"] = (out / "model.onnx").stat().st_size
        try:
            res.update(read_report(json.loads((out / "report.json").read_text())))
        except (OSError, ValueError):
            pass
    return res


def run_tp(ratio: float, model_dir: Path, out: Path) -> dict:
    """Torch-Pruning's one-shot channel pruning (bench/torch_pruning_baseline.py); a failure is an error cell."""
    t0 = time.perf_counter()
    dst = out / "model.onnx"
    res: dict = {"cmd": f"torch_pruning MagnitudePruner(L1, pruning_ratio={ratio}) via onnx2torch"}
    try:
        import onnx

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from torch_pruning_baseline import prune_onnx

        m = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)
        shapes = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in m.graph.input}
        sample = {k: v.reshape(shapes[k]) for k, v in first_eval_sample(model_dir).items() if k in shapes}
        info = prune_onnx(model_dir / "model.onnx", dst, ratio, sample)
        res.update(exit=0, model=str(dst), onnx_bytes=dst.stat().st_size, tp=info,
                   params_ratio=info["param_ratio"])
    except Exception as e:  # noqa: BLE001 - a baseline that does not apply is a table cell
        res.update(exit="error", error=f"{type(e).__name__}: {str(e)[:200]}")
    res["wall_s"] = round(time.perf_counter() - t0, 1)
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


def _search_cell(cfg: str, r: dict) -> str:
    se = r.get("search")
    if not se:
        return "not run (one-shot passed the gate)" if cfg.endswith(("+search", "+ft")) and r.get("exit") == 0 else ""
    if not se.get("budget"):
        return "off (budget 0)"
    ok = "pass" if se.get("passed") else "fail"
    z = ""
    if se.get("zeros_before") is not None and se.get("zeros_after") is not None:
        z = f", zeros {se['zeros_before']:.2f}→{se['zeros_after']:.2f}"
    return f"{se.get('rounds')}/{se.get('budget')} rounds, {se.get('reverted')} reverted, {se.get('halved')} halved, {ok}{z}"


def _ft_cell(r: dict) -> str:
    ft = r.get("finetune")
    if not ft:
        return ""
    parts = []
    for k in ("agreement", "accuracy"):
        if f"{k}_before" in ft:
            parts.append(f"{k[:5]} {ft[f'{k}_before']:.3f}→{ft[f'{k}_after']:.3f}")
    if "loss_before" in ft:
        parts.append(f"loss {ft['loss_before']:.3g}→{ft['loss_after']:.3g}")
    if ft.get("restored"):
        parts.append("restored")
    if "seconds" in ft:
        parts.append(f"{ft['seconds']:.0f} s")
    return ", ".join(parts)


def render(results: dict, cpu: str, isa: str = "") -> str:
    lines = [
        "# Real pretrained models: the CLI (one-shot, search, fine-tuning) beside onnxruntime's quantizers and pruning baselines",
        "",
        f"Measured by `bench/real_models.py` on {cpu}{f', {isa}' if isa else ''} (one onnxruntime thread for scoring and "
        "latency). Models, data and metrics: `models/real_suite.py`, `models/README.md` (\"Real pretrained models\"). Every CLI "
        "run is the command with `--calib calib.npz --eval eval.npz --no-compile` plus the flags of its config; exit 3 = "
        "accuracy gate failed (bundle written). task = the model's task metric against ground truth (↑ higher is better, "
        "↓ lower); agree = agreement with the dense model (1.000 = identical decisions; for minilm the mean cosine). "
        "Size: `model.onnx` on disk (stored: the bundle's sparse weight storage, where there is one). zeros = whole-model "
        "fraction of zero weights (report.json `stats`, else counted in the ONNX file; for int8 rows zeros are weights "
        "that quantize to 0); params = parameters vs dense (structured rows only). latency = median onnxruntime CPU time of the row's model.onnx / the dense model's, measured "
        "interleaved in the same run (1 intra-op thread, ORT_ENABLE_ALL, first eval sample; lower is faster; the dense row is "
        "the dense model against itself: the measurement's noise). search = the "
        "accuracy search's verification rounds / budget, layers fully reverted and half given back, whether the gate "
        "passed, zeros before→after. finetune = the finetune.distill pass on calib.npz: agreement / accuracy with the dense "
        "model and distillation loss before→after (on the fine-tuning data itself).",
        "",
        "Configs:",
        "",
        *[f"- **{k}**: {v}" for k, v in LEGEND],
        "",
        "Notes:",
        "",
        *[f"- {n}" for n in NOTES],
        "",
    ]
    header = ("| model | config | exit | task | agree | onnx MB | stored MB | zeros | params | latency ×dense | wall s | search | finetune |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, rows in results.items():
        spec = rs.SUITE[name]
        arrow = "↑" if spec.higher_is_better else "↓"
        dense_ms = (rows.get("dense") or {}).get("latency_ms")
        lines += [f"## {name}", "", f"{spec.family}; task metric {spec.task_metric} {arrow}, agreement {spec.agree_metric}"
                  + (f"; dense latency {dense_ms:.3f} ms" if dense_ms else "") + ".", "", *header]
        order = [c for c in ["dense", *DEFAULT_CONFIGS] if c in rows] + [c for c in rows if c not in ["dense", *DEFAULT_CONFIGS]]
        for cfg in order:
            r = rows[cfg]
            m = r.get("metric") or {}
            task = m.get(spec.task_metric)
            agree = m.get(spec.agree_metric)
            stored = f"{r['stored_bytes'] / 1e6:.3f}" if r.get("stored_bytes") else ""
            size = f"{r['onnx_bytes'] / 1e6:.3f}" if r.get("onnx_bytes") else "—"
            ex = r.get("exit", "")
            if r.get("error"):
                ex = f"{ex}: {r['error'][:80]}"
            elif r.get("note"):
                ex = f"{ex}: {r['note']}"
            zeros = f"{r['sparsity']:.3f}" if r.get("sparsity") is not None else ""
            structured = cfg == "dense" or cfg.startswith(("struct", "tp-"))
            params = f"{r['params_ratio']:.3f}" if structured and r.get("params_ratio") is not None else ""
            if cfg == "sparsegpt50-dw" and "ignored_dense" in r:
                ex = f"{ex} ({r['ignored_dense']}/{r.get('depthwise', '?')} depthwise kept dense)"
            lat = f"{r['latency_ratio']:.2f}" if r.get("latency_ratio") is not None else ""
            task_s = "—" if r.get("exit") == "n/a" else f"{fmt_metric(task)}"
            agree_s = "—" if r.get("exit") == "n/a" else fmt_metric(agree)
            lines.append(f"| {name} | {cfg} | {ex} | {task_s} | {agree_s} | {size} | {stored} | {zeros} | {params} | {lat} | "
                         f"{r.get('wall_s', '')} | {_search_cell(cfg, r)} | {_ft_cell(r)} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def _done(r: dict | None) -> bool:
    return bool(r) and ("metric" in r or r.get("exit") == "n/a")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", action="append", choices=sorted(rs.SUITE))
    ap.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                    help=f"comma-separated, from: {', '.join([*ALL_CONFIGS, *NOT_APPLICABLE])}")
    ap.add_argument("--cache", type=Path, default=rs.DEFAULT_CACHE)
    ap.add_argument("--work", type=Path, default=None, help="where bundles go (default: a temp folder)")
    ap.add_argument("--results", type=Path, default=None, help="JSON with every figure (also resumes: done cells are kept)")
    ap.add_argument("--out", type=Path, default=None, help="write the Markdown table here")
    ap.add_argument("--timeout", type=int, default=1200)
    ap.add_argument("--latency-s", type=float, default=3.0, help="time budget of one row's latency measurement")
    a = ap.parse_args(argv)
    configs = [c for c in a.configs.split(",") if c]
    unknown = [c for c in configs if c not in ALL_CONFIGS and c not in NOT_APPLICABLE]
    if unknown:
        ap.error(f"unknown config(s) {unknown}; known: {', '.join([*ALL_CONFIGS, *NOT_APPLICABLE])}")
    work = a.work or Path(tempfile.mkdtemp(prefix="real_models_"))
    results: dict = json.loads(a.results.read_text()) if a.results and a.results.exists() else {}
    cpu, isa = host_cpu(), host_isa()

    def save():
        if a.results:
            a.results.write_text(json.dumps(results, indent=1))

    for name in a.only or list(rs.SUITE):
        try:
            d = rs.ensure_built(name, a.cache)
        except rs.ModelUnavailable as e:
            print(f"{name}: unavailable: {e}", flush=True)
            continue
        rows = results.setdefault(name, {})
        dense_path = d / "model.onnx"
        feed = first_eval_sample(d)
        if "dense" not in rows:
            meta = json.loads((d / "meta.json").read_text())
            rows["dense"] = {"exit": "", "onnx_bytes": meta["onnx_bytes"], "metric": rs.score(name, dense_path, a.cache),
                             **weight_zeros(dense_path)}
            rows["dense"]["params_ratio"] = 1.0
        if any(not _done(rows.get(c)) for c in configs) or "latency_ms" not in rows["dense"]:
            lat = latency_pair(dense_path, dense_path, feed, budget_s=a.latency_s)  # dense vs itself: noise floor
            rows["dense"].update(latency_ms=lat["dense_latency_ms"], latency_ratio=lat["latency_ratio"],
                                 latency_host=f"{cpu}, {isa}")
        # the default command (+search) first: when its one-shot result passed the gate no search ran, and
        # the one-shot cell (--search-budget 0) is that same run -- not measured twice
        order = sorted(configs, key=lambda c: 0 if c.endswith("+search") else 1)
        for cfg in order:
            if cfg in BASE and not _done(rows.get(cfg)):
                twin = rows.get(f"{cfg}+search")
                if _done(twin) and twin.get("exit") == 0 and not twin.get("search"):
                    rows[cfg] = {**twin, "note": "same run as +search: the one-shot result passed the gate, no search ran",
                                 "cmd": twin.get("cmd", "") + " (one-shot passed: = --search-budget 0)"}
                    save()
                    continue
            if _done(rows.get(cfg)):
                r = rows[cfg]
                if r.get("model") and "latency_ratio" not in r and Path(r["model"]).exists():  # a cell from before latency
                    r.update(latency_pair(dense_path, Path(r["model"]), feed, budget_s=a.latency_s), latency_host=f"{cpu}, {isa}")
                    save()
                continue
            if cfg in NOT_APPLICABLE:
                rows[cfg] = {"exit": "n/a", "note": NOT_APPLICABLE[cfg]}
                save()
                continue
            out = work / f"{name}.{cfg.replace(':', '_').replace('+', '_')}"
            if cfg in ORT_CONFIGS:
                r = run_ort(cfg, d, out)
            elif cfg in TP_CONFIGS:
                r = run_tp(TP_CONFIGS[cfg], d, out)
            else:
                flags = cli_flags(cfg, d)
                r = run_cli(d, flags, out, a.timeout)
                if cfg == "sparsegpt50-dw":
                    r["depthwise"] = flags.count("--ignore")
            if r.get("model"):
                try:
                    r["metric"] = rs.score(name, r["model"], a.cache)
                except Exception as e:  # noqa: BLE001 - a model that does not run is a table cell
                    r["error"] = f"scoring: {type(e).__name__}: {str(e)[:200]}"
                if "sparsity" not in r:
                    try:
                        r["sparsity"] = weight_zeros(Path(r["model"]))["sparsity"]
                    except Exception:  # noqa: BLE001
                        pass
                if "metric" in r:
                    try:
                        r.update(latency_pair(dense_path, Path(r["model"]), feed, budget_s=a.latency_s))
                        r["latency_host"] = f"{cpu}, {isa}"
                    except Exception as e:  # noqa: BLE001
                        r["latency_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            rows[cfg] = r
            print(f"{name} {cfg}: exit {r.get('exit')} {json.dumps(r.get('metric', {}))} "
                  f"latency x{r.get('latency_ratio', '?')} {r.get('error', '')}", flush=True)
            save()
        save()
    md = render(results, cpu, isa)
    print(md)
    if a.out:
        a.out.write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
