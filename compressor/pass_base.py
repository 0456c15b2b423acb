"""The pass contract (modelled on onnx_ir's passes).

A pass is a class with
  * ``name``: stable dotted name (``cleanup.fold_batchnorm``, ``sparsify.magnitude``),
  * ``Config``: a frozen dataclass; ``__post_init__`` validates values and raises UsageError,
  * ``in_place``: True (the graph is edited in place; the manager keeps a copy for error reports),
  * ``requires(graph, ctx)`` / ``ensures(graph, ctx)``: optional pre/post-conditions,
  * ``run(graph, ctx) -> PassResult(modified, stats, warnings)``.
The graph is an onnx-graphsurgeon ``gs.Graph``.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

import onnx_graphsurgeon as gs

from compressor.errors import UsageError

if typing.TYPE_CHECKING:
    import onnx

    from compressor.data import Samples


@dataclass(frozen=True)
class EmptyConfig:
    pass


@dataclass
class PassResult:
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


@dataclass
class PassContext:
    """What a pass may read besides the graph. Passes must not write files."""

    target: Any = None  # targets.TargetSpec (family, tag, tvm_target, isa_features, round_to, ...) or None
    calib: Samples | None = None  # the --calib samples
    opset: int = 17
    history: list[str] = field(default_factory=list)  # names of passes already run
    options: dict[str, Any] = field(default_factory=dict)  # the run's resolved flags, informational (sparsity, pattern, ...):
    # a built-in pass reads its inputs from its Config and the typed fields below, never from here
    template: onnx.ModelProto | None = None  # the loaded (pre-pass) model: ir.to_model(graph.copy(), ctx.template) exports
    finetune_data: str | None = None  # --finetune DATA.npz: finetune.distill's data when its config names none
    executor_session: Any = None  # compressor.executor.RunExecutor of this run: where fanned-out stages run

    def export(self, graph: gs.Graph):
        """The current graph as an onnx.ModelProto (a copy; the graph is not changed)."""
        from compressor import ir

        return ir.to_model(graph.copy(), self.template)


class Pass:
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Config: ClassVar[type] = EmptyConfig
    in_place: ClassVar[bool] = True

    def __init__(self, config: Any = None):
        self.config = config if config is not None else self.Config()

    def requires(self, graph: gs.Graph, ctx: PassContext) -> None:
        """Raise PassError if the graph is not fit for this pass."""

    def ensures(self, graph: gs.Graph, ctx: PassContext) -> None:
        """Raise PassError if the pass broke its own promise."""

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError


def _coerce(value: Any, typ: Any, where: str) -> Any:
    origin = typing.get_origin(typ)
    if typ in (float,) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if typ in (int, str, bool):
        if isinstance(value, typ) and not (typ is int and isinstance(value, bool)):
            return value
        raise UsageError(f"{where}: expected {typ.__name__}, got {value!r}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise UsageError(f"{where}: expected a list, got {value!r}")
        (inner, *_) = typing.get_args(typ) or (Any,)
        return tuple(_coerce(v, inner, where) for v in value)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        args = typing.get_args(typ)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except UsageError:
                continue
        raise UsageError(f"{where}: {value!r} does not match {typ}")
    return value


def make_config(pass_cls: type[Pass], values: dict[str, Any] | None) -> Any:
    """Build and validate a pass's config from a plain dict (recipe / CLI)."""
    cfg_cls = pass_cls.Config
    values = dict(values or {})
    hints = typing.get_type_hints(cfg_cls)
    fields = {f.name: f for f in dataclasses.fields(cfg_cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise UsageError(
            f"pass {pass_cls.name}: unknown config key(s) {', '.join(unknown)}",
            hint=f"known: {', '.join(fields) or 'none'}",
        )
    kwargs = {k: _coerce(v, hints[k], f"pass {pass_cls.name} config {k}") for k, v in values.items()}
    try:
        return cfg_cls(**kwargs)
    except TypeError as exc:
        raise UsageError(f"pass {pass_cls.name}: {exc}") from exc


def config_dict(config: Any) -> dict[str, Any]:
    d = dataclasses.asdict(config)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
