"""``finetune.distill``: recovery fine-tuning of a pruned graph by distillation from the dense original.

One-shot pruning at high sparsity loses accuracy; training the surviving weights
a little while with the pruned positions held at zero recovers most of it
(Narang et al. 2017; Zhu & Gupta 2017).  With only an ONNX file and some inputs:

1. the current (pruned) graph becomes a torch module (``compressor.training.onnx2torch``:
   an interpreter over the ONNX nodes; unsupported ops are a UsageError listing them);
2. the teacher is the model as loaded, before any pass (``ctx.template``), run with
   onnxruntime on the fine-tuning inputs;
3. the student is trained to match the teacher (KL on softmax for classifier-like outputs,
   normalised MSE otherwise, plus cross-entropy when the data has ``labels``) for
   ``epochs`` epochs (at least ``min_steps`` optimizer steps: a 128-sample set is 4 steps an epoch)
   of Adam with a cosine learning rate, holding ``holdout`` of the samples out and keeping the
   epoch with the lowest loss on them (or the untrained weights); the keep-mask of every
   prunable weight (its non-zero positions) is re-applied after each step, so every
   zero stays exactly zero;
4. the trained values are written back into the graph's existing constants (same
   names, shapes, dtypes: the topology does not change), and the written graph is
   checked with onnxruntime against the torch module (max abs error) and scored
   (loss, top-1 agreement with the teacher, accuracy with labels).  If the loss got
   worse the original values are restored and a warning says so.

The metrics are measured on the fine-tuning data itself; held-out accuracy is what
``--eval`` reports.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs
import torch

from compressor import data as data_mod
from compressor import ir, runtime
from compressor.errors import PassError, UsageError
from compressor.pass_base import Pass, PassContext, PassResult
from compressor.verify import is_classifier_like

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistillConfig:
    data: str = ""  # .npz with one array per graph input (+ optional labels); "" = the --finetune option
    epochs: int = 3
    lr: float = 1e-3
    batch_size: int = 32
    temperature: float = 1.0
    seed: int = 0
    min_steps: int = 100  # at least this many optimizer steps (small data: more epochs than `epochs`)
    holdout: float = 0.125  # fraction of the data held out to keep the best epoch (0: keep the last)

    def __post_init__(self):
        if self.epochs < 1:
            raise UsageError(f"epochs must be >= 1, got {self.epochs}")
        if not 0.0 < self.lr < 1.0:
            raise UsageError(f"lr must be in (0, 1), got {self.lr}")
        if self.batch_size < 1:
            raise UsageError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.min_steps < 0 or not 0.0 <= self.holdout < 0.5:
            raise UsageError(f"min_steps must be >= 0 and holdout in [0, 0.5), got {self.min_steps}, {self.holdout}")
        if self.temperature <= 0:
            raise UsageError(f"temperature must be > 0, got {self.temperature}")


def _scores(runs: list[list[np.ndarray]], teacher: list[list[np.ndarray]], labels: np.ndarray | None) -> dict:
    out: dict = {}
    first = np.asarray(teacher[0][0])
    if is_classifier_like(first.shape, first.dtype):
        s = np.array([np.asarray(r[0]).reshape(-1, first.shape[-1]).argmax(-1) for r in runs])
        t = np.array([np.asarray(r[0]).reshape(-1, first.shape[-1]).argmax(-1) for r in teacher])
        out["agreement"] = round(float((s == t).mean()), 6)
        if labels is not None and s.shape[1] == 1:
            out["accuracy"] = round(float((s[:, 0] == labels).mean()), 6)
    return out


class FinetuneDistill(Pass):
    name = "finetune.distill"
    description = "recovery fine-tuning: train the pruned graph's weights (zeros kept) to match the dense original's outputs"
    Config = DistillConfig

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        from compressor.training.distill import distill
        from compressor.training.onnx2torch import OnnxModule
        from passes.sparsify_magnitude import prunable_weights

        cfg: DistillConfig = self.config
        path = cfg.data or ctx.finetune_data or ""
        if not path:
            raise UsageError("finetune.distill needs data: pass --finetune DATA.npz (or config data=PATH)")
        if ctx.template is None:
            raise PassError("finetune.distill needs the original model (ctx.template) as the teacher")
        student_model = ctx.export(graph)
        samples = data_mod.load_npz(Path(path), ir.input_specs(student_model), "--finetune")
        teacher_runs = runtime.run_all(runtime.session(ctx.template), samples.feeds)
        before_runs = runtime.run_all(runtime.session(student_model), samples.feeds)

        student = OnnxModule(student_model)
        trainable = student.named_onnx_parameters()
        masks, zeros_before, frozen_names = {}, 0, []
        for _, w in prunable_weights(graph):
            if w.name in trainable and w.name not in masks:
                p = trainable[w.name]
                m = p.detach() != 0
                masks[w.name] = (p, m)
                zeros_before += int((~m).sum())
                frozen_names.append(w.name)
        old_values = {name: np.asarray(c.values).copy() for name, c in
                      ((t.name, t) for t in graph.tensors().values() if isinstance(t, gs.Constant)) if name in trainable}
        res = distill(student, student.input_names, samples.feeds, teacher_runs, samples.labels, masks=masks,
                      epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, temperature=cfg.temperature, seed=cfg.seed,
                      min_steps=cfg.min_steps, holdout=cfg.holdout)
        warnings = [f"fine-tuning metrics are measured on the fine-tuning data itself ({len(samples.feeds)} samples); "
                    "held-out quality is what --eval reports"]
        if res.held_out and res.best_epoch == 0:
            warnings.append(f"fine-tuning did not lower the loss on the {res.held_out} held-out fine-tuning samples in "
                            f"{res.epochs} epochs: the weights from before fine-tuning were kept")
        elif res.held_out and res.best_epoch is not None and res.best_epoch < res.epochs:
            log.info("finetune.distill: kept epoch %d of %d (lowest held-out loss)", res.best_epoch, res.epochs)
        if not res.batched and len(samples.feeds) > 1:
            warnings.append("the graph does not run batched (e.g. a Reshape to a fixed batch of 1): fine-tuning ran "
                            "one sample at a time with accumulated gradients (same result, slower)")
        written = student.write_back(graph)

        # verify: zeros still zero, the written graph (onnxruntime) equals the torch module
        consts = {t.name: t for t in graph.tensors().values() if isinstance(t, gs.Constant)}
        for name, (_, m) in masks.items():
            vals = np.asarray(consts[name].values)
            if np.any(vals[~m.numpy()] != 0):
                raise PassError(f"finetune.distill: pruned positions of {name} are no longer zero")
        after_model = ctx.export(graph)
        after_runs = runtime.run_all(runtime.session(after_model), samples.feeds)
        k = min(4, len(samples.feeds))
        with torch.no_grad():
            torch_out = [student(*[torch.from_numpy(f[n]) for n in student.input_names]) for f in samples.feeds[:k]]
        torch_out = [o if isinstance(o, tuple) else (o,) for o in torch_out]
        err = max(float(np.abs(np.asarray(a) - b.numpy()).max()) for ra, rb in zip(after_runs[:k], torch_out) for a, b in zip(ra, rb))
        scale = max(1.0, max(float(np.abs(np.asarray(a)).max()) for ra in after_runs[:k] for a in ra))
        if err > 1e-3 * scale:
            raise PassError(f"finetune.distill: written graph differs from the trained torch module by {err:.3g} (onnxruntime)")

        sb, sa = _scores(before_runs, teacher_runs, samples.labels), _scores(after_runs, teacher_runs, samples.labels)
        stats = {"data": str(path), "samples": len(samples.feeds), "labels": samples.labels is not None,
                 **res.to_dict(), "weights_written": written, "masked_weights": len(masks),
                 "zeros_kept": zeros_before, "torch_vs_onnxruntime_max_abs": err}
        for key in ("agreement", "accuracy"):
            if key in sb:
                stats[f"{key}_before"], stats[f"{key}_after"] = sb[key], sa[key]
        modified = True
        if res.loss_after > res.loss_before:
            for name, vals in old_values.items():
                consts[name].values = vals
            warnings.append(f"fine-tuning did not lower the distillation loss ({res.loss_before:.4g} -> {res.loss_after:.4g}): "
                            "the weights from before fine-tuning were restored")
            stats["restored"] = True
            modified = False
        log.info("finetune.distill: loss %.5f -> %.5f in %.1f s", res.loss_before, res.loss_after, res.seconds)
        return PassResult(modified, stats, warnings)
