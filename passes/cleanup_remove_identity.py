"""``cleanup.remove_identity``: drop Identity nodes and inference-mode Dropout.

Consumers of the node's output are rewired to its input. Where the output is
a graph output, the producer of the input is renamed to produce the graph
output instead (graph outputs keep their names). A Dropout whose mask output
is used, or that runs in training mode, is kept and reported.
"""
from __future__ import annotations

import onnx_graphsurgeon as gs

from compressor.pass_base import Pass, PassContext, PassResult


def _is_inference_dropout(node: gs.Node) -> bool:
    if node.op != "Dropout":
        return False
    if len(node.outputs) > 1 and node.outputs[1].outputs:
        return False  # mask is consumed
    if len(node.inputs) > 2 and node.inputs[2].name:
        t = node.inputs[2]
        return isinstance(t, gs.Constant) and not bool(t.values)
    return True


def _replace(tensors, old, new) -> None:
    for i, t in enumerate(tensors):
        if t is old:
            tensors[i] = new


class RemoveIdentity(Pass):
    name = "cleanup.remove_identity"
    description = "remove Identity and inference-mode Dropout nodes"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        removed, kept = 0, []
        graph_outputs = {id(t) for t in graph.outputs}
        for node in list(graph.nodes):
            if node.op not in ("Identity", "Dropout"):
                continue
            if node.op == "Dropout" and not _is_inference_dropout(node):
                kept.append(f"{node.name} (Dropout in training mode or with a used mask)")
                continue
            inp, out = node.inputs[0], node.outputs[0]
            if id(out) in graph_outputs:
                producer = inp.inputs[0] if inp.inputs else None
                if producer is None or id(inp) in graph_outputs:
                    kept.append(f"{node.name} (copies a graph input/constant to a graph output)")
                    continue
                # producer now writes the graph output directly; other readers of inp read out
                node.inputs.clear()
                node.outputs.clear()
                for consumer in list(inp.outputs):
                    _replace(consumer.inputs, inp, out)
                _replace(producer.outputs, inp, out)
            else:
                node.inputs.clear()
                node.outputs.clear()
                for consumer in list(out.outputs):
                    _replace(consumer.inputs, out, inp)
            removed += 1
        graph.cleanup(remove_unused_graph_inputs=False)
        warnings = [f"kept {k}" for k in kept]
        return PassResult(removed > 0, {"removed": removed, "kept": len(kept)}, warnings)
