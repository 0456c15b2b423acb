"""``sparsify.wanda``: Wanda pruning (Sun et al., 2023, "A Simple and Effective
Pruning Approach for Large Language Models"), weights x activations.

On the canonical matrix ``W2[outputs, reduction]`` (``passes/sparsity_patterns.py``)
with layer input features ``X[tokens, reduction]`` (Gemm/MatMul rows; Conv:
im2col patches per group, one row per output position), the score is

    S_ij = |W_ij| * ||X_:,j||_2

i.e. the magnitude weighted by how strongly input feature j is driven on the
calibration data (``--calib``, captured with onnxruntime by adding the layer
inputs as graph outputs; statistics are streamed sample by sample and only the
per-feature squared norms are kept). Pruning removes the lowest scores: per
output row (``per_output``, the paper's comparison group; counts exact per
layer) for unstructured/uniform, otherwise per layer in the requested pattern
(N:M along the reduction axis, RxC blocks by block norm). No weight update.

Allocation: ``uniform``, ``global`` (one threshold over the Wanda scores of
all layers, clipped to [min_layer_sparsity, max_layer_sparsity]) or
``sensitivity`` (output-error curves of Wanda masks). Activations come from
the dense model in one pass (Wanda is one-shot, not sequential).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from compressor.pass_base import Pass, PassContext, PassResult
from passes.sparsity_patterns import (LayerReport, SparsifyConfig, calib_feeds, check_valid, expand_group_rows,
                                      feature_stats, plan_sparsities, select_layers, select_mask, summarize)


@dataclass(frozen=True)
class WandaConfig(SparsifyConfig):
    per_output: bool = True  # unstructured + uniform: compare scores within each output row (the paper's choice)


def wanda_scores(layer, norms_sq: list[np.ndarray]) -> np.ndarray:
    w2 = np.abs(layer.matrix()).astype(np.float64)
    return w2 * np.sqrt(expand_group_rows(layer, norms_sq, w2.shape[0]))


class WandaSparsify(Pass):
    name = "sparsify.wanda"
    description = "Wanda: prune by |weight| x input-feature norm on calibration data (needs --calib)"
    Config = WandaConfig

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        cfg: WandaConfig = self.config
        layers, warnings = select_layers(graph, cfg, data_aware=True)
        if cfg.sparsity == 0:
            return PassResult(False, summarize({}, cfg, warnings), warnings)
        feeds = calib_feeds(ctx, cfg, self.name)
        if not layers:
            warnings.append("no prunable Conv/Gemm/MatMul weights found: nothing was sparsified")
            return PassResult(False, summarize({}, cfg, warnings), warnings)
        norms = feature_stats(ctx.export(graph), feeds, layers, full=False)
        scores = {l.name: wanda_scores(l, norms[l.name]) for l in layers}
        alloc, w2, extra = plan_sparsities(graph, ctx, cfg, layers, lambda l: scores[l.name], self.name)
        warnings += w2
        pat = cfg.parsed_pattern
        per_row = cfg.per_output and pat.kind == "unstructured" and cfg.allocation == "uniform"
        reports = {}
        for l in layers:
            vals, mat = l.values, l.matrix()
            keep = select_mask(scores[l.name], pat, alloc[l.name], per_row=per_row)
            check_valid(l.name, keep, pat)
            l.set_matrix(np.where(keep, mat, np.zeros((), mat.dtype)))
            nz = int(np.count_nonzero(l.values))
            reports[l.name] = LayerReport(l.node.op, l.weight.name, int(vals.size), alloc[l.name], 1 - nz / vals.size)
        stats = summarize(reports, cfg, warnings)
        stats.update(extra, calib_samples_used=len(feeds))
        return PassResult(True, stats, warnings)
