"""Target contract: a tag expands to a printable spec; a backend compiles the
compressed ONNX graph into a deployable artifact (and runs it where it can).

A target is a class registered in ``targets.TARGETS`` (entry-point group
``compressor.targets``) with:

* ``name`` (tag, e.g. ``x86``) and ``aliases`` (e.g. ``x86-avx2``),
* ``expand(tag) -> TargetSpec``: the fully expanded, JSON-serialisable spec,
* ``compile(model_path, spec, out_dir, input_shapes, options: CompileOptions | None = None) -> Artifact``
  (every target takes ``options``; one that does not is refused when it is registered),
* ``run(artifact, spec, inputs) -> list[np.ndarray]`` or raise ``NotRunnableHere``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from compressor.digest import sha256_file  # noqa: F401  (targets record artifact digests with it)


# The TVM Relax ONNX importer lacks LSTM/GRU: every TVM-backed target needs them unrolled first.
TVM_FRONTEND_PASSES: tuple[str, ...] = ("lower.rnn",)


class NotRunnableHere(Exception):
    """The artifact cannot be executed on this host (other ISA, no GPU)."""


@dataclass(frozen=True)
class TargetSpec:
    tag: str  # what the user typed (e.g. "arm", "x86-avx2", "cuda-sm90")
    family: str  # "x86" | "arm" | "cuda" | plugin-defined
    tvm_target: dict[str, Any]  # the JSON dict given to tvm.target.Target
    triple: str  # LLVM triple of the host code
    isa_features: tuple[str, ...]  # features the artifact requires at run time
    # the pattern --sparsity uses when --pattern is left at auto ("unstructured", "8x1", "2:4" ...): the fastest
    # pattern whose accuracy holds by default; the kernels' speed per pattern goes in extra["patterns"]
    preferred_pattern: str
    round_to: int  # channel multiple structured pruning should keep
    quant_dtype: str  # preferred int8 flavour ("int8", "none" ...)
    cross_compiler: str | None  # command used to link the shared library, None = host cc
    runs_here: bool  # can this host execute the artifact
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["isa_features"] = list(self.isa_features)
        return d


@dataclass(frozen=True)
class Artifact:
    path: Path  # relative to the bundle dir once written
    kind: str  # e.g. "tvm-relax-vm-library"
    sha256: str
    details: dict[str, Any] = field(default_factory=dict)  # e.g. ELF machine, cuda arch, compile seconds
    extra_files: tuple[str, ...] = ()  # further bundle files (relative), e.g. tuning records; listed in the manifest
    warnings: tuple[str, ...] = ()  # things the backend did not do (go into the report)


@dataclass(frozen=True)
class CompileOptions:
    """The build knobs every target's ``compile`` accepts (a target ignores what it cannot use and says so
    in ``Artifact.warnings``)."""
    tune_trials: int = 0  # meta_schedule trials (0 = untuned)
    tuning_db: Path | None = None  # tuning database root; with 0 trials an explicit one is still applied
    progress: Callable[[str], None] | None = None  # where progress lines go
    executor_session: Any = None  # the run's RunExecutor: with ray, tuning candidates are built/measured on it
    rnn_modes: tuple[str, str] | None = None  # force the fused RNN kernels' weight modes, e.g. ("dense", "dense")

    @classmethod
    def of(cls, value: "CompileOptions | dict[str, Any] | None") -> "CompileOptions":
        """``value`` as CompileOptions (a dict with the field names is accepted; an unknown key is an error)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        unknown = sorted(set(value) - set(cls.__dataclass_fields__))
        if unknown:
            raise TypeError(f"unknown compile option(s) {unknown}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**value)

    @property
    def tuning_requested(self) -> bool:
        return bool(self.tune_trials) or bool(self.tuning_db)


def check_target(target: Any) -> None:
    """The target contract checked at registration: ``compile`` takes ``options``."""
    import inspect

    from compressor.errors import PluginError

    try:
        params = inspect.signature(target.compile).parameters
    except (AttributeError, TypeError, ValueError) as exc:
        raise PluginError(f"target {getattr(target, 'name', target)!r} has no inspectable compile method") from exc
    if "options" not in params:
        raise PluginError(f"target {getattr(target, 'name', target)!r}: compile(model_path, spec, out_dir, input_shapes, "
                          f"options=None) must take options (targets.base.CompileOptions)")


class Target:
    """Base class for targets. Subclasses override the methods below."""

    name: str = ""
    aliases: tuple[str, ...] = ()
    description: str = ""
    # passes the backend needs before it can compile (inserted after the cleanup passes,
    # before compression, so e.g. unrolled recurrent weights can be pruned too)
    required_passes: tuple[str, ...] = ()

    def expand(self, tag: str) -> TargetSpec:  # pragma: no cover - abstract
        raise NotImplementedError

    def compile(
        self, model_path: Path, spec: TargetSpec, out_dir: Path, input_shapes: dict[str, list[int]],
        options: CompileOptions | None = None,
    ) -> Artifact:  # pragma: no cover - abstract
        raise NotImplementedError

    def run(
        self, artifact_path: Path, spec: TargetSpec, inputs: dict[str, np.ndarray]
    ) -> list[np.ndarray]:
        raise NotRunnableHere(f"target {spec.tag} artifacts do not run on this host")

    def time(self, artifact_path: Path, spec: TargetSpec, inputs: dict[str, np.ndarray], **kw) -> float:
        """Median seconds per inference of the artifact on this host."""
        raise NotRunnableHere(f"target {spec.tag} artifacts do not run on this host")


def library_artifact(out: Path, t0: float, timing: dict[str, Any], expect_machine: str | None, details: dict[str, Any],
                     extra_files: tuple[str, ...] = (), warnings: tuple[str, ...] = ()) -> Artifact:
    """The Artifact of a compiled TVM Relax VM library at ``out``: checks the ELF machine
    (``expect_machine``, e.g. "x86-64" or "AArch64"; None skips the check) and records size,
    sha256 and compile time, plus the target's own ``details``."""
    import time

    from compressor.errors import TargetError
    from targets.elf import read_elf_header

    hdr = read_elf_header(out)
    if expect_machine is not None and hdr.machine_name != expect_machine:
        raise TargetError(f"{out.name} is an ELF for {hdr.machine_name}, expected {expect_machine}")
    return Artifact(
        path=Path(out.name),
        kind="tvm-relax-vm-library",
        sha256=sha256_file(out),
        details={"compile_seconds": round(time.perf_counter() - t0, 3), **timing, "elf_machine": hdr.machine_name,
                 "elf_e_machine": hdr.e_machine, "bytes": out.stat().st_size, **details},
        extra_files=extra_files,
        warnings=warnings,
    )

