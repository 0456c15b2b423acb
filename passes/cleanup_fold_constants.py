"""``cleanup.fold_constants``: evaluate every subgraph whose inputs are all
constant (onnx-graphsurgeon's folder, executed with onnxruntime) and replace it
by its value. Also turns ``Constant`` nodes into initializers and replaces ``If``
nodes with a constant condition by the taken branch (``compressor.ir.fold_constants``:
subgraph-aware, nothing over the memory limit is folded, graph outputs stay node outputs)."""
from __future__ import annotations

import onnx_graphsurgeon as gs

from compressor import ir
from compressor.pass_base import Pass, PassContext, PassResult


class FoldConstants(Pass):
    name = "cleanup.fold_constants"
    description = "fold constant subgraphs (Shape/ConstantOfShape/Pad chains, Constant nodes) into initializers"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        before = len(graph.nodes)
        ir.fold_constants(graph)
        after = len(graph.nodes)
        return PassResult(after != before, {"nodes_removed": before - after})
