"""Compilation targets. ``TARGETS`` maps a tag (and its aliases) to a Target.

Built-ins: ``x86`` (llvm, host ISA), ``arm`` (llvm aarch64-linux-gnu +neon,
cross-linked), ``cuda`` (TVM CUDA codegen, dlight GPU schedules). Plugins add
targets through the entry-point group ``compressor.targets``.
"""
from __future__ import annotations

from compressor.errors import UsageError
from compressor.registry import Registry, builtin
from targets.base import Artifact, CompileOptions, NotRunnableHere, Target, TargetSpec, check_target

TARGETS: Registry[Target] = Registry("target", "compressor.targets", check=check_target)


def _register_builtins() -> None:
    from passes import PASSES
    from targets.arm import ArmTarget
    from targets.cuda import CudaTarget
    from targets.lower_rnn import LowerRNN
    from targets.lower_sparse import LowerSparse
    from targets.x86 import X86Target

    for cls in (X86Target, ArmTarget, CudaTarget):
        TARGETS.register(cls.name, cls(), builtin(cls.__module__))
    # the lowerings targets declare in ``required_passes``: passes by contract, owned by targets
    for lcls in (LowerRNN, LowerSparse):
        PASSES.register(lcls.name, lcls, builtin(lcls.__module__))


_register_builtins()


def resolve(tag: str) -> tuple[Target, TargetSpec]:
    """Find the target for a tag such as ``arm``, ``arm64-linux``, ``x86-avx2``, ``cuda-sm90``."""
    for entry in TARGETS:
        tgt = entry.obj
        if tag == tgt.name or tag in tgt.aliases or tag.startswith(tgt.name + "-"):
            return tgt, tgt.expand(tag)
    known = ", ".join(sorted({e.name for e in TARGETS} | {a for e in TARGETS for a in e.obj.aliases}))
    raise UsageError(f"unknown target {tag!r}", hint=f"known targets: {known}")


__all__ = ["TARGETS", "Target", "TargetSpec", "Artifact", "CompileOptions", "NotRunnableHere", "resolve"]
