"""``sparsify.magnitude``: layer-wise magnitude masking.

For every prunable weight (the constant weight input of Conv, ConvTranspose,
Gemm and MatMul; biases and normalisation parameters are never touched) the
k = round(sparsity * numel) entries of smallest |w| are set to exactly zero
(ties broken by position, so the count is exact). A weight shared by several
nodes is masked once. Weights below ``min_elements`` and weights matching an
``ignore`` glob are skipped and listed.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from compressor.errors import UsageError
from compressor.pass_base import Pass, PassContext, PassResult

WEIGHT_INPUT = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}


@dataclass(frozen=True)
class MagnitudeConfig:
    sparsity: float = 0.5
    min_elements: int = 16
    ignore: tuple[str, ...] = ()

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


class MagnitudeSparsify(Pass):
    name = "sparsify.magnitude"
    description = "zero the smallest-magnitude weights of Conv/Gemm/MatMul layers to the requested sparsity"
    Config = MagnitudeConfig

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        cfg: MagnitudeConfig = self.config
        layers, warnings = {}, []
        total = zeros = 0
        for node, w in prunable_weights(graph):
            vals = np.asarray(w.values)
            if any(fnmatch.fnmatch(node.name, g) or fnmatch.fnmatch(w.name, g) for g in cfg.ignore):
                warnings.append(f"{node.name}: ignored by pattern, kept dense")
                continue
            if vals.size < cfg.min_elements:
                warnings.append(f"{node.name}: {vals.size} weights < min_elements {cfg.min_elements}, kept dense")
                continue
            mask = magnitude_mask(vals, cfg.sparsity)
            new = np.where(mask, vals, np.zeros((), vals.dtype)).astype(vals.dtype)
            w.values = new
            nz = int(np.count_nonzero(new))
            layers[node.name] = {"op": node.op, "weight": w.name, "numel": int(vals.size), "sparsity": round(1 - nz / vals.size, 6)}
            total += vals.size
            zeros += vals.size - nz
        if not layers and cfg.sparsity > 0:
            warnings.append("no prunable Conv/Gemm/MatMul weights found: nothing was sparsified")
        stats = {"layers": layers, "prunable_params": total, "achieved_sparsity": round(zeros / total, 6) if total else 0.0}
        return PassResult(bool(layers) and cfg.sparsity > 0, stats, warnings)
