"""The Python API: the same run as the ``compress`` command, callable from code (the CLI calls ``run``).

    import compressor

    res = compressor.compress("model.onnx", target="x86", sparsity=0.5, calib="calib.npz")
    res.ok, res.exit_code, res.bundle, res.min_cosine, res.report["passes"]

Every CLI flag is a keyword argument (``--min-cosine 0.98`` -> ``min_cosine=0.98``; ``--pass`` ->
``passes=[{"name": ..., "config": {...}}]``; ``--input-shape`` -> ``input_shape=["x:1x3x224x224"]``).
``model`` may be a path or an ``onnx.ModelProto``; ``calib`` / ``eval`` / ``finetune`` a ``.npz`` path or a
mapping of input name -> array with the samples on axis 0 (plus ``labels`` for ``eval``). Bad input raises a
``compressor.errors.CompressorError`` subclass whose ``exit_code`` is the CLI's (documented in the README);
an accuracy gate failure is not an exception: ``Result.exit_code`` is 3 and the bundle is written, as on
the command line. Progress lines go to ``progress`` (a callable taking one line) or, by default, to the
``compressor`` logger at INFO level.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compressor.errors import EXIT_GATE, UsageError
from compressor.recipe import Options, dump_recipe, load_recipe

__all__ = ["Result", "compress", "run", "run_recipe", "load_recipe", "register_pass", "register_target", "Options"]

log = logging.getLogger("compressor")


@dataclass(frozen=True)
class Result:
    """What one run produced. ``exit_code`` is the CLI's: 0 passed, 3 accuracy gate failed (bundle written)."""
    exit_code: int
    bundle: Path | None  # None for a dry run
    report: dict[str, Any] = field(default_factory=dict)  # the bundle's report.json
    pipeline: list[str] = field(default_factory=list)  # the resolved pipeline and target (``--dry-run``'s lines)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    @property
    def gate_failed(self) -> bool:
        return self.exit_code == EXIT_GATE

    @property
    def status(self) -> str:
        return str(self.report.get("status", "DRY-RUN" if self.bundle is None else ""))

    @property
    def warnings(self) -> list[str]:
        return list(self.report.get("warnings", []))

    @property
    def min_cosine(self) -> float | None:
        """The least output cosine of the compressed model against the original on the verification data."""
        vals = [o["cosine"] for c in self.report.get("verification", []) if c.get("kind") == "lossy" for o in c["outputs"]]
        return min(vals) if vals else None

    @property
    def sparsity(self) -> float | None:
        st = self.report.get("stats", {}).get("compressed")
        return None if st is None else float(st["sparsity"])

    @property
    def accuracy(self) -> dict[str, Any] | None:
        """Task accuracy before/after when the eval data has labels: {original, compressed, artifact, n}."""
        return self.report.get("accuracy")


_FIELDS = {f.name for f in dataclasses.fields(Options)}


def _options(model: Any, kwargs: dict[str, Any], tmp: Path) -> Options:
    from compressor.cli import _did_you_mean

    bad = [k for k in kwargs if k not in _FIELDS or k == "model"]
    if bad:
        k = bad[0]
        raise UsageError(f"compress() got an unexpected option {k!r}{_did_you_mean(k, sorted(_FIELDS - {'model'}))}")
    kw = dict(kwargs)
    for key in ("ignore", "include", "input_shape", "plugin"):  # one value or a list of them, as strings
        if key in kw:
            vals = [kw[key]] if isinstance(kw[key], (str, os.PathLike)) else kw[key]
            kw[key] = [str(v) for v in vals]
    if not isinstance(model, (str, os.PathLike)):
        import onnx

        if not isinstance(model, onnx.ModelProto):
            raise UsageError(f"model must be a path or an onnx.ModelProto, got {type(model).__name__}")
        name = "".join(c if c.isalnum() or c in "._-" else "_" for c in (model.graph.name or "model")) or "model"
        path = tmp / f"{name}.onnx"
        from compressor import ir

        ir.save_model(model, path)  # streamed; external data beside it over 1.8 GB (the model is not modified)
        if kw.get("output") is None:  # the default name, in the working directory (not the temporary one)
            from compressor.pipeline import default_output_name
            import targets

            probe = Options(model=str(path), **{k: v for k, v in kw.items() if k not in ("calib", "eval", "finetune")})
            probe.validate()
            kw["output"] = str(Path.cwd() / default_output_name(probe, path, targets.resolve(probe.target)[1].tag))
        model = path
    for key in ("calib", "eval", "finetune"):
        v = kw.get(key)
        if v is None or isinstance(v, (str, os.PathLike)):
            if v is not None:
                kw[key] = str(v)
            continue
        if not isinstance(v, Mapping):
            raise UsageError(f"{key} must be an .npz path or a mapping of input name -> array, got {type(v).__name__}")
        import numpy as np

        path = tmp / f"{key}.npz"
        np.savez(path, **{str(k): np.asarray(a) for k, a in v.items()})
        kw[key] = str(path)
    for key in ("output", "dump_ir", "tuning_db"):
        if isinstance(kw.get(key), os.PathLike):
            kw[key] = str(kw[key])
    return Options(model=str(model), **kw)


def _default_progress(line: str) -> None:
    if line:
        log.info(line)


def run(opts: Options, progress: Callable[[str], None] | None = None, save_recipe: str | os.PathLike | None = None) -> Result:
    """Run resolved ``Options`` (what the CLI and ``compress run RECIPE`` build); see ``compress``."""
    from compressor.cli import check_args

    say = progress or _default_progress
    check_args(opts)  # plain values first: a bad one fails before onnx / onnxruntime / TVM are imported
    from compressor import pipeline

    plan = pipeline.plan(opts)
    lines = pipeline.describe(plan)
    if save_recipe:
        path = Path(save_recipe)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(dump_recipe(plan.recipe(path.resolve().parent)))
        os.replace(tmp, path)
        say(f"recipe written to {path}")
    if opts.dry_run:
        return Result(0, None, {}, lines)
    rep, code = pipeline.execute(plan, say)
    return Result(code, Path(rep["bundle"]) if rep.get("bundle") else plan.output, rep, lines)


def compress(model: str | os.PathLike | Any, *, progress: Callable[[str], None] | None = None,
             save_recipe: str | os.PathLike | None = None, **options: Any) -> Result:
    """Compress ``model`` (an ONNX path or ``onnx.ModelProto``; never modified) for ``target`` and write a
    bundle; the keyword arguments are the CLI's flags (``Options`` fields). Returns a ``Result``."""
    with tempfile.TemporaryDirectory(prefix="compressor-api-") as td:
        return run(_options(model, options, Path(td)), progress, save_recipe)


def run_recipe(path: str | os.PathLike, *, progress: Callable[[str], None] | None = None, **overrides: Any) -> Result:
    """``compress run RECIPE``: the recipe's options, with ``overrides`` (e.g. ``output=...``, ``force=True``)."""
    opts = load_recipe(Path(path))
    bad = [k for k in overrides if k not in _FIELDS]
    if bad:
        raise UsageError(f"run_recipe() got an unexpected option {bad[0]!r}")
    return run(dataclasses.replace(opts, **overrides), progress)


def register_pass(cls: type, provider: str = "runtime") -> None:
    """Register a ``compressor.pass_base.Pass`` subclass (its ``name``) for this process, as a plugin file or
    entry point would; ``passes=[{"name": cls.name, ...}]`` then runs it."""
    from compressor.pass_base import Pass
    from passes import PASSES

    if not (isinstance(cls, type) and issubclass(cls, Pass) and getattr(cls, "name", "")):
        raise UsageError("register_pass takes a Pass subclass with a name")
    PASSES.register(cls.name, cls, provider)


def register_target(target: Any, provider: str = "runtime") -> None:
    """Register a ``targets.base.Target`` subclass or instance (its ``name``) for this process."""
    from targets import TARGETS
    from targets.base import Target

    obj = target() if isinstance(target, type) else target
    if not isinstance(obj, Target) or not getattr(obj, "name", ""):
        raise UsageError("register_target takes a Target subclass or instance with a name")
    TARGETS.register(obj.name, obj, provider)
