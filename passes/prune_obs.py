"""Structured OBS for ``prune.channels`` (criterion ``obs``): which channels the least-squares refit can best
do without, and what the refit will leave.

A removed channel's whole contribution passes through the weights that read it (its group's *consumer*
parameters: the FFN down-projection, the attention output projection, the conv after an expansion). For a
consumer with design matrix ``A`` (its input rows, im2col for a conv, a ones column for the bias) and weight
``W`` (design columns x outputs), removing the column set ``S`` and refitting the rest costs, on the
calibration data (Optimal Brain Surgeon with a block of columns; ZipLM, Kurtic et al. 2023; Kwon et al.
2022 "A Fast Post-Training Pruning Framework for Transformers")::

    dE(S) = tr(W_S^T [H^-1]_SS^-1 W_S),    H = A^T A + damping

and the optimal update of the remaining weights is ``W -= H^-1[:, S] [H^-1]_SS^-1 W_S``. The order is
chosen greedily (cheapest unit first, ``H^-1`` downdated after each step), so the units removed at any
fraction are the greedy prefix. ``compensate`` writes the updated weights into a zeroed copy of the
graph: the sensitivity probe then measures the error the refit leaves, not the error of bare zeroing
(which made FFN units look 5-10x dearer than they are after the refit).

Only groups whose every consumer is a refittable weight (MatMul with a 2-D constant, Gemm without transA, a
non-grouped 1-D/2-D Conv) are scored this way; the others keep ``mean_act``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

MAX_DESIGN = 4608  # design columns above which a consumer's H is not formed (a 3x3 conv over 512 channels)
ROWS_PER_SAMPLE = 512  # im2col / token rows taken from one calibration sample
DAMP = 0.01  # relative to the mean diagonal of H (SparseGPT's default)


@dataclass
class ConsumerFit:
    node: str
    op: str
    k: int  # design columns per input channel (prod of the conv kernel; 1 for MatMul/Gemm)
    W: np.ndarray  # [design columns + 1 (bias), outputs], float64
    Hinv: np.ndarray  # inverse of the damped [design + 1]^2 Gram matrix

    def cols(self, channels: np.ndarray) -> np.ndarray:
        ch = np.asarray(channels, dtype=np.int64)
        return (ch[:, None] * self.k + np.arange(self.k)[None, :]).reshape(-1)


def refit_blocker(n: gs.Node) -> str | None:
    """Why a least-squares refit (and OBS scoring) cannot handle the weight of ``n``; None when it can: a
    MatMul with a 2-D constant weight, a Gemm without transA, a non-grouped 1-D/2-D Conv (any pads or
    auto_pad: ``sparsity_patterns.im2col`` handles them)."""
    if len(n.inputs) < 2 or not isinstance(n.inputs[1], gs.Constant):
        return "no constant weight"
    w = np.asarray(n.inputs[1].values)
    if n.op == "Conv":
        if int(n.attrs.get("group", 1)) != 1:
            return "grouped conv reads the pruned channels"
        return None if w.ndim in (3, 4) else f"{w.ndim - 2}-D conv"
    if n.op == "Gemm":
        return "transA Gemm" if n.attrs.get("transA", 0) else None
    if n.op == "MatMul":
        return None if w.ndim == 2 else "batched weight"
    return f"no least-squares refit for {n.op}"


def supported(n: gs.Node) -> bool:
    return refit_blocker(n) is None


def design_weight(n: gs.Node) -> np.ndarray:
    """The weight as [design columns, outputs] (float64)."""
    w = np.asarray(n.inputs[1].values, dtype=np.float64)
    if n.op == "MatMul":
        return w
    if n.op == "Gemm":
        w = w.T if int(n.attrs.get("transB", 0)) else w
        return w * float(n.attrs.get("alpha", 1.0))
    return w.reshape(w.shape[0], -1).T  # Conv [Cout, Cin, *k] -> [Cin * prod(k), Cout]


def set_design_weight(n: gs.Node, wd: np.ndarray, tag: str) -> None:
    """Write ``wd`` ([design columns, outputs], ``design_weight``'s layout) back as the node's weight, in its
    dtype and layout (Gemm: transB and alpha; Conv: [Cout, Cin, *k])."""
    old = np.asarray(n.inputs[1].values)
    if n.op == "MatMul":
        w = wd
    elif n.op == "Gemm":
        w = (wd.T if int(n.attrs.get("transB", 0)) else wd) / float(n.attrs.get("alpha", 1.0))
    else:
        w = wd.T.reshape((wd.shape[1], *old.shape[1:]))
    n.inputs[1] = gs.Constant(f"{n.inputs[1].name}_{tag}", np.ascontiguousarray(w).astype(old.dtype))


def _rows(n: gs.Node, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    from passes.sparsity_patterns import im2col_rows

    x = x.astype(np.float64)
    if n.op == "Conv":
        a = im2col_rows(n, x, np.asarray(n.inputs[1].values).shape[2:])
    else:
        a = x.reshape(-1, x.shape[-1])
    if a.shape[0] > ROWS_PER_SAMPLE:
        a = a[rng.choice(a.shape[0], ROWS_PER_SAMPLE, replace=False)]
    return a


def consumer_fits(graph: gs.Graph, model: onnx.ModelProto, node_names: list[str], calib, limit: int) -> dict[str, ConsumerFit]:
    """One damped inverse Gram matrix per consumer node, from up to ``limit`` calibration samples of the
    unpruned model (streamed: one sample's activations in memory at a time)."""
    from compressor.activations import iter_capture
    from compressor.data import padding_keep

    nodes = {n.name: n for n in graph.nodes}
    todo = []  # (node, design columns per channel, its design weight)
    for name in dict.fromkeys(node_names):
        n = nodes.get(name)
        if n is None or not supported(n):
            continue
        wd = design_weight(n)
        if wd.shape[0] > MAX_DESIGN:
            continue
        todo.append((n, int(np.prod(np.asarray(n.inputs[1].values).shape[2:])) if n.op == "Conv" else 1, wd))
    if not todo:
        return {}
    names = list(dict.fromkeys(n.inputs[0].name for n, _, _ in todo))
    G = {n.name: np.zeros((wd.shape[0] + 1, wd.shape[0] + 1)) for n, _, wd in todo}
    rows = dict.fromkeys(G, 0)
    rng = np.random.default_rng(0)
    feeds = list(calib.feeds[:limit])
    for feed, vals in zip(feeds, iter_capture(model, feeds, names)):
        for n, _, _ in todo:
            xv = vals[n.inputs[0].name]
            keep = padding_keep(feed, xv.shape) if n.op != "Conv" else None
            if keep is not None:  # padded positions never reach the output: H over the real tokens
                xv = xv.reshape(-1, xv.shape[-1])[keep]
            a = _rows(n, xv, rng)
            a1 = np.concatenate([a, np.ones((a.shape[0], 1))], axis=1)
            G[n.name] += a1.T @ a1
            rows[n.name] += a.shape[0]
    out = {}
    for n, k, wd in todo:
        d = wd.shape[0]
        H = G[n.name] / max(rows[n.name], 1)
        diag = np.diag(H)[:-1]
        H[np.arange(d), np.arange(d)] += DAMP * max(float(diag.mean()), 1e-12)
        dead = diag <= 0  # channels that are always zero: free to remove
        H[np.nonzero(dead)[0], np.nonzero(dead)[0]] += 1.0
        try:
            Hinv = np.linalg.inv(H)
        except np.linalg.LinAlgError:
            continue
        W = np.concatenate([wd, np.zeros((1, wd.shape[1]))], axis=0)
        out[n.name] = ConsumerFit(n.name, n.op, k, W, Hinv)
    return out


def greedy_order(unit_cols: list[list[tuple[ConsumerFit, np.ndarray]]], removable: np.ndarray,
                 max_remove: int, steps: int = 128) -> np.ndarray:
    """Scores (higher = keep) from the greedy OBS removal order: unit u's design columns in every consumer
    are ``unit_cols[u]``; up to ``max_remove`` units are taken, about ``max_remove / steps`` per step, each
    step the cheapest by ``dE`` under the current (downdated) inverses. Units never taken score above every
    taken one, ordered by their last cost."""
    n = len(unit_cols)
    fits = {id(f): f for cols in unit_cols for f, _ in cols}
    W = {i: f.W.copy() for i, f in fits.items()}
    Hi = {i: f.Hinv.copy() for i, f in fits.items()}
    alive = removable.copy()
    per_fit: dict[int, list[tuple[int, np.ndarray]]] = {}
    for u, cols in enumerate(unit_cols):
        for f, c in cols:
            per_fit.setdefault(id(f), []).append((u, np.asarray(c, dtype=np.int64)))
    score = np.full(n, np.inf)
    chunk = max(1, int(np.ceil(max_remove / steps)))
    taken = 0
    cost = np.zeros(n)
    while True:
        cand = np.nonzero(alive)[0]
        if not len(cand):
            break
        cost = np.full(n, np.inf)
        cost[cand] = 0.0
        for i, members in per_fit.items():
            us = [(u, c) for u, c in members if alive[u]]
            if not us:
                continue
            w, h = W[i], Hi[i]
            lens = {len(c) for _, c in us}
            if len(lens) == 1:  # batched: every unit has as many columns in this consumer
                uu = np.array([u for u, _ in us])
                idx = np.stack([c for _, c in us])  # [units, cols]
                w_s = w[idx]  # [units, cols, out]
                if idx.shape[1] == 1:
                    cost[uu] += (w_s[:, 0, :] ** 2).sum(1) / np.maximum(h[idx[:, 0], idx[:, 0]], 1e-30)
                else:
                    h_ss = h[idx[:, :, None], idx[:, None, :]] + 1e-12 * np.eye(idx.shape[1])
                    cost[uu] += np.einsum("uco,uco->u", w_s, np.linalg.solve(h_ss, w_s))
                continue
            for u, cols in us:
                w_s = w[cols]
                h_ss = h[np.ix_(cols, cols)] + 1e-12 * np.eye(len(cols))
                cost[u] += float(np.sum(w_s * np.linalg.solve(h_ss, w_s)))
        if taken >= max_remove:
            break
        pick = cand[np.argsort(cost[cand], kind="stable")[:min(chunk, max_remove - taken)]]
        for u in pick:
            score[u] = taken
            taken += 1
            alive[u] = False
        by_fit: dict[int, list[np.ndarray]] = {}
        for u in pick:
            for f, cols in unit_cols[u]:
                by_fit.setdefault(id(f), []).append(cols)
        for i, cl in by_fit.items():
            S = np.concatenate(cl)
            h = Hi[i]
            h_ss = h[np.ix_(S, S)]
            try:
                inv = np.linalg.inv(h_ss)
            except np.linalg.LinAlgError:
                inv = np.linalg.pinv(h_ss)
            hs = h[:, S]
            W[i] -= hs @ (inv @ W[i][S])
            W[i][S] = 0.0
            Hi[i] = h - hs @ inv @ h[S, :]
    rest = np.nonzero(~np.isfinite(score))[0]
    if len(rest):
        fin = cost[rest]
        fin = np.where(np.isfinite(fin), fin, np.nanmax(np.where(np.isfinite(cost), cost, 0.0)) + 1.0)
        score[rest] = taken + 1 + np.argsort(np.argsort(fin, kind="stable"), kind="stable")
    return score


def compensated(fit: ConsumerFit, channels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The refit of ``fit``'s weight with ``channels`` removed (their columns zero) on the calibration
    Gram matrix: (design weight [design, outputs], bias delta [outputs])."""
    S = fit.cols(channels)
    W = fit.W.copy()
    if len(S):
        h_ss = fit.Hinv[np.ix_(S, S)]
        try:
            upd = fit.Hinv[:, S] @ np.linalg.solve(h_ss, W[S])
        except np.linalg.LinAlgError:
            upd = fit.Hinv[:, S] @ (np.linalg.pinv(h_ss) @ W[S])
        W -= upd
        W[S] = 0.0
    return W[:-1], W[-1]


def write_compensated(graph: gs.Graph, node_name: str, fit: ConsumerFit, channels: np.ndarray) -> bool:
    """Replace the node's weight (and bias) in ``graph`` by the compensated refit (the probe's model); True
    when a bias ``Add`` node was inserted (the graph then needs a toposort before export)."""
    n = next(x for x in graph.nodes if x.name == node_name)
    Wd, db = compensated(fit, channels)
    dt = np.asarray(n.inputs[1].values).dtype
    set_design_weight(n, Wd, "obs")
    if not np.any(db):
        return False
    if n.op == "Gemm":
        beta = float(n.attrs.get("beta", 1.0))
        if len(n.inputs) > 2 and isinstance(n.inputs[2], gs.Constant):
            c = np.asarray(n.inputs[2].values, dtype=np.float64) * beta
            n.inputs[2] = gs.Constant(f"{n.name}_bias_obs", np.broadcast_to(c + db, np.broadcast_shapes(c.shape, db.shape)).astype(dt))
        else:
            n.inputs.append(gs.Constant(f"{n.name}_bias_obs", db.astype(dt)))
        n.attrs["beta"] = 1.0
        return False
    if n.op == "Conv":
        b = np.asarray(n.inputs[2].values, dtype=np.float64) if len(n.inputs) > 2 and isinstance(n.inputs[2], gs.Constant) else 0.0
        bias = gs.Constant(f"{n.name}_bias_obs", (b + db).astype(dt))
        if len(n.inputs) > 2:
            n.inputs[2] = bias
        else:
            n.inputs.append(bias)
        return False
    return add_matmul_bias(graph, n, db.astype(dt), "obs")


def add_matmul_bias(graph: gs.Graph, n: gs.Node, b: np.ndarray, tag: str) -> bool:
    """MatMul has no bias input: ``b`` is added to the constant of a following bias ``Add`` (a torch Linear
    export), else a new ``Add`` is inserted after the MatMul (returns True: appended, not yet in order)."""
    y = n.outputs[0]
    readers = list(y.outputs)
    if len(readers) == 1 and readers[0].op == "Add" and y not in graph.outputs:
        add = readers[0]
        j = 1 if add.inputs[0] is y else 0
        if isinstance(add.inputs[j], gs.Constant) and np.asarray(add.inputs[j].values).shape == b.shape:
            old = np.asarray(add.inputs[j].values)
            add.inputs[j] = gs.Constant(f"{n.name}_bias_{tag}", (old.astype(np.float64) + b).astype(old.dtype))
            return False
    mid = gs.Variable(f"{y.name}__{tag}_nobias", dtype=y.dtype)
    n.outputs[0] = mid
    graph.nodes.append(gs.Node("Add", f"{n.name}_bias_{tag}_add", inputs=[mid, gs.Constant(f"{n.name}_bias_{tag}", b)], outputs=[y]))
    return True
