"""``sparsify.obs``: one-shot Optimal Brain Surgeon pruning, SparseGPT style
(Frantar & Alistarh, 2023; OBC, Frantar et al., 2022).

For a layer ``y = W2 x`` (canonical ``W2[outputs, reduction]``, see
``passes/sparsity_patterns.py``) and calibration inputs ``X[tokens, cols]``
(Gemm/MatMul rows; Conv: im2col patches, one Hessian per group), the
layer-wise reconstruction objective ``||W2 X^T - Ŵ X^T||^2`` has Hessian

    H = X^T X / tokens + lambda I,   lambda = damp * mean(diag(X^T X / tokens)).

OBS removes weight q with saliency ``w_q^2 / [H^-1]_qq`` and compensates the
other weights of the row by ``delta = -(w_q / [H^-1]_qq) H^-1_{:,q}``.
SparseGPT makes this tractable by processing columns left to right with the
upper Cholesky factor U of H^-1 (H^-1 = U^T U): when column i is reached its
pruned entries are zeroed and the error ``err = (w - q) / U_ii`` is propagated
to the not-yet-processed columns, ``W[:, i:] -= err U[i, i:]`` (lazily, in
column blocks of ``block_size``). Masks are chosen with the saliency
``w^2 / U_ii^2`` on the partially updated weights:

* unstructured: per column block of ``block_size`` columns, the exact share of
  the layer's pruned count (cumulative rounding, so the layer total is exact);
* N:M: each group of M columns when its first column is reached (M-N pruned
  per row and group);
* RxC blocks: per column block, whole blocks by summed saliency.

Pruned weights are exact zeros; kept weights change (the update). Layers are
processed in topological order and *sequentially*: a layer's activations are
captured (onnxruntime, layer inputs added as graph outputs of an export of the
current graph) only after every layer upstream of it has been pruned, so it
compensates the error already introduced. Layers whose inputs are independent
of each other (e.g. q/k/v projections) share one capture. Memory is bounded:
calibration samples are streamed one at a time into H (float64, cols^2 per
group) and only the layers of one such capture are held at once.

Parallel solves (``--executor ray`` only; the local path is the loop above, unchanged): the
solves that are independent *and* exactly reproducible elsewhere are fanned out on the run's
executor -- every (layer, conv group) of one capture, i.e. the layers that share a capture
(q/k/v-like siblings) and the groups of a grouped convolution, chunked into at most ``slots``
tasks per layer. A task runs the very same ``sparsegpt`` + error computation on the very same
float64 arrays, so weights, masks and reported errors are bit-identical to the local run --
provided the BLAS runs with the same thread count (OpenBLAS's multi-threaded GEMM/LAPACK split the
work differently: measured, a 128x128 solve with 1 vs 2 threads differs in the last bits; Ray
workers start with one thread per CPU granted). Each task therefore pins its BLAS to this process's
thread count (``threadpoolctl``); without threadpoolctl, or on workers whose CPU makes OpenBLAS pick
another kernel (heterogeneous clusters), the pass warns that results may differ in the last bits. Not
split: the rows of one solve. They are independent in exact arithmetic for N:M masks, but the
unstructured/RxC masks are chosen per column block over *all* rows (SparseGPT's block-wise
top-k couples the rows), and even for N:M the lazy update ``E1 @ U`` is a BLAS GEMM whose
results depend on the row count it is called with (OpenBLAS picks kernels by shape; measured:
a 100x300 solve split in 2 row blocks differs in the last bits), so a row split would not be
bit-identical to the local run. The Hessian accumulation over calibration samples is not split
either (a different summation order changes the last bits of H, hence of every weight).

Allocation: ``uniform``; ``global`` and ``sensitivity`` rank with the Wanda
score ``|w| ||x||`` on the dense model, which is the OBS saliency under a
diagonal Hessian (``w^2 / [H^-1]_qq ~ w^2 H_qq``), then OBS prunes each layer
to its allocated sparsity.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from compressor.errors import UsageError
from compressor.pass_base import Pass, PassContext, PassResult
from passes.sparsity_patterns import (Layer, LayerReport, Pattern, SparsifyConfig, activation, ancestors, block_mask, calib_feeds,
                                      check_valid, cross_stats, feature_stats, nm_mask, plan_sparsities, select_layers,
                                      summarize, unstructured_mask)
from passes.sparsify_wanda import wanda_scores

log = logging.getLogger(__name__)


VARIANTS = ("obs", "act", "act_update")  # per-group candidate solutions (solve_group)


@dataclass(frozen=True)
class OBSConfig(SparsifyConfig):
    damp: float = 0.01  # dampening, fraction of mean(diag(H))
    block_size: int = 128  # lazy-update / mask-selection column block
    # per layer group, the solution with the least reconstruction error among these (see solve_group);
    # ["obs"] is plain SparseGPT
    variants: tuple[str, ...] = VARIANTS
    # reconstruct the *dense* model's layer outputs from the pruned model's layer inputs (the error of the
    # layers upstream is compensated too): the target weights become W' = W + W (G^T - H)(H + lambda I)^-1
    # with G = X'^T X (pruned vs dense inputs); off: SparseGPT's own objective ||W X'^T - Wq X'^T||
    dense_targets: bool = False

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 < self.damp <= 1.0:
            raise UsageError(f"damp must be in (0, 1], got {self.damp}")
        if self.block_size < 1:
            raise UsageError(f"block_size must be >= 1, got {self.block_size}")
        if not self.variants or any(v not in VARIANTS for v in self.variants):
            raise UsageError(f"variants must be among {', '.join(VARIANTS)}, got {list(self.variants)}")


def _upper_hinv(h: np.ndarray, damp: float) -> np.ndarray:
    h = np.array(h, dtype=np.float64)
    diag = np.diag(h).copy()
    dead = diag <= 0
    h[dead, dead] = 1.0
    lam = damp * float(np.mean(np.diag(h)))
    for _ in range(8):
        try:
            hinv = np.linalg.inv(h + lam * np.eye(h.shape[0]))
            hinv = 0.5 * (hinv + hinv.T)
            return np.linalg.cholesky(hinv).T
        except np.linalg.LinAlgError:
            lam = lam * 10 if lam > 0 else 1e-8
    raise np.linalg.LinAlgError("Hessian not positive definite even with heavy dampening")


def sparsegpt(w: np.ndarray, h: np.ndarray, pattern: Pattern, sparsity: float, k: int | None = None,
              block_size: int = 128, damp: float = 0.01, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Prune ``w[rows, cols]`` given ``h[cols, cols]`` (OBS/SparseGPT). Returns (new weights, keep-mask).
    ``k``: exact number of pruned entries (unstructured; default round(sparsity * size)). ``mask``: a
    given keep-mask (the OBS update only, no mask selection)."""
    W = np.array(w, dtype=np.float64)
    rows, cols = W.shape
    U = _upper_hinv(h, damp)
    keep = np.ones(W.shape, dtype=bool)
    unit = math.lcm(pattern.m if pattern.kind == "nm" else 1, pattern.c if pattern.kind == "block" else 1)
    B = max(unit, (block_size // unit) * unit)
    k_total = int(round(sparsity * W.size)) if k is None else k
    for i1 in range(0, cols, B):
        i2 = min(i1 + B, cols)
        W1 = W[:, i1:i2].copy()
        U1 = U[i1:i2, i1:i2]
        dg = np.diag(U1)
        Q1 = np.zeros_like(W1)
        E1 = np.zeros_like(W1)
        sal = np.abs(W1) / dg  # sqrt of the OBS saliency w^2 / [H^-1]_qq
        if mask is not None:
            keep1 = np.array(mask[:, i1:i2], dtype=bool)
        elif pattern.kind == "unstructured":
            kb = int(round(k_total * i2 / cols)) - int(round(k_total * i1 / cols))
            keep1 = unstructured_mask(sal, 0.0, k=kb)
        elif pattern.kind == "block":
            kb = int(round(k_total * i2 / cols)) - int(round(k_total * i1 / cols))
            keep1 = block_mask(sal, 0.0, pattern.r, pattern.c, k=kb)
        else:
            keep1 = np.ones(W1.shape, dtype=bool)
        for i in range(i2 - i1):
            if mask is None and pattern.kind == "nm" and i % pattern.m == 0:
                j = min(i + pattern.m, i2 - i1)
                keep1[:, i:j] = nm_mask(np.abs(W1[:, i:j]) / dg[i:j], pattern.n, pattern.m)
            col = W1[:, i]
            q = np.where(keep1[:, i], col, 0.0)
            Q1[:, i] = q
            err = (col - q) / U1[i, i]
            W1[:, i:] -= np.outer(err, U1[i, i:])
            E1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
        keep[:, i1:i2] = keep1
    W[~keep] = 0.0
    return W, keep


def rel_recon_error(w: np.ndarray, wq: np.ndarray, h: np.ndarray) -> float:
    """||(W - Wq) X^T||^2 / ||W X^T||^2 computed through H = X^T X / tokens."""
    d = w - wq
    num = float(np.sum((d @ h) * d))
    den = float(np.sum((w @ h) * w))
    return num / max(den, 1e-30)


def _counts(total_k: int, sizes: list[int]) -> list[int]:
    """Split ``total_k`` over parts of the given sizes by cumulative rounding (sums exactly)."""
    out, cum, n = [], 0, sum(sizes)
    for s in sizes:
        prev = int(round(total_k * cum / n))
        cum += s
        out.append(int(round(total_k * cum / n)) - prev)
    return out


def _dense_target(l: Layer, hs: list[np.ndarray], gs_: list[np.ndarray], damp: float) -> np.ndarray:
    """The weights whose output on the pruned inputs X' is closest to the dense layer's output on the dense
    inputs X, per group: W' = W + W (G^T - H)(H + lambda I)^-1 (exactly W when X' = X)."""
    W2 = l.matrix().astype(np.float64)
    g = len(hs)
    rows_g = W2.shape[0] // g
    out = W2.copy()
    for gi, (h, gm) in enumerate(zip(hs, gs_)):
        lam = damp * float(np.mean(np.diag(h))) or 1e-8
        hd = h + lam * np.eye(h.shape[0])
        w = W2[gi * rows_g:(gi + 1) * rows_g]
        out[gi * rows_g:(gi + 1) * rows_g] = w + np.linalg.solve(hd, (gm.T - h).T @ w.T).T
    return out


def blas_threads() -> int | None:
    """This process's BLAS thread count (threadpoolctl), None when it cannot be known/set."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    n = [int(i["num_threads"]) for i in threadpool_info() if i.get("user_api") == "blas"]
    return max(n) if n else None


def solve_group(w: np.ndarray, h: np.ndarray, pattern: Pattern, s: float, k: int, block_size: int, damp: float,
                variants: tuple[str, ...] = VARIANTS) -> tuple[np.ndarray, np.ndarray, float, float, str]:
    """One group's pruned weights: each of ``variants`` is solved and the one with the smallest
    reconstruction error ``||(W - Wq) X^T||^2`` on the calibration inputs is kept.

    * ``obs``: SparseGPT (mask by OBS saliency per column block, jointly over the rows, with the update);
    * ``act``: the activation-weighted mask ``|w| ||x||`` with each row pruning its own share (Wanda's),
      weights unchanged;
    * ``act_update``: that mask with SparseGPT's update.

    Measured on ppocr_cls's layers at 50%: OBS alone is 10-25x worse than ``act`` on squeeze-excite and
    5x5 depthwise convs (0.0107 vs 0.0007), better on the others; the per-group minimum beats both.
    Block (RxC) patterns use ``obs`` only. Returns (Wq, keep, err_num, err_den, variant)."""
    cands = [v for v in variants if v == "obs" or pattern.kind in ("unstructured", "nm")] or ["obs"]
    den = float(np.sum((w @ h) * w))
    best = None
    act_keep = None
    for v in cands:
        if v == "obs":
            wq, kq = sparsegpt(w, h, pattern, s, k=k, block_size=block_size, damp=damp)
        else:
            if act_keep is None:
                score = np.abs(w) * np.sqrt(np.maximum(np.diag(h), 0.0))[None, :]
                act_keep = (unstructured_mask(score, 0.0, per_row=True, k=k) if pattern.kind == "unstructured"
                            else nm_mask(score, pattern.n, pattern.m))
            if v == "act":
                kq = act_keep
                wq = np.where(kq, w, 0.0)
            else:
                wq, kq = sparsegpt(w, h, pattern, s, k=k, block_size=block_size, damp=damp, mask=act_keep)
        d = w - wq
        num = float(np.sum((d @ h) * d))
        if best is None or num < best[2]:
            best = (wq, kq, num, den, v)
    return best


def _solve_groups(w_groups: list[np.ndarray], hs: list[np.ndarray], pattern: Pattern, s: float, ks: list[int],
                  block_size: int, damp: float, threads: int | None = None, variants: tuple[str, ...] = VARIANTS
                  ) -> list[tuple[np.ndarray, np.ndarray, float, float, str]]:
    """Solve some groups of one layer (an executor task): per group ``(Wq, keep, err_num, err_den)``,
    computed exactly as ``OBSSparsify._prune_layer`` does locally, with ``threads`` BLAS threads
    (the driver's count: the thread count changes the last bits of GEMM/LAPACK results)."""
    if threads is not None:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(threads, user_api="blas"):
            return _solve_groups(w_groups, hs, pattern, s, ks, block_size, damp, None, variants)
    return [solve_group(w, h, pattern, s, k, block_size, damp, variants) for w, h, k in zip(w_groups, hs, ks)]


def _run_executor(ctx: PassContext):
    """The run's Ray executor, or None (local: the in-process loop; never starts anything)."""
    from compressor.executor import RunExecutor

    session = getattr(ctx, "executor_session", None)
    if isinstance(session, RunExecutor) and session.kind != "local":
        return session.get("sparsify.obs")
    return None


class OBSSparsify(Pass):
    name = "sparsify.obs"
    description = "OBS/SparseGPT one-shot pruning with weight reconstruction on calibration data (needs --calib)"
    Config = OBSConfig

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        cfg: OBSConfig = self.config
        layers, warnings = select_layers(graph, cfg, data_aware=True)
        if cfg.sparsity == 0:
            return PassResult(False, summarize({}, cfg, warnings), warnings)
        feeds = calib_feeds(ctx, cfg, self.name)
        pat = cfg.parsed_pattern
        if pat.kind == "block" and pat.r > 1:
            ok = []
            for l in layers:
                rows_g = l.values.shape[0] // l.groups if l.node.op == "Conv" else l.matrix().shape[0]
                if l.groups > 1 and rows_g % pat.r:
                    warnings.append(f"{l.name}: {pat.text} blocks would straddle conv groups ({rows_g} outputs per group), kept dense")
                else:
                    ok.append(l)
            layers = ok
        if not layers:
            warnings.append("no prunable Conv/Gemm/MatMul weights found: nothing was sparsified")
            return PassResult(False, summarize({}, cfg, warnings), warnings)
        score = None
        if cfg.allocation != "uniform" and pat.kind != "nm":
            norms = feature_stats(ctx.export(graph), feeds, layers, full=False)
            wscores = {l.name: wanda_scores(l, norms[l.name]) for l in layers}
            score = lambda l: wscores[l.name]
        alloc, w2, extra = plan_sparsities(graph, ctx, cfg, layers, score, self.name)
        warnings += w2

        anc = {l.name: ancestors(activation(l)) for l in layers}
        pending = list(layers)
        reports, captures = {}, 0
        ex = _run_executor(ctx)
        remote = {"tasks": 0, "retries": 0, "seconds": 0.0}
        dense_model = ctx.export(graph) if cfg.dense_targets else None
        while pending:
            ids = {id(p.node) for p in pending}
            ready = [l for l in pending if not (anc[l.name] & (ids - {id(l.node)}))]
            model = ctx.export(graph)
            targets: dict[str, np.ndarray] = {}
            if dense_model is not None:
                hess, cross = cross_stats(model, dense_model, feeds, ready)
                for l in ready:
                    targets[l.name] = _dense_target(l, hess[l.name], cross[l.name], cfg.damp)
            else:
                hess = feature_stats(model, feeds, ready, full=True)
            captures += 1
            if ex is None:
                for l in ready:
                    reports[l.name] = self._prune_layer(l, hess[l.name], alloc[l.name], pat, cfg, targets.get(l.name))
            else:
                reports.update(self._prune_remote(ex, ready, hess, alloc, pat, cfg, remote, targets))
            pending = [p for p in pending if p not in ready]
        stats = summarize(reports, cfg, warnings)
        stats.update(extra, calib_samples_used=len(feeds), captures=captures)
        if ex is not None:
            stats["executor"] = {"name": ex.name, "slots": ex.slots, "tasks": remote["tasks"], "retries": remote["retries"],
                                 "solve_seconds": round(remote["seconds"], 3)}
            if remote["retries"]:
                warnings.append(f"{remote['retries']} OBS solve attempt(s) retried after worker failures")
            if "blas" in remote:
                warnings.append(remote["blas"])
        return PassResult(True, stats, warnings)

    def _prune_remote(self, ex, ready: list[Layer], hess: dict[str, list[np.ndarray]], alloc: dict[str, float],
                      pat: Pattern, cfg: OBSConfig, remote: dict, targets: dict[str, np.ndarray] | None = None
                      ) -> dict[str, LayerReport]:
        """The (layer, group) solves of one capture as executor tasks (at most ``slots`` per layer);
        results assembled in group order, so everything equals ``_prune_layer``."""
        from compressor.executor import ExecutorError

        plans, tasks = [], []
        threads = blas_threads()
        if threads is None and "blas" not in remote:
            remote["blas"] = ("threadpoolctl is not installed: the BLAS thread count of the workers cannot be pinned to this "
                              "process's, so OBS weights may differ from a local run in the last bits (pip install threadpoolctl)")
        for l in ready:
            W2 = (targets or {}).get(l.name)
            W2 = l.matrix().astype(np.float64) if W2 is None else W2
            hs = hess[l.name]
            g = len(hs)
            rows_g = W2.shape[0] // g
            s = alloc[l.name]
            ks = _counts(int(round(s * W2.size)), [rows_g * W2.shape[1]] * g)
            edges = [round(g * i / min(g, ex.slots)) for i in range(min(g, ex.slots) + 1)]
            for a, b in zip(edges[:-1], edges[1:]):
                tasks.append(([W2[gi * rows_g:(gi + 1) * rows_g] for gi in range(a, b)], hs[a:b], pat, s, ks[a:b],
                              cfg.block_size, cfg.damp, threads, tuple(cfg.variants)))
            plans.append((l, W2, rows_g, s, len(edges) - 1))
        t0 = time.perf_counter()
        outs = ex.map(_solve_groups, tasks, label="sparsify.obs solves", total=len(tasks))
        remote["seconds"] += time.perf_counter() - t0
        remote["tasks"] += len(tasks)
        remote["retries"] += ex.last_stats.retries
        bad = [o for o in outs if not o.ok]
        if bad:
            raise ExecutorError(f"sparsify.obs: {len(bad)} of {len(outs)} solve task(s) failed on {ex.name}: {bad[0].error}")
        results = iter(outs)
        reports = {}
        for l, W2, rows_g, s, n_tasks in plans:
            groups = [grp for _ in range(n_tasks) for grp in next(results).value]
            reports[l.name] = self._assemble(l, W2, rows_g, groups, s, pat)
        return reports

    def _assemble(self, l: Layer, W2: np.ndarray, rows_g: int, groups: list[tuple], s: float, pat: Pattern) -> LayerReport:
        """Write the groups' solutions (``solve_group`` results, in group order) into the layer."""
        out = np.empty_like(W2)
        keep = np.ones(W2.shape, dtype=bool)
        err_num = err_den = 0.0
        chosen: dict[str, int] = {}
        for gi, (wq, kq, num, den, variant) in enumerate(groups):
            sl = slice(gi * rows_g, (gi + 1) * rows_g)
            out[sl], keep[sl] = wq, kq
            err_num += num
            err_den += den
            chosen[variant] = chosen.get(variant, 0) + 1
        vals = l.values
        check_valid(l.name, keep, pat)
        l.set_matrix(out.astype(vals.dtype))
        nz = int(np.count_nonzero(l.values))
        return LayerReport(l.node.op, l.weight.name, int(vals.size), s, 1 - nz / vals.size,
                           {"rel_recon_error": round(err_num / max(err_den, 1e-30), 8), "variant": chosen})

    def _prune_layer(self, l: Layer, hs: list[np.ndarray], s: float, pat: Pattern, cfg: OBSConfig,
                     target: np.ndarray | None = None) -> LayerReport:
        W2 = l.matrix().astype(np.float64) if target is None else target
        g = len(hs)
        rows_g = W2.shape[0] // g
        ks = _counts(int(round(s * W2.size)), [rows_g * W2.shape[1]] * g)
        groups = [solve_group(W2[gi * rows_g:(gi + 1) * rows_g], h, pat, s, ks[gi], cfg.block_size, cfg.damp,
                              tuple(cfg.variants)) for gi, h in enumerate(hs)]
        return self._assemble(l, W2, rows_g, groups, s, pat)
