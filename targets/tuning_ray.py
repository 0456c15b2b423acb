"""meta_schedule candidates built and measured on executor workers (Ray), through TVM's own
builder/runner interfaces.

``targets/tuning.py`` drives TVM's task scheduler (search strategy, cost model, database) on
the driver. Each round the scheduler hands a batch of candidate schedules to a *builder*
(``BuilderInput``: a scheduled TIR ``IRModule`` + target -> ``BuilderResult``: a compiled
artifact) and then to a *runner* (``RunnerInput``: artifact + argument shapes ->
``RunnerFuture`` of ``RunnerResult``: measured seconds). This module supplies both as
``ms.builder.PyBuilder`` / ``ms.runner.PyRunner`` subclasses whose work is a fan-out on the
run's executor (``compressor.executor.Executor.map``); no worker pool of its own:

* **build** (one executor task per candidate): the driver serializes the module with
  ``tvm.ir.save_json`` and the target as its config dict (``Target.export()``); the worker
  (``_build_task``) reloads them, registers TVM's tensor intrinsics once per process
  (``tuning.import_tensor_intrin``, which the schedule rules' traces refer to), compiles with
  meta_schedule's own ``default_build``/``default_export`` (a ``.tar`` of objects) and returns the
  artifact *bytes*; the driver writes them to a local temporary directory, which is the
  ``artifact_path`` the scheduler sees. No shared file system between nodes is assumed.
* **measure** (one executor task per candidate): the worker (``_run_task``) writes the bytes to
  its own temporary directory and runs meta_schedule's ``local_runner._worker_func`` (load, random
  arguments, ``time_evaluator`` with the same ``EvaluatorConfig`` as the local runner), with TVM's
  thread pool sized to the machine's cores like the local runner's (Ray starts workers with
  ``OMP_NUM_THREADS=1``; the thread count used is recorded in ``stats.measure_threads``). Two
  measurements on one machine would time each other, so a measurement holds a per-machine file
  lock (``fcntl.flock`` on ``$TMPDIR/compressor-ms-measure.lock``): measurements run in parallel
  across machines, one at a time on each, while builds run on every slot.
* The **database stays on the driver**: the scheduler commits each measured record there (the
  persistent JSON database of ``tuning.py``), so a later run reuses records tuned on the cluster
  exactly like local ones.

The runner is synchronous (the futures it returns are already resolved): the scheduler waits
for a batch's results before its next round anyway. A build that fails (raises) is a failed
candidate (``BuilderResult.error_msg``), exactly like a failing local build; a worker that dies
is retried by the executor; a task past ``--task-timeout`` (default: TVM's build / run timeout plus
a minute for a fresh worker's imports) is cancelled and reported as a failed candidate.
``stats`` counts tasks and bytes moved for the report and ``bench/scale.py``.
"""
from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

log = logging.getLogger(__name__)

MEASURE_LOCK = "compressor-ms-measure.lock"
WORKER_START_SLACK_S = 60  # a fresh worker process imports TVM and its tensor intrinsics first


@dataclass
class RemoteStats:
    """What the fan-out of one tuning run moved and cost (summed over rounds)."""

    build_tasks: int = 0
    run_tasks: int = 0
    failed_tasks: int = 0
    retries: int = 0
    bytes_to_workers: int = 0  # serialized modules + artifacts shipped for measurement
    bytes_from_workers: int = 0  # artifacts returned by builds
    build_seconds: float = 0.0  # wall time of the build fan-outs
    run_seconds: float = 0.0  # wall time of the measure fan-outs
    measure_threads: list[int] = field(default_factory=list)  # distinct TVM runtime thread counts measured with

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["build_seconds"] = round(d["build_seconds"], 3)
        d["run_seconds"] = round(d["run_seconds"], 3)
        return d


# ---------------------------------------------------------------- worker side (module-level: picklable by reference)


def _worker_threads() -> int:
    """Give TVM's runtime thread pool all cores of this machine, as the local runner has. Ray starts
    workers with OMP_NUM_THREADS=1 (one per CPU granted), which TVM's pool would read: candidates
    would be timed single-threaded while the target (``num-cores``) and the deployed model use every
    core. A measurement holds the machine lock, so it owns the machine. ``TVM_NUM_THREADS`` set by the
    user wins; the pool reads it when first created, so this runs before anything else in the task."""
    from targets.tuning import _num_cores

    os.environ.setdefault("TVM_NUM_THREADS", str(_num_cores()))
    return int(os.environ["TVM_NUM_THREADS"])


def _build_task(mod_json: str, target_config: dict[str, Any]) -> tuple[str, bytes]:
    """Compile one candidate; returns (artifact file name, artifact bytes)."""
    _worker_threads()
    from targets.tuning import import_tensor_intrin

    import_tensor_intrin()
    import tvm
    from tvm.s_tir.meta_schedule.builder import local_builder as lb

    mod = tvm.ir.load_json(mod_json)
    path = lb._worker_func(None, None, mod, tvm.target.Target(target_config), None)
    try:
        with open(path, "rb") as f:
            return os.path.basename(path), f.read()
    finally:
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)


def _run_task(name: str, artifact: bytes, device_type: str, args_json: tuple, evaluator: Any,
              alloc_repeat: int) -> tuple[list[float], int]:
    """Measure one built candidate on this machine (one measurement per machine at a time);
    returns (seconds per repeat, TVM runtime threads it ran with)."""
    _worker_threads()
    from targets.tuning import import_tensor_intrin

    import_tensor_intrin()
    import tvm
    from tvm.s_tir.meta_schedule.runner import local_runner as lr

    d = tempfile.mkdtemp(prefix="compressor-ms-run-")
    try:
        path = os.path.join(d, name)
        with open(path, "wb") as f:
            f.write(artifact)
        with open(os.path.join(tempfile.gettempdir(), MEASURE_LOCK), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                costs = lr._worker_func(None, None, None, evaluator, alloc_repeat, path, device_type, args_json)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        return [float(c) for c in costs], int(tvm.runtime.num_threads())
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _warm_task(_: int) -> int:
    """Import TVM and its tensor intrinsics in a worker process (done once per process)."""
    _worker_threads()
    from targets.tuning import import_tensor_intrin

    import_tensor_intrin()
    return os.getpid()


def warm_workers(executor: Any) -> None:
    """Start TVM in every worker slot before timing (first use otherwise pays it inside a round)."""
    executor.map(_warm_task, [(i,) for i in range(executor.slots)], label="tuning warm-up")


# ---------------------------------------------------------------- driver side


def make_builder_runner(ms: Any, executor: Any, evaluator_config: Any, alloc_repeat: int = 1,
                        stats: RemoteStats | None = None) -> tuple[Any, Any, RemoteStats]:
    """``(builder, runner, stats)`` fanning builds and measurements out on ``executor``."""
    import tvm
    from tvm.ir.utils import derived_object

    from targets.tuning import BUILD_TIMEOUT_S, RUN_TIMEOUT_S

    st = stats if stats is not None else RemoteStats()

    def _map(fn, args, label: str, timeout_s: float):
        """``executor.map`` with a per-task timeout (the user's --task-timeout if set, else TVM's
        builder/runner timeout plus slack for a fresh worker importing TVM): a hung build or
        measurement is a failed candidate, never a hung tuning run."""
        old = executor.timeout_s
        executor.timeout_s = old or timeout_s + WORKER_START_SLACK_S
        try:
            outs = executor.map(fn, args, label=label, total=len(args))
        finally:
            executor.timeout_s = old
        st.failed_tasks += executor.last_stats.failed
        st.retries += executor.last_stats.retries
        return outs

    @derived_object
    class _ExecutorBuilder(ms.builder.PyBuilder):
        """Builds on the executor's workers; artifacts land in a driver-side temp dir."""

        def __init__(self) -> None:
            super().__init__()
            self.dirs: list[str] = []

        def build(self, build_inputs):
            args = []
            for bi in build_inputs:
                if bi.params is not None and len(bi.params):
                    raise ValueError("executor builder: BuilderInput.params are not supported")
                mod_json = tvm.ir.save_json(bi.mod)
                st.bytes_to_workers += len(mod_json)
                args.append((mod_json, dict(bi.target.export())))
            t0 = time.perf_counter()
            outs = _map(_build_task, args, "tuning builds", BUILD_TIMEOUT_S)
            st.build_seconds += time.perf_counter() - t0
            st.build_tasks += len(args)
            results = []
            for o in outs:
                if not o.ok:
                    results.append(ms.builder.BuilderResult(None, f"build failed on a worker: {o.error}"))
                    continue
                name, data = o.value
                st.bytes_from_workers += len(data)
                d = tempfile.mkdtemp(prefix="compressor-ms-art-")
                self.dirs.append(d)
                path = os.path.join(d, name)
                with open(path, "wb") as f:
                    f.write(data)
                results.append(ms.builder.BuilderResult(path, None))
            return results

        def close(self) -> None:
            for d in self.dirs:
                shutil.rmtree(d, ignore_errors=True)
            self.dirs = []

    @derived_object
    class _DoneFuture(ms.runner.PyRunnerFuture):
        def __init__(self, secs, err) -> None:
            super().__init__()
            self.secs, self.err = secs, err

        def done(self) -> bool:
            return True

        def result(self):
            return ms.runner.RunnerResult(self.secs, self.err)

    @derived_object
    class _ExecutorRunner(ms.runner.PyRunner):
        """Measures on the executor's workers (one measurement per machine at a time)."""

        def run(self, runner_inputs):
            args = []
            for ri in runner_inputs:
                path = str(ri.artifact_path)
                with open(path, "rb") as f:
                    data = f.read()
                st.bytes_to_workers += len(data)
                args.append((os.path.basename(path), data, str(ri.device_type),
                             tuple(a.as_json() for a in ri.args_info), evaluator_config, alloc_repeat))
            t0 = time.perf_counter()
            # at most `slots` measurements are in flight, queued on a machine's lock: allow for those ahead
            outs = _map(_run_task, args, "tuning measurements", RUN_TIMEOUT_S * max(1, executor.slots))
            st.run_seconds += time.perf_counter() - t0
            st.run_tasks += len(args)
            futures = []
            for o in outs:
                if o.ok:
                    secs, threads = o.value
                    if threads not in st.measure_threads:
                        st.measure_threads.append(threads)
                    futures.append(_DoneFuture(secs, None))
                else:
                    futures.append(_DoneFuture(None, f"measurement failed on a worker: {o.error}"))
            return futures

    return _ExecutorBuilder(), _ExecutorRunner(), st
