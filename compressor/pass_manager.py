"""PassManager: runs an ordered list of passes over an onnx-graphsurgeon graph,
with instruments hooked before/after each pass.

Instruments (CLI flag):
  TimingInstrument       always on; ``--print-pass-times`` shows the table
  ValidityInstrument     ``--check-each-pass``: onnx.checker (full) + strict shape
                         inference after every pass; a failure names the pass
  DumpIRInstrument       ``--dump-ir DIR``: the model after every pass
  ProgressInstrument     a callback for the CLI's progress lines
The final graph is always checked, whatever the instruments.

Control flow: passes get the main graph; ``If``/``Loop``/``Scan`` bodies hang
off their nodes with outer-scope reads shared (graphsurgeon), so cleanup keeps
whatever a body reads. A compression pass that does not declare
``handles_subgraphs = True`` leaves the bodies alone, and its record says which
bodies hold weights it did not touch (cleanup and target lowering passes do not
warn: they change no weights).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from compressor import ir
from compressor.errors import CompressorError, PassError, PluginError
from compressor.pass_base import Pass, PassContext, PassResult, config_dict
from compressor.registry import Provider

log = logging.getLogger(__name__)


@dataclass
class PassRecord:
    name: str
    provider: str
    config: dict[str, Any]
    modified: bool = False
    stats: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__, seconds=round(self.seconds, 4))


class Instrument:
    def before(self, p: Pass, graph: gs.Graph, ctx: PassContext) -> None:
        pass

    def after(self, p: Pass, graph: gs.Graph, ctx: PassContext, record: PassRecord) -> None:
        pass


def check_model(model: onnx.ModelProto, after: str) -> None:
    try:
        ir.check_weightless(model, full_check=True)
    except Exception as exc:
        raise PassError(f"graph invalid after {after}: {' '.join(str(exc).split())[:300]}") from exc


class ValidityInstrument(Instrument):
    def __init__(self, template: onnx.ModelProto):
        self.template = template

    def after(self, p, graph, ctx, record):
        check_model(ir.to_model(graph.copy(), self.template), f"pass {p.name}")


class DumpIRInstrument(Instrument):
    def __init__(self, directory: Path, template: onnx.ModelProto):
        self.dir = directory
        self.template = template
        self.count = 0
        directory.mkdir(parents=True, exist_ok=True)

    def after(self, p, graph, ctx, record):
        self.count += 1
        ir.save_model(ir.to_model(graph.copy(), self.template), self.dir / f"{self.count:02d}_{p.name}.onnx")


class SnapshotInstrument(Instrument):
    """Keeps the model as it is right before the pass ``name`` runs (``model``; None when it did not run)."""

    def __init__(self, name: str, like: onnx.ModelProto):
        self.name, self.like = name, like
        self.model: onnx.ModelProto | None = None

    def before(self, p, graph, ctx):
        if p.name == self.name:
            self.model = ir.to_model(graph.copy(), self.like)


class ProgressInstrument(Instrument):
    def __init__(self, callback: Callable[[str], None]):
        self.cb = callback

    def after(self, p, graph, ctx, record):
        changed = "changed" if record.modified else "no change"
        self.cb(f"  {p.name:<28} {changed:<9} {record.seconds * 1000:8.1f} ms  {_short_stats(record.stats)}")
        for w in record.warnings[:5]:
            self.cb(f"    warning: {w}")
        if len(record.warnings) > 5:
            self.cb(f"    ... {len(record.warnings) - 5} more warnings in the report")


def _short_stats(stats: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in stats.items() if isinstance(v, (int, float, str)))[:80]


def subgraph_weights(graph: gs.Graph) -> list[str]:
    """Float constants read inside control-flow bodies, per node that owns the body: one line each."""
    lines = []
    for node in graph.nodes:
        seen: dict[int, int] = {}
        for sub in node.subgraphs():
            for g in [sub, *sub.subgraphs(recursive=True)]:
                for n in g.nodes:
                    for t in n.inputs:
                        if isinstance(t, gs.Constant) and t.dtype is not None and getattr(t.dtype, "kind", "") == "f" \
                                and len(t.shape or ()) >= 2:
                            seen[id(t)] = int(np.prod(t.shape))
        if seen:
            who = f"{node.op} node {node.name!r}" if node.name else f"an unnamed {node.op} node"
            lines.append(f"{who}: {len(seen)} weight tensor(s), {sum(seen.values())} values")
    return lines


class PassManager:
    def __init__(self, passes: list[tuple[Pass, Provider | str]], instruments: list[Instrument] | None = None):
        """``passes``: (pass instance, provider) in order."""
        self.passes = [(p, Provider.of(prov)) for p, prov in passes]
        self.instruments = instruments or []

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> tuple[onnx.ModelProto, list[PassRecord]]:
        graph = ir.to_graph(model)
        records: list[PassRecord] = []
        in_bodies = subgraph_weights(graph)
        for p, provider in self.passes:
            rec = PassRecord(p.name, str(provider), config_dict(p.config))
            is_plugin = not provider.builtin
            try:
                for inst in self.instruments:
                    inst.before(p, graph, ctx)
                p.requires(graph, ctx)
                t0 = time.perf_counter()
                result = p.run(graph, ctx)
                rec.seconds = time.perf_counter() - t0
                if not isinstance(result, PassResult):
                    raise PassError(f"pass {p.name} returned {type(result).__name__}, not PassResult")
                p.ensures(graph, ctx)
                rec.modified, rec.stats, rec.warnings = result.modified, result.stats, list(result.warnings)
                if in_bodies and not getattr(p, "handles_subgraphs", False) and not p.name.startswith(("cleanup.", "lower.")):
                    rec.warnings.append("weights inside control-flow bodies left untouched (this pass reads the main graph only): "
                                        + "; ".join(in_bodies))
                ctx.history.append(p.name)
                for inst in self.instruments:
                    inst.after(p, graph, ctx, rec)
            except CompressorError as exc:
                if is_plugin and not isinstance(exc, PluginError):
                    raise PluginError(f"plugin pass {p.name} ({provider}) failed: {exc.one_line()}") from exc
                raise
            except Exception as exc:
                ran = ", ".join(ctx.history) or "none"
                msg = f"pass {p.name} ({provider}) raised {type(exc).__name__}: {' '.join(str(exc).split())[:200]} (passes run before: {ran})"
                raise (PluginError(msg) if is_plugin else PassError(msg)) from exc
            records.append(rec)
        out = ir.to_model(graph, model)
        del graph
        ir.collect()  # the graph's arrays and the input model it holds: gone before the checks copy anything
        check_model(out, "the last pass" if self.passes else "load")
        return ir.infer_shapes(out), records
