"""Graph passes. ``PASSES`` maps a stable dotted name to a Pass class.

One pass per file. Built-ins are registered here; plugins register through the
entry-point group ``compressor.passes`` or ``--plugin file.py``.
"""
from __future__ import annotations

from compressor.pass_base import Pass
from compressor.registry import Registry

PASSES: Registry[type[Pass]] = Registry("pass", "compressor.passes")


def _register_builtins() -> None:
    from passes.cleanup_dead_code import DeadCodeElimination
    from passes.cleanup_fold_batchnorm import FoldBatchNorm
    from passes.cleanup_fold_constants import FoldConstants
    from passes.cleanup_remove_identity import RemoveIdentity
    from passes.lower_rnn import LowerRNN
    from passes.sparsify_magnitude import MagnitudeSparsify

    for cls in (FoldConstants, RemoveIdentity, FoldBatchNorm, DeadCodeElimination, LowerRNN, MagnitudeSparsify):
        PASSES.register(cls.name, cls, f"builtin:{cls.__module__}")


_register_builtins()

CLEANUP_PIPELINE = ("cleanup.fold_constants", "cleanup.remove_identity", "cleanup.fold_batchnorm", "cleanup.dead_code")
