"""meta_schedule tuning of the dense (fused TIR) functions of a Relax module, with a
persistent, reusable tuning database.

Why: TVM 0.27's CPU pipeline leaves every fused operator (``fused_matmul_add_relu``,
``fused_conv2d_add`` ...) with its naive loop nest, which runs 1.5-45x slower than
onnxruntime; the CPU dlight rules do not help. meta_schedule searches schedules
(tiling, vectorisation, parallelisation, unrolling) per fused function, *measuring*
each candidate on this host, and keeps the best ones in a database.

Flow (``TuningSession.prepare``):

1. Fuse the module exactly as the target's default CPU pipeline does
   (library dispatch + LegalizeOps + AnnotateTIROpPattern + FoldConstant + FuseOps +
   FuseTIR), so the tuned workloads are structurally identical to what compilation
   later sees.
2. Extract the tasks (one per distinct fused PrimFunc; already scheduled functions,
   e.g. our BSR kernels with ``tir.is_scheduled``, are skipped).
3. Budget: ``trials`` is spread evenly, ``T = ceil(trials / tasks)`` per task. A task
   whose workload is already in the database with at least ``T`` trials spent on it
   (ledger ``compressor_trials.json`` beside the JSON database) is *reused*; the others
   are tuned (gradient task scheduler; one build worker kept alive between batches, 120 s
   build timeout; ``LocalRunner``: measuring needs a quiet CPU; cost model ``xgb`` when
   xgboost is installed, else ``random``). Progress (trials done / total, best latency so
   far per task) goes through the ``progress`` callback. With ``--executor ray`` the candidates are
   built and measured on the Ray workers instead (``targets/tuning_ray.py``: TVM's PyBuilder /
   PyRunner over the run's executor); the scheduler and the database stay in this process. TVM's *default* schedule of each
   tuned function is measured as well and stored as a record with an identity trace, so the
   best record is never one that is slower than an untuned build.
4. Compile with the same pipeline plus ``MetaScheduleApplyDatabase`` right after
   FuseTIR: every fused function with a record gets its best schedule, the rest keep
   the default one.
5. The records used (best per task) are copied into ``<bundle>/tuning/`` as a small
   JSON database, so a device build or a later run can apply them without tuning.

Database location: ``--tuning-db DIR`` or ``$COMPRESSOR_TUNING_DB`` or
``$XDG_CACHE_HOME/compressor/tuning`` (``~/.cache/compressor/tuning``), with one
sub-folder per TVM target string (records tuned for one CPU are not valid for another).

Cross-compiled targets (arm) cannot measure here: ``apply_only`` uses an existing
database and reports that nothing was tuned.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from compressor.errors import DependencyError, TargetError, UsageError

log = logging.getLogger(__name__)
Progress = Callable[[str], None]

LEDGER = "compressor_trials.json"
WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"
BUNDLE_DIR = "tuning"
BUILD_TIMEOUT_S = 120
RUN_TIMEOUT_S = 30


# ---------------------------------------------------------------- locations


def default_db_root() -> Path:
    env = os.environ.get("COMPRESSOR_TUNING_DB")
    if env:
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "compressor" / "tuning"


def target_string(tvm_target: dict[str, Any]) -> str:
    """Canonical TVM target string (what records are valid for)."""
    from targets.tvm_backend import make_target

    return str(make_target(tvm_target))


def db_dir_for(tvm_target: dict[str, Any], root: str | Path | None = None) -> Path:
    """``ROOT/<kind>-<mcpu>-<sha12 of the target string>``."""
    text = target_string(tvm_target)
    slug = f"{tvm_target.get('kind', 'target')}-{tvm_target.get('mcpu', 'generic')}"
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", slug)
    return Path(root or default_db_root()) / f"{slug}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


# ---------------------------------------------------------------- TVM helpers


@contextlib.contextmanager
def _memoized_getmodule():
    """``inspect.getmodule(obj, filename)`` scans all of ``sys.modules`` on every call; TVMScript
    calls ``inspect.stack()`` once per parsed function, and ``tvm.s_tir.tensor_intrin`` parses
    hundreds of them: with torch loaded (TVM imports it) that import takes ~40 s. The module
    for a given file does not change during an import, so memoize by file name."""
    orig = inspect.getmodule
    cache: dict[str, Any] = {}

    def fast(obj, _filename=None):
        if _filename is None:
            return orig(obj)
        if _filename not in cache:
            cache[_filename] = orig(obj, _filename)
        return cache[_filename]

    inspect.getmodule = fast
    try:
        yield
    finally:
        inspect.getmodule = orig


def import_tensor_intrin() -> None:
    """Import ``tvm.s_tir.tensor_intrin`` (needed by the schedule rules and every build) fast."""
    import sys

    if "tvm.s_tir.tensor_intrin" in sys.modules:
        return
    with _memoized_getmodule():
        import tvm.s_tir.tensor_intrin  # noqa: F401


def worker_initializer() -> None:
    """Initializer of the builder's worker processes (a fresh pool per batch)."""
    import_tensor_intrin()


def _persistent_builder(ms, timeout_s: int):
    """A ``LocalBuilder`` that keeps its single worker process between batches.

    TVM's ``LocalBuilder`` starts a fresh process pool for every batch (a guard against a
    worker memory leak); each start imports TVM and its tensor intrinsics, several seconds
    on a loaded 2-core host -- more than building the batch. We keep one worker (same
    build/export functions, same per-build timeout: a timed-out worker is killed and
    replaced by the pool) and recycle it every ``RECYCLE_EVERY`` batches instead."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import local_builder as lb
    from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

    @derived_object
    class _Builder(ms.builder.PyBuilder):
        RECYCLE_EVERY = 20

        def __init__(self) -> None:
            super().__init__()
            self.pool = None
            self.batches = 0

        def _pool(self):
            if self.pool is None or self.batches >= self.RECYCLE_EVERY:
                if self.pool is not None:
                    self.pool.shutdown()
                self.pool = PopenPoolExecutor(max_workers=1, timeout=timeout_s, initializer=worker_initializer)
                self.batches = 0
            self.batches += 1
            return self.pool

        def build(self, build_inputs):
            args = [(None, None, bi.mod, bi.target, lb._serialize_params(bi.params)) for bi in build_inputs]
            results = []
            for res in self._pool().map_with_error_catching(lambda x: lb._worker_func(*x), args):
                if res.status == StatusKind.COMPLETE:
                    results.append(ms.builder.BuilderResult(res.value, None))
                elif res.status == StatusKind.TIMEOUT:
                    results.append(ms.builder.BuilderResult(None, f"build timed out after {timeout_s} s"))
                else:
                    results.append(ms.builder.BuilderResult(None, f"build failed: {res.value}"))
            return results

        def close(self) -> None:
            if self.pool is not None:
                self.pool.shutdown()
                self.pool = None

    return _Builder()


def _ms():
    try:
        import psutil  # noqa: F401  (meta_schedule's runners need both)
        import cloudpickle  # noqa: F401
        import tvm.s_tir.meta_schedule as ms
    except ImportError as exc:
        raise DependencyError(f"meta_schedule tuning needs {exc.name}", hint="pip install psutil cloudpickle") from exc
    import_tensor_intrin()
    return ms


def fuse_passes(target) -> list:
    """The CPU pipeline up to FuseTIR (``targets.cpu_schedules.fuse_passes``: fast math,
    dispatch, legalize/fuse): its fused functions are the tasks and keys of the records."""
    from targets import cpu_schedules

    return cpu_schedules.fuse_passes(target)


def fuse(mod, target):
    import tvm

    with target:
        return tvm.transform.Sequential(fuse_passes(target))(mod)


def tuned_pipeline(target, database, stats: dict | None = None):
    """The CPU default pipeline with ``MetaScheduleApplyDatabase`` after FuseTIR (functions
    without a record then get the default schedules of ``targets.cpu_schedules``)."""
    from targets import cpu_schedules

    return cpu_schedules.pipeline(target, database, stats)


def open_database(path: Path):
    """Open (or create) the JSON tuning database at ``path``. A database that TVM cannot reload
    (seen: a record whose trace replays an RFactor fails with "parallel_for_dynamic") is repaired
    by dropping the records that do not load, one by one; what was dropped is logged and kept in
    ``<record file>.dropped`` instead of breaking every later tuned build."""
    ms = _ms()
    path.mkdir(parents=True, exist_ok=True)

    def _open():
        return ms.database.JSONDatabase(path_workload=str(path / WORKLOAD_FILE),
                                        path_tuning_record=str(path / RECORD_FILE), allow_missing=True)

    try:
        return _open()
    except Exception as exc:  # TVM raises its own error types
        dropped = _drop_unloadable_records(path)
        log.warning("tuning database %s did not load (%s); dropped %d record(s) that do not load",
                    path, " ".join(str(exc).split())[:120], dropped)
        return _open()


def _drop_unloadable_records(path: Path) -> int:
    """Keep only the record lines TVM can rebuild against their workload; returns how many were dropped."""
    import json

    ms = _ms()
    rec_file, wl_file = path / RECORD_FILE, path / WORKLOAD_FILE
    workloads = []
    for line in (wl_file.read_text().splitlines() if wl_file.exists() else []):
        try:
            workloads.append(ms.database.Workload.from_json(json.loads(line)))
        except Exception:
            workloads.append(None)
    keep, drop = [], []
    for line in (rec_file.read_text().splitlines() if rec_file.exists() else []):
        if not line.strip():
            continue
        try:
            idx, rec = json.loads(line)
            ms.database.TuningRecord.from_json(rec, workloads[idx])
            keep.append(line)
        except Exception:
            drop.append(line)
    if drop:
        with open(rec_file.with_name(rec_file.name + ".dropped"), "a") as f:
            f.write("\n".join(drop) + "\n")
        tmp = rec_file.with_name(rec_file.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, rec_file)
    return len(drop)


def _num_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def _workload_key(mod) -> str:
    return hashlib.sha256(mod.script().encode()).hexdigest()[:20]


def _flops(mod) -> float:
    try:
        from tvm.s_tir.analysis import estimate_tir_flops

        return float(estimate_tir_flops(mod))
    except Exception:  # unknown: tune it
        return 1.0


def _is_scheduled(mod) -> bool:
    """A hand-scheduled function (our BSR kernels) is not a tuning task."""
    for func in mod.functions.values():
        attrs = getattr(func, "attrs", None)
        if attrs is not None and any(bool(attrs.get(k, False)) for k in ("tirx.is_scheduled", "tir.is_scheduled")):
            return True
    return False


def _best_record(db, mod):
    if not db.has_workload(mod):
        return None
    recs = db.get_top_k(db.commit_workload(mod), 1)
    return recs[0] if len(recs) else None


def _record_seconds(rec) -> float | None:
    secs = [float(s) for s in (rec.run_secs or [])]
    return sum(secs) / len(secs) if secs else None


# ---------------------------------------------------------------- session


@dataclass
class TuningInfo:
    """What tuning did, for the report and the manifest."""

    target: str
    database: str
    trials_requested: int
    per_task_budget: int = 0
    trials_run: int = 0
    tasks: int = 0
    tasks_tuned: int = 0
    tasks_reused: int = 0
    records_applied: int = 0
    default_kept: int = 0  # functions whose best measured schedule is the untuned build's (cpu_schedules or none)
    skipped_data_movement: int = 0  # functions without arithmetic (reshape ...): not tuned
    skipped_elementwise: int = 0  # all-injective functions: the default schedule is already parallel + vectorized
    whole_model_ms: dict[str, float] = field(default_factory=dict)  # end-to-end check: tuned vs untuned build
    kept: str = "tuned"  # "untuned" when the whole tuned model measured slower (see keep_faster)
    cost_model: str = ""
    executor: str = "local"  # where candidates were built and measured: local | ray (targets/tuning_ray.py)
    workers: int = 1  # executor slots (Ray CPUs) the candidates were spread over
    remote: dict[str, Any] = field(default_factory=dict)  # ray: tasks, bytes moved, build/measure wall time
    seconds: float = 0.0
    mode: str = "tune"  # tune | apply-only
    files: list[str] = field(default_factory=list)
    task_table: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def _progress_callback(ms, names: list[str], total: int, progress: Progress | None, counts: dict[int, int],
                       best: dict[int, float]):
    from tvm.ir.utils import derived_object

    @derived_object
    class _Progress(ms.measure_callback.PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            if len(runner_results) == 0:  # the search produced no candidate this round
                return
            tid = int(task_id)
            counts[tid] = counts.get(tid, 0) + len(runner_results)
            for res in runner_results:
                secs = [float(s) for s in (res.run_secs or [])]
                if secs and not res.error_msg:
                    best[tid] = min(best.get(tid, math.inf), sum(secs) / len(secs))
            done = sum(counts.values())
            b = best.get(tid)
            msg = (f"      tuning {done}/{total} trials; {names[tid]}: "
                   + (f"best {b * 1e3:.4f} ms" if b is not None else "no valid candidate yet"))
            if progress is not None:
                progress(msg)
            log.info(msg.strip())

    return _Progress()


def _remote_executor(executor: Any) -> Any:
    """The Ray executor to build/measure on, or None for the local builder/runner. ``executor`` is an
    ``Executor`` or the run's ``RunExecutor`` session (started only here, when there is something to tune)."""
    from compressor.executor import Executor, RunExecutor

    if isinstance(executor, RunExecutor):
        return executor.get("tuning") if executor.kind != "local" else None
    if isinstance(executor, Executor) and executor.name != "local":
        return executor
    return None


def tune(mod, tvm_target: dict[str, Any], trials: int, db_root: str | Path | None = None,
         progress: Progress | None = None, seed: int = 0, executor: Any = None) -> tuple[Any, TuningInfo, list]:
    """Tune the fused functions of ``mod`` (reusing the database), return
    ``(database, info, tasks)``; ``tasks`` are the extracted workloads (for ``export``).
    ``executor`` (an ``Executor`` or the run's ``RunExecutor``; ray): candidates are built and
    measured on its workers (``targets/tuning_ray.py``), the database stays here."""
    if trials < 0:
        raise UsageError(f"--tune-trials must be >= 0, got {trials}")
    ms = _ms()
    from targets.tvm_backend import make_target

    t0 = time.perf_counter()
    target = make_target(tvm_target)
    tune_target = make_target({**tvm_target, "num-cores": _num_cores()})
    db_path = db_dir_for(tvm_target, db_root)
    info = TuningInfo(target=str(target), database=str(db_path), trials_requested=trials)
    try:
        db = open_database(db_path)
    except Exception as exc:
        raise TargetError(f"cannot open the tuning database {db_path}: {exc}") from exc
    fused = fuse(mod, target)
    tasks = list(ms.relax_integration.extract_tasks(fused, tune_target))
    tasks = [t for t in tasks if not _is_scheduled(t.dispatched[0])]
    # pure data movement (reshape/transpose: no arithmetic) is left to the default schedule:
    # the budget goes to functions that compute
    moving = [t for t in tasks if _flops(t.dispatched[0]) == 0]
    tasks = [t for t in tasks if _flops(t.dispatched[0]) > 0]
    # all-injective functions (activations, RNN gates, residual adds) keep targets.cpu_schedules'
    # fused, vectorized, parallel loop: the search has nothing else to try there, and its
    # evolutionary sampling spun for minutes looking for distinct candidates (GRU gates: 3 of
    # 18 trials in 3.5 min)
    from targets import cpu_schedules

    elementwise = [t for t in tasks if cpu_schedules.all_injective(_main_func(t.dispatched[0]))] \
        if target.kind.name == "llvm" else []
    skip = {id(t) for t in elementwise}
    tasks = [t for t in tasks if id(t) not in skip]
    info.skipped_data_movement = len(moving)
    info.skipped_elementwise = len(elementwise)
    info.tasks = len(tasks)
    if not tasks:
        info.seconds = round(time.perf_counter() - t0, 2)
        return db, info, tasks
    ledger_path = db_path / LEDGER
    ledger: dict[str, int] = json.loads(ledger_path.read_text()) if ledger_path.is_file() else {}
    budget = max(1, math.ceil(trials / len(tasks))) if trials > 0 else 0
    info.per_task_budget = budget
    todo = []
    for t in tasks:
        key = _workload_key(t.dispatched[0])
        has = _best_record(db, t.dispatched[0]) is not None
        if budget == 0 or (has and ledger.get(key, 0) >= budget):
            info.tasks_reused += int(has)
        else:
            todo.append(t)
    if todo:
        total = budget * len(todo)
        if progress:
            progress(f"      tuning {len(todo)} of {len(tasks)} fused functions, {budget} trials each "
                     f"({total} trials; {info.tasks_reused} reused from {db_path})")
        try:
            import xgboost  # noqa: F401

            cost_model = "xgb"
        except ImportError:
            cost_model = "random"  # xgboost is optional; with small budgets the search is near-random anyway
        info.cost_model = cost_model
        names = [t.task_name for t in todo]
        ctxs, weights = [], []
        from tvm.s_tir.meta_schedule.tune_context import TuneContext

        rand = ms.utils.fork_seed(seed, n=len(todo))
        for t, r in zip(todo, rand):
            # population sized to the budget: the default (512 candidates, 4 genetic rounds per
            # iteration) costs tens of seconds per task on 2 cores, more than a small budget's trials
            pop = int(min(512, max(64, 16 * budget)))
            strategy = ms.search_strategy.EvolutionarySearch(
                population_size=pop, init_min_unmeasured=min(50, pop // 2), genetic_num_iters=2 if budget < 32 else 4)
            ctxs.append(TuneContext(mod=t.dispatched[0], target=tune_target, space_generator="post-order-apply",
                                    search_strategy=strategy, task_name=t.task_name,
                                    logger=logging.getLogger(f"{__name__}.task.{t.task_name}"),
                                    rand_state=r, num_threads=_num_cores()).clone())
            weights.append(float(t.weight))
        counts: dict[int, int] = {}
        best: dict[int, float] = {}
        callbacks = list(ms.MeasureCallback.create("default")) + [
            _progress_callback(ms, names, total, progress, counts, best)]
        evaluator = ms.runner.EvaluatorConfig(number=3, repeat=2, min_repeat_ms=40)
        remote = _remote_executor(executor)
        remote_stats = None
        if remote is not None:
            from targets import tuning_ray

            builder, runner, remote_stats = tuning_ray.make_builder_runner(ms, remote, evaluator)
            info.executor, info.workers = remote.name, remote.slots
            if progress:
                progress(f"      candidates built and measured on {remote.describe()}")
        else:
            builder = _persistent_builder(ms, BUILD_TIMEOUT_S)
            runner = ms.runner.LocalRunner(timeout_sec=RUN_TIMEOUT_S, evaluator_config=evaluator)
        work_dir = tempfile.mkdtemp(prefix="compressor-tune-")
        ms_logger = logging.getLogger("tvm.s_tir.meta_schedule")
        try:
            _tune_and_measure_defaults(ms, info, ctxs, weights, work_dir, total, budget, builder, runner, db,
                                       cost_model, callbacks, todo, tune_target, ms_logger)
        finally:
            builder.close()
            shutil.rmtree(work_dir, ignore_errors=True)
        if remote_stats is not None:
            info.remote = remote_stats.to_dict()
            if remote_stats.retries:
                info.warnings.append(f"tuning on {remote.name}: {remote_stats.retries} task attempt(s) retried after "
                                     f"worker failures")
        info.trials_run = sum(counts.values())
        info.tasks_tuned = len(todo)
        for t in todo:
            k = _workload_key(t.dispatched[0])
            ledger[k] = max(ledger.get(k, 0), budget)
        tmp = ledger_path.with_name(LEDGER + ".tmp")
        tmp.write_text(json.dumps(ledger, indent=1, sort_keys=True))
        os.replace(tmp, ledger_path)
        failed = [names[i] for i in range(len(todo)) if i not in best]
        if failed:
            info.warnings.append(f"no valid schedule found for {len(failed)} fused function(s) "
                                 f"({', '.join(failed[:5])}{'...' if len(failed) > 5 else ''}): default schedule kept")
    elif progress and budget:
        progress(f"      tuning: all {len(tasks)} fused functions already tuned with >= {budget} trials in {db_path}: reused")
    elif progress:
        progress(f"      tuning: applying the records of {info.tasks_reused} of {len(tasks)} fused functions from {db_path}")
    info.seconds = round(time.perf_counter() - t0, 2)
    return db, info, tasks


def _tune_and_measure_defaults(ms, info: TuningInfo, ctxs, weights, work_dir, total, budget, builder, runner, db,
                               cost_model, callbacks, todo, tune_target, ms_logger) -> None:
    try:
        with _quiet(ms_logger):
            ms.tune_tasks(tasks=ctxs, task_weights=weights, work_dir=work_dir, max_trials_global=total,
                          max_trials_per_task=budget, num_trials_per_iter=min(budget, 16), builder=builder,
                          runner=runner, database=db, cost_model=cost_model, measure_callbacks=callbacks,
                          task_scheduler="gradient")
    except Exception as exc:
        from targets.tvm_backend import one_line

        raise TargetError(f"meta_schedule tuning failed: {one_line(exc)}") from exc
    try:
        with _quiet(ms_logger):
            measured = _measure_defaults(ms, builder, runner, todo, tune_target, db)
        if measured < len(todo):
            info.warnings.append(f"the default (untuned) schedule could not be measured for {len(todo) - measured} of "
                                 f"{len(todo)} fused functions: their tuned record applies even if slower")
    except Exception as exc:  # the tuned records still apply; say that the guard is missing
        from targets.tvm_backend import one_line

        info.warnings.append(f"could not measure the default (untuned) schedules ({one_line(exc)}): a tuned record "
                             f"is applied even where it may be slower than the default")


def _identity_trace(s_tir, mod):
    """A trace that leaves the function as it is. The JSON database never returns records with
    an *empty* trace from ``get_top_k``, so the trace holds one no-op ``GetSBlock``."""
    sch = s_tir.Schedule(mod)
    try:
        sch.get_sblock("root", "main")
    except Exception:  # no root block: the first block of the function
        name = re.findall(r'T\.sblock\("([^"]+)"\)', mod.script())
        if name:
            sch.get_sblock(name[0], "main")
    return sch.trace


def _is_identity(trace) -> bool:
    return all(str(inst.kind.name) == "GetSBlock" for inst in trace.insts)


def _main_func(m):
    return m["main"] if "main" in [g.name_hint for g in m.get_global_vars()] else m[m.get_global_vars()[0]]


def _default_schedule(s_tir, m, target):
    """``(trace, module)`` of what an untuned build compiles for the fused function ``m``: the
    schedule of ``targets.cpu_schedules`` where one of its rules applies, else the function
    as it is (an identity trace)."""
    from targets import cpu_schedules

    sch = cpu_schedules.default_schedule(_main_func(m), target) if target.kind.name == "llvm" else None
    if sch is not None:
        return sch.trace, sch.mod
    return _identity_trace(s_tir, m), m


def _is_default(s_tir, trace, m, target) -> bool:
    """Whether a record's trace is the untuned build's schedule of ``m``."""
    if _is_identity(trace):
        return True
    try:
        return str(trace) == str(_default_schedule(s_tir, m, target)[0])
    except Exception:  # a rule that cannot rebuild its schedule here: the record is a tuned one
        return False


def _measure_defaults(ms, builder, runner, tasks: list, target, db) -> int:
    """Measure every task's *default* function (what an untuned build compiles: the
    ``targets.cpu_schedules`` schedule, or the function as it is) with the same builder/runner
    and commit it as a record with that schedule's trace. The database's best record is then
    never slower than what an untuned build does (up to timing noise): with a small budget the
    random search can end with a worse schedule than the default one."""
    import tvm.s_tir as s_tir

    mods = [t.dispatched[0] for t in tasks]
    defaults = [_default_schedule(s_tir, m, target) for m in mods]
    built = builder.build([ms.builder.BuilderInput(d[1], target) for d in defaults])
    inputs, keep = [], []
    for m, (trace, _), b in zip(mods, defaults, built):
        if b.error_msg is None:
            args = ms.arg_info.ArgInfo.from_prim_func(_main_func(m))
            device = "cpu" if target.kind.name == "llvm" else target.kind.name
            inputs.append(ms.runner.RunnerInput(b.artifact_path, device, args))
            keep.append((m, trace, args, b.artifact_path))
    futures = runner.run(inputs)
    committed = 0
    for (m, trace, args, path), fut in zip(keep, futures):
        res = fut.result()
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)
        if res.error_msg is None and res.run_secs:
            db.commit_tuning_record(ms.database.TuningRecord(trace, db.commit_workload(m), res.run_secs, target, args))
            committed += 1
    return committed


@contextlib.contextmanager
def _quiet(logger: logging.Logger):
    """meta_schedule logs a task table per round at INFO; our progress callback replaces it."""
    old = logger.level
    if logger.getEffectiveLevel() < logging.WARNING:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(old)


def export(db, tasks: list, out_dir: Path, info: TuningInfo) -> list[str]:
    """Copy the best record of every task into ``out_dir/tuning`` (a JSON database);
    fills ``info.records_applied``/``task_table``; returns the written files relative to out_dir."""
    import tvm.s_tir as s_tir

    ms = _ms()
    dest = Path(out_dir) / BUNDLE_DIR
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    bundle_db = ms.database.JSONDatabase(path_workload=str(dest / WORKLOAD_FILE),
                                         path_tuning_record=str(dest / RECORD_FILE), allow_missing=True)
    applied = 0
    table = []
    for t in tasks:
        rec = _best_record(db, t.dispatched[0])
        secs = _record_seconds(rec) if rec is not None else None
        default = rec is not None and _is_default(s_tir, rec.trace, t.dispatched[0], rec.target)
        table.append({"task": t.task_name, "weight": int(t.weight), "tuned": rec is not None,
                      "schedule": "none" if rec is None else ("default" if default else "tuned"),
                      "best_ms": None if secs is None else round(secs * 1e3, 5)})
        if rec is None:
            continue
        info.default_kept += int(default)
        wl = bundle_db.commit_workload(t.dispatched[0])
        bundle_db.commit_tuning_record(ms.database.TuningRecord(rec.trace, wl, rec.run_secs, rec.target, rec.args_info))
        applied += 1
    info.records_applied = applied
    info.task_table = table
    files = [f"{BUNDLE_DIR}/{WORKLOAD_FILE}", f"{BUNDLE_DIR}/{RECORD_FILE}"]
    for f in files:
        (Path(out_dir) / f).touch(exist_ok=True)
    info.files = files
    return files


def prepare(mod, tvm_target: dict[str, Any], out_dir: Path, trials: int, db_root: str | Path | None = None,
            progress: Progress | None = None, measure_here: bool = True, executor: Any = None,
            stats: dict | None = None) -> tuple[Any, TuningInfo]:
    """Tune (or, with ``measure_here=False`` or ``trials == 0``, only look up) ``mod``'s fused
    functions, export the records into the bundle, and return ``(relax_pipeline, info)`` for
    ``tvm_backend.compile_library``."""
    from targets.tvm_backend import make_target

    if not measure_here and trials > 0:
        info_warn = (f"--tune-trials {trials}: tuning needs to measure on the target device, which this host "
                     f"cannot run; only records already in the tuning database are applied")
        trials = 0
    else:
        info_warn = None
    db, info, tasks = tune(mod, tvm_target, trials, db_root, progress, executor=executor)
    if trials == 0:
        info.mode = "apply-only"
    if info_warn:
        info.warnings.append(info_warn)
    export(db, tasks, out_dir, info)
    if info.tasks and info.records_applied < info.tasks:
        info.warnings.append(f"{info.tasks - info.records_applied} of {info.tasks} fused functions have no tuning "
                             f"record and keep the default schedule (targets/cpu_schedules.py, or none)")
    return tuned_pipeline(make_target(tvm_target), db, stats), info


def _random_args(mod) -> dict[str, Any]:
    import numpy as np

    rng = np.random.default_rng(0)
    feeds = {}
    for prm in mod["main"].params:
        ty = prm.ty  # relax TensorType (TVM 0.27)
        shape = [int(d) for d in ty.shape.values]
        dt = str(ty.dtype)
        feeds[str(prm.name)] = (rng.standard_normal(shape).astype(dt) if dt.startswith("float")
                                else np.zeros(shape, dtype=dt))
    return feeds


def keep_faster(mod, tvm_target: dict[str, Any], out: Path, info: TuningInfo, rounds: int = 5) -> None:
    """End-to-end guard: per-function records are measured in isolation (hot loop, warm thread
    pool); a chain of small parallel functions can still run slower as a whole model than
    TVM's untuned serial code. Build the untuned library too, time both (interleaved rounds,
    median) on random inputs, and keep the faster one; keeping the untuned one is a warning."""
    import statistics

    from targets import tvm_backend

    alt = out.with_name(out.name + ".untuned.so")
    try:
        tvm_backend.compile_library(mod, tvm_target, alt)
        feeds = _random_args(mod)
        t_tuned, t_untuned = [], []
        for _ in range(rounds):
            t_tuned.append(tvm_backend.time_library(out, feeds, repeat=10))
            t_untuned.append(tvm_backend.time_library(alt, feeds, repeat=10))
        tuned, untuned = statistics.median(t_tuned), statistics.median(t_untuned)
        info.whole_model_ms = {"tuned": round(tuned * 1e3, 5), "untuned": round(untuned * 1e3, 5)}
        if untuned < tuned * 0.97:
            os.replace(alt, out)
            info.kept = "untuned"
            info.warnings.append(f"the tuned build measured slower end to end ({tuned * 1e3:.4f} ms) than the untuned "
                                 f"one ({untuned * 1e3:.4f} ms) on this host: the untuned library is shipped "
                                 f"(more --tune-trials may help)")
    finally:
        alt.unlink(missing_ok=True)
