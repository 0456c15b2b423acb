"""An example compressor plugin pass: ``example.threshold``.

Zeroes every Conv/Gemm/MatMul weight whose magnitude is below ``threshold``.
Registered through the entry-point group ``compressor.passes`` (see
pyproject.toml); use it in a recipe or with ``--pass example.threshold:threshold=0.05``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from compressor.errors import UsageError
from compressor.pass_base import Pass, PassContext, PassResult
from passes.sparsify_magnitude import prunable_weights


@dataclass(frozen=True)
class ThresholdConfig:
    threshold: float = 0.01

    def __post_init__(self):
        if self.threshold < 0:
            raise UsageError(f"threshold must be >= 0, got {self.threshold}")


class ThresholdPass(Pass):
    name = "example.threshold"
    description = "zero Conv/Gemm/MatMul weights with |w| < threshold (example plugin)"
    Config = ThresholdConfig

    def run(self, graph, ctx: PassContext) -> PassResult:
        zeroed = 0
        for _, w in prunable_weights(graph):
            vals = np.asarray(w.values)
            small = np.abs(vals) < self.config.threshold
            zeroed += int(small.sum())
            w.values = np.where(small, np.zeros((), vals.dtype), vals).astype(vals.dtype)
        return PassResult(zeroed > 0, {"zeroed": zeroed})
