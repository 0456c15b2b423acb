"""Graph passes. ``PASSES`` maps a stable dotted name to a Pass class.

One pass per file. Built-ins are registered here; plugins register through the
entry-point group ``compressor.passes`` or ``--plugin file.py``. The target lowerings ``lower.rnn`` and
``lower.sparse`` (kernel choice by ISA, cost model) live in ``targets/`` and are registered when
``targets`` is imported: a pass does not know a target.
"""
from __future__ import annotations

from compressor.pass_base import Pass
from compressor.registry import Registry, builtin

PASSES: Registry[type[Pass]] = Registry("pass", "compressor.passes")


def _register_builtins() -> None:
    from passes.finetune_distill import FinetuneDistill

    PASSES.register(FinetuneDistill.name, FinetuneDistill, builtin(FinetuneDistill.__module__))

    from passes.cleanup_dead_code import DeadCodeElimination
    from passes.cleanup_fold_batchnorm import FoldBatchNorm
    from passes.cleanup_fold_constants import FoldConstants
    from passes.cleanup_remove_identity import RemoveIdentity
    from passes.sparsify_magnitude import MagnitudeSparsify
    from passes.sparsify_obs import OBSSparsify
    from passes.sparsify_wanda import WandaSparsify

    for cls in (FoldConstants, RemoveIdentity, FoldBatchNorm, DeadCodeElimination, MagnitudeSparsify):
        PASSES.register(cls.name, cls, builtin(cls.__module__))
    # the target lowerings (lower.rnn, lower.sparse) live in targets/ and are registered by it
    from passes.sparsify_auto import AutoSparsify

    for cls in (WandaSparsify, OBSSparsify, AutoSparsify):
        PASSES.register(cls.name, cls, builtin(cls.__module__))
    from passes.prune_channels import PruneChannels

    PASSES.register(PruneChannels.name, PruneChannels, builtin(PruneChannels.__module__))
    from passes.quantize_fp16 import QuantizeFp16
    from passes.quantize_int4 import QuantizeInt4
    from passes.quantize_int8 import QuantizeInt8

    for cls in (QuantizeInt8, QuantizeFp16, QuantizeInt4):
        PASSES.register(cls.name, cls, builtin(cls.__module__))


_register_builtins()

CLEANUP_PIPELINE = ("cleanup.fold_constants", "cleanup.remove_identity", "cleanup.fold_batchnorm", "cleanup.dead_code")
