"""A Torch-Pruning structured baseline for ONNX-only models (used by bench/real_models.py, config ``tp-struct20``).

Torch-Pruning (https://github.com/VainF/Torch-Pruning) prunes ``torch.nn.Module`` s; the suite's models ship as
ONNX only, so the round trip is

  1. ONNX clean-up so onnx2torch can convert it: ``Constant`` nodes become initializers, ``Reshape`` of a
     constant becomes a constant, and a bias-less ``Conv`` followed by ``Add`` of a per-channel constant
     (Paddle's export of a conv bias) becomes one ``Conv`` with a bias (else the bias stays a frozen tensor
     Torch-Pruning cannot see, and the pruned graph breaks on the shape mismatch);
  2. ``onnx2torch.convert`` -> an fx ``GraphModule`` (eval mode), checked against onnxruntime on a sample;
  3. ``torch_pruning.pruner.MagnitudePruner`` (L1 magnitude importance, uniform ``pruning_ratio`` per layer;
     the layers that feed a graph output through a reshape/flatten into a constant MatMul are kept, since that
     constant is not a module parameter), one step, no fine-tuning;
  4. ``torch.onnx.export`` with the original graph input/output names.

``prune_onnx(src, dst, ratio, sample)`` returns a dict of what happened; it raises on any failure (the bench
records the message as the cell's error). onnx2torch imports torchvision only for its NMS / RoIAlign
converters; without torchvision a stub stands in (those two ops then fail to convert).
"""
from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np


def _import_onnx2torch():
    try:
        import torchvision  # noqa: F401
    except ImportError:
        tv, ops = types.ModuleType("torchvision"), types.ModuleType("torchvision.ops")

        def _missing(*a, **k):
            raise NotImplementedError("torchvision is not installed (stub used by bench/torch_pruning_baseline.py)")

        ops.roi_align = ops.nms = ops.box_convert = _missing
        tv.ops = ops
        sys.modules.setdefault("torchvision", tv)
        sys.modules.setdefault("torchvision.ops", ops)
    from onnx2torch import convert

    return convert


def clean_for_onnx2torch(model):
    """Constants -> initializers, Reshape(const) -> const, Conv + Add(per-channel const) -> Conv with bias."""
    import onnx
    from onnx import numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    keep = []
    for n in g.node:
        if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value":
            t = onnx.TensorProto()
            t.CopyFrom(n.attribute[0].t)
            t.name = n.output[0]
            g.initializer.append(t)
            inits[t.name] = t
        else:
            keep.append(n)
    nodes = []
    for n in keep:  # Reshape of two constants -> constant
        if n.op_type == "Reshape" and all(i in inits for i in n.input[:2]):
            arr = numpy_helper.to_array(inits[n.input[0]]).reshape(numpy_helper.to_array(inits[n.input[1]]))
            t = numpy_helper.from_array(arr, n.output[0])
            g.initializer.append(t)
            inits[t.name] = t
        else:
            nodes.append(n)
    consumers: dict[str, list] = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    graph_outputs = {o.name for o in g.output}
    drop = set()
    for n in nodes:
        if n.op_type != "Conv" or len(n.input) > 2 or n.input[1] not in inits:
            continue
        cons = consumers.get(n.output[0], [])
        if len(cons) != 1 or n.output[0] in graph_outputs:
            continue
        add = cons[0]
        if add.op_type != "Add":
            continue
        other = add.input[1] if add.input[0] == n.output[0] else add.input[0]
        if other not in inits:
            continue
        c_out = inits[n.input[1]].dims[0]
        b = numpy_helper.to_array(inits[other])
        if b.size != c_out or (b.ndim == 4 and b.shape[1] != c_out):
            continue
        bias = numpy_helper.from_array(b.reshape(c_out).astype(np.float32), n.name + "_fused_bias")
        g.initializer.append(bias)
        n.input.append(bias.name)
        n.output[0] = add.output[0]
        drop.add(id(add))
    del g.node[:]
    g.node.extend(n for n in nodes if id(n) not in drop)
    used = {i for n in g.node for i in n.input}
    live = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(live)
    return model


def prune_onnx(src: Path | str, dst: Path | str, ratio: float, sample: dict[str, np.ndarray]) -> dict:
    """Prune ``ratio`` of the channels of ``src`` with Torch-Pruning's MagnitudePruner and write ``dst``.

    ``sample``: one feed (graph input name -> array with the model's static shape)."""
    import onnx
    import onnxruntime as ort
    import torch
    import torch_pruning as tp

    convert = _import_onnx2torch()
    model = onnx.load(str(src))
    in_names = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    out_names = [o.name for o in model.graph.output]
    model = clean_for_onnx2torch(model)
    module = convert(model).eval()
    xs = tuple(torch.from_numpy(np.ascontiguousarray(sample[k])) for k in in_names)
    ref = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, {k: sample[k] for k in in_names})
    with torch.no_grad():
        got = module(*xs)
    got = [got] if isinstance(got, torch.Tensor) else list(got)
    conv_err = max(float(np.abs(r - o.numpy()).max()) for r, o in zip(ref, got))
    if conv_err > 1e-3:
        raise RuntimeError(f"onnx2torch conversion differs from onnxruntime by {conv_err:.3g}")

    # the last prunable layer (its output reaches the graph output through reshapes into a constant MatMul/Gemm,
    # which Torch-Pruning cannot resize) stays whole: every conv/linear whose output shape feeds the head
    prunable = [(n, m) for n, m in module.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv1d, torch.nn.Linear))]
    ignored = [prunable[-1][1]] if prunable else []
    before = sum(p.numel() for p in module.parameters())
    pruner = tp.pruner.MagnitudePruner(module, example_inputs=xs if len(xs) > 1 else xs[0],
                                       importance=tp.importance.MagnitudeImportance(p=1),
                                       pruning_ratio=ratio, ignored_layers=ignored)
    pruner.step()
    after = sum(p.numel() for p in module.parameters())
    with torch.no_grad():
        module(*xs)  # shapes still consistent
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.onnx.export(module, xs, str(dst), input_names=in_names, output_names=out_names, dynamo=False)
        exporter = "torchscript"
    except Exception:  # noqa: BLE001 - fall back to the dynamo exporter
        torch.onnx.export(module, xs, str(dst), input_names=in_names, output_names=out_names, dynamo=True, external_data=False)
        exporter = "dynamo"
    got = onnx.load(str(dst))
    if [i.name for i in got.graph.input if i.name not in {t.name for t in got.graph.initializer}] != in_names or \
            [o.name for o in got.graph.output] != out_names:
        raise RuntimeError("exported model's I/O names differ from the source's")
    return {"conversion_max_abs_err": conv_err, "params_before": int(before), "params_after": int(after),
            "param_ratio": round(after / max(1, before), 4), "ignored_layers": [prunable[-1][0]] if prunable else [],
            "exporter": exporter}


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Torch-Pruning baseline for an ONNX model")
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--calib", required=True, help="data .npz; its first sample is the example input")
    a = ap.parse_args()
    import onnx

    m = onnx.load(a.src)
    shapes = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in m.graph.input}
    cal = np.load(a.calib)
    print(prune_onnx(a.src, a.dst, a.ratio, {k: cal[k][0].reshape(shapes[k]) for k in shapes if k in cal}))
