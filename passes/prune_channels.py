"""``prune.channels``: structured channel / filter / head removal with dependency propagation.

1. Build the channel-dependency graph (``passes.channel_deps``): pruning groups of coupled channel
   spaces, each split into *units* (the smallest index sets removable together).
2. A group is pruned only if every op touching it has a handler (else: barrier, listed in the report),
   no op changes numerics when channels go (LayerNorm/Softmax over the channel axis: "inexact",
   allowed with ``allow_inexact``), and no member matches an ``ignore`` glob. Units that touch a
   graph input/output, or contain no weight-produced channel, are locked (IO shapes never change).
3. Score units. Per parameter slice s_i along the channel axis (normalised by the parameter's mean so
   layers of different scale are comparable), then averaged over every member of the unit:
   ``l1`` = sum|w|, ``l2`` = ||w||_2 (producers and consumers), ``fpgm`` = sum_j ||w_i - w_j||_2 over the
   producer's filters (small = close to the geometric median = redundant), ``bn_gamma`` = |gamma| of the
   BatchNormalization on the channel (read from the graph, or from the loaded model ``ctx.template`` when
   ``cleanup.fold_batchnorm`` has already folded it: the folded producer's output keeps the BN output
   name), and with calibration data ``mean_act`` = E|a|, ``apoz`` = P(a > 0) (1 - APoZ) of the
   consumers' inputs, ``taylor`` = E|a_c| * ||W_consumer[:, c]||_1 (activation x weight, the first-order
   term without gradients).
4. Allocate. Each group is classified (``group_kind``): ``residual`` when its channels are coupled through
   an Add/Sum of two activations (a skip connection: the residual stream width every block shares), else
   ``attention`` (heads), else ``internal`` (expansion channels of inverted residuals, FFN intermediate
   units, SE squeeze channels, plain conv chains). ``uniform`` with ``order="internal_first"`` (the
   default): the parameters that ``ratio`` of every group would remove are taken from internal groups
   first (one common fraction, at most ``max(internal_cap, ratio)`` of each, chosen on the rounded counts so
   the realised removal is nearest the target; attention heads in the same tier), then residual groups
   only for what the others cannot give (a warning says so); measured on pretrained models, removing residual-stream channels costs far more accuracy than
   the same parameters taken from internal ones. ``order="uniform"``: each group keeps n - round(ratio * n)
   units; ``global``: units of all groups
   are ranked by normalised score and the lowest ratio * total go, subject to per-group floors
   (``min_channels``). Kept counts are rounded to the nearest multiple of ``round_to`` channels
   (onnxruntime's NCHWc kernels want multiples of 8/16), never below the floor, never all removed.
   A group with balance constraints (grouped convs in balanced mode, e.g. ShuffleNet's grouped 1x1 convs
   around a channel shuffle) removes the same number of channels from every block of each grouped conv
   (``_select_balanced``: a small integer program over interchangeable unit cells); when no removal meets
   the constraints and the rounding, the group stays whole and the report says why.
5. Remove: every parameter slice of a removed unit is deleted (weights, biases, BN terms, broadcast
   constants), attributes and shape constants are rewritten (Conv ``group``, Reshape shapes, Slice
   bounds, Split sizes, GroupNorm ``num_groups``). Removed channels, zeroed in the original, contribute
   exactly nothing, so the pruned graph equals the zeroed original (the tests' oracle, ``mode="zero"``).
6. ``reconstruct`` (needs ``--calib``): every layer whose weight reads pruned channels (the groups'
   consumer parameters: Conv with group 1, 1-D or 2-D, any kernel via im2col; Gemm; MatMul with a 2-D
   weight) is re-fit, in topological order, by ridge least squares  min ||X' W' + b' - Y||^2 +
   lambda ||W'||^2  where X' is its input in the pruned model (after the refits above it) and Y its output
   in the original model (He et al. 2017, ThiNet); lambda is chosen on held-out calibration samples. A
   consumer that cannot be refit (grouped conv, batched weight) is a warning naming it.
"""
from __future__ import annotations

import fnmatch
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from math import gcd
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from compressor import ir
from compressor.errors import UsageError
from compressor.pass_base import Pass, PassContext, PassResult
from passes.channel_deps import DepGraph, Group, build, lookup
from passes.channel_deps.graph import Space
from compressor.data import padding_keep
from passes.sparsity_patterns import im2col_rows
from passes.prune_obs import (add_matmul_bias, consumer_fits, design_weight, greedy_order, refit_blocker,
                              set_design_weight, supported, write_compensated)

log = logging.getLogger(__name__)

CRITERIA = ("l1", "l2", "fpgm", "bn_gamma", "mean_act", "apoz", "taylor", "obs")
DATA_CRITERIA = ("mean_act", "apoz", "taylor", "obs")
MAX_CALIB = 32  # samples for activation criteria
MAX_RECONSTRUCT = 512  # samples for the least-squares refit (rows >> unknowns)
MAX_OBS_CALIB = 128  # samples for the consumers' Gram matrices (criterion obs)


@dataclass(frozen=True)
class PruneChannelsConfig:
    ratio: float = 0.3
    criterion: str = "l1"
    min_channels: int = 1
    round_to: int = 1
    ignore: tuple[str, ...] = ()
    allocation: str = "uniform"
    reconstruct: bool = False
    allow_inexact: bool = False
    order: str = "internal_first"  # internal_first | uniform (every group alike, the pre-issue-17 behaviour)
    internal_cap: float = 0.6  # most of each internal group removed before residual groups are touched

    def __post_init__(self):
        if not 0.0 <= self.ratio < 1.0:
            raise UsageError(f"ratio must be in [0, 1), got {self.ratio}")
        if self.criterion not in CRITERIA:
            raise UsageError(f"unknown criterion {self.criterion!r}", hint=f"one of {', '.join(CRITERIA)}")
        if self.min_channels < 1:
            raise UsageError(f"min_channels must be >= 1, got {self.min_channels}")
        if self.round_to < 1:
            raise UsageError(f"round_to must be >= 1, got {self.round_to}")
        if self.allocation not in ("uniform", "global", "sensitivity"):
            raise UsageError(f"allocation must be uniform, global or sensitivity for prune.channels, got {self.allocation!r}")
        if self.order not in ("internal_first", "uniform"):
            raise UsageError(f"order must be internal_first or uniform, got {self.order!r}")
        if not 0.0 < self.internal_cap < 1.0:
            raise UsageError(f"internal_cap must be in (0, 1), got {self.internal_cap}")


@dataclass
class Plan:
    dep: DepGraph
    removed: dict[Space, np.ndarray]  # space -> removed indices
    group_stats: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    sensitivity: dict[str, Any] = field(default_factory=dict)  # allocation=sensitivity: the measured curves


# ------------------------------------------------------------------------------------------ analysis

def _cached_lookup():
    cache: dict[tuple[str, str, int], Any] = {}

    def f(node: gs.Node, opset: int) -> Any:
        key = (node.domain or "", node.op, opset)
        if key not in cache:
            cache[key] = lookup(node, opset)
        return cache[key]

    return f


def _slice_scores(w: np.ndarray, axis: int, kind: str) -> np.ndarray:
    m = np.moveaxis(w.astype(np.float64), axis, 0).reshape(w.shape[axis], -1)
    if kind == "l1":
        return np.abs(m).sum(1)
    if kind == "l2":
        return np.sqrt((m * m).sum(1))
    if kind == "fpgm":
        sq = (m * m).sum(1)
        d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * m @ m.T, 0.0)
        return np.sqrt(d2).sum(1)
    raise ValueError(kind)


def _param_scores(w: np.ndarray, p: Any, kind: str) -> np.ndarray:
    """Per-channel scores of parameter ``p``'s slices; a grouped consumer (``p.blocks``) holds channel
    k*Cin/g + j in column j of block k's rows."""
    if not getattr(p, "blocks", 0):
        return _slice_scores(w, p.axis, kind)
    g = p.blocks
    wb = w.reshape(g, w.shape[0] // g, *w.shape[1:])
    return np.concatenate([_slice_scores(wb[k], 1, kind) for k in range(g)])


def _norm(v: np.ndarray) -> np.ndarray:
    mean = float(np.mean(np.abs(v))) if v.size else 0.0
    return v / mean if mean > 0 else np.zeros_like(v)


def _template_gammas(template: onnx.ModelProto | None) -> dict[str, np.ndarray]:
    """BN output name -> |gamma| in the loaded (pre-pass) model."""
    if template is None:
        return {}
    inits = {t.name: t for t in template.graph.initializer}
    out = {}
    for n in template.graph.node:
        if n.op_type == "BatchNormalization" and len(n.input) > 1 and n.input[1] in inits:
            out[n.output[0]] = np.abs(onnx.numpy_helper.to_array(inits[n.input[1]]).astype(np.float64))
    return out


def _activation_stats(model: onnx.ModelProto, names: list[str], calib: Any, limit: int = MAX_CALIB) -> dict[str, list[np.ndarray]]:
    """Run the model with extra outputs; per tensor a list of per-sample arrays."""
    from compressor import runtime

    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for n in names:
        if n not in have:
            m.graph.output.append(onnx.helper.make_empty_tensor_value_info(n))
    del m.graph.value_info[:]
    sess = runtime.session(m)
    outs = [o.name for o in sess.get_outputs()]
    res: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for feed in calib.feeds[:limit]:
        vals = sess.run(names, feed) if names else []
        for n, v in zip(names, vals):
            res[n].append(v)
    del outs
    return res


def _axis_mean(arrs: list[np.ndarray], axis: int, fn) -> np.ndarray:
    tot = None
    for a in arrs:
        v = fn(a.astype(np.float64))
        s = np.moveaxis(v, axis, 0).reshape(a.shape[axis], -1).mean(1)
        tot = s if tot is None else tot + s
    return tot / max(len(arrs), 1)


def unit_scores(graph: gs.Graph, grp: Group, criterion: str, gammas: dict[str, np.ndarray],
                acts: dict[str, list[np.ndarray]]) -> tuple[np.ndarray, str]:
    """Score per unit (higher = keep) and the criterion actually used."""
    nodes = {n.name: n for n in graph.nodes}
    per_member: list[tuple[Space, Any, np.ndarray]] = []  # (space, index_fn param or None, normalised scores)
    used = criterion
    if criterion == "bn_gamma":
        for p in grp.params:
            if p.role == "bn" and p.input_index == 1:
                per_member.append((p.space, p, _norm(np.abs(np.asarray(nodes[p.node].inputs[1].values, np.float64)))))
        for s in grp.spaces:
            g = gammas.get(s[0])
            if g is not None and s[1] == 1 and g.shape[0] == grp.sizes[s]:
                per_member.append((s, None, _norm(g)))
        if not per_member:
            used = "l1"
    if criterion in DATA_CRITERIA:
        for p in grp.params:
            if p.role != "consumer":
                continue
            a = acts.get(p.space[0])
            if not a:
                continue
            mean_abs = _axis_mean(a, p.space[1], np.abs)
            if criterion in ("mean_act", "obs"):  # obs: groups prune_obs cannot score (plan) fall back to mean_act
                sc = mean_abs
            elif criterion == "apoz":
                sc = _axis_mean(a, p.space[1], lambda x: (x > 0).astype(np.float64))
            else:
                w = np.asarray(nodes[p.node].inputs[p.input_index].values)
                sc = mean_abs * _param_scores(w, p, "l1")
            per_member.append((p.space, None, _norm(sc)))
        if not per_member:
            used = "l1"
    if used in ("l1", "l2", "fpgm"):
        for p in grp.params:
            if p.role == "producer" or (p.role == "consumer" and used != "fpgm"):
                w = np.asarray(nodes[p.node].inputs[p.input_index].values)
                per_member.append((p.space, p, _norm(_param_scores(w, p, used))))
    scores = np.zeros(len(grp.units))
    for k, unit in enumerate(grp.units):
        vals = []
        for space, p, sc in per_member:
            idx = unit.get(space)
            if idx is None:
                continue
            ii = p.indices(idx) if p is not None else idx
            vals.append(float(sc[ii].mean()))
        scores[k] = float(np.mean(vals)) if vals else 0.0
    return scores, used


ADD_OPS = ("Add", "Sum", "Sub", "Mean")


def group_kind(grp: Group, view) -> str:
    """``residual`` when the group's channels are coupled through an elementwise Add/Sum/Sub/Mean of two
    activations (a skip connection: the channels reach a residual stream whose width every block shares),
    else ``internal`` (expansion channels of an inverted residual, FFN intermediate units, attention heads,
    plain conv chains). Adds with a constant or a broadcast operand (biases, ``x + 3`` in hard-swish, an
    attention mask over the heads) couple nothing and do not count."""
    spaces = set(grp.spaces)
    names = {s[0] for s in spaces}
    for nname in grp.nodes:
        node = view.nodes.get(nname)
        if node is None or node.op not in ADD_OPS:
            continue
        coupled = {t.name for t in node.inputs if not isinstance(t, gs.Constant) and t.name in names}
        if len(coupled) >= 2 or (len(node.inputs) >= 2 and len({t.name for t in node.inputs}) == 1 and coupled):
            return "residual"
    for nname in grp.nodes:  # activation x activation MatMul (Q K^T, P V): attention heads
        node = view.nodes.get(nname)
        if node is not None and node.op == "MatMul" and not any(isinstance(t, gs.Constant) for t in node.inputs):
            return "attention"
    return "internal"


def _internal_first(eligible, kinds: dict[int, str], cfg: PruneChannelsConfig, graph: gs.Graph,
                    floors: dict[int, int]) -> dict[int, float]:
    """Fraction of units removed per group: the parameters that ``ratio`` of every group would remove are
    taken from internal groups first (each up to ``max(internal_cap, ratio)``), then, only for what is
    left, from residual groups (uniformly). The fraction is chosen on the counts after rounding
    (``round_to`` moves a 200-channel group in steps of 16): the one whose realised removal is nearest
    the target, so rounding neither overshoots the target nor pushes work onto the residual stream."""
    nodes = {n.name: n for n in graph.nodes}
    cost = {grp.gid: _params_per_unit(grp, nodes) for grp, *_ in eligible}
    target = cfg.ratio * sum(cost[grp.gid] * int(rem.sum()) for grp, _, rem, _ in eligible)
    cap = max(cfg.internal_cap, cfg.ratio)

    def realised(tier: tuple[str, ...], f: float) -> float:
        tot = 0.0
        for grp, sc, rem, _ in eligible:
            if kinds[grp.gid] not in tier or f <= 0:
                continue
            n = len(grp.units)
            if grp.balance:  # the integer program is too slow to probe: its count is close to the request
                k = min(round(f * n), int(rem.sum()), n - floors[grp.gid])
            else:
                k = len(_select(grp, sc, rem, n - round(f * n), floors[grp.gid], cfg.round_to))
            tot += max(k, 0) * cost[grp.gid]
        return tot

    def best(tier: tuple[str, ...], want: float, hi: float) -> tuple[float, float]:
        grid = np.linspace(0.0, hi, 121)
        vals = [realised(tier, float(f)) for f in grid]
        i = int(np.argmin([abs(v - want) + 1e-9 * k for k, v in enumerate(vals)]))
        return float(grid[i]), vals[i]

    # Attention heads share the internal tier: on all-MiniLM-L6-v2 at 0.2 (l1, refit) FFN units alone (30%)
    # gave cosine 0.76, FFN 20% + 2 of 12 heads 0.79.
    fr: dict[str, float] = {}
    got = 0.0
    for tier, hi in ((("internal", "attention"), cap), (("residual",), 0.95)):
        f = 0.0
        if target - got > 0.02 * target and any(k in tier for k in kinds.values()):
            f, v = best(tier, target - got, hi)
            got += v
        fr.update({k: f for k in tier})
    return {grp.gid: fr[kinds[grp.gid]] for grp, *_ in eligible}


def _obs_fits(graph: gs.Graph, model: onnx.ModelProto, ctx: PassContext, candidates: list,
              kinds: dict[int, str]) -> dict[int, list[tuple[Any, Any]]]:
    """Consumer fits (``prune_obs``) for the groups whose channels end in refittable weights only: internal
    and attention groups (a residual group's channels also reach the stream's Adds and norms) whose every
    consumer parameter is a MatMul / Gemm / non-grouped Conv weight."""
    nodes = {n.name: n for n in graph.nodes}
    want: dict[int, list[Any]] = {}
    for grp, _ in candidates:
        if kinds[grp.gid] == "residual":
            continue
        cons = [p for p in grp.params if p.role == "consumer"]
        if cons and all(not p.blocks and p.node in nodes and supported(nodes[p.node]) for p in cons):
            want[grp.gid] = cons
    fits = consumer_fits(graph, model, sorted({p.node for cons in want.values() for p in cons}), ctx.calib, MAX_OBS_CALIB)
    return {gid: [(p, fits[p.node]) for p in cons] for gid, cons in want.items() if all(p.node in fits for p in cons)}


def _obs_scores(grp: Group, fits: list[tuple[Any, Any]], cap: float, floor: int) -> np.ndarray:
    unit_cols = []
    for unit in grp.units:
        unit_cols.append([(fit, fit.cols(p.indices(unit[p.space]))) for p, fit in fits if p.space in unit])
    removable = ~grp.locked & np.array([bool(c) for c in unit_cols])
    n = len(grp.units)
    max_remove = max(0, min(int(removable.sum()), n - floor, int(np.ceil(cap * n))))
    return greedy_order(unit_cols, removable, max_remove)


def _params_per_unit(grp: Group, nodes: dict[str, gs.Node]) -> float:
    """Parameter elements a removed unit takes on average (every slice of every parameter of the group)."""
    total = 0.0
    for p in grp.params:
        t = nodes[p.node].inputs[p.input_index] if p.node in nodes else None
        if not isinstance(t, gs.Constant):
            continue
        shape = np.asarray(t.values).shape
        if p.axis >= len(shape) or not shape[p.axis]:
            continue
        covered = sum(len(p.indices(u[p.space])) for u in grp.units if p.space in u)
        total += float(np.prod(shape)) / shape[p.axis] * covered
    return total / max(len(grp.units), 1) if total else 1.0


def _width(grp: Group) -> int:
    n = len(grp.units)
    w = 1
    for p in grp.producers:
        size = grp.sizes[p.space]
        if size % n == 0:
            w = max(w, size // n)
    return w


def _round_keep(keep: float, n: int, floor: int, mult: int) -> int:
    """Kept unit count: ``keep`` rounded to a multiple of ``mult`` within [floor, n].

    A group smaller than ``mult`` cannot reach the hardware multiple by pruning; rounding it as if it could
    would drive it to the floor (an 8-channel stem or squeeze-excite group pruned to 1 channel at
    round_to 16: far more MACs gone than asked, the unaligned result off onnxruntime's NCHWc kernels, and
    the accuracy lost). Such a group rounds to the largest power-of-two step that fits it instead
    (8 -> keep 8 or 0 -> kept whole at ratio 0.5; 6 -> 4).
    """
    while mult > 1 and mult > n:
        mult //= 2
    k = int(round(keep / mult)) * mult
    floor_m = -(-floor // mult) * mult
    k = max(k, floor_m if floor_m <= n else floor)
    return int(min(max(k, floor, 1), n))


def plan(graph: gs.Graph, ctx: PassContext, cfg: PruneChannelsConfig) -> Plan:
    model = ctx.export(graph)
    dep = build(graph, model, ctx.opset, _cached_lookup())
    warnings: list[str] = []
    criterion = cfg.criterion
    if criterion in DATA_CRITERIA and ctx.calib is None:
        warnings.append(f"criterion {criterion} needs calibration data (--calib); used l1 instead")
        criterion = "l1"
    gammas = _template_gammas(ctx.template) if criterion == "bn_gamma" else {}

    eligible: list[tuple[Group, np.ndarray, np.ndarray, str]] = []  # group, scores, removable mask, used criterion
    stats: list[dict[str, Any]] = []
    acts: dict[str, list[np.ndarray]] = {}
    candidates = []
    for grp in dep.groups:
        st = {"group": grp.gid, "members": grp.nodes[:12] + ([f"... {len(grp.nodes) - 12} more"] if len(grp.nodes) > 12 else []),
              "spaces": len(grp.spaces), "channels_before": len(grp.units), "channels_after": len(grp.units),
              "criterion": None, "barriers": grp.barriers, "status": "pruned"}
        stats.append(st)
        names = set(grp.nodes) | {p.node for p in grp.params} | {s[0] for s in grp.spaces}
        if grp.barriers:
            st["status"] = "barrier"
        elif grp.inexact and not cfg.allow_inexact:
            st["status"] = "inexact"
            st["barriers"] = grp.inexact
        elif cfg.ignore and any(fnmatch.fnmatchcase(n, g) for n in names for g in cfg.ignore):
            st["status"] = "ignored"
        elif not (~grp.locked).any():
            st["status"] = "locked (graph input/output or no weight-produced channel)"
        else:
            candidates.append((grp, st))
    if criterion in DATA_CRITERIA and candidates:
        need = sorted({p.space[0] for grp, _ in candidates for p in grp.params if p.role == "consumer"})
        acts = _activation_stats(model, need, ctx.calib)
    kinds = {grp.gid: group_kind(grp, dep.view) for grp, _ in candidates}
    obs_fits: dict[int, list[tuple[Any, Any]]] = {}  # gid -> [(consumer param, ConsumerFit)]
    if criterion == "obs" and candidates:
        obs_fits = _obs_fits(graph, model, ctx, candidates, kinds)
    for grp, st in candidates:
        if grp.gid in obs_fits:
            cap = max(cfg.internal_cap, cfg.ratio) if kinds[grp.gid] != "residual" else 0.95
            sc = _obs_scores(grp, obs_fits[grp.gid], cap, max(cfg.min_channels, int(grp.locked.sum()), 1))
            used = "obs"
        else:
            sc, used = unit_scores(graph, grp, criterion, gammas, acts)
            if criterion == "obs" and used == "obs":  # unit_scores scored it by mean |activation|: say so
                used = "mean_act (obs: a residual-stream group or a consumer that cannot be refit)"
        st["criterion"] = used
        if used != criterion and not used.startswith("mean_act (obs"):
            warnings.append(f"group {grp.gid}: criterion {criterion} has no data for this group ({', '.join(grp.nodes[:3])}); used {used}")
        if grp.inexact:
            warnings.append(f"group {grp.gid} pruned although inexact (allow_inexact): {'; '.join(grp.inexact[:3])}")
        eligible.append((grp, sc, ~grp.locked, used))

    removed_units: dict[int, list[int]] = {}
    floors = {grp.gid: max(cfg.min_channels, int(grp.locked.sum()), 1) for grp, *_ in eligible}
    for st in stats:
        if st["group"] in kinds:
            st["kind"] = kinds[st["group"]]
    sens_extra: dict[str, Any] = {}
    if cfg.allocation == "sensitivity" and ctx.calib is None:
        warnings.append("allocation sensitivity needs calibration data (--calib); used uniform")
    if cfg.allocation == "uniform" or (cfg.allocation == "sensitivity" and ctx.calib is None):
        fracs = _internal_first(eligible, kinds, cfg, graph, floors) if cfg.order == "internal_first" else {
            grp.gid: cfg.ratio for grp, *_ in eligible}
    elif cfg.allocation == "sensitivity":
        fracs, w, sens_extra = _sensitivity_fractions(graph, model, ctx, cfg, dep, eligible, floors, kinds, obs_fits)
        warnings += w
    if cfg.allocation in ("uniform", "sensitivity"):
        for grp, sc, rem, _ in eligible:
            n = len(grp.units)
            f = fracs[grp.gid]
            next(st for st in stats if st["group"] == grp.gid)["fraction"] = round(f, 4)
            if f <= 0:
                continue
            removed_units[grp.gid] = _select(grp, sc, rem, n - round(f * n), floors[grp.gid], cfg.round_to)
        res = [g for g, *_ in eligible if kinds[g.gid] == "residual"]
        if cfg.allocation == "sensitivity":
            cut = [g for g in res if g.gid in removed_units and removed_units[g.gid]]
            if cut:
                warnings.append(f"structured: {len(cut)} residual-stream group(s) pruned where the measured output error was "
                                "lowest (accuracy risk; lower --structured to keep the residual width)")
        elif cfg.order == "internal_first" and res:
            fr = max(fracs[g.gid] for g in res)
            if fr > 0:
                warnings.append(f"structured: the internal groups (each at most {max(cfg.internal_cap, cfg.ratio):.0%}) cannot meet the "
                                f"parameter target; {len(res)} residual-stream group(s) pruned at {fr:.0%} "
                                f"(accuracy risk; lower --structured to keep the residual width)")
    else:
        total = sum(len(g.units) for g, *_ in eligible)
        budget = round(cfg.ratio * total)
        ranked = sorted(((sc[k] / (np.mean(sc) or 1.0), grp.gid, k) for grp, sc, rem, _ in eligible
                         for k in np.nonzero(rem)[0]))
        count = Counter()
        sizes = {grp.gid: len(grp.units) for grp, *_ in eligible}
        for _, gid, k in ranked:
            if budget <= 0:
                break
            if sizes[gid] - count[gid] - 1 >= floors[gid]:
                count[gid] += 1
                budget -= 1
        for grp, sc, rem, _ in eligible:
            n = len(grp.units)
            removed_units[grp.gid] = _select(grp, sc, rem, n - count[grp.gid], floors[grp.gid], cfg.round_to)

    removed: dict[Space, list[np.ndarray]] = defaultdict(list)
    by_gid = {st["group"]: st for st in stats}
    for grp, *_ in eligible:
        ks = removed_units.get(grp.gid, [])
        by_gid[grp.gid]["channels_after"] = len(grp.units) - len(ks)
        if not ks:
            by_gid[grp.gid]["status"] = "unchanged"
            if grp.balance and by_gid[grp.gid]["channels_before"] - floors[grp.gid] > 0:
                by_gid[grp.gid]["barriers"] = [
                    f"balanced grouped conv / channel shuffle: no removal keeps the {len(grp.balance)} grouped "
                    f"channel space(s) equal per group" + (f" with round_to {cfg.round_to}" if cfg.round_to > 1 else "")]
        for k in ks:
            for s, idx in grp.units[k].items():
                removed[s].append(idx)
    final = {s: np.unique(np.concatenate(v)) for s, v in removed.items()}
    return Plan(dep, final, stats, warnings, sens_extra)


SENS_LEVELS = (0.1, 0.2, 0.3, 0.45, 0.6)  # fractions of a group's units probed by allocation=sensitivity
SENS_SAMPLES = 16


def _sensitivity_fractions(graph: gs.Graph, model: onnx.ModelProto, ctx: PassContext, cfg: PruneChannelsConfig, dep: DepGraph,
                           eligible: list, floors: dict[int, int], kinds: dict[int, str],
                           obs_fits: dict[int, list[tuple[Any, Any]]] | None = None
                           ) -> tuple[dict[int, float], list[str], dict[str, Any]]:
    """Per-group fractions with the least summed output error for the parameter target: every group's
    lowest-scored units are zeroed at a few fractions (``SENS_LEVELS``, the removal the pass would make,
    rounding included), the relative output error against the unpruned model is measured on
    ``SENS_SAMPLES`` calibration samples, and the curves are allocated like sparsity's
    (``compressor.sensitivity.allocate``: cheapest marginal error per parameter first). Measured without the
    refit, so an overestimate of what ``reconstruct`` leaves, but a ranking of where channels are cheap."""
    from compressor import runtime
    from compressor.metrics import rel_error as _rel_error
    from compressor.sensitivity import Curve, allocate

    feeds = list(ctx.calib.feeds[:SENS_SAMPLES])
    ref = runtime.run_all(runtime.session(model), feeds)
    nodes = {n.name: n for n in graph.nodes}
    cap = max(cfg.internal_cap, cfg.ratio)
    curves = []
    for grp, sc, rem, _ in eligible:
        n = len(grp.units)
        cost = _params_per_unit(grp, nodes)
        levels, errs = [0.0], [0.0]
        seen: set[int] = set()
        for f in SENS_LEVELS:
            if f > cap + 1e-9:
                break
            ks = _select(grp, sc, rem, n - round(f * n), floors[grp.gid], cfg.round_to)
            if not ks or len(ks) in seen:
                continue
            seen.add(len(ks))
            removed: dict[Space, list[np.ndarray]] = defaultdict(list)
            for k in ks:
                for sp, idx in grp.units[k].items():
                    removed[sp].append(idx)
            g2 = gs.import_onnx(model)
            rem_sp = {sp: np.unique(np.concatenate(v)) for sp, v in removed.items()}
            apply_plan(g2, Plan(dep, rem_sp), "zero")
            inserted = False
            for prm, fit in (obs_fits or {}).get(grp.gid, []):
                if prm.space in rem_sp:
                    inserted |= write_compensated(g2, prm.node, fit, prm.indices(rem_sp[prm.space]))
            if inserted:
                g2.toposort()
            m2 = ctx.export(g2)
            levels.append(len(ks) / n)
            errs.append(_rel_error(runtime.run_all(runtime.session(m2), feeds), ref))
        curves.append(Curve(str(grp.gid), kinds[grp.gid], int(round(cost * n)), levels, errs))
    # the removals _select can make (round_to) are the probed levels; anything past a group's last probed
    # level is unreachable for it (a prohibitive error, not the flat extrapolation of its curve)
    top = max(max(c.levels) for c in curves) if curves else 0.0
    for c in curves:
        if c.levels[-1] < top:
            c.levels.append(top)
            c.errors.append(1e6)
    alloc, warnings = allocate(curves, cfg.ratio, 0.0, top)
    fracs = {grp.gid: float(alloc.get(str(grp.gid), 0.0)) for grp, *_ in eligible}
    extra = {"samples": len(feeds), "curves": {c.layer: {"kind": c.op, "params": c.numel,
                                                         "levels": [round(v, 4) for v in c.levels],
                                                         "errors": [round(e, 8) for e in c.errors]} for c in curves}}
    return fracs, warnings, extra


def _segments(grp: Group) -> list[np.ndarray]:
    """Units partitioned by the producer spaces they hold. One segment for a plain or residual group (every
    unit spans the same producers); one per Concat input in a concat-merged group (DenseNet: the stem and
    each dense layer own a disjoint slice of the concatenated channels)."""
    prod = sorted({p.space for p in grp.producers})
    keys: dict[tuple, list[int]] = defaultdict(list)
    for k, u in enumerate(grp.units):
        keys[tuple(s for s in prod if s in u)].append(k)
    return [np.array(v, dtype=np.int64) for v in keys.values()]


def _select(grp: Group, scores: np.ndarray, removable: np.ndarray, keep: float, floor: int, round_to: int) -> list[int]:
    """Units to remove. Rounding applies per producer segment, so that every conv output (and every Concat
    slice) stays a multiple of ``round_to``, not only the group's total: rounding the total of a concat group
    left segments such as 7 + 3 + 3 + 3 = 16, all off onnxruntime's NCHWc kernels."""
    n = len(grp.units)
    mult = round_to // gcd(_width(grp), round_to)
    segs = _segments(grp)
    if grp.balance:
        return _select_balanced(grp, scores, removable, n - int(round(keep)), floor, mult, segs)
    if len(segs) <= 1 or mult == 1:
        k = _round_keep(keep, n, floor, mult)
        n_remove = min(n - k, int(removable.sum()))
        if n_remove <= 0:
            return []
        order = [int(i) for i in np.argsort(np.where(removable, scores, np.inf), kind="stable")]
        return sorted(order[:n_remove])
    out: list[int] = []
    frac = keep / n
    for seg in segs:
        ns = len(seg)
        seg_floor = max(1, int(np.ceil(floor * ns / n)), int((~removable[seg]).sum()))
        k = _round_keep(frac * ns, ns, min(seg_floor, ns), mult)
        n_remove = min(ns - k, int(removable[seg].sum()))
        if n_remove <= 0:
            continue
        order = np.argsort(np.where(removable[seg], scores[seg], np.inf), kind="stable")
        out += [int(seg[i]) for i in order[:n_remove]]
    return sorted(out)


def _select_balanced(grp: Group, scores: np.ndarray, removable: np.ndarray, target: int, floor: int, mult: int,
                     segs: list[np.ndarray]) -> list[int]:
    """Units to remove from a group with balance constraints (grouped convs in balanced mode): for every
    constraint (space, g) the removed indices fall equally into the g blocks of the space.

    Units with the same block counts in every constrained space and the same producer segment (a *cell*) are
    interchangeable, so the choice is: how many units n_c to take from each cell (then its lowest-scored
    ones). An integer program over the n_c (scipy's HiGHS MILP; a proportional search without scipy):
    maximise the number removed (up to ``target``), then minimise their score, subject to
    sum_c n_c (cnt_c[k] - cnt_c[0]) = 0 for every constrained space and block k, every producer segment
    keeping at least one unit, a multiple of ``mult`` (the rounding, per segment as in ``_select``), and the
    group keeping at least ``floor``. Returns [] when only the empty removal is feasible."""
    n = len(grp.units)
    target = min(target, n - floor, int(removable.sum()))
    if target <= 0:
        return []
    seg_of = np.zeros(n, dtype=np.int64)
    for i, seg in enumerate(segs):
        seg_of[seg] = i
    cells: dict[tuple, list[int]] = defaultdict(list)
    sig_rows: dict[tuple, np.ndarray] = {}
    for k in np.nonzero(removable)[0]:
        u = grp.units[int(k)]
        sig = []
        for s, g in grp.balance:
            idx = u.get(s)
            cnt = np.zeros(g, dtype=np.int64) if idx is None else np.bincount(idx // (grp.sizes[s] // g), minlength=g)
            sig.append(cnt[1:] - cnt[0])
        row = np.concatenate(sig) if sig else np.zeros(0, dtype=np.int64)
        key = (int(seg_of[k]), row.tobytes())
        cells[key].append(int(k))
        sig_rows[key] = row
    keys = list(cells)
    for key in keys:  # lowest score first
        cells[key].sort(key=lambda k: (scores[k], k))
    A = np.stack([sig_rows[k] for k in keys], axis=1).astype(np.float64) if keys else np.zeros((0, 0))
    A = A[np.any(A != 0, axis=1)] if A.size else A
    seg_units = [len(seg) for seg in segs]
    seg_locked = [int((~removable[seg]).sum()) for seg in segs]

    def seg_mult(ns: int) -> int:
        m = mult
        while m > 1 and m > ns:
            m //= 2
        return m

    counts = _balanced_counts_milp(keys, cells, scores, A, target, floor, n, segs, seg_units, seg_locked, seg_mult)
    if counts is None:
        counts = _balanced_counts_search(keys, cells, A, target, segs, seg_units, seg_locked, seg_mult)
    if A.size and np.any(A @ np.asarray(counts, dtype=np.float64) != 0):  # a solver tolerance slip: refuse
        log.warning("group %d: balanced selection not exact; group kept whole", grp.gid)
        return []
    out = [k for key, c in zip(keys, counts) for k in cells[key][:int(c)]]
    return sorted(out)


def _balanced_counts_milp(keys, cells, scores, A, target, floor, n, segs, seg_units, seg_locked, seg_mult):
    try:
        from scipy.optimize import Bounds, LinearConstraint, milp
    except ImportError:  # optional: the proportional search below
        return None
    nc = len(keys)
    sizes = [len(cells[k]) for k in keys]
    nz = sum(sizes)
    ns = len(segs)
    nv = nc + nz + ns  # n_c, z (one per unit, in cell order), y_seg (kept = mult * y)
    sc = np.concatenate([scores[cells[k]] for k in keys]).astype(np.float64)
    big = 1.0 + float(np.abs(sc).sum())
    cost = np.zeros(nv)
    cost[nc:nc + nz] = sc - big  # every removal pays -big: the count comes first, then the score
    rows, lo, hi = [], [], []

    def add(r, a, b):
        rows.append(r)
        lo.append(a)
        hi.append(b)

    off = nc
    for j, sz in enumerate(sizes):  # n_c = sum of the cell's z (lowest scores first: the LP fills them in order)
        r = np.zeros(nv)
        r[j] = 1.0
        r[off:off + sz] = -1.0
        add(r, 0.0, 0.0)
        off += sz
    for arow in A:
        r = np.zeros(nv)
        r[:nc] = arow
        add(r, 0.0, 0.0)
    r = np.zeros(nv)
    r[:nc] = 1.0
    add(r, 0.0, float(min(target, n - floor)))
    seg_of_key = [k[0] for k in keys]
    for i in range(ns):
        r = np.zeros(nv)  # kept in segment i: seg_units - sum n_c = mult * y  ->  sum n_c + mult * y = seg_units
        for j in range(nc):
            if seg_of_key[j] == i:
                r[j] = 1.0
        r[nc + nz + i] = float(seg_mult(seg_units[i]))
        add(r, float(seg_units[i]), float(seg_units[i]))
    lb = np.zeros(nv)
    ub = np.concatenate([np.array(sizes, float), np.ones(nz), np.array(seg_units, float)])
    for i in range(ns):
        m = seg_mult(seg_units[i])
        seg_floor = max(1, seg_locked[i], int(np.ceil(floor * seg_units[i] / n)))
        lb[nc + nz + i] = -(-seg_floor // m)
        ub[nc + nz + i] = seg_units[i] // m
    integrality = np.concatenate([np.ones(nc), np.zeros(nz), np.ones(ns)])
    res = milp(cost, integrality=integrality, bounds=Bounds(lb, ub),
               constraints=LinearConstraint(np.array(rows), np.array(lo), np.array(hi)),
               options={"time_limit": 20.0})
    if res.x is None:
        return [0] * nc
    return [int(round(v)) for v in res.x[:nc]]


def _balanced_counts_search(keys, cells, A, target, segs, seg_units, seg_locked, seg_mult):
    """Without scipy: the same fraction of every cell (balanced when it is integral), the largest that fits."""
    sizes = np.array([len(cells[k]) for k in keys])
    seg_of_key = np.array([k[0] for k in keys])
    best, best_n = [0] * len(keys), 0
    for f in np.linspace(1.0, 0.0, 401):
        c = np.floor(f * sizes + 1e-9).astype(np.int64)
        tot = int(c.sum())
        if tot <= best_n or tot > target or (A.size and np.any(A @ c != 0)):
            continue
        ok = True
        for i in range(len(segs)):
            kept = seg_units[i] - int(c[seg_of_key == i].sum())
            if kept < max(1, seg_locked[i]) or kept % seg_mult(seg_units[i]):
                ok = False
                break
        if ok:
            best, best_n = c.tolist(), tot
    return best


# ------------------------------------------------------------------------------------------ rewriting

def apply_plan(graph: gs.Graph, p: Plan, mode: str = "remove") -> int:
    """Remove (``mode="remove"``) or zero (``mode="zero"``, the test oracle) the planned channels.
    Returns the number of parameter tensors rewritten."""
    if not p.removed:
        return 0
    nodes = {n.name: n for n in graph.nodes}
    edits: dict[tuple[str, int], dict[int, tuple[set[int], float, int]]] = defaultdict(dict)
    for grp in p.dep.groups:
        for prm in grp.params:
            r = p.removed.get(prm.space)
            if r is None:
                continue
            idx, fill, blocks = edits[(prm.node, prm.input_index)].get(prm.axis, (set(), prm.fill, prm.blocks))
            idx |= set(prm.indices(r).tolist())
            edits[(prm.node, prm.input_index)][prm.axis] = (idx, fill, blocks)
    for (nname, i), axes in edits.items():
        node = nodes[nname]
        old = node.inputs[i]
        vals = np.array(old.values, copy=True)
        for axis, (idx, fill, blocks) in sorted(axes.items(), reverse=True):
            ii = np.array(sorted(idx), dtype=np.int64)
            if blocks:  # grouped consumer (axis 1): channel c is column c % cin_g of block c // cin_g's rows
                vals = _edit_grouped(vals, ii, blocks, mode, fill)
            elif mode == "zero":
                sl = [slice(None)] * vals.ndim
                sl[axis] = ii
                vals[tuple(sl)] = fill
            else:
                vals = np.delete(vals, ii, axis=axis)
        node.inputs[i] = gs.Constant(f"{old.name}__{nname}_{mode}", np.ascontiguousarray(vals))
    if mode == "zero":
        return len(edits)
    view = p.dep.view

    def new_shape(name: str) -> tuple[int, ...]:
        shp = list(view.shape(name))
        for a in range(len(shp)):
            r = p.removed.get((name, a))
            if r is not None:
                shp[a] -= len(r)
        return tuple(shp)

    touched = {s[0] for s in p.removed}
    opset_lookup = _cached_lookup()
    for node in graph.nodes:
        names = {t.name for t in node.inputs} | {t.name for t in node.outputs}
        if not names & touched:
            continue
        h = opset_lookup(node, view.opset)
        if h is not None and hasattr(h, "fix"):
            mine = {s: r for s, r in p.removed.items() if s[0] in names}
            h.fix(node, mine, new_shape, view)
    io = {t.name for t in graph.inputs} | {t.name for t in graph.outputs}
    for name, t in graph.tensors().items():
        if isinstance(t, gs.Variable) and name not in io:
            t.shape = None
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    _reinfer_shapes(graph)
    return len(edits)


def _edit_grouped(w: np.ndarray, removed: np.ndarray, g: int, mode: str, fill: float) -> np.ndarray:
    """Zero or delete input channels of a grouped Conv weight [Cout, Cin/g, ...]; the selection removed the
    same number from every block."""
    cin_g, rows = w.shape[1], w.shape[0] // g
    wb = w.reshape(g, rows, *w.shape[1:])
    out = []
    for k in range(g):
        cols = removed[(removed // cin_g) == k] % cin_g
        if mode == "zero":
            wb[k][:, cols] = fill
        else:
            out.append(np.delete(wb[k], cols, axis=1))
    if mode == "zero":
        return wb.reshape(w.shape)
    if len({o.shape[1] for o in out}) != 1:
        raise ValueError("unbalanced removal from a grouped conv (a bug in the selection)")
    return np.concatenate(out, axis=0)


def _reinfer_shapes(graph: gs.Graph) -> None:
    """Give the intermediate tensors their new static shapes (ONNX shape inference)."""
    # the weightless export: inference needs the graph and the constants' shapes, not their values
    inferred = onnx.shape_inference.infer_shapes(ir.export_weightless(graph))
    shapes = {}
    for vi in inferred.graph.value_info:
        tt = vi.type.tensor_type
        if tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
            shapes[vi.name] = ([int(d.dim_value) for d in tt.shape.dim], tt.elem_type)
    for name, t in graph.tensors().items():
        if isinstance(t, gs.Variable) and name in shapes:
            t.shape = shapes[name][0]
            if t.dtype is None:
                t.dtype = onnx.helper.tensor_dtype_to_np_dtype(shapes[name][1])


# ------------------------------------------------------------------------------------------ reconstruction

def refit_targets(graph: gs.Graph, p: Plan) -> tuple[list[gs.Node], list[str]]:
    """Every node whose weight reads pruned channels (the groups' consumer parameters), in topological
    order; those that cannot be refit are listed with the reason."""
    consumers = {prm.node for grp in p.dep.groups for prm in grp.params
                 if prm.role == "consumer" and prm.space in p.removed}
    targets, warnings = [], []
    for n in graph.nodes:
        if n.name not in consumers:
            continue
        why = refit_blocker(n)
        if why:
            warnings.append(f"reconstruct: {n.name} ({n.op}) not refit: {why}")
        else:
            targets.append(n)
    return targets, warnings


def _fit_rows(n: gs.Node, x: np.ndarray, y: np.ndarray, removed_out: np.ndarray | None, take: int,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Design rows A (the consumer's pruned input, im2col for convs) and targets T (its original output,
    less its own removed output channels) of one calibration sample, ``take`` random rows of them."""
    x = x.astype(np.float64)
    y = y.astype(np.float64)
    w = np.asarray(n.inputs[1].values)
    if n.op == "Conv":
        if removed_out is not None:
            y = np.delete(y, removed_out, axis=1)
        A = im2col_rows(n, x, w.shape[2:])
        T = np.moveaxis(y, 1, -1).reshape(-1, y.shape[1])
    else:
        if removed_out is not None:
            y = np.delete(y, removed_out, axis=-1)
        A, T = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    if A.shape[0] != T.shape[0]:
        raise ValueError(f"{A.shape[0]} input rows vs {T.shape[0]} output rows")
    if A.shape[0] > take:
        sel = rng.choice(A.shape[0], take, replace=False)
        A, T = A[sel], T[sel]
    return A, T


RIDGES = (1e-7, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


def _ridge_fit(parts: list[tuple[np.ndarray, np.ndarray]], ridge: float | None,
               prior: np.ndarray | None = None) -> np.ndarray | None:
    """[W; b] of min ||[A 1] [W; b] - T||^2 + lambda ||W - P||^2, lambda relative to the mean diagonal of
    A'A, ``P`` the ``prior`` (the layer's original weights on its kept inputs; zeros when None): a large
    lambda keeps the original weights, a small one the exact least-squares fit. ``ridge=None``: lambda
    chosen on held-out calibration samples (every 5th): a well-determined layer gets a near-exact fit, one
    with few rows per unknown (a classifier after global pooling: one row per sample; an FFN projection
    with 1536 inputs on a few thousand tokens) stays near its original weights."""
    def gram(ps):
        A = np.concatenate([a for a, _ in ps])
        T = np.concatenate([t for _, t in ps])
        A1 = np.concatenate([A, np.ones((A.shape[0], 1))], axis=1)
        return A1.T @ A1, A1.T @ T, A1, T

    P = None if prior is None else np.concatenate([prior.astype(np.float64), np.zeros((1, prior.shape[1]))], axis=0)

    def solve(G, B, lam_rel):
        reg = lam_rel * max(float(np.trace(G)) / G.shape[0], 1e-30) * np.eye(G.shape[0])
        reg[-1, -1] = 0.0
        try:
            return np.linalg.solve(G + reg, B if P is None else B + reg @ P)
        except np.linalg.LinAlgError:
            return None

    G, B, _, _ = gram(parts)
    lam = ridge
    if lam is None:
        lam = 1e-3
        val = parts[::5]
        train = [q for i, q in enumerate(parts) if i % 5]
        if len(parts) >= 5 and train:
            Gt, Bt, _, _ = gram(train)
            _, _, Av, Tv = gram(val)
            errs = []
            for r in RIDGES:
                sol = solve(Gt, Bt, r)
                errs.append(np.inf if sol is None else float(np.square(Av @ sol - Tv).mean()))
            if np.isfinite(min(errs)):
                lam = RIDGES[int(np.argmin(errs))]
    return solve(G, B, lam)


def reconstruct(graph: gs.Graph, original: onnx.ModelProto, p: Plan, ctx: PassContext, template: onnx.ModelProto,
                ridge: float | None = None, max_rows: int = 24000) -> tuple[int, list[str]]:
    """Refit every consumer of pruned channels (Conv 1-D/2-D with any kernel via im2col, Gemm, MatMul):
    min ||X' W' + b' - Y||^2 + lambda ||W'||^2 with X' its input in the pruned model (after the refits above
    it) and Y its output in the original; returns (count, warnings)."""
    targets, warnings = refit_targets(graph, p)
    if not targets:
        return 0, warnings
    ys = _activation_stats(original, [n.outputs[0].name for n in targets], ctx.calib, MAX_RECONSTRUCT)
    rng = np.random.default_rng(0)
    done = 0
    for n in targets:  # topological order; each refit sees the already refitted layers above it
        yname = n.outputs[0].name
        xs = _activation_stats(ctx.export(graph), [n.inputs[0].name], ctx.calib, MAX_RECONSTRUCT)[n.inputs[0].name]
        w = np.asarray(n.inputs[1].values)
        ax_out = 1 if n.op == "Conv" else len(ys[yname][0].shape) - 1
        r = p.removed.get((yname, ax_out))
        take = max(1, max_rows // max(len(xs), 1))
        try:
            parts = []
            for x, y, feed in zip(xs, ys[yname], ctx.calib.feeds[:MAX_RECONSTRUCT]):
                keep = padding_keep(feed, x.shape) if n.op != "Conv" and x.shape[:-1] == y.shape[:-1] else None
                if keep is not None:  # padded positions never reach the output: fit the real tokens
                    x, y = x.reshape(-1, x.shape[-1])[keep], y.reshape(-1, y.shape[-1])[keep]
                parts.append(_fit_rows(n, x, y, r, take, rng))
        except ValueError as exc:
            warnings.append(f"reconstruct: {n.name} ({n.op}) not refit: {exc}")
            continue
        sol = _ridge_fit(parts, ridge, design_weight(n))
        if sol is None:
            warnings.append(f"reconstruct: {n.name} ({n.op}) not refit: singular system")
            continue
        W, b = sol[:-1], sol[-1]
        dt = w.dtype
        set_design_weight(n, W, "refit")
        if n.op == "Gemm":
            n.attrs["beta"] = 1.0  # the fitted bias replaces beta * C
        if n.op == "MatMul":
            add_matmul_bias(graph, n, b.astype(dt), "refit")  # fitted against the MatMul's own output
        else:
            bias = gs.Constant(f"{n.name}_bias_refit", b.astype(dt))
            if len(n.inputs) > 2:
                n.inputs[2] = bias
            else:
                n.inputs.append(bias)
        done += 1
    return done, warnings


# ------------------------------------------------------------------------------------------ the pass

class PruneChannels(Pass):
    name = "prune.channels"
    description = "remove whole channels/filters/heads with dependency propagation (dense, smaller graph)"
    Config = PruneChannelsConfig

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        cfg: PruneChannelsConfig = self.config
        warnings: list[str] = []
        if cfg.reconstruct and ctx.calib is None:
            warnings.append("reconstruct needs calibration data (--calib); skipped")
        original = ctx.export(graph) if cfg.reconstruct and ctx.calib is not None else None
        pl = plan(graph, ctx, cfg)
        warnings += pl.warnings
        params_before = _param_count(graph)
        edited = apply_plan(graph, pl, "remove")
        refit = 0
        if original is not None and pl.removed:
            refit, w = reconstruct(graph, original, pl, ctx, ctx.template)
            warnings += w
        groups = pl.group_stats
        barrier_ops = Counter(b.split(" ", 1)[0] for g in groups if g["status"] == "barrier" for b in g["barriers"])
        if barrier_ops:
            warnings.append("groups not pruned at barriers: " + ", ".join(f"{op} x{c}" for op, c in sorted(barrier_ops.items())))
        inexact = [g for g in groups if g["status"] == "inexact"]
        if inexact:
            warnings.append(f"{len(inexact)} group(s) not pruned: an op normalises over their channels "
                            f"(e.g. {inexact[0]['barriers'][0]}); set allow_inexact to prune them")
        stats = {
            "ratio": cfg.ratio, "criterion": cfg.criterion, "allocation": cfg.allocation,
            "groups": len(groups), "groups_pruned": sum(g["status"] == "pruned" for g in groups),
            "channels_before": sum(g["channels_before"] for g in groups),
            "channels_after": sum(g["channels_after"] for g in groups),
            "params_before": params_before, "params_after": _param_count(graph),
            "tensors_rewritten": edited, "reconstructed": refit,
            "barrier_ops": dict(barrier_ops), "group_stats": groups, "order": cfg.order,
            **({"sensitivity": pl.sensitivity} if pl.sensitivity else {}),
            "groups_internal": sum(g.get("kind") == "internal" for g in groups),
            "groups_residual": sum(g.get("kind") == "residual" for g in groups),
            "groups_attention": sum(g.get("kind") == "attention" for g in groups),
            "channels_removed_internal": sum(g["channels_before"] - g["channels_after"] for g in groups if g.get("kind") == "internal"),
            "channels_removed_residual": sum(g["channels_before"] - g["channels_after"] for g in groups if g.get("kind") == "residual"),
        }
        return PassResult(bool(pl.removed), stats, warnings)


def _param_count(graph: gs.Graph) -> int:
    return int(sum(np.asarray(t.values).size for t in graph.tensors().values()
                   if isinstance(t, gs.Constant) and np.asarray(t.values).dtype.kind == "f"))
