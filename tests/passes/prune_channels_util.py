"""Shared oracle for the prune.channels tests: zero-then-remove."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from compressor import ir, runtime
from compressor.pass_base import PassContext
from passes import CLEANUP_PIPELINE, PASSES
from passes.prune_channels import PruneChannelsConfig, apply_plan, plan


def feeds_for(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for i in ir.graph_inputs(model):
        shape = [d.dim_value for d in i.type.tensor_type.shape.dim]
        if i.type.tensor_type.elem_type == onnx.TensorProto.INT64:
            out[i.name] = rng.integers(0, 50, shape).astype(np.int64)
        else:
            out[i.name] = rng.standard_normal(shape).astype(np.float32)
    return out


def cleaned(model: onnx.ModelProto):
    g = ir.to_graph(model)
    ctx = PassContext(opset=ir.default_opset(model) or 17, template=model)
    for name in CLEANUP_PIPELINE:
        PASSES.get(name)().run(g, ctx)
    return g, ctx


def zero_then_remove(model: onnx.ModelProto | Path, **cfg) -> dict:
    """Zero the planned channels in the original, remove them with the pass; both must agree to 1e-5.
    Also: onnx.checker (full), shape inference, unchanged IO shapes. Returns facts for further asserts."""
    if not isinstance(model, onnx.ModelProto):
        model = ir.load(Path(model), {})
    g, ctx = cleaned(model)
    base = ctx.export(g)
    pl = plan(g, ctx, PruneChannelsConfig(**cfg))
    gz = ir.to_graph(base)
    apply_plan(gz, pl, "zero")
    zeroed = ctx.export(gz)
    apply_plan(g, pl, "remove")
    pruned = ctx.export(g)
    onnx.checker.check_model(pruned, full_check=True)
    try:  # strict shape inference where onnx can infer the original (it has no rule for some function ops)
        onnx.shape_inference.infer_shapes(base, strict_mode=True)
        strict = True
    except onnx.shape_inference.InferenceError:
        strict = False
    onnx.shape_inference.infer_shapes(pruned, strict_mode=strict)
    assert [(s.name, s.shape) for s in ir.input_specs(pruned)] == [(s.name, s.shape) for s in ir.input_specs(base)]
    assert [(s.name, s.shape) for s in ir.output_specs(pruned)] == [(s.name, s.shape) for s in ir.output_specs(base)]
    feeds = feeds_for(base)
    za = runtime.session(zeroed).run(None, feeds)
    pa = runtime.session(pruned).run(None, feeds)
    for z, p in zip(za, pa):
        scale = max(1.0, float(np.abs(z).max()))
        np.testing.assert_allclose(p, z, rtol=1e-5, atol=1e-5 * scale)
    n_params = lambda m: sum(int(np.prod(t.dims)) for t in m.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)
    return {"plan": pl, "base": base, "pruned": pruned, "params": (n_params(base), n_params(pruned)),
            "status": [s["status"] for s in pl.group_stats], "removed": sum(len(v) for v in pl.removed.values())}
