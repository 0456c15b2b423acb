"""Where independent tasks run: in this process (``local``, the default) or on a Ray cluster (``ray``).

A stage that fans out (the sensitivity sweep's layer x sparsity probes, the
model x target jobs of ``compress batch``) describes its work as a function
and a list of argument tuples and calls ``Executor.map``. The function must be
a module-level function (picklable by reference) and deterministic: the same
arguments give the same value wherever it runs, which is what makes a Ray run
equal to a local one.

Large inputs shared by all tasks (the model, the calibration samples, the dense
reference outputs) are handed over once with ``Executor.put``: locally that is
the object itself, on Ray an ``ObjectRef`` into the object store (``ray.put``),
so each node fetches the bytes once and tasks on it read them zero-copy.

Ray executor semantics
  * Without an address a private local instance is started for the run
    (``ray.init(num_cpus=..., include_dashboard=False)``, bound to 127.0.0.1)
    and shut down by ``close()``; with ``address`` it connects to a running
    cluster (``ray start --head`` / ``ray start --address``) and only
    disconnects at the end.
  * Each task reserves one CPU. At most ``slots`` tasks (the cluster's CPUs,
    at least 1) are in flight; further arguments are drawn from the iterable
    only as tasks finish, so a generator of per-task payloads (e.g. masked
    weights) never materialises all at once.
  * A worker process that dies (killed, OOM) is retried by Ray up to
    ``max_retries`` times; a task that raises is not retried (the error is
    deterministic) and is reported as a failed outcome with its one-line error.
    Every attempt is logged in a small actor so the report can state retries.
  * ``timeout_s`` bounds a task's time from submission (close to its run time,
    since no more tasks than CPUs are in flight); a task past it is cancelled
    (its worker is killed) and reported as failed. The loop never blocks
    without a deadline, so the run cannot hang on a lost task.

The local executor runs tasks one by one in this process; exceptions become
failed outcomes the same way; it has no preemption, so ``timeout_s`` is
checked after each task only (a late task is reported failed, not cut short).

Progress: ``map(..., progress=cb)`` calls ``cb(Progress)`` after every
completion (done / running / failed / retries / ETA).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from compressor.errors import CompressorError, DependencyError, UsageError

log = logging.getLogger(__name__)

EXECUTORS = ("local", "ray")
RAY_HINT = "install the optional extra: pip install 'compressor[ray]' (or: pip install ray)"


class ExecutorError(CompressorError):
    """A fanned-out stage could not complete (tasks failed after their retries)."""


@dataclass
class Outcome:
    """One task's result: ``value`` if ``ok``, else ``error`` (one line)."""

    index: int
    value: Any = None
    error: str | None = None
    attempts: int = 1
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class Progress:
    label: str
    total: int
    done: int = 0
    running: int = 0
    failed: int = 0
    retries: int = 0
    elapsed: float = 0.0

    @property
    def eta(self) -> float | None:
        finished = self.done + self.failed
        if finished == 0:
            return None
        return self.elapsed / finished * (self.total - finished)

    def line(self) -> str:
        eta = "?" if self.eta is None else f"{self.eta:.0f}s"
        bar_w = 20
        fill = int(bar_w * (self.done + self.failed) / max(self.total, 1))
        return (f"{self.label} [{'#' * fill}{'.' * (bar_w - fill)}] {self.done}/{self.total} done, "
                f"{self.running} running, {self.failed} failed, {self.retries} retried, "
                f"{self.elapsed:.0f}s elapsed, ETA {eta}")


ProgressFn = Callable[[Progress], None]


@dataclass
class RunStats:
    """What a stage's fan-out cost; goes into reports."""

    executor: str
    tasks: int = 0
    failed: int = 0
    retries: int = 0
    seconds: float = 0.0
    slots: int = 1
    retried_tasks: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"executor": self.executor, "tasks": self.tasks, "failed": self.failed, "retries": self.retries,
                "seconds": round(self.seconds, 3), "slots": self.slots, "retried_tasks": self.retried_tasks}


def error_line(exc: BaseException) -> str:
    """One line for a task's exception (Ray wraps it: use the original cause when there is one)."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException) and cause is not exc:
        exc = cause
    if isinstance(exc, CompressorError):
        return exc.one_line()
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}"[:400]


class Executor:
    """Runs ``fn(*shared, *args)`` for every ``args`` in ``tasks``; outcomes in task order."""

    name = "base"

    def __init__(self, max_retries: int = 3, timeout_s: float | None = None):
        if max_retries < 0:
            raise UsageError(f"--max-retries must be >= 0, got {max_retries}")
        if timeout_s is not None and timeout_s <= 0:
            raise UsageError(f"--task-timeout must be > 0 seconds, got {timeout_s}")
        self.max_retries = max_retries
        self.timeout_s = timeout_s
        self.last_stats = RunStats(self.name)

    @property
    def slots(self) -> int:
        return 1

    def put(self, obj: Any) -> Any:
        return obj

    def map(self, fn: Callable[..., Any], tasks: Iterable[tuple], shared: tuple = (), *, label: str = "tasks",
            total: int | None = None, progress: ProgressFn | None = None) -> list[Outcome]:
        raise NotImplementedError

    def describe(self) -> str:
        return self.name

    def close(self) -> None:
        pass

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _with_bar(label: str, n: int, progress: ProgressFn | None) -> tuple[ProgressFn, Any]:
    """``progress`` plus a terminal progress bar (``compressor.progress``; a no-op when bars are off)
    advanced by every completed or failed task."""
    from compressor import progress as bars

    bar = bars.bar(label, n)
    seen = [0]

    def cb(p: Progress) -> None:
        finished = p.done + p.failed
        if finished > seen[0]:
            bar.update(finished - seen[0])
            seen[0] = finished
        if progress:
            progress(p)

    return cb, bar


def _count(tasks: Iterable[tuple], total: int | None) -> int:
    if total is not None:
        return total
    try:
        return len(tasks)  # type: ignore[arg-type]
    except TypeError:
        return 0


class LocalExecutor(Executor):
    """In-process, one task at a time (the default; needs nothing extra)."""

    name = "local"

    def map(self, fn, tasks, shared=(), *, label="tasks", total=None, progress=None):
        n = _count(tasks, total)
        prog = Progress(label, n)
        progress, bar = _with_bar(label, n, progress)
        try:
            return self._map(fn, tasks, shared, prog, progress)
        finally:
            bar.close()

    def _map(self, fn, tasks, shared, prog: Progress, progress: ProgressFn) -> list[Outcome]:
        outcomes: list[Outcome] = []
        t0 = time.perf_counter()
        for i, args in enumerate(tasks):
            prog.running = 1
            ts = time.perf_counter()
            try:
                out = Outcome(i, fn(*shared, *args))
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # reported per task, the stage decides what a failure means
                log.debug("task %d failed", i, exc_info=True)
                out = Outcome(i, error=error_line(exc))
            out.seconds = time.perf_counter() - ts
            if out.ok and self.timeout_s is not None and out.seconds > self.timeout_s:
                out = Outcome(i, error=f"timed out: {out.seconds:.1f}s > {self.timeout_s:g}s (local executor: checked after the task)",
                              seconds=out.seconds)
            outcomes.append(out)
            prog.running = 0
            prog.done += out.ok
            prog.failed += not out.ok
            prog.total = max(prog.total, i + 1)
            prog.elapsed = time.perf_counter() - t0
            progress(prog)
        self.last_stats = RunStats(self.name, len(outcomes), prog.failed, 0, time.perf_counter() - t0, 1)
        return outcomes


def import_ray() -> Any:
    """The ``ray`` module, or exit 5 with the install hint."""
    try:
        import ray
    except ImportError as exc:
        raise DependencyError(f"--executor ray needs the 'ray' package, which is not installed ({exc})", hint=RAY_HINT) from None
    return ray


def _ray_call(fn: Callable[..., Any], attempts: Any, index: int, *args: Any) -> Any:
    """Body of every Ray task: log the attempt (so retries are visible), then run ``fn``."""
    if attempts is not None:
        import ray

        ray.get(attempts.start.remote(index, os.getpid()))
    return fn(*args)


class _AttemptLog:
    """Actor: task index -> worker pids of its attempts (one entry per start)."""

    def __init__(self) -> None:
        self.log: dict[int, list[int]] = {}

    def start(self, index: int, pid: int) -> None:
        self.log.setdefault(index, []).append(pid)

    def get(self) -> dict[int, list[int]]:
        return self.log


class RayExecutor(Executor):
    """Tasks on a Ray cluster: a private local instance, or ``address`` to join one."""

    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: int | None = None, max_retries: int = 3,
                 timeout_s: float | None = None, object_store_mb: int | None = None):
        super().__init__(max_retries, timeout_s)
        if num_cpus is not None and num_cpus < 1:
            raise UsageError(f"--num-cpus must be >= 1, got {num_cpus}")
        self.ray = import_ray()
        self.address = address
        self._owns = True  # this executor opened the connection (and closes it)
        if self.ray.is_initialized():  # e.g. a caller that already joined a cluster: theirs to close
            log.info("reusing the Ray connection of this process")
            self._owns = False
        elif address:
            try:
                self.ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
            except Exception as exc:  # ConnectionError and Ray's own types
                raise DependencyError(f"cannot connect to the Ray cluster at {address}: {error_line(exc)}",
                                      hint="start it with `ray start --head --port PORT` and pass --ray-address HOST:PORT") from None
        else:
            kw: dict[str, Any] = {}
            if object_store_mb:
                kw["object_store_memory"] = object_store_mb * 1024 * 1024
            # address="local": always a new private instance, never a cluster found on this machine
            self.ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False,
                          _node_ip_address="127.0.0.1", logging_level=logging.WARNING, log_to_driver=False, **kw)
        self._remote = self.ray.remote(_ray_call)
        self._actor_cls = self.ray.remote(num_cpus=0)(_AttemptLog)

    @property
    def slots(self) -> int:
        return max(1, int(self.ray.cluster_resources().get("CPU", 1)))

    def describe(self) -> str:
        where = f"cluster {self.address}" if self.address else "local instance"
        return f"ray ({where}, {len(self.ray.nodes())} node(s), {self.slots} CPU slots)"

    def put(self, obj: Any) -> Any:
        return self.ray.put(obj)

    def map(self, fn, tasks, shared=(), *, label="tasks", total=None, progress=None):
        ray = self.ray
        n = _count(tasks, total)
        prog = Progress(label, n)
        progress, bar = _with_bar(label, n, progress)
        shared_refs = tuple(s if isinstance(s, ray.ObjectRef) else ray.put(s) for s in shared)
        attempts = self._actor_cls.remote()
        opts = dict(max_retries=self.max_retries, retry_exceptions=False, num_cpus=1)
        it: Iterator[tuple] = iter(tasks)
        window = self.slots
        inflight: dict[Any, tuple[int, float]] = {}  # ref -> (index, submitted at)
        results: dict[int, Outcome] = {}
        t0 = time.perf_counter()
        next_index, exhausted = 0, False

        def submit() -> None:
            nonlocal next_index, exhausted
            while not exhausted and len(inflight) < window:
                try:
                    args = next(it)
                except StopIteration:
                    exhausted = True
                    return
                ref = self._remote.options(**opts).remote(fn, attempts, next_index, *shared_refs, *args)
                inflight[ref] = (next_index, time.perf_counter())
                next_index += 1

        try:
            submit()
            while inflight:
                now = time.perf_counter()
                wait_s = 1.0
                if self.timeout_s is not None:
                    wait_s = max(0.05, min(wait_s, min(ts + self.timeout_s - now for _, ts in inflight.values())))
                ready, _ = ray.wait(list(inflight), num_returns=1, timeout=wait_s)
                for ref in ready:
                    i, ts = inflight.pop(ref)
                    try:
                        out = Outcome(i, ray.get(ref))
                    except Exception as exc:  # RayTaskError, WorkerCrashedError after retries, ...
                        out = Outcome(i, error=error_line(exc))
                    out.seconds = time.perf_counter() - ts
                    results[i] = out
                    prog.done += out.ok
                    prog.failed += not out.ok
                if self.timeout_s is not None:
                    now = time.perf_counter()
                    for ref, (i, ts) in list(inflight.items()):
                        if now - ts > self.timeout_s:
                            ray.cancel(ref, force=True)
                            inflight.pop(ref)
                            results[i] = Outcome(i, error=f"timed out after {self.timeout_s:g}s (task cancelled)", seconds=now - ts)
                            prog.failed += 1
                submit()
                prog.running = len(inflight)
                prog.total = max(n, next_index)
                prog.elapsed = time.perf_counter() - t0
                if ready and progress:
                    progress(prog)
            log_ = ray.get(attempts.get.remote(), timeout=60)
        finally:
            bar.close()
            for ref in inflight:
                ray.cancel(ref, force=True)
            ray.kill(attempts)
        retried = sorted(i for i, pids in log_.items() if len(pids) > 1)
        for i in retried:
            if i in results:
                results[i].attempts = len(log_[i])
        retries = sum(len(log_[i]) - 1 for i in retried)
        if progress and retries != prog.retries:
            prog.retries = retries
            progress(prog)
        out = [results[i] for i in range(next_index)]
        self.last_stats = RunStats(self.name, len(out), prog.failed, retries, time.perf_counter() - t0, window, retried)
        if retries:
            log.info("%s: %d task attempt(s) retried after worker failures (tasks %s)", label, retries, retried)
        return out

    def close(self) -> None:
        if self._owns and self.ray.is_initialized():
            self.ray.shutdown()  # stops the private instance; for a cluster, only disconnects


def make_executor(kind: str = "local", address: str | None = None, num_cpus: int | None = None,
                  max_retries: int = 3, timeout_s: float | None = None) -> Executor:
    if kind not in EXECUTORS:
        raise UsageError(f"unknown executor {kind!r}", hint=f"choose one of: {', '.join(EXECUTORS)}")
    if kind == "local":
        if address:
            raise UsageError("--ray-address needs --executor ray")
        return LocalExecutor(max_retries, timeout_s)
    return RayExecutor(address, num_cpus, max_retries, timeout_s)


class RunExecutor:
    """The executor of one ``compress`` run, shared by its passes (``PassContext.executor_session``).

    Started on first use (a run whose passes fan out nothing never starts Ray) and closed once, at the end
    of the run, by the pipeline: every fanned-out stage of the run uses the same instance / connection.
    ``uses`` lists the stages that ran on it, for the report."""

    def __init__(self, kind: str = "local", address: str | None = None):
        if kind not in EXECUTORS:
            raise UsageError(f"unknown executor {kind!r}", hint=f"choose one of: {', '.join(EXECUTORS)}")
        if address and kind != "ray":
            raise UsageError("--ray-address needs --executor ray")
        self.kind, self.address = kind, address
        self._ex: Executor | None = None
        self.uses: list[str] = []

    def get(self, stage: str) -> Executor:
        if self._ex is None:
            self._ex = make_executor(self.kind, self.address)
            log.info("executor for this run: %s", self._ex.describe())
        self.uses.append(stage)
        return self._ex

    @property
    def started(self) -> bool:
        return self._ex is not None

    def close(self) -> None:
        if self._ex is not None:
            self._ex.close()
            self._ex = None

    def __enter__(self) -> "RunExecutor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def for_stage(ctx: Any, stage: str) -> Executor:
    """The run's executor for a fanned-out stage of a pass; in-process when the pass runs outside a pipeline run."""
    session = getattr(ctx, "executor_session", None)
    return session.get(stage) if isinstance(session, RunExecutor) else LocalExecutor()


def add_cli_flags(p: Any, core: bool = True) -> None:
    """The executor flags of ``analyze`` and ``batch`` (``core=False``: all but --executor/--ray-address,
    which the main compress flags already define)."""
    if core:
        p.add_argument("--executor", default="local", choices=list(EXECUTORS), help="where tasks run: local (default) | ray")
        p.add_argument("--ray-address", metavar="HOST:PORT", help="--executor ray: join this cluster (default: start a local instance for the run)")
    p.add_argument("--num-cpus", type=int, help="--executor ray without --ray-address: CPUs of the local instance (default: all)")
    p.add_argument("--max-retries", type=int, default=3, help="--executor ray: retries of a task whose worker died (default 3)")
    p.add_argument("--task-timeout", type=float, help="seconds after which a task is cancelled and reported failed (default: none)")


def from_cli(a: Any) -> Executor:
    return make_executor(a.executor, a.ray_address, a.num_cpus, a.max_retries, a.task_timeout)


def progress_printer(say: Callable[[str], None], every_s: float = 2.0) -> ProgressFn:
    """A progress callback printing one line at most every ``every_s`` seconds, and the last one."""
    last = [0.0]

    def cb(p: Progress) -> None:
        now = time.perf_counter()
        if p.done + p.failed >= p.total or now - last[0] >= every_s:
            last[0] = now
            say("  " + p.line())

    return cb
