"""Default CPU schedules for the fused functions that no hand-written kernel covers, so an
untuned build does not run them as TVM's naive loop nests.

TVM 0.27's CPU pipeline (``relax.backend.cpu_generic``) legalizes and fuses, then compiles
every fused PrimFunc exactly as legalized: one thread, scalar code. Our kernels
(``dense_kernels``, ``conv_kernels``, ``sparse_kernels``) cover the weight layers; what is
left in a transformer is GELU, LayerNorm, Softmax, the attention products (activation x
activation) and reshapes/transposes, which took ~55% of a 90%-sparse transformer's time
before these rules. Applied here (dlight ``ApplyDefaultSchedule``, after FuseTIR and after
any tuning records, so a tuned function keeps its tuned schedule):

* :class:`Injective`: all blocks elementwise/broadcast/transpose -> inline into one loop
  nest, fuse, vectorize by the SIMD width, parallel over the cores when big enough.
* :class:`BatchMatmul`: ``C[..., i, j] += A[..., i, k] * B[..., k, j]`` with both inputs
  activations -> loop order ``(..., i) k j``, ``j`` vectorized, batch x rows parallel when
  big enough, injective epilogue (the attention scale) computed per row.
* TVM's own ``dlight.cpu.Reduction`` (LayerNorm, Softmax, RMSNorm: parallel rows,
  vectorized injective parts), serial below ``PARALLEL_MIN_ELEMENTS``.
* :class:`WindowReduction`: pooling windows (reduction loops inside, the output's innermost
  spatial axis vectorized, padding inlined).

Before legalization, ``targets.fast_math`` replaces exp/tanh/sigmoid/erf/softmax by
vectorizable approximations (TVM compiles those to one scalar libm call per element).
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any

log = logging.getLogger(__name__)

# below this many elements (or multiply-adds) a function runs on the calling thread: a
# fork-join of TVM's thread pool costs a few microseconds
PARALLEL_MIN_ELEMENTS = 1 << 14
PARALLEL_MIN_MACS = 1 << 18


def _lanes(target, dtype_bits: int = 32) -> int:
    """SIMD lanes of ``dtype_bits`` in the widest register LLVM enables for ``target``.
    (``llvm_get_vector_width`` answers 512 for every x86 target, AVX2-only ones included.)"""
    from targets.sparse_kernels import vector_floats

    return max(vector_floats(target) * 32 // dtype_bits, 2)


def _static(sch, loops) -> list[int] | None:
    from tvm.s_tir.dlight.base import get_extent

    ext = [get_extent(sch, lp) for lp in loops]
    return ext if all(isinstance(e, int) for e in ext) else None


def _vector_factor(n: int, lanes: int) -> int:
    """The largest power of two <= ``lanes`` that divides ``n`` (1: do not vectorize)."""
    v = lanes
    while v > 1 and n % v:
        v //= 2
    return v


def _parallel_vectorize(sch, block, lanes: int, parallel: bool | None = None) -> bool:
    """Fuse all loops of ``block``, split off the vector lanes and vectorize them, and run
    the rest in parallel when there are enough elements (or when ``parallel`` says so)."""
    loops = sch.get_loops(block)
    if not loops:
        return False
    ext = _static(sch, loops)
    if ext is None:
        return False
    n = 1
    for e in ext:
        n *= e
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    v = _vector_factor(n, lanes)
    if v > 1:
        outer, inner = sch.split(fused, factors=[None, v])
        sch.vectorize(inner)
    else:
        outer = fused
    if (n >= PARALLEL_MIN_ELEMENTS if parallel is None else parallel) and n // max(v, 1) > 1:
        sch.parallel(outer)
    return True


def _last_index_is(region, var) -> bool:
    """Whether the innermost index of a buffer region is exactly ``var``."""
    from tvm import tirx

    last = region.region[-1].min
    return isinstance(last, tirx.Var) and last.same_as(var)


def _reduction_inner_spatial(sch, block, outer: list, red: list, w, w_ext: int, lanes: int, parallel: bool):
    """Loop order ``fuse(outer) red... w``: ``w`` (a spatial loop, the output's innermost
    axis) vectorized inside the reduction loops, ``fuse(outer)`` parallel if asked, and the
    reduction's init split off (vectorized too). Vectorize and parallel go first: they need
    the block to still carry its init. Returns the fused outer loop."""
    from tvm import tirx

    sch.reorder(*red, w)
    row = sch.fuse(*outer) if len(outer) > 1 else outer[0]
    v = _vector_factor(w_ext, lanes)
    if v > 1:
        if w_ext > v:
            _, w = sch.split(w, factors=[None, v])
        sch.vectorize(w)
    if parallel:
        sch.parallel(row)
    init = sch.decompose_reduction(block, red[0])
    if v > 1:
        inner = sch.get_loops(init)[-1]
        if sch.get(inner).kind != tirx.ForKind.VECTORIZED:
            sch.vectorize(inner)
    return row


def _product(xs) -> int:
    n = 1
    for x in xs:
        n *= x
    return n


def _rule_base():
    from tvm.s_tir.dlight.cpu.base import CPUScheduleRule

    return CPUScheduleRule


def make_rules() -> list[Any]:
    """The rules, in the order they are tried."""
    from tvm import s_tir, tirx
    from tvm.s_tir import dlight as dl
    from tvm.s_tir.dlight.analysis import normalize_prim_func
    from tvm.s_tir.dlight.base import try_inline

    class Rule(_rule_base()):
        def blocks(self, func, target):
            """(schedule, normalized block infos) of ``func``, or (None, None) if the rule
            cannot apply (not a PrimFunc, not a CPU target, blocks not normalizable)."""
            if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
                return None, None
            sch = s_tir.Schedule(func)
            return sch, normalize_prim_func(sch)

    base = _rule_base()

    class Injective(Rule):
        """All blocks injective (elementwise, broadcast, reshape, transpose)."""

        def apply(self, func, target, _tunable):
            sch, infos = self.blocks(func, target)
            if not infos or not all(b.is_injective() for b in infos):
                return None
            infos = try_inline(sch, infos)
            done = False
            for b in infos:
                done |= _parallel_vectorize(sch, b.block_rv, _lanes(target))
            return sch if done else None

    class BatchMatmul(Rule):
        """``C[..., i, j] += A[..., i, k] * B[..., k, j]`` (+ an injective epilogue) whose
        operands are both function arguments (activations; constant weights have kernels)."""

        def apply(self, func, target, _tunable):
            sch, infos = self.blocks(func, target)
            if not infos:
                return None
            main = [b for b in infos if not b.is_injective()]
            if len(main) != 1 or len(infos) > 2 or infos[0] is not main[0]:
                return None
            mm, epi = main[0], (infos[1] if len(infos) == 2 else None)
            kinds = mm.dom_kind()
            if len(kinds) < 3 or kinds[-1] != "R" or set(kinds[:-1]) != {"S"}:
                return None
            stmt = sch.get(mm.block_rv)
            if len(stmt.reads) != 2 or len(stmt.writes) != 1:
                return None
            j_var, k_var = mm.iters[-2].var, mm.iters[-1].var
            # B[..., k, j]: the vectorized axis j is B's innermost index and C's innermost index
            bvars = [r for r in stmt.reads if _last_index_is(r, j_var)]
            avars = [r for r in stmt.reads if _last_index_is(r, k_var)]
            if len(bvars) != 1 or len(avars) != 1 or not _last_index_is(stmt.writes[0], j_var):
                return None
            loops = sch.get_loops(mm.block_rv)
            ext = _static(sch, loops)
            if ext is None:
                return None
            *rows, j, k = loops
            lanes = _lanes(target)
            row = _reduction_inner_spatial(sch, mm.block_rv, rows, [k], j, ext[-2], lanes,
                                           _product(ext) >= PARALLEL_MIN_MACS)
            if epi is not None:
                sch.reverse_compute_at(epi.block_rv, row, preserve_unit_loops=True)
                eloops = sch.get_loops(epi.block_rv)
                if len(eloops) > 1:
                    inner = sch.fuse(*eloops[1:]) if len(eloops) > 2 else eloops[1]
                    ev = _vector_factor(ext[-2], lanes)
                    if ev > 1:
                        if ext[-2] > ev:
                            _, inner = sch.split(inner, factors=[None, ev])
                        sch.vectorize(inner)
            return sch

    class WindowReduction(Rule):
        """One reduction block whose spatial axes come first and whose innermost spatial axis
        is the output's innermost index, e.g. max/avg pooling (``[n, c, h, w] <- window
        [kh, kw]``), after inlining injective producers (padding): loop order
        ``(outer spatial) (reduction) w``, ``w`` vectorized, outer spatial parallel."""

        def apply(self, func, target, _tunable):
            sch, infos = self.blocks(func, target)
            if not infos:
                return None
            infos = try_inline(sch, infos)
            if len(infos) != 1 or infos[0].is_injective():
                return None
            blk = infos[0]
            kinds = blk.dom_kind()
            ns = len(kinds) - len(kinds.lstrip("S"))
            if ns < 2 or set(kinds[ns:]) != {"R"}:
                return None
            stmt = sch.get(blk.block_rv)
            if len(stmt.writes) != 1 or not _last_index_is(stmt.writes[0], blk.iters[ns - 1].var):
                return None
            # the loops include unit ones that the block info drops: index from the end
            loops = sch.get_loops(blk.block_rv)
            ext = _static(sch, loops)
            nr = len(kinds) - ns
            if ext is None or len(loops) < nr + 2:
                return None
            _reduction_inner_spatial(sch, blk.block_rv, loops[:-nr - 1], loops[-nr:], loops[-nr - 1], ext[-nr - 1],
                                     _lanes(target), _product(ext) >= PARALLEL_MIN_ELEMENTS)
            return sch

    class Guarded(base):
        """A rule whose schedule primitives fail on a function (an unexpected block
        structure) leaves that function alone instead of failing the build."""

        def __init__(self, rule) -> None:
            self.rule = rule

        def apply(self, func, target, tunable):
            try:
                return self.rule.apply(func, target, tunable)
            except Exception as exc:  # tvm ScheduleError and friends: keep TVM's default schedule
                name = func.attrs.get("global_symbol", "?") if func.attrs is not None else "?"
                log.debug("%s declined %s: %s", type(self.rule).__name__, name, str(exc))
                FAILURES.append(f"{type(self.rule).__name__}: {name}")
                return None

    class Reduction(dl.cpu.Reduction):
        """TVM's rule (parallel rows), on the calling thread when the largest buffer has fewer
        than PARALLEL_MIN_ELEMENTS elements: the 32-wide transformer's LayerNorms and
        Softmaxes (512 elements) forked the pool 7 times per inference, ~9 us of its 30."""

        def apply(self, func, target, tunable):
            if not isinstance(func, tirx.PrimFunc) or _largest_buffer(func) >= PARALLEL_MIN_ELEMENTS:
                return super().apply(func, target, tunable)
            with _serial_schedules():
                return super().apply(func, target, tunable)

    return [Guarded(r) for r in (Injective(), BatchMatmul(), Reduction(), WindowReduction())]


def _largest_buffer(func: Any) -> int:
    """Elements of the largest parameter buffer of ``func`` (inf when a shape is dynamic)."""
    best = 0
    bufs = func.buffer_map.values() if hasattr(func, "buffer_map") else func.params  # 0.27: params are buffers
    for buf in bufs:
        if not hasattr(buf, "shape"):
            continue
        n = 1
        for d in buf.shape:
            if not hasattr(d, "value"):
                return 1 << 62
            n *= int(d.value)
        best = max(best, n)
    return best


@contextlib.contextmanager
def _serial_schedules():
    """``Schedule.parallel`` is a no-op inside (for a rule that parallelizes unconditionally).
    A class attribute, so for the calling thread's compile only: TVM builds (and our pipeline
    calls) the rules one function at a time on one thread; tuning's builders are processes."""
    from tvm import s_tir

    original = s_tir.Schedule.parallel
    s_tir.Schedule.parallel = lambda self, loop: None
    try:
        yield
    finally:
        s_tir.Schedule.parallel = original


FAILURES: list[str] = []


def all_injective(func: Any) -> bool:
    """Whether every block of ``func`` is injective (what :class:`Injective` schedules)."""
    from tvm import s_tir, tirx
    from tvm.s_tir.dlight.analysis import normalize_prim_func

    if not isinstance(func, tirx.PrimFunc):
        return False
    infos = normalize_prim_func(s_tir.Schedule(func))
    return bool(infos) and all(b.is_injective() for b in infos)


def default_schedule(func: Any, target: Any) -> Any:
    """The schedule (``s_tir.Schedule``, with its trace) that :func:`schedule_pass` gives
    ``func`` for ``target``, or None where no rule applies (the function compiles as it is).
    Tuning measures this as each function's "default" candidate."""
    from tvm.s_tir.dlight.base.transform import _apply_rules

    space = _apply_rules(func, target, make_rules(), tunable=False)
    return space[0] if space else None


def schedule_pass():
    """dlight ``ApplyDefaultSchedule`` with :func:`make_rules` (skips scheduled functions)."""
    from tvm.s_tir import dlight as dl

    return dl.ApplyDefaultSchedule(*make_rules())


def fuse_passes(target) -> list:
    """The CPU pipeline up to FuseTIR: ``targets.fast_math``, then TVM's library dispatch and
    legalize/fuse passes. Tuning extracts its tasks (and keys its records) after these."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    from targets.fast_math import fast_math_pass

    return [fast_math_pass()] + cpu.library_dispatch_passes(target) + cpu.legalize_passes(target)


def _scheduled(mod) -> tuple[list[str], list[str]]:
    """(scheduled, unscheduled) PrimFunc names of ``mod``."""
    import tvm

    done, todo = [], []
    for gv, func in mod.functions_items():
        if isinstance(func, tvm.tirx.PrimFunc):
            attrs = func.attrs
            ok = attrs is not None and any(bool(attrs.get(k, False)) for k in ("tirx.is_scheduled", "tir.is_scheduled"))
            (done if ok else todo).append(gv.name_hint)
    return sorted(done), sorted(todo)


def pipeline(target, database: Any = None, stats: dict | None = None):
    """TVM's CPU pipeline (``relax.backend.cpu_generic``) with, after FuseTIR, the tuning
    records of ``database`` (if any) and then the default schedules of this module.

    ``stats`` (filled when the pipeline runs): ``functions`` (fused PrimFuncs),
    ``kernels`` (hand-written or with a tuning record), ``default_scheduled`` (by these
    rules), ``unscheduled`` (names of the functions left as TVM's naive loop nests)."""
    import tvm
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    @tvm.transform.module_pass(opt_level=0, name="CompressorCPUPipeline")
    def _pipeline(mod, _ctx):
        with target:
            mod = tvm.transform.Sequential(fuse_passes(target))(mod)
            if database is not None:
                from tvm.relax.transform import MetaScheduleApplyDatabase

                with database:
                    mod = MetaScheduleApplyDatabase(enable_warning=False)(mod)
            before, _ = _scheduled(mod)
            mod = schedule_pass()(mod)
            if stats is not None:
                after, left = _scheduled(mod)
                stats.update(functions=len(after) + len(left), kernels=len(before),
                             default_scheduled=len(after) - len(before), unscheduled=left)
            mod = tvm.transform.Sequential(cpu.dataflow_lower_passes(target) + cpu.finalize_passes(target))(mod)
        return mod

    return _pipeline


def coverage_warning(stats: dict) -> str | None:
    """One report line for the functions no kernel, tuning record or default rule covers."""
    left = stats.get("unscheduled") or []
    if not left:
        return None
    names = ", ".join(left[:4]) + (f" (+{len(left) - 4} more)" if len(left) > 4 else "")
    return (f"{len(left)} of {stats.get('functions', '?')} fused functions keep TVM's unscheduled loop nest "
            f"(no kernel, tuning record or default schedule rule applies): {names}; --tune-trials N tunes them")
