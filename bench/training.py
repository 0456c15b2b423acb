"""Training-time sparsity vs one-shot pruning, reproducing the seed papers' qualitative claims
on data that installs offline. Writes bench/training.md.

(a) a small CNN on scikit-learn's 8x8 digits (the architecture of models/train_digits.py);
(b) a GRU character-level language model on concatenated Python standard-library sources
    (bits per character on a held-out tail).

At 80% and 90% sparsity of the pruned layers it compares: dense; one-shot magnitude
(``sparsify.magnitude`` on the exported ONNX for the CNN); one-shot + recovery fine-tuning
(``finetune.distill`` on the ONNX for the CNN, ``compressor.training.distill`` in torch for
the GRU); gradual pruning during training (Narang et al.; Zhu & Gupta's cubic schedule for
the CNN too); scheduled grow-and-prune (GaP); for the CNN SSL (group lasso) + channel
removal with parameters and onnxruntime latency; and a dense smaller model with as many
parameters as the 90%-pruned one (Narang: the pruned larger model should win).

    .venv/bin/python -m bench.training            # full table (~10 min on 2 shared cores)
    .venv/bin/python -m bench.training --smoke    # seconds; prints, writes nothing unless --out
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from compressor import ir, runtime  # noqa: E402
from compressor.pass_base import PassContext, make_config  # noqa: E402
from compressor.pass_manager import PassManager  # noqa: E402
from compressor.training import GaPPruner, GradualPruner, GroupLasso, magnitude_keep_mask, prunable_parameters  # noqa: E402
from compressor.training.distill import distill  # noqa: E402
from models.build import export_onnx  # noqa: E402
from models.train_digits import load_split  # noqa: E402

SPARSITIES = (0.8, 0.9)
BPC_NOISE = 0.02  # bits per character treated as a tie (one seed)


@dataclass(frozen=True)
class Config:
    cnn_epochs: int = 30
    cnn_recovery_epochs: int = 5
    ssl_lambda: float = 3e-2
    lm_chars: int = 400_000
    lm_hidden: int = 128
    lm_embed: int = 32
    lm_seq: int = 48
    lm_batch: int = 32
    lm_steps: int = 700
    lm_recovery_steps: int = 150
    lm_eval_chars: int = 20_000


FULL = Config()
SMOKE = Config(cnn_epochs=2, cnn_recovery_epochs=1, lm_chars=20_000, lm_hidden=32, lm_seq=24, lm_batch=16,
               lm_steps=40, lm_recovery_steps=8, lm_eval_chars=2_000)


# ----------------------------------------------------------------------------------------- helpers

def count_nonzero(model: nn.Module) -> int:
    return int(sum(int((p != 0).sum()) for p in model.parameters()))


def pruned_sparsity(params: dict[str, nn.Parameter]) -> float:
    tot = sum(p.numel() for p in params.values())
    return 1.0 - sum(int((p != 0).sum()) for p in params.values()) / tot


def schedule_steps(total: int) -> dict[str, int]:
    """Narang et al. prune during the first ~60% of training and train the sparse model after."""
    return {"start_itr": int(0.1 * total), "ramp_itr": int(0.35 * total), "end_itr": int(0.6 * total),
            "freq": max(1, total // 100)}


# ------------------------------------------------------------------------------------------ (a) CNN

class DigitsNet(nn.Module):
    """models.train_digits.DigitsCNN with configurable widths (same module names)."""

    def __init__(self, c1: int = 16, c2: int = 32, hidden: int = 64):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1, bias=False), nn.BatchNorm2d(c1), nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1, bias=False), nn.BatchNorm2d(c2), nn.ReLU())
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(c2 * 64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


CNN_KEEP_DENSE = ["features.0", "classifier.3"]  # stem + classifier, as sparsify.magnitude's defaults


def train_cnn(data, epochs: int, net: DigitsNet | None = None, make_sp: Callable[[nn.Module, int], Any] | None = None,
              penalty: GroupLasso | None = None, seed: int = 0, lr: float = 2e-3) -> tuple[nn.Module, Any]:
    x_tr, y_tr = data[0], data[1]
    torch.manual_seed(seed)
    model = net if net is not None else DigitsNet()
    steps = epochs * math.ceil(len(x_tr) / 32)
    sp = make_sp(model, steps) if make_sp else None
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), 32):
            idx = perm[i:i + 32]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            if penalty is not None:
                loss = loss + penalty.penalty()
            loss.backward()
            opt.step()
            sched.step()
            if sp is not None:
                sp.step()
            if penalty is not None:
                penalty.step()
    return model.eval(), sp


def cnn_acc(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float((model.eval()(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def onnx_acc(model, x: np.ndarray, y: np.ndarray) -> float:
    sess = runtime.session(model)
    name = sess.get_inputs()[0].name
    return float(np.mean([int(sess.run(None, {name: x[i:i + 1]})[0].argmax()) == y[i] for i in range(len(x))]))


def run_passes(model, items):
    from passes import PASSES

    passes = [(PASSES.get(n)(make_config(PASSES.get(n), c)), "builtin:bench") for n, c in items]
    return PassManager(passes).run(model, PassContext(opset=17, template=model, options={}))


def ssl_shrink(model: DigitsNet) -> tuple[DigitsNet, tuple[int, int, int]]:
    """The smaller dense model: drop conv filters / hidden units whose weights, BN scale and shift
    (or bias) are all exactly zero. Such a channel outputs exactly 0, so the result is exact."""
    f, c = model.features, model.classifier
    k1 = ((f[0].weight.flatten(1) != 0).any(1) | (f[1].weight != 0) | (f[1].bias != 0)).nonzero().flatten()
    k2 = ((f[3].weight.flatten(1) != 0).any(1) | (f[4].weight != 0) | (f[4].bias != 0)).nonzero().flatten()
    kh = ((c[1].weight != 0).any(1) | (c[1].bias != 0)).nonzero().flatten()
    small = DigitsNet(len(k1), len(k2), len(kh)).eval()
    with torch.no_grad():
        sf, sc = small.features, small.classifier
        sf[0].weight.copy_(f[0].weight[k1])
        for src, dst, k in ((f[1], sf[1], k1), (f[4], sf[4], k2)):
            for a in ("weight", "bias", "running_mean", "running_var"):
                getattr(dst, a).copy_(getattr(src, a)[k])
        sf[3].weight.copy_(f[3].weight[k2][:, k1])
        cols = (k2[:, None] * 64 + torch.arange(64)[None, :]).flatten()  # flatten order: channel-major
        sc[1].weight.copy_(c[1].weight[kh][:, cols])
        sc[1].bias.copy_(c[1].bias[kh])
        sc[3].weight.copy_(c[3].weight[:, kh])
        sc[3].bias.copy_(c[3].bias)
    return small, (len(k1), len(k2), len(kh))


def bench_cnn(cfg: Config, log: Callable[[str], None]) -> dict[str, Any]:
    x_tr, y_tr, x_te, y_te = load_split()
    data = (x_tr, y_tr)
    res: dict[str, Any] = {"rows": [], "n_test": len(y_te)}
    t0 = time.perf_counter()
    dense, _ = train_cnn(data, cfg.cnn_epochs)
    dense_acc = cnn_acc(dense, x_te, y_te)
    dense_params = prunable_parameters(dense, exclude=CNN_KEEP_DENSE)
    n_prunable = sum(p.numel() for p in dense_params.values())
    res["rows"].append(("dense", 0.0, 0.0, count_nonzero(dense), dense_acc))
    log(f"cnn dense: acc {dense_acc:.4f} ({time.perf_counter() - t0:.1f} s)")
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "dense.onnx"
        export_onnx(dense, {"input": torch.from_numpy(x_te[:1])}, onnx_path, ["logits"])
        np.savez(Path(tmp) / "ft.npz", input=x_tr)  # inputs only: distillation needs no labels
        loaded = ir.load(onnx_path)
        from passes import CLEANUP_PIPELINE

        base = [(n, {}) for n in CLEANUP_PIPELINE]
        for s in SPARSITIES:
            t = time.perf_counter()
            one, recs = run_passes(loaded, base + [("sparsify.magnitude", {"sparsity": s})])
            res["rows"].append(("one-shot magnitude", s, s, _onnx_nonzero(one), onnx_acc(one, x_te, y_te)))
            rec_model, recs = run_passes(loaded, base + [("sparsify.magnitude", {"sparsity": s}),
                                                         ("finetune.distill", {"data": str(Path(tmp) / "ft.npz"),
                                                                               "epochs": cfg.cnn_recovery_epochs})])
            res["rows"].append((f"one-shot + recovery ({cfg.cnn_recovery_epochs} ep. distillation, no labels)", s, s,
                                _onnx_nonzero(rec_model), onnx_acc(rec_model, x_te, y_te)))
            log(f"cnn {s}: one-shot / +recovery done ({time.perf_counter() - t:.1f} s)")
        res["onnx_dense_nonzero"] = _onnx_nonzero(run_passes(loaded, base)[0])
    for s in SPARSITIES:
        for label, kind in (("gradual (Narang et al. threshold schedule)", "narang"), ("gradual (Zhu & Gupta cubic)", "cubic")):
            t = time.perf_counter()
            m, sp = train_cnn(data, cfg.cnn_epochs, make_sp=lambda mod, n, s=s, kind=kind: GradualPruner(
                mod, s, schedule=kind, exact_final=True, exclude=CNN_KEEP_DENSE, **schedule_steps(n)))
            res["rows"].append((label, s, sp.sparsity()["overall"], count_nonzero(m), cnn_acc(m, x_te, y_te)))
            log(f"cnn {s}: {kind} acc {res['rows'][-1][-1]:.4f} ({time.perf_counter() - t:.1f} s)")
            if s == 0.9 and kind == "narang":
                res["pruned90"] = (count_nonzero(m), res["rows"][-1][-1])
        t = time.perf_counter()
        m, sp = train_cnn(data, cfg.cnn_epochs, make_sp=lambda mod, n, s=s: GaPPruner(
            mod, s, period=max(1, int(0.8 * n) // 6), num_partitions=2, total_steps=int(0.8 * n), exclude=CNN_KEEP_DENSE))
        res["rows"].append(("GaP (2 partitions, 3 cycles, sparse from init)", s, sp.sparsity()["overall"], count_nonzero(m), cnn_acc(m, x_te, y_te)))
        log(f"cnn {s}: GaP acc {res['rows'][-1][-1]:.4f} ({time.perf_counter() - t:.1f} s)")
    # dense smaller model with the 90%-pruned model's parameter count
    target = res["pruned90"][0]
    best = min((abs(count_nonzero(DigitsNet(max(1, round(16 * f)), max(1, round(32 * f)), max(1, round(64 * f)))) - target), f)
               for f in np.linspace(0.05, 1.0, 400))[1]
    widths = (max(1, round(16 * best)), max(1, round(32 * best)), max(1, round(64 * best)))
    small, _ = train_cnn(data, cfg.cnn_epochs, net=DigitsNet(*widths))
    res["small"] = (widths, count_nonzero(small), cnn_acc(small, x_te, y_te))
    log(f"cnn dense small {widths}: acc {res['small'][2]:.4f}")
    # SSL: group lasso on conv filters and hidden units, zero the ~0 groups, fine-tune with them fixed, shrink
    t = time.perf_counter()
    net = DigitsNet()
    torch.manual_seed(0)
    gl = GroupLasso(net, cfg.ssl_lambda, structures=("filters",), linear_rows=True, norm_scales=True)
    m, _ = train_cnn(data, cfg.cnn_epochs, net=net, penalty=gl)
    n_zero = gl.zero_small_groups(1e-2)
    ssl_masks = _ssl_channel_masks(m)
    _apply(ssl_masks)
    ssl_acc_zeroed = cnn_acc(m, x_te, y_te)
    m, _ = train_cnn(data, max(1, cfg.cnn_epochs // 5), net=m, make_sp=lambda mod, n: _FixedMasks(ssl_masks), lr=5e-4)
    small_ssl, widths_ssl = ssl_shrink(m)
    ssl_acc = cnn_acc(m, x_te, y_te)
    assert abs(cnn_acc(small_ssl, x_te, y_te) - ssl_acc) < 1e-9, "channel removal must be exact"
    with tempfile.TemporaryDirectory() as tmp:
        export_onnx(dense, {"input": torch.from_numpy(x_te[:1])}, Path(tmp) / "d.onnx", ["logits"])
        export_onnx(small_ssl, {"input": torch.from_numpy(x_te[:1])}, Path(tmp) / "s.onnx", ["logits"])
        d_sess = runtime.session(ir.load(Path(tmp) / "d.onnx"), optimized=True)
        s_sess = runtime.session(ir.load(Path(tmp) / "s.onnx"), optimized=True)
        feed = {"input": x_te[:1]}
        lat = runtime.compare_latency({"dense": lambda: d_sess.run(None, feed), "ssl": lambda: s_sess.run(None, feed)})
        ssl_onnx_acc = onnx_acc(ir.load(Path(tmp) / "s.onnx"), x_te, y_te)
    res["ssl"] = {"lambda": cfg.ssl_lambda, "groups_zeroed": n_zero, "widths": widths_ssl,
                  "params": count_nonzero(small_ssl), "acc_zeroed": ssl_acc_zeroed, "acc": ssl_acc, "onnx_acc": ssl_onnx_acc,
                  "lat_dense": lat["dense"], "lat_ssl": lat["ssl"]}
    log(f"cnn SSL: widths {widths_ssl}, acc {ssl_acc:.4f} ({time.perf_counter() - t:.1f} s)")
    res["dense_params"] = count_nonzero(dense)
    res["n_prunable"] = n_prunable
    return res


def _onnx_nonzero(model) -> int:
    from onnx import numpy_helper

    return int(sum(int(np.count_nonzero(numpy_helper.to_array(i))) for i in model.graph.initializer
                   if numpy_helper.to_array(i).dtype.kind == "f"))


def _ssl_channel_masks(m: DigitsNet) -> dict[str, tuple[nn.Parameter, torch.Tensor]]:
    """After zero_small_groups: a zeroed conv filter also gets its BN scale/shift zeroed (a zeroed
    hidden unit its bias), so the channel outputs exactly 0 and can be removed exactly."""
    f, c = m.features, m.classifier
    out = {}
    for conv, bn, tag in ((f[0], f[1], "c1"), (f[3], f[4], "c2")):
        keep = (conv.weight.flatten(1) != 0).any(1) & (bn.weight != 0)
        out[f"{tag}.w"] = (conv.weight, keep[:, None, None, None].expand_as(conv.weight).clone())
        out[f"{tag}.g"] = (bn.weight, keep.clone())
        out[f"{tag}.b"] = (bn.bias, keep.clone())
    keep = (c[1].weight != 0).any(1)
    out["h.w"] = (c[1].weight, keep[:, None].expand_as(c[1].weight).clone())
    out["h.b"] = (c[1].bias, keep.clone())
    return out


@torch.no_grad()
def _apply(masks: dict[str, tuple[nn.Parameter, torch.Tensor]]) -> None:
    for p, k in masks.values():
        p.mul_(k.to(p.dtype))


class _FixedMasks:
    def __init__(self, masks):
        self.masks = masks

    def step(self) -> None:
        _apply(self.masks)


# ------------------------------------------------------------------------------------------ (b) GRU LM

def corpus(n_chars: int) -> str:
    """Python standard-library sources (sorted, top-level *.py), tabs as spaces, deterministic."""
    root = Path(os.__file__).resolve().parent
    parts, total = [], 0
    for p in sorted(root.glob("*.py")):
        text = p.read_text(encoding="utf-8", errors="replace").replace("\t", "    ")
        parts.append(text)
        total += len(text)
        if total >= n_chars:
            break
    return "".join(parts)[:n_chars]


VOCAB = ["\n"] + [chr(c) for c in range(32, 127)] + ["<unk>"]


def encode(text: str) -> np.ndarray:
    idx = {ch: i for i, ch in enumerate(VOCAB)}
    unk = len(VOCAB) - 1
    return np.array([idx.get(ch, unk) for ch in text], dtype=np.int64)


class CharGRU(nn.Module):
    def __init__(self, hidden: int, embed: int = 32, vocab: int = len(VOCAB)):
        super().__init__()
        self.emb = nn.Embedding(vocab, embed)
        self.gru = nn.GRU(embed, hidden, batch_first=True)
        self.out = nn.Linear(hidden, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        y, _ = self.gru(self.emb(tokens))
        return self.out(y)


def lm_batches(ids: np.ndarray, seq: int, batch: int, steps: int, seed: int):
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        starts = rng.integers(0, len(ids) - seq - 1, batch)
        x = np.stack([ids[s:s + seq] for s in starts])
        y = np.stack([ids[s + 1:s + seq + 1] for s in starts])
        yield torch.from_numpy(x), torch.from_numpy(y)


def train_lm(cfg: Config, ids: np.ndarray, hidden: int, make_sp: Callable[[nn.Module, int], Any] | None = None,
             seed: int = 0) -> tuple[nn.Module, Any]:
    torch.manual_seed(seed)
    model = CharGRU(hidden, cfg.lm_embed)
    sp = make_sp(model, cfg.lm_steps) if make_sp else None
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.lm_steps)
    for x, y in lm_batches(ids, cfg.lm_seq, cfg.lm_batch, cfg.lm_steps, seed):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if sp is not None:
            sp.step()
    return model.eval(), sp


@torch.no_grad()
def bpc(model: nn.Module, ids: np.ndarray, seq: int = 128) -> float:
    n = (len(ids) - 1) // seq
    x = torch.from_numpy(ids[:n * seq].reshape(n, seq))
    y = torch.from_numpy(ids[1:n * seq + 1].reshape(n, seq))
    loss = nn.functional.cross_entropy(model.eval()(x).flatten(0, 1), y.flatten())
    return float(loss) / math.log(2)


def lm_prunable(model: nn.Module) -> dict[str, nn.Parameter]:
    return prunable_parameters(model)  # gru.weight_ih_l0, gru.weight_hh_l0, out.weight (embedding not pruned)


def bench_lm(cfg: Config, log: Callable[[str], None]) -> dict[str, Any]:
    ids = encode(corpus(cfg.lm_chars + cfg.lm_eval_chars))
    tr, te = ids[:-cfg.lm_eval_chars], ids[-cfg.lm_eval_chars:]
    res: dict[str, Any] = {"rows": [], "chars": (len(tr), len(te))}
    t = time.perf_counter()
    dense, _ = train_lm(cfg, tr, cfg.lm_hidden)
    res["rows"].append(("dense", 0.0, 0.0, count_nonzero(dense), bpc(dense, te)))
    log(f"lm dense: {res['rows'][-1][-1]:.3f} bpc ({time.perf_counter() - t:.1f} s)")
    # fine-tuning inputs for recovery: training windows, teacher = the dense model
    rng = np.random.default_rng(1)
    starts = rng.integers(0, len(tr) - cfg.lm_seq - 1, cfg.lm_recovery_steps * cfg.lm_batch // 4)
    feeds = [{"tokens": tr[s:s + cfg.lm_seq][None, :]} for s in starts]
    with torch.no_grad():
        teacher = [[dense(torch.from_numpy(f["tokens"])).numpy()] for f in feeds]
    for s in SPARSITIES:
        one = CharGRU(cfg.lm_hidden, cfg.lm_embed)
        one.load_state_dict(dense.state_dict())
        params = lm_prunable(one)
        masks = {}
        with torch.no_grad():
            for n, p in params.items():
                m = magnitude_keep_mask(p, s)
                p.mul_(m)
                masks[n] = (p, m)
        res["rows"].append(("one-shot magnitude", s, pruned_sparsity(params), count_nonzero(one), bpc(one, te)))
        t = time.perf_counter()
        r = distill(one, ["tokens"], feeds, teacher, masks=masks, epochs=4, lr=1e-3, batch_size=cfg.lm_batch, classifier=[True])
        res["rows"].append((f"one-shot + recovery (distillation, {r.epochs} ep. on {len(feeds)} windows)", s,
                            pruned_sparsity(params), count_nonzero(one), bpc(one, te)))
        log(f"lm {s}: one-shot {res['rows'][-2][-1]:.3f}, +recovery {res['rows'][-1][-1]:.3f} ({time.perf_counter() - t:.1f} s)")
        t = time.perf_counter()
        m, sp = train_lm(cfg, tr, cfg.lm_hidden, make_sp=lambda mod, n, s=s: GradualPruner(
            mod, s, exact_final=True, **schedule_steps(n)))
        res["rows"].append(("gradual (Narang et al. threshold schedule)", s, sp.sparsity()["overall"], count_nonzero(m), bpc(m, te)))
        if s == 0.9:
            res["pruned90"] = (count_nonzero(m), res["rows"][-1][-1])
        log(f"lm {s}: gradual {res['rows'][-1][-1]:.3f} ({time.perf_counter() - t:.1f} s)")
        t = time.perf_counter()
        m, sp = train_lm(cfg, tr, cfg.lm_hidden, make_sp=lambda mod, n, s=s: GaPPruner(
            mod, s, period=max(1, int(0.8 * n) // 6), num_partitions=3, total_steps=int(0.8 * n)))
        res["rows"].append(("GaP (3 partitions = W, R, output; 2 cycles, sparse from init)", s, sp.sparsity()["overall"],
                            count_nonzero(m), bpc(m, te)))
        log(f"lm {s}: GaP {res['rows'][-1][-1]:.3f} ({time.perf_counter() - t:.1f} s)")
    target = res["pruned90"][0]
    h = min(range(4, cfg.lm_hidden + 1), key=lambda k: abs(count_nonzero(CharGRU(k, cfg.lm_embed)) - target))
    small, _ = train_lm(cfg, tr, h)
    res["small"] = (h, count_nonzero(small), bpc(small, te))
    log(f"lm dense small H={h}: {res['small'][2]:.3f} bpc")
    res["dense_params"] = count_nonzero(dense)
    return res


# ------------------------------------------------------------------------------------------ report

def _table(rows, metric: str, dense_val: float, better: str) -> list[str]:
    out = [f"| target | method | pruned-layer sparsity reached | non-zero params | {metric} | vs dense |", "|---|---|---|---|---|---|"]
    for name, target, s, nz, v in rows:
        d = v - dense_val
        out.append(f"| {target:.0%} | {name} | {s:.1%} | {nz:,} | {v:.4f} | {d:+.4f} |")
    return out


def _compare(a: float, b: float, higher_better: bool, noise: float) -> str:
    """'beats' / 'ties with (within noise)' / 'loses to'."""
    d = (a - b) if higher_better else (b - a)
    return "beats" if d > noise else "loses to" if d < -noise else "ties with (within noise)"


def _verdict(rows, s: float, higher_better: bool, noise: float) -> list[str]:
    def get(prefix):
        vals = [v for n, target, _, _, v in rows if n.startswith(prefix) and target == s]
        return vals[0] if vals else None

    one, rec, grad, gap = get("one-shot magnitude"), get("one-shot + recovery"), get("gradual (Narang"), get("GaP")
    out = []
    for label, v in (("gradual", grad), ("GaP", gap), ("one-shot + recovery", rec)):
        if v is not None and one is not None:
            out.append(f"{label} {_compare(v, one, higher_better, noise)} one-shot magnitude at {s:.0%}")
    for label, v in (("gradual", grad), ("GaP", gap)):
        if v is not None and rec is not None:
            out.append(f"{label} {_compare(v, rec, higher_better, noise)} one-shot + recovery at {s:.0%}")
    return out


def report(cfg: Config, cnn: dict[str, Any], lm: dict[str, Any], seconds: float, smoke: bool) -> str:
    import platform

    L = ["# Training-time sparsity vs one-shot pruning (bench/training.py)", "",
         f"Generated by `.venv/bin/python -m bench.training{' --smoke' if smoke else ''}` in {seconds:.0f} s on "
         f"{platform.machine()} ({torch.get_num_threads()} torch thread), torch {torch.__version__}. One seed per row: "
         f"differences below ~1 point of digits accuracy (n={cnn['n_test']}: one sample = {1 / cnn['n_test']:.2%}) "
         "or ~0.02 bpc are noise.", ""]
    L += ["## (a) CNN on scikit-learn digits", "",
          f"DigitsCNN (conv 16, conv 32, fc 64, fc 10) trained {cfg.cnn_epochs} epochs (Adam, cosine). Pruned layers: "
          f"conv2 and fc1 ({cnn['n_prunable']:,} weights); the stem conv and the classifier stay dense in every row "
          "(sparsify.magnitude's defaults). One-shot rows go through the ONNX pipeline (`sparsify.magnitude`, "
          "`finetune.distill` with the training inputs and no labels; params counted on the BN-folded graph); "
          "the others train in torch with `compressor.training`.", ""]
    dense_acc = cnn["rows"][0][-1]
    L += _table(cnn["rows"], "test accuracy", dense_acc, "higher")
    w, nz, acc = cnn["small"]
    L += ["", f"**Pruned larger vs dense smaller** (Narang): gradual 90% model, {cnn['pruned90'][0]:,} non-zero params, "
          f"accuracy {cnn['pruned90'][1]:.4f}; dense DigitsCNN with widths {w} and {nz:,} params: {acc:.4f} -> "
          f"{'pruned larger wins' if cnn['pruned90'][1] > acc else 'pruned larger does NOT win' if cnn['pruned90'][1] < acc else 'tie'}.", ""]
    s = cnn["ssl"]
    L += ["**SSL + channel removal** (group lasso over conv filters and fc1 rows, lambda "
          f"{s['lambda']:g}; groups with norm <= 1% of the layer's largest set to zero together with their BN "
          "scale/shift or bias, 20% more epochs with those fixed, then the zero channels removed, which is exact):", "",
          "| model | channels conv1/conv2/fc1 | params | test accuracy | onnxruntime latency (batch 1) |",
          "|---|---|---|---|---|",
          f"| dense | 16/32/64 | {cnn['dense_params']:,} | {dense_acc:.4f} | {s['lat_dense'] * 1e6:.1f} us |",
          f"| SSL, smaller dense model | {'/'.join(map(str, s['widths']))} | {s['params']:,} ({s['params'] / cnn['dense_params']:.2f}x) | "
          f"{s['onnx_acc']:.4f} (right after zeroing: {s['acc_zeroed']:.4f}) | {s['lat_ssl'] * 1e6:.1f} us ({s['lat_dense'] / s['lat_ssl']:.2f}x faster) |",
          "", "Channel removal is done on the torch model (`ssl_shrink`): `prune.channels` ranks channels by a "
          "criterion at a requested ratio rather than removing exactly the zero groups, so it is not used here.", ""]
    L += ["## (b) GRU character-level language model on Python stdlib sources", "",
          f"Embedding {cfg.lm_embed} -> GRU {cfg.lm_hidden} -> Linear to {len(VOCAB)} chars; {lm['chars'][0]:,} training / "
          f"{lm['chars'][1]:,} held-out characters; {cfg.lm_steps} steps of {cfg.lm_batch}x{cfg.lm_seq} (Adam, cosine, clip 1). "
          "Pruned: GRU input and recurrent weights and the output layer (Narang et al.); the embedding stays dense. "
          "Metric: bits per character on the held-out tail (lower is better).", ""]
    L += _table(lm["rows"], "test bpc", lm["rows"][0][-1], "lower")
    h, nz, v = lm["small"]
    L += ["", f"**Pruned larger vs dense smaller**: gradual 90% GRU-{cfg.lm_hidden}, {lm['pruned90'][0]:,} non-zero params, "
          f"{lm['pruned90'][1]:.3f} bpc; dense GRU-{h} with {nz:,} params: {v:.3f} bpc -> "
          f"{'pruned larger wins' if lm['pruned90'][1] < v else 'pruned larger does NOT win'}.", ""]
    L += ["## Verdicts (computed from the tables above)", ""]
    acc_noise = 1.5 / cnn["n_test"]
    L += [f"(noise band: {acc_noise:.2%} accuracy = 1.5 test samples; {BPC_NOISE} bpc)", ""]
    for s_ in SPARSITIES:
        L += [f"- CNN: {x}" for x in _verdict(cnn["rows"], s_, True, acc_noise)]
        L += [f"- GRU: {x}" for x in _verdict(lm["rows"], s_, False, BPC_NOISE)]
    cnn_pl = _compare(cnn["pruned90"][1], cnn["small"][2], True, acc_noise)
    lm_pl = _compare(lm["pruned90"][1], lm["small"][2], False, BPC_NOISE)
    L += [f"- CNN: the 90%-pruned larger model {cnn_pl} the dense smaller one of equal size",
          f"- GRU: the 90%-pruned larger model {lm_pl} the dense smaller one of equal size"]
    L += ["", "## Where this differs from the papers, and why", "",
          "- Scale: the papers train Deep Speech 2 / ResNet-50 for days; here models have 10^4-10^5 weights and train "
          "for seconds. Narang et al.'s 7-9% relative gain of gradual over hard pruning is measured *at equal training "
          "budget from scratch*; our one-shot rows start from a fully trained dense model, and with recovery "
          "fine-tuning they get extra training, which narrows or reverses the gap on a task as easy as 8x8 digits.",
          "- Narang et al. pick theta from q, the weight magnitude at the target percentile of a trained model; we "
          "compute q per layer at start_itr (no pre-training) and, for comparisons at equal parameter count, prune "
          "any layer still short of the target up to it at end_itr (`exact_final`). With few iterations the paper's "
          "+1 terms also push the final threshold slightly above q (sparsity a little above the target).",
          "- GaP: Ma et al. partition ResNet/Transformer blocks and run many cycles over hundreds of epochs; we use "
          "2-3 partitions (one per pruned layer) and 2-3 cycles, then train the sparse model for the last 20% of steps.",
          "- SSL: Wen et al. report speedups of whole AlexNet conv layers; here the model is tiny, so onnxruntime's "
          "per-op overhead limits the measured latency gain even when parameters drop several-fold.",
          *([f"- Pruned larger vs dense smaller: the 90%-sparse GRU-{cfg.lm_hidden} {lm_pl} a dense GRU of equal size, "
             "unlike Narang et al., who compare GRUs of 1760-3072 units trained for many epochs. Ours trains "
             f"{cfg.lm_steps} steps, so the sparse model is undertrained (its mask is final at 60% of the steps) "
             "while a small dense GRU converges faster per step; pruning the 97-way output layer to 90% also costs "
             "more at this size than in a speech model."] if lm_pl != "beats" else []),
          *(["- Digits is nearly saturated: every training-time row matches the dense model within noise, so the "
             "ordering among gradual / cubic / GaP is not resolved by this data set; the GRU rows separate them."]
            if all(abs(v - dense_acc) <= acc_noise for n, t, _, _, v in cnn["rows"] if t and not n.startswith("one-shot"))
            else []),
          "- The GRU recovery row is run in torch (`compressor.training.distill`, KL per position) rather than through "
          "the ONNX path, to keep the run short; the CNN rows use the real `finetune.distill` pass on ONNX.", ""]
    return "\n".join(L) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny configuration (< 60 s); writes only with --out")
    ap.add_argument("--out", type=Path, default=None, help="markdown output (default: bench/training.md for the full run)")
    a = ap.parse_args(argv)
    cfg = SMOKE if a.smoke else FULL
    out = a.out if a.out is not None else (None if a.smoke else REPO / "bench" / "training.md")
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)  # noqa: E731
    cnn = bench_cnn(cfg, log)
    lm = bench_lm(cfg, log)
    text = report(cfg, cnn, lm, time.perf_counter() - t0, a.smoke)
    print(text)
    if out is not None:
        out.write_text(text)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
