"""Benchmark-scale models (seed-paper / DeepBench sizes) beside the test-sized zoo in
:mod:`models.build`: ``mlp-large``, ``gru-large``, ``transformer-large``, ``mobilenetv2-large``.

The zoo's models are 32-128 wide so the test suite stays fast; at that size the sparse
kernels cannot pay (a 64x64 GEMV is a few hundred nanoseconds, call overhead included), so
the sparse-lowering speed targets are measured on these (``bench/end_to_end.py``). Built
with torch (random weights, seeded) and exported with ``torch.onnx.export(dynamo=False)``.

* ``mlp-large``: 1024 -> 2048 -> 2048 -> 1024 -> 10, ReLU, batch 1.
* ``gru-large``: torch GRU 256 -> 1024 hidden, 8 steps, batch_first, last hidden -> Linear.
* ``transformer-large``: :class:`models.build.TinyTransformer` at d_model 512, 8 heads,
  2 layers, MLP 2048, seq 16.
* ``mobilenetv2-large``: the real MobileNetV2 1.0 topology at 112 px, 1000 classes.
"""
from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

from models.zoo import ensure_built


def build_mlp_large(path: Path, widths=(1024, 2048, 2048, 1024), classes: int = 10, seed: int = 0) -> Path:
    import torch
    from torch import nn

    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(widths[-1], classes))
    net = nn.Sequential(*layers).eval()
    return _export(net, torch.randn(1, widths[0]), path)


def _export(net, x, path: Path) -> Path:
    import torch

    net = net.eval()
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (x,), str(path), input_names=["x"], output_names=["logits"], opset_version=17,
                          dynamo=False, do_constant_folding=True)
    return path


def build_gru_large(path: Path, inp: int = 256, hidden: int = 1024, seq: int = 8, classes: int = 10,
                    seed: int = 0) -> Path:
    """batch_first GRU (1 layer) -> last hidden state -> Linear; input [1, seq, inp]."""
    import torch
    from torch import nn

    class GRUHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.GRU(inp, hidden, num_layers=1, batch_first=True)
            self.fc = nn.Linear(hidden, classes)

        def forward(self, x):
            _, h = self.rnn(x)
            return self.fc(h[-1])

    torch.manual_seed(seed)
    return _export(GRUHead(), torch.randn(1, seq, inp), path)


def build_transformer_large(path: Path, seq: int = 16, dim: int = 512, heads: int = 8, layers: int = 2,
                            mlp_dim: int = 2048, seed: int = 0) -> Path:
    """models.build.TinyTransformer's explicit-attention pre-LN encoder at d_model ``dim``."""
    import torch

    from models.build import TinyTransformer

    torch.manual_seed(seed)
    net = TinyTransformer(seq=seq, dim=dim, heads=heads, layers=layers, mlp_dim=mlp_dim)
    return _export(net, torch.randn(1, seq, dim), path)


# MobileNetV2 1.0 (Sandler et al. 2018, table 2): (expansion t, out channels c, repeats n, first stride s)
MBV2_CFG = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def build_mobilenetv2_large(path: Path, size: int = 112, classes: int = 1000, seed: int = 0) -> Path:
    """The real MobileNetV2 1.0 topology (stem 3x3/2 -> 32, 17 inverted residual blocks with
    ReLU6, the t=1 block without expansion conv, 1x1 -> 1280, global pool, Linear) at
    ``size`` px, BatchNorm with non-trivial statistics (folded by the cleanup passes)."""
    import torch
    from torch import nn

    def cbr(cin, cout, k=1, stride=1, groups=1, act=True):
        mods = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        return nn.Sequential(*mods, *([nn.ReLU6()] if act else []))

    class Block(nn.Module):
        def __init__(self, cin, cout, stride, t):
            super().__init__()
            hid = cin * t
            self.res = stride == 1 and cin == cout
            self.body = nn.Sequential(*([cbr(cin, hid)] if t != 1 else []), cbr(hid, hid, 3, stride, hid),
                                      cbr(hid, cout, act=False))

        def forward(self, x):
            return x + self.body(x) if self.res else self.body(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            layers, cin = [cbr(3, 32, 3, 2)], 32
            for t, c, n, s in MBV2_CFG:
                for i in range(n):
                    layers.append(Block(cin, c, s if i == 0 else 1, t))
                    cin = c
            layers.append(cbr(cin, 1280))
            self.features = nn.Sequential(*layers)
            self.fc = nn.Linear(1280, classes)

        def forward(self, x):
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))

    torch.manual_seed(seed)
    net = Net().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
    return _export(net, torch.randn(1, 3, size, size), path)


LARGE = {"mlp-large": build_mlp_large, "gru-large": build_gru_large, "transformer-large": build_transformer_large,
         "mobilenetv2-large": build_mobilenetv2_large}


def model_path(name: str, cache: Path) -> Path:
    if name in LARGE:
        cache.mkdir(parents=True, exist_ok=True)
        p = cache / f"{name.replace('-', '_')}.onnx"
        return p if p.is_file() else LARGE[name](p)
    return ensure_built(name, cache)


def build_mlp_external(path: Path, width: int, layers: int, inp: int | None = None, classes: int = 10,
                       seed: int = 0) -> Path:
    """A ``layers``-deep ReLU MLP of ``width`` (MatMul + Add per layer, then a ``classes`` head) whose
    weights live in one external-data file beside the model (``<name>.data``), written layer by layer
    so that a model larger than the generator's memory (a 1B-parameter, 4 GB one) can be built.
    Random weights scaled 1/sqrt(fan-in) (activations stay O(1) through the depth), batch 1."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    inp = inp or width
    rng = np.random.default_rng(seed)
    path = Path(path)
    data_name = path.name + ".data"
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    offset = 0
    with open(path.parent / data_name, "wb") as f:
        def external(name: str, arr: np.ndarray) -> None:
            nonlocal offset
            pad = (-offset) % 4096  # page-aligned: runtimes can map the tensors instead of copying them
            f.write(b"\0" * pad)
            offset += pad
            raw = np.ascontiguousarray(arr, dtype=np.float32)
            f.write(raw.tobytes())
            tp = onnx.TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(raw.shape))
            tp.data_location = TensorProto.EXTERNAL
            for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(raw.nbytes))):
                tp.external_data.add(key=k, value=v)
            offset += raw.nbytes
            inits.append(tp)

        x, cin = "x", inp
        dims = [width] * layers + [classes]
        for i, cout in enumerate(dims):
            w = np.empty((cin, cout), np.float32)
            for r0 in range(0, cin, 1024):  # in row blocks: no float64 copy of a whole 4096x8192 layer
                w[r0:r0 + 1024] = rng.standard_normal((min(1024, cin - r0), cout), dtype=np.float32) / np.sqrt(cin)
            external(f"fc{i}.weight", w)
            external(f"fc{i}.bias", (rng.standard_normal(cout, dtype=np.float32) * 0.1))
            del w
            y = "logits" if i == len(dims) - 1 else f"h{i}"
            nodes.append(helper.make_node("MatMul", [x, f"fc{i}.weight"], [f"mm{i}"], name=f"MatMul_{i}"))
            nodes.append(helper.make_node("Add", [f"mm{i}", f"fc{i}.bias"], [y if i == len(dims) - 1 else f"pre{i}"],
                                          name=f"Add_{i}"))
            if i < len(dims) - 1:
                nodes.append(helper.make_node("Relu", [f"pre{i}"], [y], name=f"Relu_{i}"))
            x, cin = y, cout
    graph = helper.make_graph(nodes, "mlp_external", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, inp])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="models.large")
    model.ir_version = 8
    onnx.save_model(model, str(path))
    return path
