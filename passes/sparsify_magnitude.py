"""``sparsify.magnitude``: layer-wise magnitude masking.

For every prunable weight (the constant weight input of Conv, ConvTranspose,
Gemm and MatMul; biases and normalisation parameters are never touched) the
k = round(sparsity * numel) entries of smallest |w| are set to exactly zero
(ties broken by position, so the count is exact). A weight shared by several
nodes is masked once. Weights below ``min_elements`` and weights matching an
``ignore`` glob are skipped and listed.

Default exclusions (the field's lesson: the stem and the last layer dominate
the error under pruning): the stem convolution (a Conv with <= 4 input
channels) and the final classifier (the last prunable layer before a graph
output, through bias adds / reshapes / softmax only) stay dense unless
``keep_stem`` / ``keep_classifier`` are false. Each kept layer is a warning.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from compressor.errors import UsageError
from compressor.pass_base import Pass, PassContext, PassResult

WEIGHT_INPUT = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}
# recurrent layers: input weights W (input 1) and recurrent weights R (input 2) are pruned,
# biases are not (Narang et al. 2017)
RECURRENT_WEIGHT_INPUTS = {"LSTM": (1, 2), "GRU": (1, 2), "RNN": (1, 2)}


@dataclass(frozen=True)
class MagnitudeConfig:
    sparsity: float = 0.5
    min_elements: int = 16
    ignore: tuple[str, ...] = ()
    keep_stem: bool = True
    keep_classifier: bool = True

    def __post_init__(self):
        if not 0.0 <= self.sparsity < 1.0:
            raise UsageError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.min_elements < 0:
            raise UsageError(f"min_elements must be >= 0, got {self.min_elements}")


def magnitude_mask(w: np.ndarray, sparsity: float) -> np.ndarray:
    """Boolean keep-mask with exactly round(sparsity * w.size) False entries."""
    k = int(round(sparsity * w.size))
    keep = np.ones(w.size, dtype=bool)
    if k > 0:
        order = np.argsort(np.abs(w).ravel(), kind="stable")
        keep[order[:k]] = False
    return keep.reshape(w.shape)


def prunable_weights(graph: gs.Graph) -> list[tuple[gs.Node, gs.Constant]]:
    found, seen = [], set()
    for node in graph.nodes:
        for idx in RECURRENT_WEIGHT_INPUTS.get(node.op, ()):
            w = node.inputs[idx] if len(node.inputs) > idx else None
            if isinstance(w, gs.Constant) and w.name not in seen and np.asarray(w.values).dtype.kind == "f":
                seen.add(w.name)
                found.append((node, w))
        idx = WEIGHT_INPUT.get(node.op)
        if idx is None or len(node.inputs) <= idx:
            continue
        w = node.inputs[idx]
        if node.op == "MatMul" and not isinstance(w, gs.Constant) and isinstance(node.inputs[0], gs.Constant):
            w = node.inputs[0]
        if isinstance(w, gs.Constant) and w.name not in seen and np.asarray(w.values).dtype.kind == "f":
            seen.add(w.name)
            found.append((node, w))
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
            if node.op in WEIGHT_INPUT:
                found.add(node.name)
                break
            if node.op not in _PASS_THROUGH:
                break
            t = node.inputs[0]
    return found


def is_stem_conv(node: gs.Node, w: np.ndarray) -> bool:
    return node.op == "Conv" and w.ndim >= 3 and w.shape[1] * int(node.attrs.get("group", 1)) <= 4


def default_exclusion(node: gs.Node, w: np.ndarray, classifiers: set[str], keep_stem: bool, keep_classifier: bool) -> str | None:
    """Why a layer is kept dense by default (None: prune it)."""
    if keep_stem and is_stem_conv(node, w):
        return "stem conv (<= 4 input channels) kept dense by default (keep_stem)"
    if keep_classifier and node.name in classifiers:
        return "final classifier kept dense by default (keep_classifier)"
    return None


class MagnitudeSparsify(Pass):
    name = "sparsify.magnitude"
    description = "zero the smallest-magnitude weights of Conv/Gemm/MatMul layers to the requested sparsity"
    Config = MagnitudeConfig

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        cfg: MagnitudeConfig = self.config
        layers, warnings = {}, []
        total = zeros = 0
        classifiers = classifier_nodes(graph)
        for node, w in prunable_weights(graph):
            vals = np.asarray(w.values)
            if any(fnmatch.fnmatch(node.name, g) or fnmatch.fnmatch(w.name, g) for g in cfg.ignore):
                warnings.append(f"{node.name}: ignored by pattern, kept dense")
                continue
            reason = default_exclusion(node, vals, classifiers, cfg.keep_stem, cfg.keep_classifier)
            if reason:
                warnings.append(f"{node.name}: {reason}")
                continue
            if vals.size < cfg.min_elements:
                warnings.append(f"{node.name}: {vals.size} weights < min_elements {cfg.min_elements}, kept dense")
                continue
            mask = magnitude_mask(vals, cfg.sparsity)
            new = np.where(mask, vals, np.zeros((), vals.dtype)).astype(vals.dtype)
            w.values = new
            nz = int(np.count_nonzero(new))
            layers[node.name if node.op in WEIGHT_INPUT else f"{node.name}/{w.name}"] = {"op": node.op, "weight": w.name, "numel": int(vals.size), "sparsity": round(1 - nz / vals.size, 6)}
            total += vals.size
            zeros += vals.size - nz
        if not layers and cfg.sparsity > 0:
            warnings.append("no prunable Conv/Gemm/MatMul weights found: nothing was sparsified")
        stats = {"layers": layers, "prunable_params": total, "achieved_sparsity": round(zeros / total, 6) if total else 0.0}
        return PassResult(bool(layers) and cfg.sparsity > 0, stats, warnings)
