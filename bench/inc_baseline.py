"""Baseline: Intel Neural Compressor's accuracy-aware post-training static int8 tuning on the real-model suite.

Runs INC 2.x ``neural_compressor.quantization.fit`` (``PostTrainingQuantConfig`` + ``AccuracyCriterion`` +
``TuningCriterion(strategy="basic")``, onnxruntime backend) on each model of ``models/real_suite.py``, with

* calibration: the model's ``calib.npz`` (all 128 samples, batch 1, fed as ``{input name: array}`` exactly like
  ``bench/real_models.py``'s ``run_ort`` feeds ``quantize_static``);
* ``eval_func``: the suite's task metric on ``eval.npz`` (``SUITE[name].metric`` on onnxruntime outputs, one thread,
  optimizations off; the same computation as ``rs.score``). The scalar INC tunes against is
  ``SUITE[name].task_metric``: ``accuracy`` (ppocr_cls, magika), ``frame_accuracy`` (silero_vad), ``cer`` (ppocr_rec,
  lower is better), ``nn_agreement`` (minilm: nearest-neighbour agreement of the embeddings with the dense model's,
  1.0 for the dense model). ``--metric NAME=KEY`` picks another key of the metric dict (e.g. ``minilm=cosine``);
* accuracy criterion: ``AccuracyCriterion(criterion="absolute", tolerable_loss=0.01)`` by default, i.e. at most
  1 point (0.01) worse than the fp32 model on that metric -- the same budget as the CLI's ``--max-accuracy-drop 0.01``
  (for minilm with ``cosine`` it equals the CLI's ``--min-cosine 0.99``). INC's check is strict (``>`` / ``<`` the
  target). ``--criterion relative`` switches to INC's default relative criterion;
* strategy: ``basic`` with ``quant_level=1`` (INC's default ``quant_level="auto"`` would run the "auto" strategy,
  conservative then basic; ``--quant-level auto`` gives that), ``timeout=0`` (INC's default: stop at the first
  config that meets the criterion), ``max_trials`` 50 (``--max-trials``). The wall-clock limit ``--timeout`` is
  enforced by running each model in a child process that is killed when it runs over (INC's own ``timeout`` would
  change its exit policy to "keep tuning until the timeout").

Recorded per model: whether a model meeting the criterion was found, the number of tuning trials (evaluations of a
quantized model; INC's own "Tune N" counter beside it), the wall seconds of ``fit`` (calibration + all trials, the
fp32 baseline evaluation included), the task metric before / after (``rs.score`` of the dense file and of the saved
int8 file), model sizes on disk, and the op types of the int8 model (which ops INC quantized, which stayed fp32).

Setup (a separate venv; INC 2.6 needs older onnx / onnxruntime / numpy than the project's .venv)::

    python3.11 -m venv /tmp/inc2venv
    /tmp/inc2venv/bin/pip install "neural-compressor==2.6" "onnx==1.16.2" "onnxruntime==1.18.1" "numpy<2" \\
        "scipy==1.13.1" "pandas<2.3" "scikit-learn<1.6" six

Run (from the repo root; models are built / cached by the project's venv: ``.venv/bin/python -m models.real_suite
build``; this script only needs numpy / onnx / onnxruntime from ``models.real_suite``)::

    /tmp/inc2venv/bin/python bench/inc_baseline.py [--only NAME ...] [--out bench/inc_baseline.md]
        [--results inc_baseline.json] [--timeout 900] [--max-trials 50] [--work /tmp/inc_baseline]
"""
from __future__ import annotations

import argparse
import collections
import json
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from models import real_suite as rs  # noqa: E402

# op types of an int8 QOperator / QDQ graph (onnxruntime contrib + standard ops)
INT8_OPS = re.compile(r"^(QLinear.*|.*Integer|QuantizeLinear|DequantizeLinear|DynamicQuantize.*|QAttention|QGemm|QEmbedLayerNormalization)$")


def versions() -> dict:
    out = {"python": platform.python_version()}
    for mod in ("neural_compressor", "onnx", "onnxruntime", "numpy"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001
            out[mod] = f"unavailable: {type(e).__name__}: {e}"
    return out


def metric_key(name: str, overrides: dict) -> tuple[str, bool]:
    spec = rs.SUITE[name]
    key = overrides.get(name, spec.task_metric)
    if key == spec.task_metric:
        return key, spec.higher_is_better
    return key, not key.startswith(("cer", "mean_abs"))


def op_counts(path: Path) -> dict:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return dict(collections.Counter(n.op_type for n in m.graph.node))


def meets(after: float, before: float, higher: bool, criterion: str, tol: float) -> bool:
    """INC's rule (objective.py: strict comparison with the target)."""
    if criterion == "relative":
        target = before * (1 - tol) if higher else before * (1 + tol)
    else:
        target = before - tol if higher else before + tol
    return after > target if higher else after < target


# ---------------------------------------------------------------------------------------------------
# child: one model, in its own process
# ---------------------------------------------------------------------------------------------------
def tune_one(name: str, a: argparse.Namespace) -> dict:
    import numpy as np
    import onnxruntime as ort
    from neural_compressor import PostTrainingQuantConfig, quantization, set_workspace
    from neural_compressor.config import AccuracyCriterion, TuningCriterion

    d = rs.ensure_built(name, a.cache)
    src = d / "model.onnx"
    work = a.work / name
    work.mkdir(parents=True, exist_ok=True)
    dst = work / "model.onnx"
    if dst.exists():
        dst.unlink()
    progress = work / "progress.jsonl"
    progress.write_text("")
    set_workspace(str(work / "nc_workspace"))  # INC's history / deploy yaml (default: ./nc_workspace in the cwd)
    spec = rs.SUITE[name]
    key, higher = metric_key(name, a.metric)

    shapes = {i.name: i.shape for i in ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).get_inputs()}
    calib = dict(np.load(d / "calib.npz"))
    n_calib = len(next(iter(calib.values())))

    class CalibLoader:
        """INC's calib_dataloader protocol: ``batch_size`` + iteration over ``(inputs, label)``; inputs a dict."""
        batch_size = 1

        def __iter__(self):
            for i in range(n_calib):
                yield {k: calib[k][i].reshape(s) for k, s in shapes.items()}, 0

    ev = rs.load_eval(name, a.cache)
    evals: list[dict] = []
    t_fit = [0.0]

    def eval_func(model) -> float:
        t = time.perf_counter()
        m = spec.metric(rs.run_onnx(model, ev["inputs"]), ev)
        rec = {"i": len(evals), "value": m[key], "metric": m, "eval_s": round(time.perf_counter() - t, 2),
               "at_s": round(time.perf_counter() - t_fit[0], 1)}
        evals.append(rec)
        with progress.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        print(f"[inc_baseline] {name} eval {rec['i']} ({'fp32 baseline' if rec['i'] == 0 else 'trial'}): {key}={m[key]:.4f}", flush=True)
        return float(m[key])

    conf = PostTrainingQuantConfig(
        approach="static",
        quant_level=a.quant_level,
        calibration_sampling_size=[n_calib],
        accuracy_criterion=AccuracyCriterion(higher_is_better=higher, criterion=a.criterion, tolerable_loss=a.tolerable_loss),
        tuning_criterion=TuningCriterion(strategy=a.strategy, timeout=0, max_trials=a.max_trials),
    )
    res = {"metric_key": key, "higher_is_better": higher, "criterion": f"{a.criterion} {a.tolerable_loss}",
           "strategy": a.strategy, "quant_level": a.quant_level, "max_trials": a.max_trials, "calib_samples": n_calib,
           "onnx_bytes_before": src.stat().st_size, "ops_before": op_counts(src), "versions": versions()}
    res["metric_before"] = rs.score(name, src, a.cache)
    t_fit[0] = time.perf_counter()
    try:
        q = quantization.fit(str(src), conf, calib_dataloader=CalibLoader(), eval_func=eval_func)
    except SystemExit as e:  # INC calls exit(0) on some failures
        q = None
        res["error"] = f"INC called exit({e.code})"
    res["wall_s"] = round(time.perf_counter() - t_fit[0], 1)
    res["evals"] = [{k: r[k] for k in ("i", "value", "eval_s", "at_s")} for r in evals]
    res["trials"] = max(0, len(evals) - 1)
    res["baseline_inc"] = evals[0]["value"] if evals else None
    if q is None:
        res["met"] = False
        tried = [r["value"] for r in evals[1:]]
        if tried:
            res["best_trial_value"] = max(tried) if higher else min(tried)
        return res
    q.save(str(dst))
    res["model"] = str(dst)
    res["onnx_bytes_after"] = dst.stat().st_size
    res["ops_after"] = op_counts(dst)
    res["metric_after"] = rs.score(name, dst, a.cache)
    res["met"] = meets(res["metric_after"][key], res["metric_before"][key], higher, a.criterion, a.tolerable_loss)
    try:  # INC's per-op decision: which ops it kept in fp32 (fallback)
        qc = getattr(q, "q_config", None) or {}
        ops = qc.get("op", {}) if isinstance(qc, dict) else {}
        fb = collections.Counter()
        q8 = collections.Counter()
        for (op_name, op_type), cfg in ops.items():
            dt = (cfg.get("activation") or cfg.get("weight") or {}).get("dtype")
            (fb if dt == "fp32" else q8)[op_type] += 1
        res["inc_op_config"] = {"int8": dict(q8), "fp32": dict(fb)}
    except Exception as e:  # noqa: BLE001
        res["inc_op_config_error"] = f"{type(e).__name__}: {e}"
    return res


# ---------------------------------------------------------------------------------------------------
# parent: a child per model, a hard wall-clock limit, the table
# ---------------------------------------------------------------------------------------------------
def run_child(name: str, a: argparse.Namespace, argv: list[str]) -> dict:
    work = a.work / name
    work.mkdir(parents=True, exist_ok=True)
    out_json, log = work / "result.json", work / "inc.log"
    if out_json.exists():
        out_json.unlink()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", name, "--_result", str(out_json)] + argv
    t0 = time.perf_counter()
    with log.open("w") as lf:
        p = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, cwd=str(work))
        try:
            rc = p.wait(timeout=a.timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            rc = "timeout"
    wall = round(time.perf_counter() - t0, 1)
    if out_json.exists():
        r = json.loads(out_json.read_text())
    else:
        r = {"met": False, "error": f"child exit {rc}" if rc != "timeout" else f"killed after --timeout {a.timeout} s"}
        evals = [json.loads(line) for line in (work / "progress.jsonl").read_text().splitlines()] if (work / "progress.jsonl").exists() else []
        key, higher = metric_key(name, a.metric)
        r.update(metric_key=key, higher_is_better=higher, trials=max(0, len(evals) - 1),
                 evals=[{k: e[k] for k in ("i", "value", "eval_s", "at_s")} for e in evals])
        if evals:
            r["metric_before"] = evals[0]["metric"]
            r["wall_s"] = evals[-1]["at_s"]
            if len(evals) > 1:
                vals = [e["value"] for e in evals[1:]]
                r["best_trial_value"] = max(vals) if higher else min(vals)
        if rc != "timeout":
            tail = log.read_text(errors="replace").strip().splitlines()[-5:]
            r["error"] += ": " + " | ".join(tail)[-600:]
    text = log.read_text(errors="replace") if log.exists() else ""
    tunes = re.findall(r"Tune (\d+) result is", text)
    r["inc_tune_count"] = int(tunes[-1]) if tunes else 0
    r["process_wall_s"] = wall
    r["log"] = str(log)
    return r


def fmt(v) -> str:
    return "—" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))


def int8_summary(r: dict) -> str:
    ops = r.get("ops_after")
    if not ops:
        return ""
    q = {k: v for k, v in ops.items() if INT8_OPS.match(k)}
    f = {k: v for k, v in ops.items() if k in {"Conv", "ConvTranspose", "MatMul", "Gemm", "LSTM", "GRU", "Attention"}}
    s = ", ".join(f"{k} {v}" for k, v in sorted(q.items(), key=lambda x: -x[1]))
    if f:
        s += "; fp32 left: " + ", ".join(f"{k} {v}" for k, v in sorted(f.items(), key=lambda x: -x[1]))
    return s


def render(results: dict, meta: dict) -> str:
    v = meta["versions"]
    lines = [
        "# Intel Neural Compressor baseline: accuracy-aware static int8 tuning on the real-model suite",
        "",
        f"Measured by `bench/inc_baseline.py` with neural-compressor {v.get('neural_compressor')}, onnxruntime "
        f"{v.get('onnxruntime')}, onnx {v.get('onnx')}, numpy {v.get('numpy')} (Python {v.get('python')}) on {meta['cpu']}. "
        f"`quantization.fit` with `PostTrainingQuantConfig(approach=\"static\", quant_level={meta['quant_level']}, "
        f"calibration_sampling_size=[128])`, `TuningCriterion(strategy=\"{meta['strategy']}\", timeout=0, "
        f"max_trials={meta['max_trials']})`, `AccuracyCriterion(criterion=\"{meta['criterion']}\", "
        f"tolerable_loss={meta['tolerable_loss']})`; calibration = calib.npz (128 samples, batch 1); eval_func = the "
        f"suite's metric on eval.npz (the key in the `metric` column; ↑ higher / ↓ lower is better). Wall-clock limit "
        f"per model {meta['timeout']} s (child process killed). trials = quantized models INC evaluated (the fp32 "
        "baseline evaluation not counted); wall = `fit` (calibration, baseline, every trial). before / after = "
        "`rs.score` of the dense file / of INC's saved model; size = model.onnx on disk.",
        "",
        "| model | metric | met | trials | wall s | before | after | agree after | size MB before → after | int8 ops (INC) | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        key = r.get("metric_key", "?")
        arrow = "↑" if r.get("higher_is_better", True) else "↓"
        agree_key = rs.SUITE[name].agree_metric
        before = (r.get("metric_before") or {}).get(key)
        after = (r.get("metric_after") or {}).get(key)
        agree = (r.get("metric_after") or {}).get(agree_key)
        sb, sa = r.get("onnx_bytes_before"), r.get("onnx_bytes_after")
        size = f"{sb / 1e6:.2f} → {sa / 1e6:.2f}" if sb and sa else (f"{sb / 1e6:.2f} → —" if sb else "—")
        wall = "—" if r.get("wall_s") is None else f"{r['wall_s']:.1f}"
        notes = []
        if r.get("error"):
            notes.append(r["error"][:300].replace("|", "/"))
        if after is None and r.get("best_trial_value") is not None:
            notes.append(f"best trial {key} {r['best_trial_value']:.4f}")
        if r.get("inc_tune_count") not in (None, r.get("trials")):
            notes.append(f"INC log 'Tune N' = {r['inc_tune_count']}")
        fb = (r.get("inc_op_config") or {}).get("fp32")
        if fb:
            notes.append("INC kept fp32: " + ", ".join(f"{k} {n}" for k, n in sorted(fb.items(), key=lambda x: -x[1])))
        lines.append(f"| {name} | {key} {arrow} | {'yes' if r.get('met') else 'no'} | {r.get('trials', '—')} | "
                     f"{wall} | {fmt(before)} | {fmt(after)} | {agree_key} {fmt(agree)} | {size} | "
                     f"{int8_summary(r)} | {'; '.join(notes)} |")
    return "\n".join(lines) + "\n"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", action="append", choices=sorted(rs.SUITE), help="run only this model (repeatable)")
    ap.add_argument("--out", type=Path, help="write the Markdown table here")
    ap.add_argument("--results", type=Path, help="write (and merge into) this JSON")
    ap.add_argument("--timeout", type=float, default=900, help="wall-clock limit per model, seconds (default 900)")
    ap.add_argument("--max-trials", type=int, default=50, help="INC TuningCriterion.max_trials (default 50)")
    ap.add_argument("--strategy", default="basic", help="INC tuning strategy (default basic)")
    ap.add_argument("--quant-level", default="1", help="INC quant_level: 1 (use --strategy), 0 (conservative), auto")
    ap.add_argument("--criterion", choices=["absolute", "relative"], default="absolute")
    ap.add_argument("--tolerable-loss", type=float, default=0.01)
    ap.add_argument("--metric", action="append", default=[], metavar="NAME=KEY",
                    help="tune against this key of the metric dict instead of the task metric (e.g. minilm=cosine)")
    ap.add_argument("--cache", type=Path, default=rs.DEFAULT_CACHE)
    ap.add_argument("--work", type=Path, default=Path("/tmp/inc_baseline"), help="quantized models and logs go here")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    ap.add_argument("--_result", type=Path, help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    a = ap.parse_args(argv)
    a.quant_level = a.quant_level if a.quant_level == "auto" else int(a.quant_level)
    a.metric = dict(m.split("=", 1) for m in a.metric)
    # what a child gets: everything but --only/--out/--results/--_child/--_result
    passthrough, skip = [], False
    for i, x in enumerate(argv):
        if skip:
            skip = False
            continue
        if x in ("--only", "--out", "--results", "--_child", "--_result"):
            skip = True
            continue
        if x.split("=", 1)[0] in ("--only", "--out", "--results", "--_child", "--_result"):
            continue
        passthrough.append(x)
    return a, passthrough


def main(argv=None) -> int:
    a, passthrough = parse_args(argv)
    if a._child:
        r = tune_one(a._child, a)
        a._result.write_text(json.dumps(r, indent=1))
        return 0
    try:
        import neural_compressor  # noqa: F401
    except ImportError as e:
        print(f"neural_compressor is not importable with {sys.executable}: {e}\nsee the setup in this file's docstring")
        return 2
    meta = {"versions": versions(), "cpu": cpu_name(), "timeout": a.timeout, "max_trials": a.max_trials, "strategy": a.strategy,
            "quant_level": a.quant_level, "criterion": a.criterion, "tolerable_loss": a.tolerable_loss}
    results: dict = {}
    if a.results and a.results.exists():
        try:
            results = json.loads(a.results.read_text()).get("results", {})
        except ValueError:
            results = {}
    for name in a.only or list(rs.SUITE):
        print(f"== {name}: INC {a.strategy} tuning (limit {a.timeout:.0f} s) ...", flush=True)
        r = run_child(name, a, passthrough)
        results[name] = r
        key = r.get("metric_key")
        print(f"{name}: met={r.get('met')} trials={r.get('trials')} wall={r.get('wall_s')} s "
              f"{key} {fmt((r.get('metric_before') or {}).get(key))} -> {fmt((r.get('metric_after') or {}).get(key))} "
              f"{r.get('error', '')}", flush=True)
        if a.results:
            a.results.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    md = render({k: results[k] for k in rs.SUITE if k in results}, meta)
    print(md)
    if a.out:
        a.out.write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
