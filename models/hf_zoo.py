"""Tiny random-weight ``transformers`` models exported to ONNX (no downloads).

Each entry builds a model from a small config (few layers, small hidden sizes, seeded weights),
wraps it to return only the logits, and exports it with the legacy TorchScript exporter
(``torch.onnx.export(..., dynamo=False)``, opset 17, static shapes, batch 1). Exports are cached
like ``models.zoo``: ``ensure_built(name, cache_dir)`` builds at most once per cache directory
(atomic replace, keyed by a hash of this file and the transformers version).

    from models.hf_zoo import HF_MODELS, ensure_built
    path = ensure_built("hf_bert", cache_dir)
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent


def _vision(cfg_name: str, model_name: str, img: int | None = None, **kw) -> Callable:
    def make():
        import transformers as tf

        cfg = getattr(tf, cfg_name)(**kw)
        size = img or IMG
        return getattr(tf, model_name)(cfg), {"pixel_values": ("float", (1, kw.get("num_channels", 3), size, size))}
    return make


def _text(cfg_name: str, model_name: str, **kw) -> Callable:
    def make():
        import transformers as tf

        cfg = getattr(tf, cfg_name)(**kw)
        return getattr(tf, model_name)(cfg), {"input_ids": ("int", (1, SEQ))}
    return make


IMG, SEQ = 32, 16
_TXT = dict(vocab_size=100, max_position_embeddings=32, num_labels=4)
HF_MODELS: dict[str, Callable] = {
    "hf_bert": _text("BertConfig", "BertForSequenceClassification", hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=64, **_TXT),
    "hf_distilbert": _text("DistilBertConfig", "DistilBertForSequenceClassification", dim=32, n_layers=2, n_heads=4,
                           hidden_dim=64, **_TXT),
    "hf_vit": _vision("ViTConfig", "ViTForImageClassification", image_size=IMG, patch_size=8, hidden_size=32,
                      num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_labels=5),
    "hf_resnet": _vision("ResNetConfig", "ResNetForImageClassification", embedding_size=16, hidden_sizes=[16, 32, 64],
                         depths=[1, 1, 1], layer_type="bottleneck", num_labels=5),
    "hf_convnext": _vision("ConvNextConfig", "ConvNextForImageClassification", hidden_sizes=[16, 32], depths=[1, 1], num_stages=2,
                           num_labels=5),
    "hf_mobilenetv2": _vision("MobileNetV2Config", "MobileNetV2ForImageClassification", image_size=IMG,
                              depth_multiplier=0.35, num_labels=5),
    "hf_efficientnet": _vision("EfficientNetConfig", "EfficientNetForImageClassification", image_size=IMG,
                               width_coefficient=0.25, depth_coefficient=0.2, hidden_dim=320, num_labels=5),
    "hf_regnet": _vision("RegNetConfig", "RegNetForImageClassification", embedding_size=16, hidden_sizes=[16, 32],
                         depths=[1, 1], groups_width=8, num_labels=5),
    "hf_swin": _vision("SwinConfig", "SwinForImageClassification", image_size=IMG, patch_size=4, embed_dim=16,
                       depths=[1, 1], num_heads=[2, 4], window_size=4, num_labels=5),
}

# bench-only (bench/structured.py): 224x224 inputs and realistic widths, so that latency is compute-bound
HF_BENCH: dict[str, Callable] = {
    "hf_resnet50ish_224": _vision("ResNetConfig", "ResNetForImageClassification", img=224, embedding_size=64,
                                  hidden_sizes=[256, 512, 1024, 2048], depths=[1, 1, 1, 1], layer_type="bottleneck",
                                  num_labels=10),
    "hf_mobilenetv2_224": _vision("MobileNetV2Config", "MobileNetV2ForImageClassification", img=224, image_size=224,
                                  depth_multiplier=1.0, num_labels=10),
    "hf_regnet_224": _vision("RegNetConfig", "RegNetForImageClassification", img=224, embedding_size=32,
                             hidden_sizes=[64, 128, 256, 512], depths=[1, 1, 2, 1], groups_width=16, num_labels=10),
    "hf_efficientnet_224": _vision("EfficientNetConfig", "EfficientNetForImageClassification", img=224, image_size=224,
                                   width_coefficient=1.0, depth_coefficient=0.5, hidden_dim=1280,
                                   num_labels=10),
}


def _fingerprint() -> str:
    import transformers

    return hashlib.sha256(Path(__file__).read_bytes() + transformers.__version__.encode()).hexdigest()[:10]


def make_model(name: str):
    """``(module, example_input, input_name)``: the seeded, eval-mode torch model of ``name`` wrapped to return
    the logits -- exactly what ``build`` exports (other tools, e.g. Torch-Pruning, start from this module)."""
    import torch

    makers = {**HF_MODELS, **HF_BENCH}
    if name not in makers:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(makers)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(sum(map(ord, name)))
        model, spec = makers[name]()
        gen = torch.Generator().manual_seed(7)
        with torch.no_grad():  # non-trivial norm statistics/affine terms
            for m in model.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
                if isinstance(m, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.LayerNorm)) and m.weight is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
        (iname, (kind, shape)), = spec.items()
        x = torch.randint(0, 100, shape) if kind == "int" else torch.randn(shape)
    model.eval()

    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(**{iname: x}).logits

    return Logits(model).eval(), x, iname


def export(module, x, iname: str, out: Path) -> None:
    """Legacy TorchScript export (``dynamo=False``), opset 17, static shapes, output ``logits``."""
    import torch

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), str(out), dynamo=False, opset_version=17, input_names=[iname],
                          output_names=["logits"], do_constant_folding=True)


def build(name: str, out: Path) -> None:
    module, x, iname = make_model(name)
    export(module, x, iname, out)


def ensure_built(name: str, cache_dir: Path | str) -> Path:
    cache = Path(cache_dir) / f"hf-{_fingerprint()}"
    dest = cache / f"{name}.onnx"
    if dest.is_file():
        return dest
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}.", dir=cache) as tmp:
        p = Path(tmp) / f"{name}.onnx"
        build(name, p)
        os.replace(p, dest)
    return dest


if __name__ == "__main__":
    import sys

    out = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/hf_zoo")
    for n in HF_MODELS:
        print(n, ensure_built(n, out))  # noqa: T201 (script entry point)
