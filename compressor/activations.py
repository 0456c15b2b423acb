"""Capture intermediate activations with onnxruntime.

A copy of the model gets the requested tensors added as graph outputs (types
from shape inference) and runs sample by sample in onnxruntime with graph
optimizations disabled, so values are exactly those of the model as written.

    capture(model, samples, ["conv1_in", "fc_in"])  -> {name: array stacked over samples}
    for acts in iter_capture(model, samples, names): ...   # streaming: one dict per sample

Graph inputs are returned from the feed; initializers from the model. Memory:
``iter_capture`` holds one sample's activations at a time (use it for
statistics such as X^T X); ``capture`` stacks everything.
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator

import numpy as np
import onnx
from onnx import helper, numpy_helper

from compressor import ir
from compressor.errors import InputError


def _feeds(samples: Any) -> list[dict[str, np.ndarray]]:
    return list(samples.feeds) if hasattr(samples, "feeds") else list(samples)


def with_outputs(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs the given intermediate tensors."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    existing = {o.name for o in m.graph.output}
    types: dict[str, int] = {}
    try:
        inferred = ir.inferred_structure(m)
        for vi in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
            if vi.type.HasField("tensor_type"):
                types[vi.name] = vi.type.tensor_type.elem_type
    except Exception:  # inference is only used for element types; fall back to float
        pass
    produced = {o for n in m.graph.node for o in n.output}
    for name in names:
        if name in existing:
            continue
        if name not in produced:
            raise InputError(f"tensor {name!r} is not produced by any node of the model")
        m.graph.output.append(helper.make_tensor_value_info(name, types.get(name, onnx.TensorProto.FLOAT), None))
        existing.add(name)
    return m


def iter_capture(model: onnx.ModelProto, samples: Any, tensor_names: list[str]) -> Iterator[dict[str, np.ndarray]]:
    """Yield ``{name: activation}`` for each sample (graph inputs and initializers included)."""
    from compressor import runtime

    feeds = _feeds(samples)
    inits = {i.name for i in model.graph.initializer}
    inputs = {i.name for i in model.graph.input} - inits
    const = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if i.name in tensor_names}
    computed = [n for n in dict.fromkeys(tensor_names) if n not in inputs and n not in const]
    sess = runtime.session(with_outputs(model, computed)) if computed else None
    for feed in feeds:
        out: dict[str, np.ndarray] = {}
        if sess is not None:
            out.update(zip(computed, sess.run(computed, feed)))
        for n in tensor_names:
            if n in inputs:
                out[n] = feed[n]
            elif n in const:
                out[n] = const[n]
        yield out


def capture(model: onnx.ModelProto, samples: Any, tensor_names: list[str]) -> dict[str, np.ndarray]:
    """``{name: activations stacked over samples}`` (leading axis = sample)."""
    acc: dict[str, list[np.ndarray]] = {n: [] for n in tensor_names}
    for acts in iter_capture(model, samples, tensor_names):
        for n in tensor_names:
            acc[n].append(acts[n])
    return {n: np.stack(v) if v else np.zeros((0,)) for n, v in acc.items()}
