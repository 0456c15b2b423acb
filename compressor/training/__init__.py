"""Training-time sparsity (torch side) and recovery fine-tuning of ONNX models.

* ``GradualPruner`` (Narang et al. / Zhu & Gupta schedules), ``GaPPruner``
  (scheduled grow-and-prune), ``GroupLasso`` (SSL): see ``sparsifiers`` and
  ``group_lasso``; example: ``examples/train_sparse.py``.
* ``onnx2torch.OnnxModule``: an ONNX graph as a trainable torch module.
* ``distill.distill``: fine-tune a (masked) student by distillation from a teacher's outputs.
"""
from __future__ import annotations

from compressor.training.group_lasso import GroupLasso
from compressor.training.schedules import CubicSchedule, NarangSchedule
from compressor.training.sparsifiers import GaPPruner, GradualPruner, Sparsifier, magnitude_keep_mask, prunable_parameters

__all__ = ["CubicSchedule", "GaPPruner", "GradualPruner", "GroupLasso", "NarangSchedule", "Sparsifier",
           "magnitude_keep_mask", "prunable_parameters"]
