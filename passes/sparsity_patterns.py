"""Shared sparsity machinery for the ``sparsify.*`` passes: patterns, masks,
layer views, allocation and the common config.

Canonical weight matrix ("rows = outputs, columns = reduction axis")
-------------------------------------------------------------------
Every prunable weight is viewed as a 2-D matrix ``W2[rows, cols]`` whose rows
index output features and whose columns index the axis that is summed over
(the *reduction axis*) when the layer computes ``y[r] = sum_c W2[r, c] x[c]``:

* ``Conv`` weight ``[O, I/g, kH, kW]`` -> ``W2 = w.reshape(O, I/g*kH*kW)``;
  columns are ordered (input channel, kernel row, kernel column), i.e. the
  im2col patch order, so an N:M group is M consecutive (channel, kh, kw)
  taps of one filter.
* ``ConvTranspose`` weight ``[I, O/g, kH, kW]`` -> ``w.transpose(1, 0, 2, 3)``
  reshaped to ``[O/g, I*kH*kW]`` (data-aware passes skip ConvTranspose).
* ``Gemm`` weight B: ``transB=1`` stores ``[N, K]`` = ``W2`` as is;
  ``transB=0`` stores ``[K, N]`` and ``W2 = B.T``.
* ``MatMul`` constant B ``[K, N]`` (``y = x @ B``): ``W2 = B.T``; a batched
  ``[..., K, N]`` weight becomes ``swapaxes(-1, -2).reshape(-1, K)``.
  Constant A ``[M, K]`` (``y = A @ x``): ``W2 = A`` (``reshape(-1, K)``).

Patterns (all defined on ``W2``)
--------------------------------
* ``unstructured``: exactly ``round(s * numel)`` entries of smallest score are
  zeroed (stable order breaks ties).
* ``N:M`` (``2:4``, ``4:8``, ``1:4``): every group of M consecutive columns of
  one row (groups start at column 0) keeps at most N non-zeros; a trailing
  partial group of g < M columns keeps at most ``max(0, g - (M - N))``. The
  per-layer sparsity is fixed at ``1 - N/M``.
* ``RxC`` blocks (``1x4``, ``4x1``, ``8x1``, ``16x1``, any ``RxC``): the grid of
  R rows (outputs) x C columns (reduction) starting at (0, 0) is either fully
  zero or kept; blocks are scored by their norm (RMS of the element scores,
  i.e. the L2 norm for full blocks, size-corrected for partial edge blocks) and
  the lowest-scoring blocks are dropped until the zeroed element count is
  closest to ``round(s * numel)`` (exact up to one block).

Allocation (per-layer sparsities meeting the global target)
-----------------------------------------------------------
* ``uniform``: every layer gets the target.
* ``global``: one score threshold t across all layers; layer i gets
  ``clip(frac(scores_i < t), floor, ceiling)`` and t is found by bisection so
  the pruned count equals ``round(s * total)`` (within rounding).
* ``sensitivity``: see ``compressor.sensitivity`` (least total output error). The sweep's probes run on
  the run's executor (``--executor local|ray``, ``compressor.executor.for_stage``); the stats record
  it under ``sensitivity_run`` (executor, tasks, retries, seconds).
"""
from __future__ import annotations

import fnmatch
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import onnx_graphsurgeon as gs

from compressor.errors import UsageError

log = logging.getLogger(__name__)

WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# recurrent layers: input weights W (input 1) and recurrent weights R (input 2) are pruned, biases are not
# (Narang et al. 2017). W [dirs, gates*H, I] / R [dirs, gates*H, H]: W2 = w.reshape(-1, last axis).
RECURRENT_WEIGHT_INPUTS = {"LSTM": (1, 2), "GRU": (1, 2), "RNN": (1, 2)}


# ----------------------------------------------------------------------------- patterns


@dataclass(frozen=True)
class Pattern:
    kind: str  # "unstructured" | "nm" | "block"
    n: int = 0
    m: int = 0
    r: int = 1
    c: int = 1

    @property
    def text(self) -> str:
        if self.kind == "nm":
            return f"{self.n}:{self.m}"
        if self.kind == "block":
            return f"{self.r}x{self.c}"
        return "unstructured"

    @property
    def fixed_sparsity(self) -> float | None:
        """Per-layer sparsity implied by the pattern (N:M), else None."""
        return 1.0 - self.n / self.m if self.kind == "nm" else None


def parse_pattern(text: str) -> Pattern:
    t = str(text).strip().lower()
    if t in ("unstructured", "none", ""):
        return Pattern("unstructured")
    m = re.fullmatch(r"(\d+):(\d+)", t)
    if m:
        n, mm = int(m.group(1)), int(m.group(2))
        if not 0 < n < mm:
            raise UsageError(f"pattern {text!r}: N:M needs 0 < N < M", hint="e.g. 2:4, 4:8, 1:4")
        return Pattern("nm", n=n, m=mm)
    m = re.fullmatch(r"(\d+)x(\d+)", t)
    if m:
        r, c = int(m.group(1)), int(m.group(2))
        if r < 1 or c < 1 or r * c < 2:
            raise UsageError(f"pattern {text!r}: blocks need R, C >= 1 and R*C >= 2", hint="e.g. 1x4, 4x1, 8x1, 16x1")
        return Pattern("block", r=r, c=c)
    raise UsageError(f"unknown sparsity pattern {text!r}", hint="unstructured | N:M (2:4, 4:8, 1:4) | RxC blocks (1x4, 4x1, 8x1, 16x1)")


def _exact_k(sparsity: float, n: int) -> int:
    return int(round(sparsity * n))


def _prune_lowest(s: np.ndarray, per: np.ndarray) -> np.ndarray:
    """Prune-mask of a 2-D score matrix: in row r the ``per[r]`` lowest scores, ties broken by column (the first
    ones go), NaN above everything -- exactly the first ``per[r]`` entries of a stable argsort of each row, found
    with one O(n) ``np.partition`` (a threshold per row) instead of an O(n log n) sort."""
    rows, cols = s.shape
    prune = np.zeros(s.shape, dtype=bool)
    live = np.flatnonzero(per > 0)
    if live.size == 0:
        return prune
    if live.size < rows:  # rows that prune nothing take no part
        sub = _prune_lowest(s[live], per[live])
        prune[live] = sub
        return prune
    kth = np.unique(per - 1)  # per-row counts differ by at most one: one or two partition points
    t = np.partition(s, kth, axis=1)[np.arange(rows), per - 1][:, None]  # the per[r]-th smallest of each row
    nan_t = np.isnan(t)
    if nan_t.any():  # NaN sorts last: below a NaN threshold every number lies, NaNs tie with it
        isnan = np.isnan(s)
        less = np.where(nan_t, ~isnan, s < t)
        eq = np.where(nan_t, isnan, s == t)
    else:
        less, eq = s < t, s == t
    need = per - np.count_nonzero(less, axis=1)  # >= 1: the threshold itself is pruned
    tied = np.count_nonzero(eq, axis=1)
    prune |= less
    full = need >= tied  # every tie goes
    prune[full] |= eq[full]
    part = np.flatnonzero(~full)
    if part.size:  # the first ``need`` ties (by column) go, as in a stable sort
        e = eq[part]
        prune[part] |= e & (np.cumsum(e, axis=1) <= need[part, None])
    return prune


def unstructured_mask(scores: np.ndarray, sparsity: float, per_row: bool = False, k: int | None = None) -> np.ndarray:
    """Keep-mask with exactly round(s * numel) (or ``k``) False entries (lowest scores; among equal scores the
    first in row-major order go, as in a stable sort; found by partition, O(n)).
    ``per_row``: each row prunes its own share (row counts differ by at most one)."""
    s = np.asarray(scores, dtype=np.float64)
    k = _exact_k(sparsity, s.size) if k is None else k
    if k <= 0:
        return np.ones(s.shape, dtype=bool)
    if not per_row or s.ndim != 2:
        flat = s.reshape(1, -1)
        return ~_prune_lowest(flat, np.array([min(k, flat.shape[1])])).reshape(s.shape)
    rows, cols = s.shape
    per = np.full(rows, k // rows)
    per[: k - per.sum()] += 1
    return ~_prune_lowest(s, np.minimum(per, cols))


def nm_mask(scores: np.ndarray, n: int, m: int) -> np.ndarray:
    """Keep-mask: in every group of m consecutive columns, the m-n lowest scores are pruned."""
    s = np.asarray(scores, dtype=np.float64)
    rows, cols = s.shape
    pad = (-cols) % m
    sp = np.pad(s, ((0, 0), (0, pad)), constant_values=np.inf).reshape(rows, -1, m)
    order = np.argsort(sp, axis=2, kind="stable")
    keep = np.ones(sp.shape, dtype=bool)
    np.put_along_axis(keep, order[:, :, : m - n], False, axis=2)
    return keep.reshape(rows, -1)[:, :cols]


def block_scores(scores: np.ndarray, r: int, c: int) -> tuple[np.ndarray, np.ndarray]:
    """(RMS score per block, number of real elements per block) on the r x c grid."""
    s = np.asarray(scores, dtype=np.float64)
    rows, cols = s.shape
    pr, pc = (-rows) % r, (-cols) % c
    sq = np.pad(s * s, ((0, pr), (0, pc))).reshape((rows + pr) // r, r, (cols + pc) // c, c)
    cnt = np.pad(np.ones_like(s), ((0, pr), (0, pc))).reshape(sq.shape)
    size = cnt.sum(axis=(1, 3))
    return np.sqrt(sq.sum(axis=(1, 3)) / size), size


def expand_blocks(block_keep: np.ndarray, r: int, c: int, shape: tuple[int, int]) -> np.ndarray:
    full = np.repeat(np.repeat(block_keep, r, axis=0), c, axis=1)
    return full[: shape[0], : shape[1]]


def block_mask(scores: np.ndarray, sparsity: float, r: int, c: int, k: int | None = None) -> np.ndarray:
    """Keep-mask of whole r x c blocks: lowest-RMS blocks pruned until the pruned element
    count is closest to round(s * numel) (or ``k``)."""
    s = np.asarray(scores, dtype=np.float64)
    bs, size = block_scores(s, r, c)
    k = _exact_k(sparsity, s.size) if k is None else k
    order = np.argsort(bs.ravel(), kind="stable")
    cum = np.concatenate([[0.0], np.cumsum(size.ravel()[order])])
    j = int(np.argmin(np.abs(cum - k)))
    bk = np.ones(bs.size, dtype=bool)
    bk[order[:j]] = False
    return expand_blocks(bk.reshape(bs.shape), r, c, s.shape)


def select_mask(scores: np.ndarray, pattern: Pattern, sparsity: float, per_row: bool = False) -> np.ndarray:
    """Keep-mask on a canonical 2-D score matrix (higher score = more important)."""
    if pattern.kind == "nm":
        return nm_mask(scores, pattern.n, pattern.m)
    if pattern.kind == "block":
        return block_mask(scores, sparsity, pattern.r, pattern.c)
    return unstructured_mask(scores, sparsity, per_row)


def pattern_violations(keep: np.ndarray, pattern: Pattern) -> int:
    """Number of N:M groups / blocks that break the pattern (0 = valid)."""
    k = np.asarray(keep, dtype=bool)
    rows, cols = k.shape
    if pattern.kind == "nm":
        m, n = pattern.m, pattern.n
        pad = (-cols) % m
        kp = np.pad(k, ((0, 0), (0, pad))).reshape(rows, -1, m)
        real = np.pad(np.ones_like(k), ((0, 0), (0, pad))).reshape(rows, -1, m).sum(axis=2)
        limit = np.maximum(0, real - (m - n))
        return int((kp.sum(axis=2) > np.minimum(n, limit)).sum())
    if pattern.kind == "block":
        r, c = pattern.r, pattern.c
        pr, pc = (-rows) % r, (-cols) % c
        kp = np.pad(k.astype(np.int64), ((0, pr), (0, pc))).reshape((rows + pr) // r, r, (cols + pc) // c, c).sum(axis=(1, 3))
        _, size = block_scores(np.zeros(k.shape), r, c)
        return int(((kp != 0) & (kp != size)).sum())
    return 0


# ----------------------------------------------------------------------------- layer views


@dataclass
class Layer:
    node: gs.Node
    weight: gs.Constant
    index: int  # input index of the weight in node.inputs

    @property
    def name(self) -> str:
        if self.node.op in RECURRENT_WEIGHT_INPUTS:
            return f"{self.node.name}/{self.weight.name}"
        return self.node.name or self.weight.name

    @property
    def groups(self) -> int:
        return int(self.node.attrs.get("group", 1)) if self.node.op in ("Conv", "ConvTranspose") else 1

    @property
    def values(self) -> np.ndarray:
        return np.asarray(self.weight.values)

    def matrix(self, w: np.ndarray | None = None) -> np.ndarray:
        return to_matrix(self, self.values if w is None else w)

    def set_matrix(self, w2: np.ndarray) -> None:
        v = self.values
        self.weight.values = from_matrix(self, w2, v.shape).astype(v.dtype)


def to_matrix(layer: Layer, w: np.ndarray) -> np.ndarray:
    op = layer.node.op
    if op in RECURRENT_WEIGHT_INPUTS:
        return w.reshape(-1, w.shape[-1])
    if op == "Conv":
        return w.reshape(w.shape[0], -1)
    if op == "ConvTranspose":
        return np.swapaxes(w, 0, 1).reshape(w.shape[1], -1)
    if op == "Gemm":
        return w if int(layer.node.attrs.get("transB", 0)) else w.T
    if op == "MatMul":
        if layer.index == 1:
            w = w.reshape(1, -1) if w.ndim == 1 else w
            return np.swapaxes(w, -1, -2).reshape(-1, w.shape[-2])
        return w.reshape(-1, w.shape[-1])
    raise ValueError(op)


def from_matrix(layer: Layer, w2: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    op = layer.node.op
    if op == "Conv" or op in RECURRENT_WEIGHT_INPUTS:
        return w2.reshape(shape)
    if op == "ConvTranspose":
        return np.swapaxes(w2.reshape((shape[1], shape[0]) + tuple(shape[2:])), 0, 1)
    if op == "Gemm":
        return w2 if int(layer.node.attrs.get("transB", 0)) else w2.T
    if op == "MatMul":
        if layer.index == 1:
            s2 = (1,) + tuple(shape) if len(shape) == 1 else tuple(shape)
            swapped = s2[:-2] + (s2[-1], s2[-2])
            return np.swapaxes(w2.reshape(swapped), -1, -2).reshape(shape)
        return w2.reshape(shape)
    raise ValueError(op)


def find_layers(graph: gs.Graph) -> list[Layer]:
    """Prunable layers in graph order: the constant float weight input of Conv/ConvTranspose/Gemm/MatMul
    (MatMul: B, or A when only A is constant) and W/R of LSTM/GRU/RNN. Shared weights are listed once."""
    found, seen = [], set()
    for node in graph.nodes:
        for idx in RECURRENT_WEIGHT_INPUTS.get(node.op, ()):
            w = node.inputs[idx] if len(node.inputs) > idx else None
            if isinstance(w, gs.Constant) and w.name not in seen and np.asarray(w.values).dtype.kind == "f":
                seen.add(w.name)
                found.append(Layer(node, w, idx))
        if node.op not in WEIGHT_OPS or len(node.inputs) < 2:
            continue
        idx = 1
        if node.op == "MatMul" and not isinstance(node.inputs[1], gs.Constant) and isinstance(node.inputs[0], gs.Constant):
            idx = 0
        w = node.inputs[idx]
        if isinstance(w, gs.Constant) and w.name not in seen and np.asarray(w.values).dtype.kind == "f" and np.asarray(w.values).ndim >= 2:
            seen.add(w.name)
            found.append(Layer(node, w, idx))
    return found


# ops a classifier's logits may pass through on the way to a graph output
_PASS_THROUGH = {"Add", "Dropout", "Softmax", "LogSoftmax", "Reshape", "Flatten", "Identity", "Squeeze", "Unsqueeze", "Sigmoid", "Cast"}


def classifier_nodes(graph: gs.Graph) -> set[str]:
    """Names of prunable nodes that produce a graph output through pass-through ops only."""
    found = set()
    for out in graph.outputs:
        t = out
        while t.inputs:
            node = t.inputs[0]
            if node.op in WEIGHT_OPS:
                found.add(node.name)
                break
            if node.op not in _PASS_THROUGH:
                break
            t = node.inputs[0]
    return found


def is_stem_conv(node: gs.Node, w: np.ndarray) -> bool:
    """A Conv with <= 4 input channels and no weighted layer upstream (a squeeze-excite conv on 4
    squeezed channels is not a stem)."""
    if not (node.op == "Conv" and w.ndim >= 3 and w.shape[1] * int(node.attrs.get("group", 1)) <= 4):
        return False
    seen, stack = set(), [t for t in node.inputs[:1] if not isinstance(t, gs.Constant)]
    while stack:
        for p in stack.pop().inputs:
            if id(p) in seen:
                continue
            seen.add(id(p))
            if p.op in WEIGHT_OPS and any(isinstance(t, gs.Constant) and len(t.shape or ()) >= 2 for t in p.inputs[1:]):
                return False
            stack.extend(i for i in p.inputs if not isinstance(i, gs.Constant))
    return True


# ----------------------------------------------------------------------------- shared config


ALLOCATIONS = ("uniform", "global", "sensitivity")


@dataclass(frozen=True)
class SparsifyConfig:
    """Keys shared by all sparsify passes (the pipeline writes sparsity, pattern, allocation, ignore)."""

    sparsity: float = 0.5
    pattern: str = "unstructured"
    allocation: str = "uniform"
    min_layer_sparsity: float = 0.0  # global/sensitivity allocation: per-layer floor
    max_layer_sparsity: float = 0.98  # global/sensitivity allocation: per-layer ceiling
    min_elements: int = 16
    ignore: tuple[str, ...] = ()
    include: tuple[str, ...] = ()  # name globs pruned even where a default rule keeps them dense (stem, classifier)
    # None (default): kept dense by rule unless allocation=sensitivity, which measures how much error
    # pruning them costs and allocates their sparsity like every other layer's
    keep_stem: bool | None = None
    keep_classifier: bool | None = None
    calib_samples: int = 128  # calibration samples used (wanda / obs statistics); 0 = all
    # samples per sensitivity probe (allocation=sensitivity: layers x 12 levels full-model runs each):
    # on the zoo MobileNetV2 at 70% (10 layers) 16 samples gave the same per-layer sparsities as 128
    # in 3.7 s instead of 24.8 s of probes; MobileNetV2-112 spent 706 s in 561 probes of 128 samples
    # (shared cores). 0 = calib_samples
    sensitivity_samples: int = 16

    def __post_init__(self):
        if not 0.0 <= self.sparsity < 1.0:
            raise UsageError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.min_elements < 0:
            raise UsageError(f"min_elements must be >= 0, got {self.min_elements}")
        if self.allocation not in ALLOCATIONS:
            raise UsageError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got {self.allocation!r}")
        if not 0.0 <= self.min_layer_sparsity <= self.max_layer_sparsity < 1.0:
            raise UsageError("need 0 <= min_layer_sparsity <= max_layer_sparsity < 1, got "
                             f"{self.min_layer_sparsity}, {self.max_layer_sparsity}")
        if self.calib_samples < 0 or self.sensitivity_samples < 0:
            raise UsageError(f"calib_samples and sensitivity_samples must be >= 0, got {self.calib_samples}, "
                             f"{self.sensitivity_samples}")
        p = parse_pattern(self.pattern)
        fixed = p.fixed_sparsity
        if fixed is not None and self.sparsity > 0 and abs(fixed - self.sparsity) > 1e-6:
            raise UsageError(f"pattern {p.text} fixes the sparsity of every pruned layer at {fixed:g}, but sparsity {self.sparsity:g} was requested",
                             hint=f"pass --sparsity {fixed:g} with --pattern {p.text}")

    @property
    def parsed_pattern(self) -> Pattern:
        return parse_pattern(self.pattern)


def select_layers(graph: gs.Graph, cfg: SparsifyConfig, data_aware: bool = False) -> tuple[list[Layer], list[str]]:
    """Layers to prune under the shared rules, plus warnings for each layer kept dense and why."""
    classifiers = classifier_nodes(graph)
    layers, warnings = [], []
    measured = cfg.allocation == "sensitivity"
    keep_stem = cfg.keep_stem if cfg.keep_stem is not None else not measured
    keep_classifier = cfg.keep_classifier if cfg.keep_classifier is not None else not measured
    for layer in find_layers(graph):
        node, vals = layer.node, layer.values
        included = any(fnmatch.fnmatch(node.name, g) or fnmatch.fnmatch(layer.weight.name, g) for g in cfg.include)
        if any(fnmatch.fnmatch(node.name, g) or fnmatch.fnmatch(layer.weight.name, g) for g in cfg.ignore):
            warnings.append(f"{node.name}: ignored by pattern, kept dense")
        elif keep_stem and not included and is_stem_conv(node, vals):
            warnings.append(f"{node.name}: stem conv (<= 4 input channels) kept dense by default (keep_stem)")
        elif keep_classifier and not included and node.name in classifiers:
            warnings.append(f"{node.name}: final classifier kept dense by default (keep_classifier)")
        elif vals.size < cfg.min_elements:
            warnings.append(f"{node.name}: {vals.size} weights < min_elements {cfg.min_elements}, kept dense")
        elif data_aware and node.op in RECURRENT_WEIGHT_INPUTS:
            warnings.append(f"{layer.name}: recurrent weights are not supported by data-aware pruning, kept dense "
                            "(use sparsify.magnitude, or lower.rnn first)")
        elif data_aware and node.op == "ConvTranspose":
            warnings.append(f"{node.name}: ConvTranspose is not supported by data-aware pruning, kept dense")
        elif data_aware and node.op == "Conv" and vals.ndim not in (3, 4):
            warnings.append(f"{node.name}: {vals.ndim - 2}-D convolution not supported by data-aware pruning, kept dense")
        elif data_aware and node.op == "MatMul" and vals.ndim != 2:
            warnings.append(f"{node.name}: batched MatMul weight {list(vals.shape)} not supported by data-aware pruning, kept dense")
        else:
            layers.append(layer)
    return layers, warnings


# ----------------------------------------------------------------------------- allocation


def _count_below(x: np.ndarray, sizes: np.ndarray | None, t: float, inclusive: bool = False) -> float:
    """Pruned count (elements, or block elements with ``sizes``) of the scores ``x`` below ``t`` (or at most ``t``);
    a NaN ``t`` counts every number (NaN sorts last), as a search in sorted scores would."""
    if np.isnan(t):
        sel = ~np.isnan(x)
    else:
        sel = x <= t if inclusive else x < t
    return float(np.count_nonzero(sel)) if sizes is None else float(np.sum(sizes, where=sel))


def _sorted_counts(x: np.ndarray, sizes: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(sorted scores, pruned count up to and including each) for counting by ``searchsorted``."""
    order = np.argsort(x, kind="stable")
    return x[order], (np.arange(1, x.size + 1, dtype=np.float64) if sizes is None else np.cumsum(sizes[order]))


def _first_reaching(units: dict[str, tuple[np.ndarray, np.ndarray | None]], clipped: Callable[[dict[str, float]], float],
                    want: float) -> float:
    """The smallest score v with ``clipped(pruned counts of the scores <= v) >= want`` (the caller checked that one
    exists and that pruning nothing stays below ``want``), in O(n) and exactly: a strided sample of the scores
    brackets it (two exact checks, widened until they hold), and only the scores inside the bracket are sorted."""
    def reaches(v: float) -> bool:
        return clipped({k: _count_below(x, sz, v, inclusive=True) for k, (x, sz) in units.items()}) >= want

    step = max(1, sum(x.size for x, _ in units.values()) // 65536)
    sample = {}
    for k, (x, sz) in units.items():  # each layer's sample stands for the layer: its counts scaled up
        xs, cum = _sorted_counts(x[::step], None if sz is None else sz[::step])
        full = float(x.size) if sz is None else float(sz.sum())
        sample[k] = (xs, cum * (full / cum[-1]) if cum.size else cum)

    def estimate(v: float) -> bool:
        counts = {}
        for k, (xs, cum) in sample.items():
            j = int(np.searchsorted(xs, v, side="right"))
            counts[k] = cum[j - 1] if j > 0 else 0.0
        return clipped(counts) >= want

    values = np.unique(np.concatenate([xs for xs, _ in sample.values()]))
    i = int(np.searchsorted([estimate(float(v)) for v in values[:: max(1, values.size // 64)]], True))  # coarse
    lo_i, hi_i = max(0, (i - 1) * max(1, values.size // 64)), min(values.size - 1, (i + 1) * max(1, values.size // 64))
    while lo_i < hi_i:  # the first sample value the estimate says reaches
        mid_i = (lo_i + hi_i) // 2
        if estimate(float(values[mid_i])):
            hi_i = mid_i
        else:
            lo_i = mid_i + 1
    margin = int(np.sqrt(values.size)) + 1  # about 2 standard deviations of a sample quantile, in sample ranks
    a_i, b_i = lo_i - margin, lo_i + margin
    a = b = None  # v_star in (a, b]; None: unbounded
    for _ in range(6):
        a = float(values[a_i]) if a_i >= 0 else None
        b = float(values[b_i]) if b_i < values.size else None
        if a is not None and reaches(a):
            b, b_i, a_i = a, a_i, a_i - 4 * margin
        elif b is not None and not reaches(b):
            a, a_i, b_i = b, b_i, b_i + 4 * margin
        else:
            break
        margin *= 4
    else:
        a = b = None  # the estimate was far off: search everything
    c = float(values[lo_i])  # the estimate itself: an end of the bracket, so its ties (e.g. zeros) are never sorted
    if (a is None or a < c) and (b is None or c < b):
        if reaches(c):
            b = c
        else:
            a = c
    # exact: v_star is b or one of the scores strictly between a and b; count those below a, sort those between
    base, cand = {}, {}
    for k, (x, sz) in units.items():
        inside = np.ones(x.shape, bool) if a is None else x > a
        if b is not None:
            inside &= x < b
        base[k] = 0.0 if a is None else _count_below(x, sz, a, inclusive=True)
        cand[k] = _sorted_counts(x[inside], None if sz is None else sz[inside])
    between = np.unique(np.concatenate([xs for xs, _ in cand.values()]))

    def reaches_between(v: float) -> bool:
        counts = {}
        for k, (xs, cum) in cand.items():
            j = int(np.searchsorted(xs, v, side="right"))
            counts[k] = base[k] + (cum[j - 1] if j > 0 else 0.0)
        return clipped(counts) >= want

    lo_i, hi_i = 0, between.size  # between.size: none of them reaches, so b does
    while lo_i < hi_i:
        mid_i = (lo_i + hi_i) // 2
        if reaches_between(float(between[mid_i])):
            hi_i = mid_i
        else:
            lo_i = mid_i + 1
    return float(between[lo_i]) if lo_i < between.size else b


def global_allocation(scores: dict[str, np.ndarray], pattern: Pattern, target: float, floor: float, ceiling: float
                      ) -> tuple[dict[str, float], list[str]]:
    """Per-layer sparsity from one threshold over all layers' (block) scores, clipped to [floor, ceiling].

    The threshold is the bisection (100 halvings between the smallest score - 1 and the largest + 1) for the
    smallest one whose clipped pruned count reaches the target. Each step only compares the middle with the first
    score that reaches the target (``_first_reaching``: O(n), a sample bracket and a sort of just the scores inside
    it), so no layer's scores are sorted; the result is the same as a search in fully sorted scores."""
    units: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    for name, s in scores.items():
        if pattern.kind == "block":
            bs, size = block_scores(s, pattern.r, pattern.c)
            units[name] = (bs.ravel(), size.ravel().astype(np.float64))
        else:
            units[name] = (np.asarray(s, np.float64).ravel(), None)
    n = {k: float(s.size) for k, s in scores.items()}
    total = sum(n.values())
    warnings = []
    want = target * total
    lo_cap, hi_cap = sum(floor * v for v in n.values()), sum(ceiling * v for v in n.values())
    if not lo_cap <= want <= hi_cap:
        warnings.append(f"global allocation: target {target:g} outside what the per-layer floor {floor:g} / ceiling {ceiling:g} allow; clamped")
        want = min(max(want, lo_cap), hi_cap)

    def clipped(cnt: dict[str, float]) -> float:  # the total pruned count, each layer clipped to [floor, ceiling]
        return sum(min(max(cnt[k], floor * n[k]), ceiling * n[k]) for k in units)

    def pruned(t: float) -> dict[str, float]:
        return {k: min(max(_count_below(x, sz, t), floor * n[k]), ceiling * n[k]) for k, (x, sz) in units.items()}

    ends = [(float(x.min()), float(x.max())) for x, _ in units.values() if x.size] or [(0.0, 0.0)]
    if any(np.isnan(e[0]) for e in ends):  # NaN propagates through min/max: every threshold is NaN
        lo = hi = np.nan
    else:
        lo, hi = min(e[0] for e in ends) - 1.0, max(e[1] for e in ends) + 1.0
    # a threshold t prunes the scores below it; the clipped total of t stays under the target exactly while no score
    # that reaches the target lies below t, i.e. t <= v_star: the bisection needs only v_star
    if np.isnan(lo) or not units:
        everything = {k: _count_below(x, sz, np.nan) for k, (x, sz) in units.items()}  # NaN scores sort last
        never, always, v_star = False, clipped(everything) < want, np.nan
    else:
        everything = {k: float(x.size) if sz is None else float(sz.sum()) for k, (x, sz) in units.items()}
        never = not clipped({k: 0.0 for k in units}) < want  # nothing pruned already reaches it
        always = not never and clipped(everything) < want  # everything pruned still stays under
        v_star = np.nan if never or always else _first_reaching(units, clipped, want)
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if always or (not never and not np.isnan(mid) and mid <= v_star):
            lo = mid
        else:
            hi = mid
    counts = pruned(hi)
    # distribute the residual (ties at the threshold, rounding) over layers with room, largest first
    resid = want - sum(counts.values())
    for k in sorted(counts, key=lambda k: -n[k]):
        if abs(resid) < 0.5:
            break
        room = (ceiling * n[k] - counts[k]) if resid > 0 else (counts[k] - floor * n[k])
        step = min(abs(resid), max(room, 0.0)) * np.sign(resid)
        counts[k] += step
        resid -= step
    return {k: counts[k] / n[k] for k in counts}, warnings


@dataclass
class LayerReport:
    op: str
    weight: str
    numel: int
    requested: float
    sparsity: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, "weight": self.weight, "numel": self.numel, "requested": round(self.requested, 6),
                "sparsity": round(self.sparsity, 6), **self.extra}


def summarize(layers: dict[str, LayerReport], cfg: SparsifyConfig, warnings: list[str]) -> dict[str, Any]:
    total = sum(r.numel for r in layers.values())
    zeros = sum(r.sparsity * r.numel for r in layers.values())
    return {"layers": {k: r.to_dict() for k, r in layers.items()}, "prunable_params": total,
            "requested_sparsity": cfg.sparsity, "pattern": cfg.parsed_pattern.text, "allocation": cfg.allocation,
            "achieved_sparsity": round(zeros / total, 6) if total else 0.0}


def check_valid(name: str, keep: np.ndarray, pattern: Pattern) -> None:
    bad = pattern_violations(keep, pattern)
    if bad:
        from compressor.errors import PassError

        raise PassError(f"{name}: {bad} group(s) violate pattern {pattern.text} (internal error)")


# ----------------------------------------------------------------------------- layer inputs (data-aware passes)


def input_tensor(layer: Layer) -> str:
    """Name of the activation that multiplies the weight."""
    return activation(layer).name


def _conv_pads(node: gs.Node, spatial: tuple[int, ...], kernel: tuple[int, ...], strides, dil) -> list[int]:
    auto = node.attrs.get("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    nd = len(spatial)
    if auto in ("NOTSET", "") or auto is None:
        pads = list(node.attrs.get("pads", [0] * (2 * nd)))
        return pads
    if auto == "VALID":
        return [0] * (2 * nd)
    begin, end = [], []
    for i in range(nd):
        out = -(-spatial[i] // strides[i])
        total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dil[i] + 1 - spatial[i])
        small, big = total // 2, total - total // 2
        begin.append(big if auto == "SAME_LOWER" else small)
        end.append(small if auto == "SAME_LOWER" else big)
    return begin + end


def im2col(node: gs.Node, x: np.ndarray, kernel: tuple[int, ...]) -> np.ndarray:
    """Patches ``[N, OH, OW, C, kH, kW]`` of a Conv input (1-D convs get H = 1)."""
    one_d = x.ndim == 3
    if one_d:
        x = x[:, :, None, :]
        kernel = (1,) + tuple(kernel)
    nd = 2
    strides = list(node.attrs.get("strides", [1] * (1 if one_d else 2)))
    dil = list(node.attrs.get("dilations", [1] * (1 if one_d else 2)))
    if one_d:
        strides, dil = [1] + strides, [1] + dil
    spatial = tuple(x.shape[2:])
    pads = _conv_pads(node, spatial[1:] if one_d else spatial, kernel[1:] if one_d else kernel,
                      strides[1:] if one_d else strides, dil[1:] if one_d else dil)
    if one_d:
        pads = [0, pads[0], 0, pads[1]]
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[nd]), (pads[1], pads[nd + 1])))
    eff = tuple((k - 1) * d + 1 for k, d in zip(kernel, dil))
    win = np.lib.stride_tricks.sliding_window_view(xp, eff, axis=(2, 3))
    win = win[:, :, :: strides[0], :: strides[1], :: dil[0], :: dil[1]]
    return win.transpose(0, 2, 3, 1, 4, 5)


def im2col_rows(node: gs.Node, x: np.ndarray, kernel: tuple[int, ...]) -> np.ndarray:
    """``im2col`` as a design matrix: rows [N * OH * OW] in the output's order, columns [C * prod(kernel)] in
    the weight's (C, kernel) order, so ``rows @ w.reshape(Cout, -1).T`` is the (non-grouped) conv."""
    p = im2col(node, x, tuple(kernel))
    return p.reshape(p.shape[0] * p.shape[1] * p.shape[2], -1)


def layer_features(layer: Layer, x: np.ndarray) -> list[np.ndarray]:
    """Input rows ``X_g[tokens, cols]`` per group g such that the layer computes ``X_g @ W2_g.T``
    (``W2_g`` = the rows of the canonical matrix belonging to group g)."""
    node, w = layer.node, layer.values
    if node.op == "Conv":
        g = layer.groups
        patches = im2col(node, x, tuple(w.shape[2:]))  # [N, OH, OW, C, kH, kW]
        cg = patches.shape[3] // g
        return [patches[:, :, :, i * cg:(i + 1) * cg].reshape(-1, cg * int(np.prod(w.shape[2:]))) for i in range(g)]
    if node.op == "Gemm":
        x2 = x.T if int(node.attrs.get("transA", 0)) else x
        return [x2.reshape(-1, x2.shape[-1])]
    if node.op == "MatMul":
        if layer.index == 1:
            return [x.reshape(-1, x.shape[-1])]
        return [np.swapaxes(x, -1, -2).reshape(-1, x.shape[-2])]
    raise ValueError(node.op)


def ancestors(tensor: gs.Tensor) -> set[int]:
    """ids of all nodes upstream of a tensor."""
    seen: set[int] = set()
    stack = [tensor]
    while stack:
        t = stack.pop()
        for node in t.inputs:
            if id(node) not in seen:
                seen.add(id(node))
                stack.extend(node.inputs)
    return seen


def activation(layer: Layer) -> gs.Tensor:
    """The activation tensor that multiplies the weight."""
    return layer.node.inputs[1] if layer.node.op == "MatMul" and layer.index == 0 else layer.node.inputs[0]


def feature_stats(model: Any, samples: list[dict], layers: list[Layer], full: bool) -> dict[str, list[np.ndarray]]:
    """Stream calibration samples through onnxruntime and accumulate, per layer and group, either
    the full Gram matrix H = sum X^T X (``full``) or its diagonal (squared feature norms), in float64.
    Returns ``{layer name: [H_g or diag_g]}`` divided by the token count."""
    from compressor.activations import iter_capture
    from compressor.data import padding_keep

    names = sorted({input_tensor(l) for l in layers})
    acc: dict[str, list[np.ndarray]] = {}
    buf: dict[str, list[list[np.ndarray]]] = {}
    tokens: dict[str, int] = {l.name: 0 for l in layers}

    def flush(name: str) -> None:
        # one GEMM per buffered chunk instead of a rank-few update per sample (memory-bound)
        for i, chunks in enumerate(buf[name]):
            if chunks:
                f = np.concatenate(chunks)
                acc[name][i] += f.T @ f if full else np.einsum("ij,ij->j", f, f)
                chunks.clear()

    feeds = list(samples.feeds) if hasattr(samples, "feeds") else list(samples)
    for feed, acts in zip(feeds, iter_capture(model, feeds, names)):
        for l in layers:
            x = np.asarray(acts[input_tensor(l)], dtype=np.float64)
            keep = padding_keep(feed, x.shape) if l.node.op == "MatMul" and l.index == 1 else None
            if keep is not None:  # padded positions never reach the output: statistics of the real tokens
                x = x.reshape(-1, x.shape[-1])[keep]
            feats = layer_features(l, x)
            if l.name not in acc:
                acc[l.name] = [np.zeros((f.shape[1], f.shape[1]) if full else f.shape[1]) for f in feats]
                buf[l.name] = [[] for _ in feats]
            for i, f in enumerate(feats):
                buf[l.name][i].append(f)
            tokens[l.name] += feats[0].shape[0]
            if sum(c.shape[0] for c in buf[l.name][0]) >= _FLUSH_ROWS:
                flush(l.name)
    for name in acc:
        flush(name)
    return {k: [a / max(tokens[k], 1) for a in v] for k, v in acc.items()}


_FLUSH_ROWS = 1024  # buffered feature rows per layer group before they are folded into H


def cross_stats(model: Any, dense: Any, samples: list[dict], layers: list[Layer]
                ) -> tuple[dict[str, list[np.ndarray]], dict[str, list[np.ndarray]]]:
    """Per layer and group, ``H = X'^T X' / tokens`` of the layer's input X' in ``model`` and the cross term
    ``G = X'^T X / tokens`` with its input X in ``dense`` (same graph, other weights), both from the same
    samples run through both models in lockstep."""
    from compressor.activations import iter_capture

    names = sorted({input_tensor(l) for l in layers})
    H: dict[str, list[np.ndarray]] = {}
    G: dict[str, list[np.ndarray]] = {}
    tokens = {l.name: 0 for l in layers}
    for acts, dacts in zip(iter_capture(model, samples, names), iter_capture(dense, samples, names)):
        for l in layers:
            fx = layer_features(l, np.asarray(acts[input_tensor(l)], dtype=np.float64))
            fd = layer_features(l, np.asarray(dacts[input_tensor(l)], dtype=np.float64))
            if l.name not in H:
                H[l.name] = [np.zeros((f.shape[1], f.shape[1])) for f in fx]
                G[l.name] = [np.zeros((f.shape[1], f.shape[1])) for f in fx]
            for i, (a, b) in enumerate(zip(fx, fd)):
                H[l.name][i] += a.T @ a
                G[l.name][i] += a.T @ b
            tokens[l.name] += fx[0].shape[0]
    return ({k: [a / max(tokens[k], 1) for a in v] for k, v in H.items()},
            {k: [a / max(tokens[k], 1) for a in v] for k, v in G.items()})


def expand_group_rows(layer: Layer, per_group: list[np.ndarray], rows: int) -> np.ndarray:
    """Per-row copy of a per-group vector ([rows, cols])."""
    g = len(per_group)
    return np.repeat(np.stack(per_group), rows // g, axis=0)


# ----------------------------------------------------------------------------- per-layer budgets


def calib_feeds(ctx: Any, cfg: SparsifyConfig, who: str) -> list[dict[str, np.ndarray]]:
    """The calibration feeds a data-aware step uses, or a UsageError naming --calib."""
    if ctx is None or getattr(ctx, "calib", None) is None:
        raise UsageError(f"{who} needs calibration data: pass --calib data.npz",
                         hint="an .npz with one array per model input, samples on axis 0")
    feeds = list(ctx.calib.feeds)
    if not feeds:
        raise UsageError(f"{who}: the calibration data holds no samples", hint="pass --calib with at least one sample")
    return feeds[: cfg.calib_samples] if cfg.calib_samples else feeds


def plan_sparsities(graph: gs.Graph, ctx: Any, cfg: SparsifyConfig, layers: list[Layer],
                    score: Any, who: str) -> tuple[dict[str, float], list[str], dict[str, Any]]:
    """Per-layer sparsity under ``cfg.allocation``. ``score(layer) -> 2-D score matrix`` (canonical view)
    is the criterion the pass uses (global thresholds and sensitivity probes use it too)."""
    pat = cfg.parsed_pattern
    names = [l.name for l in layers]
    if pat.kind == "nm" or cfg.allocation == "uniform" or not layers:
        warnings = []
        if pat.kind == "nm" and cfg.allocation != "uniform":
            warnings.append(f"allocation {cfg.allocation} ignored: pattern {pat.text} fixes every pruned layer at {pat.fixed_sparsity:g}")
        s = pat.fixed_sparsity if pat.kind == "nm" else cfg.sparsity
        return {n: s for n in names}, warnings, {}
    if cfg.allocation == "global":
        alloc, warnings = global_allocation({l.name: score(l) for l in layers}, pat, cfg.sparsity,
                                            cfg.min_layer_sparsity, cfg.max_layer_sparsity)
        return alloc, warnings, {}
    from compressor import sensitivity

    feeds = calib_feeds(ctx, cfg, f"{who} with allocation=sensitivity")
    if cfg.sensitivity_samples:
        feeds = feeds[: cfg.sensitivity_samples]
    model = ctx.export(graph)
    by_name = {l.name: l for l in layers}
    scores = {l.name: score(l) for l in layers}

    def masked(name: str, s: float) -> np.ndarray:
        l = by_name[name]
        w2 = l.matrix()
        return from_matrix(l, np.where(select_mask(scores[name], pat, s), w2, 0), l.values.shape)

    weights = {l.name: (l.node.op, l.weight.name, l.values) for l in layers}
    import hashlib

    key = hashlib.sha1(model.SerializeToString()).hexdigest(), tuple(names), pat.text, cfg.sparsity, \
        cfg.min_layer_sparsity, cfg.max_layer_sparsity, len(feeds), \
        hashlib.sha1(b"".join(np.ascontiguousarray(v).tobytes() for f in feeds[:2] for v in f.values())).hexdigest(), \
        hashlib.sha1(b"".join(np.ascontiguousarray(s_).tobytes() for s_ in scores.values())).hexdigest()
    if key in _SWEEP_CACHE:  # sparsify.auto: every candidate measures the same curves
        return _SWEEP_CACHE[key]
    from compressor.executor import for_stage

    # the run's executor (--executor local|ray): every (layer, level) probe is a task; the curves,
    # hence the allocation, do not depend on where the probes ran
    ex = for_stage(ctx, f"{who} sensitivity sweep")
    curves = sensitivity.measure(model, feeds, weights, masked, executor=ex)
    alloc, warnings = sensitivity.allocate(curves, cfg.sparsity, cfg.min_layer_sparsity, cfg.max_layer_sparsity)
    run = {**ex.last_stats.to_dict(), "describe": ex.describe()}
    if run["retries"]:
        warnings.append(f"sensitivity sweep: {run['retries']} probe attempt(s) were retried after worker failures "
                        f"(tasks {run['retried_tasks']}); results are from the completed attempts")
    extra = {"sensitivity": {c.layer: {"levels": c.levels, "errors": [round(e, 8) for e in c.errors]} for c in curves},
             "sensitivity_samples": len(feeds), "sensitivity_run": run}
    _SWEEP_CACHE.clear()  # one entry: the candidates of one sparsify.auto run
    _SWEEP_CACHE[key] = (alloc, list(warnings), extra)
    return alloc, warnings, extra


_SWEEP_CACHE: dict[tuple, tuple[dict[str, float], list[str], dict[str, Any]]] = {}
