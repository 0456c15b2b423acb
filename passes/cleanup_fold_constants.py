"""``cleanup.fold_constants``: evaluate every subgraph whose inputs are all
constant (onnx-graphsurgeon's folder, executed with onnxruntime) and replace it
by its value. Also turns ``Constant`` nodes into initializers."""
from __future__ import annotations

import onnx_graphsurgeon as gs

from compressor.pass_base import Pass, PassContext, PassResult


class FoldConstants(Pass):
    name = "cleanup.fold_constants"
    description = "fold constant subgraphs (Shape/ConstantOfShape/Pad chains, Constant nodes) into initializers"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        before = len(graph.nodes)
        graph.fold_constants(error_ok=True)
        graph.cleanup(remove_unused_graph_inputs=False)
        after = len(graph.nodes)
        return PassResult(after != before, {"nodes_removed": before - after})
