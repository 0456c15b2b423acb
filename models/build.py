"""Builders for the small test/benchmark model zoo.

Every model is a tiny torch network with random (but seeded, hence reproducible)
weights, exported to ONNX with the legacy TorchScript exporter at opset 17 with
static shapes (batch 1).  BatchNormalization layers are kept *unfused* in the
exported graph (the compressor's cleanup pass is responsible for folding them),
and BN running statistics are made non-trivial by a few train-mode forward passes
on random data before switching to eval mode.

Usage (from the repository root)::

    python -m models.build                  # all models -> models/onnx/<name>.onnx
    python -m models.build --only resnet    # one model
    python -m models.build --out /tmp/zoo   # another output directory

Python API::

    from models.build import MODEL_NAMES, build, make_model, example_inputs
    path = build("resnet", out_dir)          # -> Path(out_dir) / "resnet.onnx"
    model, inputs = make_model("resnet")     # torch module (eval) + {name: tensor}
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

OPSET = 17
DEFAULT_OUT_DIR = Path(__file__).resolve().parent / "onnx"
# torch.onnx.export (legacy) and the global torch RNG are process-global: serialize builds/exports
# across threads.  (Across processes nothing is shared; build() writes atomically.)
_LOCK = threading.RLock()


# --------------------------------------------------------------------------------------
# Topologies
# --------------------------------------------------------------------------------------


def conv_bn_relu(cin: int, cout: int, k: int = 3, stride: int = 1, act: type[nn.Module] = nn.ReLU,
                 groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        act(),
    )


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, 128), nn.ReLU(),
            nn.Linear(128, 128), nn.ReLU(),
            nn.Linear(128, 64), nn.ReLU(),
            nn.Linear(64, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_relu(3, 16),
            conv_bn_relu(16, 32),
            nn.MaxPool2d(2),
            conv_bn_relu(32, 64),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return self.fc(torch.flatten(x, 1))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn_relu(3, 16)
        self.layer1 = BasicBlock(16, 16)
        self.layer2 = BasicBlock(16, 32, stride=2)  # 1x1 stride-2 projection shortcut
        self.layer3 = BasicBlock(32, 32)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.block = nn.Sequential(
            conv_bn_relu(cin, hidden, k=1, act=nn.ReLU6),                                # expand
            conv_bn_relu(hidden, hidden, k=3, stride=stride, act=nn.ReLU6, groups=hidden),  # depthwise
            nn.Conv2d(hidden, cout, 1, bias=False),                                       # linear project
            nn.BatchNorm2d(cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_res else out


class MobileNetV2(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn_relu(3, 16, act=nn.ReLU6)
        self.blocks = nn.Sequential(
            InvertedResidual(16, 16, stride=1, expand=4),
            InvertedResidual(16, 24, stride=2, expand=4),
            InvertedResidual(24, 24, stride=1, expand=4),
        )
        self.head = conv_bn_relu(24, 64, k=1, act=nn.ReLU6)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv(F.relu(self.bn(x)))], dim=1)


class DenseNet(nn.Module):
    def __init__(self, growth: int = 8) -> None:
        super().__init__()
        c = 16
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        block1 = []
        for _ in range(3):
            block1.append(DenseLayer(c, growth))
            c += growth
        self.block1 = nn.Sequential(*block1)
        self.trans = nn.Sequential(
            nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1, bias=False), nn.AvgPool2d(2)
        )
        c //= 2
        block2 = []
        for _ in range(2):
            block2.append(DenseLayer(c, growth))
            c += growth
        self.block2 = nn.Sequential(*block2)
        self.norm = nn.BatchNorm2d(c)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.trans(self.block1(self.stem(x))))
        x = self.pool(F.relu(self.norm(x)))
        return self.fc(torch.flatten(x, 1))


class GRUClassifier(nn.Module):
    """Input [1, 16, 8] (batch_first), one GRU layer (hidden 32), last hidden -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(8, 32, num_layers=1, batch_first=True)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, h = self.rnn(x)
        return self.fc(h[-1])


class LSTMClassifier(nn.Module):
    """Input [1, 16, 8] (batch_first), one LSTM layer (hidden 32), last hidden -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(8, 32, num_layers=1, batch_first=True)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, (h, _c) = self.rnn(x)
        return self.fc(h[-1])


class SelfAttention(nn.Module):
    """Explicit multi-head self-attention (exports as MatMul/Reshape/Transpose/Softmax)."""

    def __init__(self, dim: int, heads: int, seq: int) -> None:
        super().__init__()
        self.heads, self.head_dim, self.seq, self.dim = heads, dim // heads, seq, dim
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.scale = 1.0 / float(self.head_dim) ** 0.5

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        # [1, S, D] -> [1, H, S, Dh]   (static shapes, batch 1)
        return t.reshape(1, self.seq, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))
        scores = torch.matmul(q, k.transpose(-2, -1)) * self.scale
        attn = torch.softmax(scores, dim=-1)
        ctx = torch.matmul(attn, v)                                # [1, H, S, Dh]
        ctx = ctx.transpose(1, 2).reshape(1, self.seq, self.dim)   # [1, S, D]
        return self.out(ctx)


class EncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, seq: int, mlp_dim: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, seq)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyTransformer(nn.Module):
    """Pre-LN encoder, 2 layers, 4 heads, d=32; input [1, 16, 32] features -> [1, 10] logits."""

    def __init__(self, seq: int = 16, dim: int = 32, heads: int = 4, layers: int = 2,
                 mlp_dim: int = 64) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[EncoderLayer(dim, heads, seq, mlp_dim) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.layers(x))
        return self.head(x.mean(dim=1))


# --------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    name: str
    factory: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    input_name: str = "input"
    output_name: str = "logits"
    output_shape: tuple[int, ...] = (1, 10)
    seed: int = 0


IMAGE = (1, 3, 32, 32)
SEQ = (1, 16, 8)

SPECS: dict[str, ModelSpec] = {
    s.name: s
    for s in [
        ModelSpec("mlp", MLP, (1, 64), seed=1),
        ModelSpec("cnn", SmallCNN, IMAGE, seed=2),
        ModelSpec("resnet", ResNet, IMAGE, seed=3),
        ModelSpec("mobilenetv2", MobileNetV2, IMAGE, seed=4),
        ModelSpec("densenet", DenseNet, IMAGE, seed=5),
        ModelSpec("gru", GRUClassifier, SEQ, seed=6),
        ModelSpec("lstm", LSTMClassifier, SEQ, seed=7),
        ModelSpec("transformer", TinyTransformer, (1, 16, 32), seed=8),
    ]
}
MODEL_NAMES: list[str] = list(SPECS)


def _spec(name: str) -> ModelSpec:
    try:
        return SPECS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODEL_NAMES)}") from None


def _randomize_norms(model: nn.Module, gen: torch.Generator) -> None:
    """Give BN / LayerNorm affine params non-trivial values (default is gamma=1, beta=0)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
                m.weight.copy_(torch.empty_like(m.weight).uniform_(0.5, 1.5, generator=gen))
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)


def example_inputs(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic random input(s) for ``name``: ``{input_name: float32 tensor}``."""
    spec = _spec(name)
    gen = torch.Generator().manual_seed(1000 + seed)
    return {spec.input_name: torch.randn(spec.input_shape, generator=gen)}


def make_model(name: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Build the (eval-mode, seeded) torch model and a matching example input dict."""
    spec = _spec(name)
    # Seed the global RNG (module default inits use it) without clobbering the caller's state.
    with _LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = spec.factory()
        gen = torch.Generator().manual_seed(spec.seed + 100)
        _randomize_norms(model, gen)
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            # Non-trivial running stats: a few train-mode passes on shifted/scaled random data.
            model.train()
            with torch.no_grad():
                for _ in range(8):
                    x = torch.randn((8,) + spec.input_shape[1:], generator=gen) * 1.5 + 0.3
                    model(x)
    model.eval()
    return model, example_inputs(name)


def export_onnx(model: nn.Module, inputs: dict[str, torch.Tensor], path: Path | str,
                output_names: list[str]) -> None:
    """Legacy (TorchScript) export at opset 17, static shapes, BN kept as BatchNormalization.

    ``TrainingMode.PRESERVE`` on an eval-mode model exports BN in inference form (running
    stats, ``training_mode=0``) exactly like ``TrainingMode.EVAL``, but skips the exporter's
    EVAL-only ``_jit_pass_onnx_eval_peephole`` that folds Conv+BatchNormalization.  That lets
    us keep ``do_constant_folding=True``: weights then land as plain initializers (MatMul
    weights pre-transposed, GRU/LSTM W/R/B as initializers instead of runtime Slice/Concat
    chains), while BN stays unfused for the compressor's own cleanup pass to fold.
    (``EVAL`` + ``do_constant_folding=False`` also keeps BN but leaves those runtime chains.)
    """
    assert not model.training, "export expects an eval-mode model"
    args = tuple(inputs.values())
    with _LOCK, warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            args,
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=list(inputs),
            output_names=output_names,
            training=torch.onnx.TrainingMode.PRESERVE,
            do_constant_folding=True,
        )


def build(name: str, out_dir: Path | str = DEFAULT_OUT_DIR) -> Path:
    """Export model ``name`` to ``out_dir/<name>.onnx`` (atomically) and return the path."""
    spec = _spec(name)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dest = out_dir / f"{name}.onnx"
    model, inputs = make_model(name)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".onnx.tmp", dir=out_dir)
    os.close(fd)
    try:
        export_onnx(model, inputs, tmp, [spec.output_name])
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def reference_output(name: str, inputs: dict[str, np.ndarray | torch.Tensor] | None = None) -> np.ndarray:
    """Torch output of model ``name`` for ``inputs`` (default: ``example_inputs(name)``)."""
    model, default = make_model(name)
    feeds = default if inputs is None else {k: torch.as_tensor(v) for k, v in inputs.items()}
    with torch.no_grad():
        return model(*feeds.values()).numpy()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.build", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", action="append", choices=MODEL_NAMES, metavar="NAME",
                   help=f"build only this model (repeatable); one of: {', '.join(MODEL_NAMES)}")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR, help="output directory (default: models/onnx)")
    a = p.parse_args(argv)
    for name in a.only or MODEL_NAMES:
        t0 = time.perf_counter()
        path = build(name, a.out)
        print(f"{name:12s} -> {path}  ({path.stat().st_size / 1024:.1f} KiB, {time.perf_counter() - t0:.2f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
