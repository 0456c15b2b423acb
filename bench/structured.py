"""Structured pruning benchmark: onnxruntime latency of pruned vs original, side by side, with the MAC ratio.

For each model: cleanup passes, then ``prune.channels`` (l1, uniform, round_to from the host x86 target
unless --round-to), then both graphs are timed in the same process with interleaved rounds
(``compressor.runtime.compare_latency``, ORT_ENABLE_ALL, 1 thread by default so other jobs disturb less).
Columns: MACs after/before, params after/before, speedup = t_orig / t_pruned, and efficiency =
speedup / (MAC_before / MAC_after) (the target is >= 0.8 on CNNs at ratio 0.5).
Torch-Pruning and onnxsim's apply_structured_pruning are compared when importable (else: said so).

    .venv/bin/python bench/structured.py                  # all models, ratios 0.3 and 0.5 -> bench/structured.md
    .venv/bin/python bench/structured.py --smoke          # tiny configuration (used by tests)
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from compressor import ir, runtime, stats  # noqa: E402
from compressor.pass_base import PassContext  # noqa: E402
from passes import CLEANUP_PIPELINE, PASSES  # noqa: E402
from passes.prune_channels import PruneChannelsConfig  # noqa: E402

# bench-only larger CNNs (random weights, 224x224) so that latency is compute-bound
BIG = {
    "hf_resnet50ish_224": ("ResNetConfig", "ResNetForImageClassification",
                           dict(embedding_size=64, hidden_sizes=[256, 512, 1024, 2048], depths=[1, 1, 1, 1],
                                layer_type="bottleneck", num_labels=10)),
    "hf_mobilenetv2_224": ("MobileNetV2Config", "MobileNetV2ForImageClassification",
                           dict(image_size=224, depth_multiplier=1.0, num_labels=10)),
    "hf_regnet_224": ("RegNetConfig", "RegNetForImageClassification",
                      dict(embedding_size=32, hidden_sizes=[64, 128, 256, 512], depths=[1, 1, 2, 1], groups_width=16,
                           num_labels=10)),
}


def build_big(name: str, out: Path) -> Path:
    import torch
    import transformers as tf

    dest = out / f"{name}.onnx"
    if dest.is_file():
        return dest
    cfg_name, model_name, kw = BIG[name]
    torch.manual_seed(0)
    model = getattr(tf, model_name)(getattr(tf, cfg_name)(**kw)).eval()

    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(pixel_values=x).logits

    torch.onnx.export(Logits(model), (torch.randn(1, 3, 224, 224),), str(dest), dynamo=False, opset_version=17,
                      input_names=["pixel_values"], output_names=["logits"])
    return dest


def feeds(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {}
    for s in ir.input_specs(model):
        out[s.name] = (rng.integers(0, 50, s.shape) if np.dtype(s.dtype).kind == "i" else rng.standard_normal(s.shape)).astype(s.dtype)
    return out


def prune(path: Path, ratio: float, round_to: int) -> tuple[onnx.ModelProto, onnx.ModelProto, dict]:
    model = ir.load(path, {})
    g = ir.to_graph(model)
    ctx = PassContext(opset=ir.default_opset(model) or 17, template=model)
    for n in CLEANUP_PIPELINE:
        PASSES.get(n)().run(g, ctx)
    base = ctx.export(g)
    res = PASSES.get("prune.channels")(PruneChannelsConfig(ratio=ratio, round_to=round_to)).run(g, ctx)
    return base, ctx.export(g), res.stats


def macs(m: onnx.ModelProto) -> float:
    try:
        return float(stats.compute(m, 0).macs)
    except Exception:
        return float("nan")


def latency(a: onnx.ModelProto, b: onnx.ModelProto, threads: int, rounds: int) -> tuple[float, float]:
    sa, sb = runtime.session(a, optimized=True, threads=threads), runtime.session(b, optimized=True, threads=threads)
    f = feeds(a)
    lat = runtime.compare_latency({"a": lambda: sa.run(None, f), "b": lambda: sb.run(None, f)}, rounds=rounds)
    return lat["a"], lat["b"]


def optional_tools() -> list[str]:
    notes = []
    try:
        import torch_pruning  # noqa: F401
        notes.append("torch-pruning: importable (PyTorch-module pruning; not applied to ONNX graphs here)")
    except ImportError:
        notes.append("torch-pruning: not installed, not compared")
    try:
        import onnxsim  # noqa: F401
        notes.append(f"onnxsim {getattr(onnxsim, '__version__', '?')}: importable")
    except ImportError:
        notes.append("onnxsim 0.8.1 (apply_structured_pruning): not installed, not compared")
    return notes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--ratios", default="0.3,0.5")
    ap.add_argument("--round-to", type=int, default=0, help="0: the host x86 target's default")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "structured.md")
    a = ap.parse_args(argv)
    import targets

    round_to = a.round_to or targets.resolve("x86")[1].round_to
    cache = Path(tempfile.gettempdir()) / "compressor-bench-structured"
    cache.mkdir(exist_ok=True)
    from models.zoo import ensure_built

    models: list[tuple[str, Path, str]] = []
    zoo = ["cnn"] if a.smoke else ["cnn", "resnet", "mobilenetv2", "densenet", "mlp", "transformer", "digits"]
    models += [(n, ensure_built(n, cache), "cnn" if n in ("cnn", "resnet", "mobilenetv2", "densenet", "digits") else "other") for n in zoo]
    if not a.smoke:
        try:
            from models.hf_zoo import ensure_built as hf_built

            for n in ("hf_bert", "hf_vit", "hf_resnet", "hf_convnext", "hf_efficientnet", "hf_regnet"):
                models.append((n, hf_built(n, cache), "cnn" if n in ("hf_resnet", "hf_efficientnet", "hf_regnet") else "other"))
            for n in BIG:
                models.append((n, build_big(n, cache), "cnn"))
        except ImportError:
            print("transformers not installed: HF models skipped")
    ratios = [float(r) for r in a.ratios.split(",")] if not a.smoke else [0.5]
    rows = []
    header = ("| model | kind | ratio | MACs after/before | params after/before | t_orig ms | t_pruned ms | speedup | "
              "MAC reduction | speedup / MAC reduction |")
    print(header)
    for name, path, kind in models:
        for ratio in ratios:
            t0 = time.perf_counter()
            base, pruned, st = prune(path, ratio, round_to)
            m0, m1 = macs(base), macs(pruned)
            ta, tb = latency(base, pruned, a.threads, 3 if a.smoke else a.rounds)
            red = m0 / m1 if m1 else float("nan")
            row = (f"| {name} | {kind} | {ratio} | {m1 / m0:.3f} | {st['params_after'] / st['params_before']:.3f} | "
                   f"{ta * 1e3:.3f} | {tb * 1e3:.3f} | {ta / tb:.2f}x | {red:.2f}x | {ta / tb / red:.2f} |")
            rows.append(row)
            print(row, f"({time.perf_counter() - t0:.1f}s)", flush=True)
    notes = optional_tools()
    text = ["# prune.channels: onnxruntime latency vs MAC reduction", "",
            f"criterion l1, uniform allocation, round_to {round_to}, ORT_ENABLE_ALL, {a.threads} thread(s), "
            f"median of interleaved rounds, batch 1, measured on {_host()}.", "", header,
            "|" + "---|" * 10, *rows, "", *[f"- {n}" for n in notes], ""]
    if not a.smoke:
        a.out.write_text("\n".join(text))
    print("\n".join(f"- {n}" for n in notes))
    return 0


def _host() -> str:
    try:
        from targets.host import detect_host

        h = detect_host()
        return f"{h.model_name} ({h.simd_summary})"
    except Exception:
        return "this host"


if __name__ == "__main__":
    sys.exit(main())
