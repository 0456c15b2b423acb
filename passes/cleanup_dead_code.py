"""``cleanup.dead_code``: remove nodes and initializers that no graph output depends on."""
from __future__ import annotations

import onnx_graphsurgeon as gs

from compressor.pass_base import Pass, PassContext, PassResult


class DeadCodeElimination(Pass):
    name = "cleanup.dead_code"
    description = "remove nodes and tensors that do not reach a graph output"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        before_nodes = len(graph.nodes)
        before_consts = sum(1 for t in graph.tensors().values() if isinstance(t, gs.Constant))
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        removed = before_nodes - len(graph.nodes)
        consts = before_consts - sum(1 for t in graph.tensors().values() if isinstance(t, gs.Constant))
        return PassResult(removed > 0 or consts > 0, {"nodes_removed": removed, "constants_removed": consts})
