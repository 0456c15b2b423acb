"""A single-file plugin: ``compress model.onnx --plugin examples/plugin_file_example.py --pass example.report_ops``.

Defines ``example.report_ops``: changes nothing, records the op-type histogram
in the pass statistics (shows the minimum a pass must provide).
"""
from __future__ import annotations

from collections import Counter

from compressor.pass_base import Pass, PassContext, PassResult


class ReportOps(Pass):
    name = "example.report_ops"
    description = "record the op-type histogram (example single-file plugin)"

    def run(self, graph, ctx: PassContext) -> PassResult:
        return PassResult(False, {"ops": dict(Counter(n.op for n in graph.nodes))})
