"""The compress pipeline: load -> reference -> passes -> verify -> compile ->
verify artifact -> bundle. One direction, each stage reported.

``plan(opts)`` resolves everything that can be resolved without touching the
model (plugins, target, pass configs): ``--dry-run`` prints it. ``execute``
runs it and returns the report dict plus the exit status.
"""
from __future__ import annotations

import dataclasses
import logging
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

import compressor
from compressor import bundle as bundle_mod
from compressor import data as data_mod
from compressor import ir, report as report_mod, runtime, stats, verify
from compressor.digest import sha256_file
from compressor.errors import InputError, TargetError, UsageError
from compressor.pass_base import Pass, PassContext, make_config
from compressor.pass_manager import (DumpIRInstrument, PassManager, ProgressInstrument, SnapshotInstrument,
                                     ValidityInstrument)
from compressor.plugins import load_plugin_file
from compressor.recipe import Options, dump_recipe, normalize_passes, to_recipe

log = logging.getLogger(__name__)
Say = Callable[[str], None]


@dataclass
class Plan:
    opts: Options
    target: Any  # targets.Target
    spec: Any  # targets.TargetSpec
    passes: list[tuple[Pass, str]]  # (instance, provider)
    output: Path

    def resolved_passes(self) -> list[dict[str, Any]]:
        from compressor.pass_base import config_dict

        return [{"name": p.name, "config": config_dict(p.config)} for p, _ in self.passes]

    def recipe(self, base: Path) -> dict[str, Any]:
        return to_recipe(self.opts, self.resolved_passes(), base)


def effective_pattern(pattern: str, spec: Any) -> str:
    """``--pattern auto`` is the target's ``preferred_pattern`` (unstructured where it names none)."""
    return (getattr(spec, "preferred_pattern", None) or "unstructured") if pattern == "auto" else pattern


def sparsity_defaults(opts: Options) -> tuple[str, str]:
    """(method, allocation) for ``--sparsity`` when left at ``auto``: with calibration data the
    data-aware method that fits the model (``auto``: OBS/SparseGPT and Wanda both run, the one with the
    smaller error on held-out calibration samples is kept) and the measured per-layer allocation
    (``sensitivity``: depthwise convs, stems and heads that lose accuracy get a smaller share); without
    data, magnitude and uniform. N:M patterns fix every layer's sparsity: uniform."""
    from passes.sparsity_patterns import parse_pattern

    data = bool(opts.calib)
    method = opts.method if opts.method != "auto" else ("auto" if data else "magnitude")
    nm = parse_pattern(opts.pattern).kind == "nm"
    allocation = opts.allocation if opts.allocation != "auto" else ("sensitivity" if data and not nm else "uniform")
    return method, allocation


def default_pass_list(opts: Options, spec: Any) -> list[dict[str, Any]]:
    """cleanup -> prune.channels (--structured) -> sparsify.<method> (--sparsity) -> finetune.distill (--finetune)
    -> quantize.<q> (--quantize).
    Flags left at their defaults are not written into pass configs, so each pass keeps its own defaults."""
    from passes import CLEANUP_PIPELINE

    opts = dataclasses.replace(opts, pattern=effective_pattern(opts.pattern, spec))
    items = [{"name": n, "config": {}} for n in CLEANUP_PIPELINE]
    ignore = {"ignore": list(opts.ignore)} if opts.ignore else {}
    if opts.structured > 0:
        # measured on the real suite (20%, sensitivity allocation, refit): structured OBS (obs; mean_act for the
        # groups it cannot score) against mean |activation|: MiniLM eval cosine 0.953 -> 0.972, ppocr_cls
        # agreement 0.995 -> 1.000; ppocr_rec CER 0.18% -> 0.26% and silero-vad decisions 0.9987 -> 0.9968
        # with 1-1.5% more parameters removed (docs/quality.md)
        criterion = opts.criterion if opts.criterion != "auto" else ("obs" if opts.calib else "l1")
        cfg = {"ratio": opts.structured, "criterion": criterion, "min_channels": opts.min_channels,
               "round_to": opts.round_to or spec.round_to, **ignore}
        if opts.allocation not in ("uniform", "auto"):
            cfg["allocation"] = opts.allocation
        elif opts.allocation == "auto" and opts.calib:
            # measured on the real suite (20%, mean_act, refit) against internal-first uniform: MiniLM cosine
            # 0.866 -> 0.916, ppocr_rec CER 0.70% -> 0.35%, silero-vad decisions 0.991 -> 0.999, ppocr_cls 0.990 -> 0.985
            cfg["allocation"] = "sensitivity"
        if opts.reconstruct if opts.reconstruct is not None else bool(opts.calib):
            cfg["reconstruct"] = True
        items.append({"name": "prune.channels", "config": cfg})
    if opts.sparsity > 0:
        cfg = {"sparsity": opts.sparsity, **ignore, **({"include": list(opts.include)} if opts.include else {})}
        if opts.pattern != "unstructured":
            cfg["pattern"] = opts.pattern
        method, allocation = sparsity_defaults(opts)
        if allocation != "uniform":
            cfg["allocation"] = allocation
        if method == "sparsegpt":  # the paper's algorithm: OBS masks and updates only, no per-group alternatives
            method, cfg["variants"] = "obs", ["obs"]
        items.append({"name": f"sparsify.{method}", "config": cfg})
    if opts.finetune:
        ft = {"data": str(opts.finetune)}
        if opts.epochs is not None:  # an explicit count is honoured exactly
            ft.update(epochs=opts.epochs, min_steps=0)
        items.append({"name": "finetune.distill", "config": ft})
    if opts.quantize != "none":
        cfg = {"keep_fp32": opts.keep_fp32} if opts.keep_fp32 is not None else {}
        if opts.ignore and opts.quantize == "int8":
            cfg.update(ignore)
        items.append({"name": f"quantize.{opts.quantize}", "config": cfg})
    return items


def lower_for_target(model: onnx.ModelProto, target: Any, spec: Any, say: Say,
                     only: tuple[str, ...] | None = None) -> tuple[onnx.ModelProto, list[dict[str, Any]]]:
    """Apply the passes a backend needs before it can compile (``Target.required_passes``,
    e.g. ``lower.rnn`` for TVM's importer) to a copy of the compressed model. The bundle's
    model.onnx stays as compressed (an LSTM stays an LSTM for onnxruntime users); the
    artifact-vs-compressed comparison checks the lowering."""
    from passes import PASSES

    names = target.required_passes if only is None else only
    needed = [(PASSES.get(n)(), PASSES.entry(n).provider) for n in names]
    if not needed:
        return model, []
    ctx = PassContext(target=spec, opset=ir.default_opset(model) or 17, template=model)
    lowered, records = PassManager(needed, [ProgressInstrument(say)]).run(model, ctx)
    return (lowered if any(r.modified for r in records) else model), [r.to_dict() for r in records]


def plan(opts: Options) -> Plan:
    import targets
    from passes import PASSES

    opts.validate()
    if not opts.model:
        raise UsageError("no model given")
    PASSES.load_entry_points(strict=opts.strict)
    targets.TARGETS.load_entry_points(strict=opts.strict)
    for p in opts.plugin:
        load_plugin_file(Path(p))
    target, spec = targets.resolve(opts.target)
    opts = dataclasses.replace(opts, pattern=effective_pattern(opts.pattern, spec))
    items = normalize_passes(opts.passes) if opts.passes is not None else default_pass_list(opts, spec)
    passes = []
    for item in items:
        cls = PASSES.get(item["name"])
        passes.append((cls(make_config(cls, item["config"])), PASSES.entry(item["name"]).provider))
    model_path = Path(opts.model)
    output = Path(opts.output) if opts.output else Path(default_output_name(opts, model_path, spec.tag))
    return Plan(opts, target, spec, passes, output)


def _pct(x: float) -> str:
    return f"{x * 100:g}".replace(".", "p")  # 0.9 -> 90, 0.875 -> 87p5


def default_output_name(opts: Options, model_path: Path, tag: str) -> str:
    """``<model-stem>.<target>[.s90][.2of4|.8x1][.st20][.int8|.fp16|.int4][.ft].bundle``: the variant a run
    builds is in its default bundle name, so runs of other variants of one model do not collide.
    s: --sparsity (percent; with its --pattern, N:M written NofM), st: --structured, then --quantize
    and ft for --finetune. In the target tag and the variant, characters other than letters, digits and ``._+-``
    become ``_``; the model's stem is kept as it is."""
    from passes.sparsity_patterns import parse_pattern

    parts = [tag]
    if opts.sparsity > 0:
        parts.append(f"s{_pct(opts.sparsity)}")
        pattern = opts.pattern
        if pattern == "auto":
            import targets

            pattern = effective_pattern(pattern, targets.resolve(tag)[1])
        pat = parse_pattern(pattern)
        if pat.kind == "nm":
            parts.append(f"{pat.n}of{pat.m}")
        elif pat.kind == "block":
            parts.append(f"{pat.r}x{pat.c}")
    if opts.structured > 0:
        parts.append(f"st{_pct(opts.structured)}")
    if opts.quantize != "none":
        parts.append(opts.quantize)
    if opts.finetune:
        parts.append("ft")
    return f"{model_path.stem}.{re.sub(r'[^A-Za-z0-9._+-]', '_', '.'.join(parts))}.bundle"


def describe(p: Plan) -> list[str]:
    lines = [f"model:  {p.opts.model}", f"target: {p.spec.tag} -> {p.spec.tvm_target}",
             f"output: {p.output}", "passes:"]
    for i, (ps, provider) in enumerate(p.passes, 1):
        from compressor.pass_base import config_dict

        lines.append(f"  {i}. {ps.name} {config_dict(ps.config) or ''}  [{provider}]")
    if p.target.required_passes and not p.opts.no_compile:
        lines.append(f"target lowering (on a copy handed to the {p.spec.tag} backend): {', '.join(p.target.required_passes)}")
    lines += _int8_sparse_plan(p)
    return lines


def _int8_sparse_plan(p: Plan) -> list[str]:
    """With --sparsity and --quantize int8: whether the pattern's zeros can reach the target's int8 sparse
    kernel (R x 4 blocks, ``explain-target``'s ``patterns.int8_sparse``), and what would if not."""
    from passes.sparsity_patterns import parse_pattern

    info = ((p.spec.extra or {}).get("patterns") or {}).get("int8_sparse")
    if not info or p.opts.sparsity <= 0 or p.opts.quantize != "int8" or p.opts.no_compile:
        return []
    kr = int(info["pattern"].split("x")[0])
    pat = parse_pattern(p.opts.pattern)
    if pat.kind == "block" and pat.r % kr == 0 and pat.c % 4 == 0:
        return [f"int8 sparse: {p.opts.pattern} zeros leave whole {info['pattern']} blocks empty: the int8 layers that "
                f"keep them run the {info['kernel']} int8 sparse kernel in the {p.spec.tag} artifact"]
    return [f"int8 sparse: {p.opts.pattern} zeros do not empty the {info['pattern']} blocks the {info['kernel']} int8 "
            f"kernel skips, so the quantized model runs in onnxruntime at dense int8 speed; --pattern {info['pattern']} "
            f"(or a multiple, e.g. {kr * 2}x4) would use the int8 sparse kernel"]


def _compile_artifact(p: Plan, src: Path, bdir: Path, shapes: dict[str, list[int]], say: Say, session: Any = None):
    """``Target.compile`` with the build options (every target takes them; what it cannot use it reports
    in ``Artifact.warnings``)."""
    from targets.base import CompileOptions

    opts = CompileOptions(tune_trials=p.opts.tune_trials or 0, tuning_db=p.opts.tuning_db, progress=say,
                          executor_session=session)
    from compressor import progress

    with progress.stage(f"compiling for {p.spec.tag}"):
        return p.target.compile(src, p.spec, bdir, shapes, options=opts)


class _ChildPlan:
    """What :func:`_compile_in_child` needs of a Plan (picklable: no callables, no executor)."""

    def __init__(self, p: Plan):
        self.target, self.spec = p.target, p.spec
        self.opts = p.opts


def _compile_and_run(p: Plan | _ChildPlan, src: Path, bdir: Path, shapes: dict[str, list[int]], say: Say,
                     warnings: list[str], session: Any,
                     feeds: list[dict[str, np.ndarray]]) -> tuple[Any, list[list[np.ndarray]] | None, str | None]:
    """Compile, then run the artifact once on every verification feed where this host can.
    Returns (artifact, runs or None, why it was not run)."""
    from targets.base import NotRunnableHere

    art = _compile_artifact(p, src, bdir, shapes, say, session)  # type: ignore[arg-type]
    try:
        return art, [p.target.run(bdir / art.path, p.spec, f) for f in feeds], None
    except NotRunnableHere as exc:
        return art, None, str(exc)


def _compile_in_child(cp: _ChildPlan, src: Path, bdir: Path, shapes: dict[str, list[int]],
                      feeds: list[dict[str, np.ndarray]]) -> tuple[Any, list[list[np.ndarray]] | None, str | None, list[str]]:
    """Child side of an isolated build (a kernel that segfaults on its first run does so here, not in
    the tool's process). Returns :func:`_compile_and_run`'s triple plus the compile warnings."""
    warnings: list[str] = []
    art, runs, why = _compile_and_run(cp, src, bdir, shapes, lambda line: print(line, flush=True), warnings, None, feeds)
    return art, runs, why, warnings


def _isolated_build(p: Plan, src: Path, bdir: Path, shapes: dict[str, list[int]], say: Say, warnings: list[str],
                    session: Any, feeds: list[dict[str, np.ndarray]]) -> tuple[Any, list[list[np.ndarray]] | None, str | None]:
    """Compile (and first-run) the artifact in a child process (``compressor.isolated``): an LLVM
    abort or a segfaulting kernel becomes :class:`~compressor.isolated.ChildCrashed` instead of
    killing the run. Runs with a Ray executor compile in this process (the tuning fans out on the
    run's cluster connection, which cannot cross into a child)."""
    from compressor import isolated

    if session is not None and getattr(session, "kind", "local") != "local":
        return _compile_and_run(p, src, bdir, shapes, say, warnings, session, feeds)
    from compressor import progress

    try:
        with progress.stage(f"compiling for {p.spec.tag}"):
            art, runs, why, child_warnings = isolated.call(
                _compile_in_child, (_ChildPlan(p), src, bdir, shapes, feeds),
                label=f"code generation for {p.spec.tag} ({p.spec.extra.get('isa', p.spec.family)})",
                plugins=list(p.opts.plugin), on_line=say)
    except TypeError as exc:  # a plugin target that cannot be pickled: build here, say so
        warnings.append(f"compile: not isolated in a child process ({exc}); a code-generation crash would end the run")
        return _compile_and_run(p, src, bdir, shapes, say, warnings, session, feeds)
    warnings += child_warnings
    return art, runs, why


def _sparse_kernels_in(model: onnx.ModelProto) -> dict[str, int]:
    """Counts of the ``compressor``-domain kernel ops in a lowered model, by op type."""
    counts: dict[str, int] = {}
    for n in model.graph.node:
        if n.domain == "compressor":
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def _host_description() -> str:
    from targets.host import detect_host

    h = detect_host()
    return f"{h.model_name} ({h.arch}, {h.simd_summary})"


class StageClock:
    """Wall time and memory per stage of a run (report.json ``stages``): each ``enter`` closes the stage
    before it with its seconds, the process's resident memory at its end and the peak so far
    (``ru_maxrss``: the peak of the whole process up to that point, imports included)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self._name: str | None = None
        self._t = time.perf_counter()

    @staticmethod
    def _rss_mb() -> tuple[float, float]:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        try:
            with open("/proc/self/statm") as f:
                now = int(f.read().split()[1]) * resource.getpagesize() / 2**20
        except OSError:
            now = float("nan")
        return now, peak

    def enter(self, name: str | None) -> None:
        t = time.perf_counter()
        if self._name is not None:
            now, peak = self._rss_mb()
            self.rows.append({"stage": self._name, "seconds": round(t - self._t, 3), "rss_mb": round(now, 1),
                              "peak_rss_mb": round(peak, 1)})
        self._name, self._t = name, t


@dataclass
class _Run:
    """State of one execution, filled stage by stage (see ``execute``)."""

    p: Plan
    say: Say
    warnings: list[str]
    model: onnx.ModelProto
    inputs: list[Any]
    outputs: list[Any]
    verif: data_mod.Samples
    calib: data_mod.Samples | None
    tol: verify.Tolerances
    ref_runs: list[list[np.ndarray]] | None = None
    compressed: onnx.ModelProto | None = None
    comp_runs: list[list[np.ndarray]] | None = None
    comparisons: list[verify.Comparison] | None = None
    accuracy: dict[str, Any] | None = None
    session: Any = None  # the run's RunExecutor (passes and tuning fan out on it; see execute)
    search: dict[str, Any] | None = None  # the accuracy search's result, when it ran
    before_finetune: onnx.ModelProto | None = None  # the one-shot model, when finetune.distill ran after it
    finetune: tuple[Any, Any, Any] | None = None  # (pass, provider, context) of that finetune.distill run
    clock: StageClock = dataclasses.field(default_factory=StageClock)
    source_files: list[Path] = dataclasses.field(default_factory=list)  # the model file and its external data

    @property
    def out_names(self) -> list[str]:
        return [o.name for o in self.outputs]

    @property
    def labelled(self) -> bool:
        return self.verif.labels is not None and self.p.opts.eval is not None

    def compare(self, candidate: str, reference: str, kind: str, cand_runs, ref_runs) -> None:
        self.comparisons.append(verify.compare(candidate, reference, kind, self.out_names, cand_runs, ref_runs, self.tol,
                                               gate_cosine=not (kind == "lossy" and self.labelled)))


def _load(p: Plan, say: Say) -> _Run:
    """Stage 1: load + normalise the model, check every data file, choose the verification samples."""
    opts = p.opts
    model_path = Path(opts.model)
    say(f"[1/6] load {model_path}")
    shape_notes: list[str] = []
    files: list[Path] = []
    model = ir.load(model_path, ir.parse_input_shapes(opts.input_shape), ir.npz_shapes(opts.calib, opts.eval, opts.finetune),
                    shape_notes, files)
    for line in shape_notes:
        say(f"      {line}")
    inputs, outputs = ir.input_specs(model), ir.output_specs(model)
    say(f"      inputs {', '.join(f'{s.name}{list(s.shape)}' for s in inputs)}; outputs {', '.join(o.name for o in outputs)}")
    eval_samples = data_mod.load_npz(Path(opts.eval), inputs, "--eval") if opts.eval else None
    calib = data_mod.load_npz(Path(opts.calib), inputs, "--calib") if opts.calib else None
    if opts.finetune:  # checked before any work; finetune.distill reads it
        data_mod.load_npz(Path(opts.finetune), inputs, "--finetune")
    warnings: list[str] = list(shape_notes)  # dynamic dims fixed from the data: the bundle is built for that shape
    if eval_samples is not None:
        verif = eval_samples  # all of it: accuracy and agreement come from the same runs
    elif calib is not None:
        verif = calib.head(opts.verify_samples)
    else:
        verif = data_mod.random_samples(inputs, opts.verify_samples, opts.seed, model=model)
        warnings.append(f"verification uses random inputs ({verif.source}): weak evidence; pass --eval data.npz for real data")
        warnings += verif.notes
    tol = verify.Tolerances(opts.min_cosine, opts.min_top1, opts.max_accuracy_drop)
    return _Run(p, say, warnings, model, inputs, outputs, verif, calib, tol, source_files=files)


def _reference_runs(r: _Run) -> list[list[np.ndarray]]:
    """The original model on the verification inputs. It passed load's checks, so a failure here is the
    model's or the data's (an index out of its table, a corrupt node onnxruntime refuses): exit 4."""
    try:
        return runtime.run_all(runtime.session(r.model), r.verif.feeds)
    except InputError:
        raise
    except Exception as exc:  # onnxruntime's own error types
        raise InputError(f"onnxruntime cannot run the original model on the verification inputs ({r.verif.source}): "
                         f"{' '.join(str(exc).split())[:300]}",
                         hint="pass real inputs with --eval/--calib" if r.verif.weak else "check the data file's values") from exc


def _compress(r: _Run) -> list[Any]:
    """Stages 2-4: reference outputs, the pass pipeline, the compressed model verified with onnxruntime."""
    opts, say = r.p.opts, r.say
    say("[2/6] reference outputs (onnxruntime, optimizations disabled)")
    r.clock.enter("reference")
    r.ref_runs = _reference_runs(r)
    say(f"[3/6] passes ({len(r.p.passes)})")
    r.clock.enter("passes")
    instruments = [ProgressInstrument(say)]
    if opts.check_each_pass:
        instruments.append(ValidityInstrument(r.model))
    if opts.dump_ir:
        instruments.append(DumpIRInstrument(Path(opts.dump_ir), r.model))
    # one executor for the whole run (execute opens it): started by the first stage that fans out
    # (passes, tuning), stopped when the run ends
    session = r.session
    ctx = PassContext(target=r.p.spec, calib=r.calib, opset=ir.default_opset(r.model) or 17,
                      options={"sparsity": opts.sparsity, "structured": opts.structured, "pattern": opts.pattern,
                               "finetune": opts.finetune, "executor": opts.executor, "ray_address": opts.ray_address},
                      template=r.model, finetune_data=opts.finetune, executor_session=session)
    ft = next(((ps, prov) for ps, prov in r.p.passes if ps.name == FINETUNE), None)
    snap = SnapshotInstrument(FINETUNE, r.model) if ft else None
    r.compressed, records = PassManager(r.p.passes, instruments + ([snap] if snap else [])).run(r.model, ctx)
    if snap is not None and snap.model is not None:
        r.before_finetune, r.finetune = snap.model, (*ft, ctx)
    if opts.executor != "local" and not session.uses and not opts.tune_trials:
        r.warnings.append(f"--executor {opts.executor}: no stage of this run fans out (only --allocation sensitivity, "
                          "sparsify.obs and --tune-trials do); "
                          "everything ran in this process")
    for rec in records:
        r.warnings += [f"{rec.name}: {w}" for w in rec.warnings]
    say("[4/6] verify compressed model (onnxruntime)")
    r.clock.enter("verify")
    r.comp_runs = runtime.run_all(runtime.session(r.compressed), r.verif.feeds)
    r.comparisons = []
    r.compare("compressed.onnx", "original.onnx", "lossy", r.comp_runs, r.ref_runs)
    if r.labelled:
        r.accuracy = {"original": verify.accuracy(r.ref_runs, r.verif.labels), "compressed": verify.accuracy(r.comp_runs, r.verif.labels),
                      "n": len(r.verif.feeds), "max_drop": r.tol.max_accuracy_drop, "artifact": None}
    r.clock.enter("search")
    _search(r)
    return records


FINETUNE = "finetune.distill"


def _finetune_bisect(r: _Run, res: Any, gate: Any, budget: int) -> tuple[Any, Any, dict, int, list] | None:
    """Fine-tuning recovers part of what pruning loses, so the one-shot search (which stops at the first
    configuration that passes *without* fine-tuning) gives back more than needed. Fine-tune the searched
    configuration; when it passes, bisect the number of search steps between 0 (the plain fine-tuned
    model, which failed) and the search's count, fine-tuning each probe: the fewest steps whose
    fine-tuned model passes the gate. At most ``max(1, budget // 4)`` fine-tunings (3 at the default budget
    of 12; each is a whole fine-tuning: measured, ppocr_rec 2:4 with up to six ran past 50 minutes on 2
    cores; ppocr_cls 2:4 with six kept 94 of 104 steps instead of all 104). Returns (model, runs,
    fine-tuning stats, steps, rounds) of the kept configuration; ``res`` is updated to describe it."""
    ps, prov, ctx = r.finetune
    rounds: list[dict[str, Any]] = []

    def probe(k: int) -> tuple[Any, Any, dict, list[str]]:
        model, _, _, _ = res.configure(k)
        tuned, recs = PassManager([(ps, prov)], [ProgressInstrument(r.say)]).run(model, ctx)
        runs = runtime.run_all(runtime.session(tuned), r.verif.feeds)
        fails = gate(runs)
        rounds.append({"steps": k, "passed": not fails, "failure": fails[0] if fails else None})
        r.say(f"      fine-tune round {len(rounds)}: {k} of {res.steps} search steps given back, fine-tuned -> "
              f"{'gate passes' if not fails else fails[0]}")
        return tuned, runs, recs[0].stats, fails

    limit = max(1, budget // 4)
    tuned, runs, stats, fails = probe(res.steps)
    if fails:
        return None
    best = (tuned, runs, stats, res.steps)
    lo, hi = 0, res.steps  # fine-tuned: lo fails (the run's own fine-tuning), hi passes
    while hi - lo > 1 and len(rounds) < limit:
        mid = (lo + hi) // 2
        tuned, runs, stats, fails = probe(mid)
        if fails:
            lo = mid
        else:
            hi, best = mid, (tuned, runs, stats, mid)
    _, res.reverted, res.halved, res.zeros_after = res.configure(best[3])
    return (*best, rounds)


def _search(r: _Run) -> None:
    """Accuracy-aware search (``compressor.accuracy_search``) when the one-shot result misses the gate:
    revert the weights that cause most of the error until it passes or ``--search-budget`` runs out."""
    from compressor import accuracy_search

    opts, say = r.p.opts, r.say
    gate = accuracy_search.gate_for(r.out_names, r.ref_runs, r.tol, r.verif.labels if r.labelled else None,
                                    r.accuracy["original"] if r.accuracy else None)
    if opts.no_gate or not gate(r.comp_runs):
        return
    budget = max(opts.search_budget, 0)
    attrib = r.calib.head(32).feeds if r.calib is not None else r.verif.feeds
    quantized = any(n.op_type in ("QuantizeLinear", *accuracy_search.DYNAMIC_INT8) for n in r.compressed.graph.node)
    what = "the fine-tuned result" if r.before_finetune is not None else "the one-shot result"
    say(f"      gate fails on {what}: accuracy search (budget {budget} rounds)" if budget else
        f"      gate fails on {what}: ranking the layers by error (search off: --search-budget 0)")
    # the weights to go back to: the model after the leading value-preserving cleanup passes (BN folding
    # renames conv weights; the original's names would find nothing to revert)
    lead = []
    for ps, provider in r.p.passes:
        if not ps.name.startswith("cleanup."):
            break
        lead.append((ps, provider))
    base = r.model
    if lead:
        ctx = PassContext(target=r.p.spec, calib=r.calib, opset=ir.default_opset(r.model) or 17, template=r.model)
        base, _ = PassManager(lead, []).run(r.model, ctx)
    refit = None  # the searched configuration fine-tuned again (when fine-tuning ran and still missed the gate)
    if quantized:
        res = accuracy_search.search_quantized(base, r.compressed, attrib, r.verif.feeds, r.ref_runs, gate, budget, say)
    else:  # the ranking probes fan out on the run's executor (--executor ray)
        ex = r.session.get("accuracy search") if opts.executor != "local" and r.session is not None else None
        after_ft = r.before_finetune is not None and budget > 0
        if after_ft:
            # fine-tuned weights are fitted to each other: giving one layer back alone undoes that (measured:
            # every revert made the error worse, and the search gave back all of the compression). Search
            # the one-shot model instead, then fine-tune the configuration it finds.
            say("      fine-tuning did not reach the gate: searching the one-shot model, then fine-tuning the result")
        res = accuracy_search.search(base, r.before_finetune if after_ft else r.compressed, attrib, r.verif.feeds,
                                     r.ref_runs, gate, budget, say, executor=ex)
        if after_ft and res.passed and res.configure is not None:
            refit = _finetune_bisect(r, res, gate, budget)
            r.warnings.append("accuracy search ran on the one-shot model (fine-tuning alone missed the gate); the searched "
                              "configurations were fine-tuned again: "
                              + (f"kept the one that gives back fewest weights ({refit[3]} of the {res.steps} search steps)"
                                 if refit else "none passed the gate, so the searched one-shot weights were kept"))
    r.search = res.to_dict()
    if r.before_finetune is not None and budget > 0 and not quantized:
        r.search["searched"] = "one-shot model (before fine-tuning)"
        r.search["refinetuned"] = refit is not None
        if refit:
            r.search["refinetune"] = refit[2]
            r.search["refinetune_rounds"] = refit[4]
    r.search["hint"] = res.top3_hint()
    for note in res.unsearchable:
        r.warnings.append(f"accuracy search: {note}")
    if not budget:
        r.warnings.append("accuracy search off (--search-budget 0): the one-shot result fails the gate"
                          + (f"; {res.top3_hint()}" if res.ranking else ""))
        return
    if not res.passed:
        r.warnings.append(f"accuracy search: no passing configuration within {res.rounds} rounds; {res.top3_hint()}"
                          if res.ranking else "accuracy search: nothing to revert")
        return
    touched = res.reverted + res.halved
    names = ", ".join(x.node for x in touched[:6]) + (f" (+{len(touched) - 6} more)" if len(touched) > 6 else "")
    if res.kind == "quantized":
        r.warnings.append(f"accuracy search: gave {len(res.reverted)} of {len(res.ranking)} int8 layers back to fp32 to pass "
                          f"the gate ({names}; relative output error {res.error_before:.3g} -> {res.error_after:.3g}, "
                          f"{res.rounds} rounds)")
        if len(res.reverted) > 0.5 * len(res.ranking):
            r.warnings.append(f"accuracy search gave more than half of the int8 layers back to fp32 to meet the gate: relax "
                              "the bound (--min-cosine/--min-top1/--max-accuracy-drop) or quantize fewer op types")
    else:
        r.warnings.append(f"accuracy search: gave weights back in {len(touched)} of {len(res.ranking)} compressed layers to "
                          f"pass the gate ({len(res.reverted)} fully, {len(res.halved)} half: {names}; relative output error "
                          f"{res.error_before:.3g} -> "
                          f"{res.error_after:.3g}, {res.rounds} rounds); zeros in the compressed layers "
                          f"{res.zeros_before:.1%} -> {res.zeros_after:.1%}")
    if res.kind == "values" and res.zeros_after < 0.5 * res.zeros_before:
        r.warnings.append(f"accuracy search gave back more than half of the compression ({res.zeros_before:.1%} -> "
                          f"{res.zeros_after:.1%} zeros) to meet the gate: lower the target, relax the bound "
                          f"(--min-cosine/--min-top1/--max-accuracy-drop), or recover with --finetune; --search-budget 0 "
                          "keeps the one-shot result")
    r.compressed = refit[0] if refit else res.model
    r.comp_runs = refit[1] if refit else runtime.run_all(runtime.session(r.compressed), r.verif.feeds)
    r.comparisons = []
    r.compare("compressed.onnx", "original.onnx", "lossy", r.comp_runs, r.ref_runs)
    if r.labelled:
        r.accuracy["compressed"] = verify.accuracy(r.comp_runs, r.verif.labels)


@dataclass
class _Build:
    artifact: Any = None
    artifact_runs: list[list[np.ndarray]] | None = None
    target_passes: list[dict[str, Any]] | None = None
    runtime_choice: dict[str, Any] | None = None
    expected_runs: list[list[np.ndarray]] | None = None  # what the bundle's default runtime produces
    sparse_fallback: dict[str, Any] | None = None  # sparse kernels that crashed code generation (kept dense)


def _build(r: _Run, stage: bundle_mod.StagedDir) -> _Build:
    """Stage 5: pick the runtime, lower + compile for the target, run and verify the artifact where it runs."""
    from passes.quant_common import choose_runtime

    p, say, bdir = r.p, r.say, stage.path
    b = _Build(target_passes=[], runtime_choice=choose_runtime(r.compressed, p.spec), expected_runs=r.comp_runs)
    if b.runtime_choice["name"] == "onnxruntime" and b.runtime_choice.get("quantized_ops") \
            and "lower.sparse" in p.target.required_passes:
        from targets.lower_sparse import int8_sparse_candidates

        int8 = int8_sparse_candidates(r.compressed, p.spec.tvm_target)
        if int8:  # int8 sparse kernels: compile; the latency step still ships onnxruntime if it is faster
            b.runtime_choice = {"name": "tvm", "quantized_ops": b.runtime_choice["quantized_ops"],
                                "reason": f"{len(int8)} int8 layer(s) with block-sparse weights run the int8 sparse "
                                          f"kernels (targets.sparse_int8); the other quantized ops run dequantized in TVM"}
    if p.opts.no_compile:
        r.warnings.append("--no-compile: no target artifact was produced")
        say("[5/6] compile: skipped (--no-compile)")
    elif b.runtime_choice["name"] == "onnxruntime":  # quantized ops: TVM would dequantize them
        r.warnings.append(f"runtime: onnxruntime ({b.runtime_choice['reason']}); no TVM artifact")
        say(f"[5/6] compile: skipped, runtime onnxruntime ({b.runtime_choice['reason']})")
        b.expected_runs = runtime.run_all(runtime.session(r.compressed, optimized=True), r.verif.feeds)
        rt_name = "runtime(onnxruntime, ORT_ENABLE_ALL)"
        r.compare(rt_name, "original.onnx", "lossy", b.expected_runs, r.ref_runs)
        # fused int8 kernels requantize with their own rounding (one step per layer at most), so this is
        # gated like a lossy change, not with the bit-level compile tolerance
        r.compare(rt_name, "compressed.onnx", "lossy", b.expected_runs, r.comp_runs)
        if r.accuracy is not None:
            r.accuracy["artifact"] = verify.accuracy(b.expected_runs, r.verif.labels)
    else:
        say(f"[5/6] compile for {p.spec.tag} ({p.spec.tvm_target.get('kind')}, {p.spec.triple})")
        t0 = time.perf_counter()
        try:
            b.artifact, b.artifact_runs = _lower_and_compile(r, b, stage, t0)
        except TargetError as exc:
            r.warnings.append(f"artifact not produced for {p.spec.tag}: {exc.one_line()}")
            say(f"      warning: artifact not produced: {exc.one_line()}")
    if b.artifact_runs is not None:
        r.compare(f"artifact({p.spec.tag})", "original.onnx", "lossy", b.artifact_runs, r.ref_runs)
        # int8 kernels quantize activations with their own rounding (a near-tie can land one step away from
        # onnxruntime's): gated like onnxruntime's own fused int8 kernels, as a lossy change
        int8 = any(str(L.get("precision", "")).startswith("int8") and L.get("lowered")
                   for rec in b.target_passes or [] if rec.get("name") == "lower.sparse"
                   for L in (rec.get("stats") or {}).get("layers", []))
        r.compare(f"artifact({p.spec.tag})", "compressed.onnx", "lossy" if int8 else "compile", b.artifact_runs,
                  r.comp_runs)
        if r.accuracy is not None:
            r.accuracy["artifact"] = verify.accuracy(b.artifact_runs, r.verif.labels)
    if b.artifact is None and b.runtime_choice["name"] == "tvm":
        b.runtime_choice = {"name": "onnxruntime", "quantized_ops": {},
                            "reason": "no TVM artifact (see warnings): the bundle's model.onnx runs with onnxruntime"}
    return b


def _lower_and_compile(r: _Run, b: _Build, stage: bundle_mod.StagedDir, t0: float) -> tuple[Any, list[list[np.ndarray]] | None]:
    """Target lowering, then the isolated compile + first run. When the code generation of the
    lowered model crashes and the lowering put sparse kernels in it, the layers are kept dense
    (the target's lowering without ``lower.sparse``) and the build is retried once: a warning and a
    report row (``sparse_fallback``) name the kernels and the ISA."""
    from compressor.isolated import ChildCrashed

    p, say, bdir = r.p, r.say, stage.path
    lowered, b.target_passes = lower_for_target(r.compressed, p.target, p.spec, say)
    shapes = {s.name: list(s.shape) for s in r.inputs}

    def build(model: onnx.ModelProto, name: str) -> tuple[Any, list[list[np.ndarray]] | None]:
        src = bdir / "model.onnx"
        if model is not r.compressed:
            # the lowered graph (unrolled RNNs, BSR ops with a standard-op reference body) still
            # runs in onnxruntime: check it bit-tight against the compressed model, so targets
            # whose artifact cannot run here (arm, cuda) have their lowering verified too
            r.compare(f"{name}.onnx", "compressed.onnx", "compile", runtime.run_all(runtime.session(model), r.verif.feeds),
                      r.comp_runs)
            src = stage.path.parent / f"{stage.path.name}.{name}.onnx"
            ir.save_model(model, src)
        try:
            art, runs, why = _isolated_build(p, src, bdir, shapes, say, r.warnings, r.session, r.verif.feeds)
        finally:
            if src.parent != bdir:
                src.unlink(missing_ok=True)
        say(f"      {art.path} ({time.perf_counter() - t0:.1f} s)")
        r.warnings.extend(f"compile: {w}" for w in getattr(art, "warnings", ()))
        if why is not None:
            r.warnings.append(f"artifact not executed here: {why}; it was verified only as ONNX (onnxruntime)")
            say(f"      artifact not run here: {why}")
        return art, runs

    try:
        return build(lowered, "lowered")
    except ChildCrashed as exc:
        kernels = _sparse_kernels_in(lowered)
        if not kernels:
            raise
        isa = p.spec.extra.get("isa", p.spec.family)
        what = ", ".join(f"{n} x{c}" for c, n in sorted((c, n) for n, c in kernels.items()))
        r.warnings.append(f"sparse kernels ({what}) crashed code generation for {p.spec.tag} (ISA {isa}): "
                          f"{exc.one_line()}; every layer kept dense for this artifact")
        say(f"      warning: sparse kernels crashed code generation ({exc.signal_name or 'error'}); retrying with dense layers")
        b.sparse_fallback = {"kernels": kernels, "isa": isa, "target": p.spec.tvm_target, "error": exc.one_line()}
        keep = tuple(n for n in p.target.required_passes if n != "lower.sparse")
        dense, passes = lower_for_target(r.compressed, p.target, p.spec, say, only=keep)
        b.target_passes = passes
        return build(dense, "lowered_dense")


def _measure(r: _Run, b: _Build, bdir: Path) -> dict[str, Any] | None:
    """Latency of original vs compressed (onnxruntime, interleaved) and of the artifact; a measured-slower
    artifact makes the bundle's runner default to onnxruntime (the artifact is still shipped)."""
    if r.p.opts.no_latency:
        return None
    p = r.p
    # from the files, as a user runs them (the user's model, the bundle's model.onnx): onnxruntime reads the
    # weights itself, without this process's arrays of them (a weight-sized copy each, two sessions at once)
    feed = r.verif.feeds[0]
    try:
        orig_fast = runtime.session(str(Path(r.p.opts.model)), optimized=True)
        orig_fast.run(None, feed)
    except Exception:  # noqa: BLE001 - what only the loaded model runs (an old opset converted, shapes fixed at load)
        orig_fast = runtime.session(r.model, optimized=True)
    comp_fast = runtime.session(str(bdir / "model.onnx"), optimized=True)
    lat = runtime.compare_latency({"orig": lambda: orig_fast.run(None, feed), "comp": lambda: comp_fast.run(None, feed)})
    latency = {"ort_original_s": lat["orig"], "ort_compressed_s": lat["comp"], "artifact_s": None,
               "measured_on": _host_description(), "method": "median of 25 interleaved runs, ORT_ENABLE_ALL, batch as in model"}
    if b.artifact_runs is None:
        return latency
    runtime.settle()  # onnxruntime's spinning threads would take the artifact's cores
    latency["artifact_s"] = p.target.time(bdir / b.artifact.path, p.spec, feed)
    slow = latency["artifact_s"] / lat["comp"]
    if slow > 1.5:
        tuned = (b.artifact.details.get("tuning") or {}).get("records_applied")
        how = f"tuned: {tuned} fused functions with tuning records" if tuned else "untuned schedules; try --tune-trials 64"
        r.warnings.append(f"the {p.spec.tag} artifact (TVM, {how}) is {slow:.1f}x slower than onnxruntime "
                          f"on the compressed model on this host")
    if slow > 1.1 and b.runtime_choice["name"] == "tvm":
        # measured, not assumed: ship the artifact, but make the runner default to the faster runtime
        b.runtime_choice = {"name": "onnxruntime", "quantized_ops": {}, "measured_slowdown_of_tvm": round(slow, 3),
                            "reason": f"measured on this host: the TVM artifact takes {latency['artifact_s'] * 1e3:.3f} ms, "
                                      f"onnxruntime {lat['comp'] * 1e3:.3f} ms on the compressed model; run_bundle.py "
                                      f"defaults to onnxruntime (--tvm runs the shipped artifact)"}
        r.warnings.append(f"runtime: onnxruntime ({b.runtime_choice['reason']})")
    return latency


def _write_selfcheck(r: _Run, b: _Build, bdir: Path) -> None:
    (bdir / "selfcheck").mkdir()
    k = r.p.opts.verify_samples
    data_mod.save_samples(bdir / "selfcheck" / "inputs.npz", r.verif.feeds[:k])
    for name, runs in (("expected.npz", b.expected_runs), ("original.npz", r.ref_runs)):
        np.savez(bdir / "selfcheck" / name, **{n: np.stack([run[i] for run in runs[:k]]) for i, n in enumerate(r.out_names)})
    shutil.copyfile(Path(__file__).with_name("bundle_runner.py"), bdir / "run_bundle.py")


def _gate(r: _Run) -> tuple[str, list[str]]:
    failures = [f"{c.candidate} vs {c.reference}: {f}" for c in r.comparisons for f in c.failures]
    if r.accuracy is not None:
        failures += filter(None, [verify.accuracy_drop_failure(r.accuracy["original"], r.accuracy["compressed"], r.tol)])
    if r.p.opts.no_gate and failures:
        r.warnings.append(f"accuracy gate disabled (--no-gate); {len(failures)} check(s) would have failed")
    return ("FAILED" if failures and not r.p.opts.no_gate else "PASSED"), failures


def execute(p: Plan, say: Say) -> tuple[dict[str, Any], int]:
    """load -> reference -> passes -> verify -> compile + verify artifact -> measure -> bundle (staged, atomic)."""
    opts = p.opts
    model_path = Path(opts.model)
    if p.output.resolve() in model_path.resolve().parents or p.output.resolve() == model_path.resolve():
        raise InputError(f"output directory {p.output} contains the input model", hint="choose another -o; the input is never overwritten")
    bundle_mod.check_output_dir(p.output, opts.force)
    if opts.executor == "ray":  # missing package: exit 5 before any work, not at the first sweep
        from compressor.executor import import_ray

        import_ray()
    t_start = time.perf_counter()
    src_hash = sha256_file(model_path) if model_path.is_file() else None
    clock = StageClock()
    clock.enter("load")
    r = _load(p, say)
    r.clock = clock
    from compressor.executor import RunExecutor

    with RunExecutor(opts.executor, opts.ray_address) as r.session:
        return _execute_rest(p, say, r, model_path, src_hash, t_start)


def _execute_rest(p: Plan, say: Say, r: _Run, model_path: Path, src_hash: str | None, t_start: float) -> tuple[dict[str, Any], int]:
    opts = p.opts
    records = _compress(r)
    stage = bundle_mod.StagedDir(p.output)
    try:
        bdir = stage.path
        r.clock.enter("write model")
        ir.save_model(r.compressed, bdir / "model.onnx")
        from compressor.sparse_storage import write_sparse_weights

        sparse_storage = write_sparse_weights(r.compressed, bdir / "weights.sparse.npz")
        r.clock.enter("compile")
        b = _build(r, stage)
        say("[6/6] measure and write bundle")
        r.clock.enter("measure")
        latency = _measure(r, b, bdir)
        before = stats.compute(r.model, sum(f.stat().st_size for f in r.source_files or [model_path]))
        weights_file = ["model.onnx.data"] if (bdir / "model.onnx.data").exists() else []  # over ir.SINGLE_FILE_MAX
        after = stats.compute(r.compressed, sum((bdir / f).stat().st_size for f in ["model.onnx", *weights_file]))
        _write_selfcheck(r, b, bdir)
        status, gate_failures = _gate(r)
        artifact = b.artifact
        r.clock.enter(None)
        rep: dict[str, Any] = {
            "tool": {"name": "compressor", "version": compressor.__version__},
            "status": status,
            "gate": {"enabled": not opts.no_gate, "tolerances": r.tol.to_dict(), "failures": gate_failures},
            "model": {"path": str(model_path), "sha256": src_hash, "opset": ir.default_opset(r.model),
                      "inputs": [s.to_dict() for s in r.inputs], "outputs": [s.to_dict() for s in r.outputs]},
            "target": p.spec.to_dict(),
            "passes": [rec.to_dict() for rec in records],
            "target_passes": b.target_passes,
            "sparse_fallback": b.sparse_fallback,
            "search": r.search,
            "verification_data": r.verif.source,
            "verification": [c.to_dict() for c in r.comparisons],
            "accuracy": r.accuracy,
            "stats": {"original": before.to_dict(), "compressed": after.to_dict()},
            "latency": latency,
            "runtime": b.runtime_choice,
            "artifact": None if artifact is None else {"path": str(artifact.path), "kind": artifact.kind,
                                                       "sha256": artifact.sha256, **artifact.details},
            "warnings": r.warnings,
            "bundle": str(p.output),
            "sparse_storage": sparse_storage,
            "wall_seconds": round(time.perf_counter() - t_start, 2),
            "stages": r.clock.rows,
        }
        files = ["model.onnx", *weights_file, "selfcheck/inputs.npz", "selfcheck/expected.npz", "selfcheck/original.npz", "run_bundle.py",
                 sparse_storage["file"]] + ([str(artifact.path), *getattr(artifact, "extra_files", ())] if artifact else [])
        manifest = {
            "schema_version": bundle_mod.MANIFEST_SCHEMA_VERSION,
            "tool": rep["tool"],
            "status": status,
            "source_model": {"path": str(model_path), "sha256": src_hash},
            "target": p.spec.to_dict(),
            "required_isa_features": list(p.spec.isa_features),
            "files": {name: {"sha256": sha256_file(bdir / name), "bytes": (bdir / name).stat().st_size} for name in files},
            "artifact": rep["artifact"],
            "runtime": b.runtime_choice,
            "inputs": rep["model"]["inputs"],
            "outputs": rep["model"]["outputs"],
            "passes": rep["passes"],
            "target_passes": b.target_passes,
            "verification": {"data": r.verif.source, "measured_on": _host_description(),
                             "runtime": "onnxruntime (ORT_DISABLE_ALL) and the artifact where it runs here",
                             "comparisons": rep["verification"], "accuracy": r.accuracy, "gate": rep["gate"]},
            "latency": latency,
            "warnings": r.warnings,
        }
        bundle_mod.write_json(bdir / "manifest.json", manifest)
        bundle_mod.write_json(bdir / "report.json", rep)
        (bdir / "report.md").write_text(report_mod.markdown(rep))
        (bdir / "recipe.yaml").write_text(dump_recipe(p.recipe(p.output.resolve())))
        stage.commit()
    except BaseException:
        stage.discard()
        raise
    return rep, (3 if status == "FAILED" else 0)
