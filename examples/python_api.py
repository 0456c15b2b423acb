"""The Python API on the embedded default model (docs/python-api.md); run from the repository root:

    .venv/bin/python examples/python_api.py [OUT_DIR]
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx

import compressor
from compressor.pass_base import Pass, PassContext, PassResult

repo = Path(__file__).resolve().parents[1]
out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("api-example")
model_path = repo / "models" / "digits_cnn.onnx"
calib = repo / "models" / "digits_calib.npz"

# 1. the CLI's run: `compress models/digits_cnn.onnx --target x86 --sparsity 0.5 --calib ... -o OUT/s50`
res = compressor.compress(model_path, target="x86", sparsity=0.5, calib=calib, output=out / "s50", force=True,
                          progress=print)
print(f"status {res.status} (exit {res.exit_code}), sparsity {res.sparsity:.3f}, min cosine {res.min_cosine:.4f}")
print(f"bundle {res.bundle}: {sorted(p.name for p in res.bundle.iterdir())}")
if res.accuracy:
    print(f"accuracy {res.accuracy['original']:.4f} -> {res.accuracy['compressed']:.4f}")
assert res.ok and (res.bundle / "report.json").is_file()

# 2. an in-memory model and in-memory calibration data; the model object is not modified
model = onnx.load(model_path)
data = dict(np.load(calib))
res = compressor.compress(model, quantize="int8", calib=data, output=out / "int8", force=True, no_compile=True)
print(f"int8: {res.status}, min cosine {res.min_cosine:.4f}, warnings: {len(res.warnings)}")


# 3. a pass of your own, registered for this process (no plugin file, no entry point)
class CountConvs(Pass):
    name = "example.count_convs"
    description = "count Conv nodes (changes nothing)"

    def run(self, graph, ctx: PassContext) -> PassResult:  # graph: an onnx_graphsurgeon gs.Graph
        return PassResult(False, {"convs": sum(n.op == "Conv" for n in graph.nodes)})


compressor.register_pass(CountConvs)
res = compressor.compress(model_path, passes=[{"name": "example.count_convs", "config": {}}], output=out / "mine",
                          force=True, no_compile=True)
print("example.count_convs:", next(p["stats"] for p in res.report["passes"] if p["name"] == "example.count_convs"))

# 4. a gate failure is a result, not an exception; bad input raises with the CLI's exit code
res = compressor.compress(model_path, sparsity=0.97, output=out / "s97", force=True, no_compile=True, search_budget=0)
print(f"97%: exit {res.exit_code} ({res.status}), gate: {res.report['gate']['failures'][:1]}")
try:
    compressor.compress(model_path, sparsity=1.5)
except compressor.errors.CompressorError as exc:
    print(f"bad input: exit {exc.exit_code}: {exc.one_line()}")
