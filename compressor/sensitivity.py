"""Per-layer sensitivity to sparsity, and the allocation it drives.

Measurement: for each prunable layer i and each sparsity level s in a grid,
only layer i is masked (with the pass's score and pattern) and the model is run
on calibration samples in onnxruntime. The cost is the relative output error

    err_i(s) = sum_samples,outputs ||y_s - y_dense||^2 / sum ||y_dense||^2

(and, with labels, the task accuracy). One session serves every measurement:
the prunable weights become graph inputs, so each probe feeds a masked weight
instead of rebuilding a model.

Allocation: per-layer sparsities s_i with sum_i s_i n_i = s * sum_i n_i
(n_i = layer size) that minimise sum_i err_i(s_i) (errors assumed additive,
the usual first-order view). Greedy on marginal cost: repeatedly take, over all
layers, the step to a higher grid level with the smallest error increase per
pruned weight (looking ahead over all higher levels so non-convex curves are
handled); the final step is interpolated so the target is met exactly.

``compress analyze MODEL --calib DATA`` prints the curves as a table and
plots them (``sensitivity.png``) with ``sensitivity.json``.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
from onnx import helper

from compressor import ir
from compressor.metrics import rel_error

log = logging.getLogger(__name__)

DEFAULT_LEVELS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98)


@dataclass
class Curve:
    layer: str
    op: str
    numel: int
    levels: list[float]
    errors: list[float]
    accuracy: list[float] | None = None
    excluded: str | None = None  # why the default rules keep it dense (analysis still measures it)

    def error_at(self, s: float) -> float:
        return float(np.interp(s, self.levels, self.errors))

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "op": self.op, "numel": self.numel, "levels": self.levels,
                "errors": self.errors, "accuracy": self.accuracy, "excluded": self.excluded}


def weights_as_inputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """Copy of ``model`` where the named initializers are graph inputs (fed per run)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    keep, moved = [], []
    for init in m.graph.initializer:
        (moved if init.name in names else keep).append(init)
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    for init in moved:
        m.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    return m


def _accuracy(outs: list[list[np.ndarray]], labels: np.ndarray) -> float:
    pred = np.array([int(np.argmax(o[0])) for o in outs])
    return float(np.mean(pred == labels[: len(pred)]))


_SESSIONS: dict[str, Any] = {}  # sweep id -> onnxruntime session (one per worker process, the latest sweep)


def _sweep_session(sweep: str, model_bytes: np.ndarray) -> Any:
    from compressor import runtime

    if sweep not in _SESSIONS:
        _SESSIONS.clear()
        # a Ray worker is granted one CPU per task and says so in OMP_NUM_THREADS: size onnxruntime's pool to it
        # (results do not depend on the thread count: the equality test compares local and Ray bit for bit)
        threads = int(os.environ["OMP_NUM_THREADS"]) if os.environ.get("OMP_NUM_THREADS", "").isdigit() else 0
        _SESSIONS[sweep] = runtime.session(model_bytes.tobytes(), threads=threads)
    return _SESSIONS[sweep]


def _probe(sweep: str, model_bytes: np.ndarray, feeds: list[dict[str, np.ndarray]], dense: dict[str, np.ndarray],
           ref: list[list[np.ndarray]], labels: np.ndarray | None, wname: str, weight: np.ndarray) -> tuple[float, float | None]:
    """One (layer, sparsity) measurement: run every sample with ``wname`` fed as ``weight``.
    A task of the sweep (local or on a Ray worker); the model, samples, dense weights and reference
    outputs are shared objects, only the masked weight travels with the task."""
    sess = _sweep_session(sweep, model_bytes)
    feed_w = {**dense, wname: weight}
    outs = [sess.run(None, {**f, **feed_w}) for f in feeds]
    return rel_error(outs, ref), (_accuracy(outs, labels) if labels is not None else None)


def measure(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], weights: dict[str, tuple[str, str, np.ndarray]],
            masked: Callable[[str, float], np.ndarray], levels: tuple[float, ...] = DEFAULT_LEVELS,
            labels: np.ndarray | None = None, progress: Callable[[str], None] | None = None,
            executor: Any = None, task_progress: Callable[[Any], None] | None = None) -> list[Curve]:
    """Curves for the layers in ``weights`` ({layer: (op, weight name, dense value)}).
    ``masked(layer, s)`` returns that layer's weight pruned to sparsity s.

    Every (layer, s > 0) probe is an independent task of ``executor`` (a
    compressor.executor.Executor; default: in this process). The model (weights
    as inputs), samples, dense weights and reference outputs are put once; masks are
    computed here, lazily, as tasks are handed out. Results do not depend on the
    executor: each probe is the same onnxruntime computation on the same inputs."""
    import uuid

    from compressor.executor import ExecutorError, LocalExecutor

    ex = executor or LocalExecutor()
    wnames = [w for _, w, _ in weights.values()]
    mbytes = np.frombuffer(weights_as_inputs(model, wnames).SerializeToString(), dtype=np.uint8)
    dense = {w: v for _, w, v in weights.values()}
    sweep = uuid.uuid4().hex
    ref = [_sweep_session(sweep, mbytes).run(None, {**f, **dense}) for f in feeds]
    if not isinstance(ex, LocalExecutor):
        _SESSIONS.clear()  # the driver's session is not needed while workers measure
    shared = (sweep, ex.put(mbytes), ex.put(feeds), ex.put(dense), ex.put(ref), ex.put(labels))
    jobs = [(layer, s) for layer in weights for s in levels if s != 0]

    def tasks():
        for layer, s in jobs:
            _, wname, value = weights[layer]
            yield wname, masked(layer, s).astype(value.dtype)

    outcomes = ex.map(_probe, tasks(), shared, label="sensitivity", total=len(jobs), progress=task_progress)
    _SESSIONS.clear()
    failed = [o for o in outcomes if not o.ok]
    if failed:
        first = jobs[failed[0].index]
        raise ExecutorError(f"sensitivity sweep: {len(failed)} of {len(jobs)} probes failed; first ({first[0]} at {first[1]:g}): "
                            f"{failed[0].error}")
    got = {job: o.value for job, o in zip(jobs, outcomes)}
    ref_acc = _accuracy(ref, labels) if labels is not None else None
    curves = []
    for layer, (op, wname, value) in weights.items():
        errs = [0.0 if s == 0 else got[(layer, s)][0] for s in levels]
        accs = [ref_acc if s == 0 else got[(layer, s)][1] for s in levels]
        curves.append(Curve(layer, op, int(value.size), list(map(float, levels)), errs, accs if labels is not None else None))
        if progress:
            progress(f"sensitivity {layer}: " + " ".join(f"{s:g}:{e:.3g}" for s, e in zip(levels, errs)))
    return curves


def allocate(curves: list[Curve], target: float, floor: float = 0.0, ceiling: float = 0.98) -> tuple[dict[str, float], list[str]]:
    """Per-layer sparsity meeting ``target`` over the curves' layers with least summed error."""
    warnings: list[str] = []
    if not curves:
        return {}, warnings
    total = sum(c.numel for c in curves)
    need = target * total
    grids = []
    for c in curves:
        lv = [s for s in c.levels if floor <= s <= ceiling]
        lv = sorted(set([floor] + lv + [ceiling]))
        grids.append((lv, [c.error_at(s) for s in lv]))
    idx = [0] * len(curves)
    cur = sum(g[0][0] * c.numel for g, c in zip(grids, curves))
    alloc = {c.layer: g[0][0] for g, c in zip(grids, curves)}
    if cur > need + 1e-9:
        warnings.append(f"sensitivity allocation: per-layer floor {floor:g} exceeds target {target:g}")
    while cur < need - 1e-9:
        best = None
        for i, (c, (lv, er)) in enumerate(zip(curves, grids)):
            for j in range(idx[i] + 1, len(lv)):
                gain = (lv[j] - lv[idx[i]]) * c.numel
                cost = (er[j] - er[idx[i]]) / gain
                if best is None or cost < best[0]:
                    best = (cost, i, j, gain)
        if best is None:
            warnings.append(f"sensitivity allocation: target {target:g} not reachable under ceiling {ceiling:g}; "
                            f"reached {cur / total:.4f}")
            break
        _, i, j, gain = best
        c, (lv, _) = curves[i], grids[i]
        if cur + gain >= need:
            alloc[c.layer] = lv[idx[i]] + (need - cur) / c.numel
            cur = need
            break
        idx[i] = j
        alloc[c.layer] = lv[j]
        cur += gain
    return alloc, warnings


def plot(curves: list[Curve], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for c in curves:
        ax.plot(c.levels, [max(e, 1e-12) for e in c.errors], marker="o", ms=3,
                label=f"{c.layer} ({c.numel})" + (" [dense by default]" if c.excluded else ""),
                linestyle="--" if c.excluded else "-")
    ax.set_yscale("log")
    ax.set_xlabel("layer sparsity (only this layer pruned)")
    ax.set_ylabel("relative output error ||y - y_dense||^2 / ||y_dense||^2")
    ax.set_title(title or "per-layer sensitivity")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=6, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@dataclass
class Analysis:
    curves: list[Curve]
    allocation: dict[str, float] | None = None
    warnings: list[str] = field(default_factory=list)
    pattern: str = "unstructured"
    run: dict[str, Any] | None = None  # executor statistics (tasks, retries, seconds)


def analyze(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], pattern: str = "unstructured",
            levels: tuple[float, ...] = DEFAULT_LEVELS, labels: np.ndarray | None = None,
            target: float | None = None, keep_stem: bool = True, keep_classifier: bool = True,
            progress: Callable[[str], None] | None = None, executor: Any = None,
            task_progress: Callable[[Any], None] | None = None) -> Analysis:
    """Measure every prunable layer of a (cleaned) model with magnitude scores; with ``target``,
    also the allocation over the layers the default rules would prune."""
    from compressor import ir
    from passes.sparsity_patterns import classifier_nodes, find_layers, from_matrix, is_stem_conv, parse_pattern, select_mask

    pat = parse_pattern(pattern)
    if pat.fixed_sparsity is not None:
        levels = (0.0, pat.fixed_sparsity)
    graph = ir.to_graph(model)
    layers = {l.name: l for l in find_layers(graph)}
    classifiers = classifier_nodes(graph)
    weights = {n: (l.node.op, l.weight.name, l.values) for n, l in layers.items()}

    def masked(name: str, s: float) -> np.ndarray:
        l = layers[name]
        w2 = l.matrix()
        return from_matrix(l, np.where(select_mask(np.abs(w2), pat, s), w2, 0), l.values.shape)

    curves = measure(model, feeds, weights, masked, tuple(levels), labels, progress, executor, task_progress)
    for c in curves:
        l = layers[c.layer]
        if keep_stem and is_stem_conv(l.node, l.values):
            c.excluded = "stem conv"
        elif keep_classifier and l.name in classifiers:
            c.excluded = "final classifier"
    out = Analysis(curves, pattern=pat.text)
    if target is not None and pat.fixed_sparsity is None:
        out.allocation, out.warnings = allocate([c for c in curves if not c.excluded], target)
    return out


def table_rows(an: Analysis, show: tuple[float, ...] = (0.5, 0.7, 0.9, 0.95)) -> tuple[list[str], list[list[str]]]:
    levels = an.curves[0].levels if an.curves else []
    cols = [s for s in show if s in levels] or [s for s in levels if s > 0]
    header = ["layer", "op", "params", "default"] + [f"err@{s:g}" for s in cols]
    if an.curves and an.curves[0].accuracy is not None:
        header += [f"acc@{s:g}" for s in cols]
    if an.allocation is not None:
        header.append("allocated")
    rows = []
    for c in an.curves:
        row = [c.layer, c.op, str(c.numel), f"dense ({c.excluded})" if c.excluded else "prune"]
        row += [f"{c.error_at(s):.3g}" for s in cols]
        if c.accuracy is not None:
            row += [f"{c.accuracy[c.levels.index(s)]:.4f}" for s in cols]
        if an.allocation is not None:
            row.append(f"{an.allocation[c.layer]:.3f}" if c.layer in an.allocation else "-")
        rows.append(row)
    return header, rows


def write(an: Analysis, out_dir: Path, title: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    png, js = out_dir / "sensitivity.png", out_dir / "sensitivity.json"
    plot(an.curves, png, title)
    js.write_text(json.dumps({"pattern": an.pattern, "curves": [c.to_dict() for c in an.curves],
                              "allocation": an.allocation, "warnings": an.warnings, "run": an.run}, indent=2))
    return [png, js]


def run_analyze(model_path: Path, calib_path: Path, out_dir: Path | None, say: Callable[[str], None],
                pattern: str = "unstructured", sparsity: float | None = None, samples: int = 64,
                eval_path: Path | None = None, input_shapes: list[str] | None = None, executor: Any = None) -> int:
    """``compress analyze``: load + clean the model, measure, print the table, write PNG/JSON."""
    from compressor import data as data_mod
    from compressor import report
    from compressor.errors import UsageError
    from compressor.pass_base import PassContext
    from compressor.pass_manager import PassManager
    from passes import CLEANUP_PIPELINE, PASSES

    if sparsity is not None and not 0.0 < sparsity < 1.0:
        raise UsageError(f"--sparsity must be in (0, 1), got {sparsity}")
    if samples < 1:
        raise UsageError(f"--samples must be >= 1, got {samples}")
    model = ir.load(Path(model_path), ir.parse_input_shapes(input_shapes))
    inputs = ir.input_specs(model)
    calib = data_mod.load_npz(Path(calib_path), inputs, "--calib")
    labels = None
    feeds = calib.feeds[:samples]
    if eval_path:
        ev = data_mod.load_npz(Path(eval_path), inputs, "--eval", need_labels=True)
        feeds, labels = ev.feeds[:samples], ev.labels[:samples]
        say(f"measuring on {len(feeds)} labelled --eval samples (output error and accuracy)")
    model, _ = PassManager([(PASSES.get(n)(), PASSES.entry(n).provider) for n in CLEANUP_PIPELINE], []).run(model, PassContext(template=model))
    from compressor.executor import LocalExecutor, progress_printer

    ex = executor or LocalExecutor()
    say(f"sweep on {ex.describe()}")
    an = analyze(model, feeds, pattern=pattern, labels=labels, target=sparsity, executor=ex, task_progress=progress_printer(say))
    an.run = ex.last_stats.to_dict()
    if an.run["retries"]:
        an.warnings.append(f"{an.run['retries']} probe attempt(s) were retried after worker failures "
                           f"(tasks {an.run['retried_tasks']}); results are from the completed attempts")
    if not an.curves:
        say("no prunable Conv/Gemm/MatMul weights found")
        return 0
    header, rows = table_rows(an)
    for line in report.table(rows, header):
        say(line)
    for w in an.warnings:
        say(f"warning: {w}")
    if an.allocation is not None:
        tot = sum(c.numel for c in an.curves if c.layer in an.allocation)
        got = sum(an.allocation[c.layer] * c.numel for c in an.curves if c.layer in an.allocation)
        say(f"allocation for --sparsity {sparsity:g} ({an.pattern}): {got / max(tot, 1):.4f} of {tot} prunable weights; "
            f"use it with --method magnitude|wanda|obs --allocation sensitivity")
    out = Path(out_dir) if out_dir else Path(f"{Path(model_path).stem}.sensitivity")
    for pth in write(an, out, f"{Path(model_path).name}: per-layer sensitivity ({an.pattern}, {len(feeds)} samples)"):
        say(f"wrote {pth}")
    return 0
