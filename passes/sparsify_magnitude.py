"""``sparsify.magnitude``: magnitude masking in a pattern, with a per-layer budget.

For every prunable weight (the constant weight input of Conv, ConvTranspose,
Gemm and MatMul, and the input/recurrent weights W/R of LSTM/GRU/RNN; biases, normalisation parameters and embeddings (Gather
tables) are never touched) the score is |w| on the canonical matrix view
``W2[outputs, reduction]`` (see ``passes/sparsity_patterns.py`` for the view of
each op and the exact pattern definitions):

* ``pattern=unstructured``: the round(s_i * numel) smallest |w| are zeroed
  (ties broken by position, so the count is exact);
* ``pattern=N:M``: in each group of M consecutive reduction-axis entries of one
  output the M-N smallest |w| are zeroed (s_i = 1 - N/M);
* ``pattern=RxC``: R-output x C-reduction blocks with the smallest L2 norm are
  zeroed (exact up to one block).

The per-layer sparsity s_i comes from ``allocation``: ``uniform`` (s_i = s),
``global`` (one |w| threshold across layers, clipped to
[min_layer_sparsity, max_layer_sparsity]) or ``sensitivity`` (per-layer
output-error curves on ``--calib`` data; least total error meeting s).

A weight shared by several nodes is masked once. Weights below
``min_elements`` and weights matching an ``ignore`` glob are skipped and
listed. Default exclusions (the field's lesson: the stem and the last layer
dominate the error under pruning): the stem convolution (a Conv with <= 4
input channels) and the final classifier (the last prunable layer before a
graph output, through bias adds / reshapes / softmax only) stay dense unless
``keep_stem`` / ``keep_classifier`` are false. Each kept layer is a warning.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from compressor.pass_base import Pass, PassContext, PassResult
from passes.sparsity_patterns import (RECURRENT_WEIGHT_INPUTS, LayerReport, SparsifyConfig, check_valid,  # noqa: F401
                                      classifier_nodes, find_layers, is_stem_conv, plan_sparsities, select_layers, select_mask, summarize,
                                      unstructured_mask)

WEIGHT_INPUT = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}


@dataclass(frozen=True)
class MagnitudeConfig(SparsifyConfig):
    pass


def magnitude_mask(w: np.ndarray, sparsity: float) -> np.ndarray:
    """Boolean keep-mask with exactly round(sparsity * w.size) False entries."""
    return unstructured_mask(np.abs(w).reshape(1, -1) if w.ndim else np.abs(w), sparsity).reshape(w.shape)


def prunable_weights(graph: gs.Graph) -> list[tuple[gs.Node, gs.Constant]]:
    """(node, weight) of every prunable layer (see ``sparsity_patterns.find_layers``)."""
    return [(l.node, l.weight) for l in find_layers(graph)]


def apply_scores(layers, alloc: dict[str, float], score, pattern) -> dict[str, LayerReport]:
    """Mask each layer with ``select_mask(score(layer), pattern, alloc[layer])``; returns the per-layer report."""
    out = {}
    for l in layers:
        vals = l.values
        w2 = l.matrix()
        keep = select_mask(score(l), pattern, alloc[l.name])
        check_valid(l.name, keep, pattern)
        l.set_matrix(np.where(keep, w2, np.zeros((), w2.dtype)))
        nz = int(np.count_nonzero(l.values))
        out[l.name] = LayerReport(l.node.op, l.weight.name, int(vals.size), alloc[l.name], 1 - nz / vals.size)
    return out


class MagnitudeSparsify(Pass):
    name = "sparsify.magnitude"
    description = "zero the smallest-magnitude weights (unstructured, N:M or blocks; uniform/global/sensitivity allocation)"
    Config = MagnitudeConfig

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        cfg: MagnitudeConfig = self.config
        layers, warnings = select_layers(graph, cfg)
        if cfg.sparsity == 0:
            return PassResult(False, summarize({}, cfg, warnings), warnings)
        if not layers:
            warnings.append("no prunable Conv/Gemm/MatMul weights found: nothing was sparsified")
            return PassResult(False, summarize({}, cfg, warnings), warnings)
        score = lambda l: np.abs(l.matrix())
        alloc, w2, extra = plan_sparsities(graph, ctx, cfg, layers, score, self.name)
        warnings += w2
        reports = apply_scores(layers, alloc, score, cfg.parsed_pattern)
        stats = summarize(reports, cfg, warnings)
        stats.update(extra)
        return PassResult(True, stats, warnings)
