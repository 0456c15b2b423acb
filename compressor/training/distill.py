"""Recovery fine-tuning by knowledge distillation (Hinton et al. 2015) with fixed masks.

The student (a pruned model as a torch module) learns to reproduce the teacher's
(the dense original's) outputs on the fine-tuning inputs:

    classifier-like output (``[N, C]``):  KL(softmax(t / T) || softmax(s / T)) * T^2
    any other output:                     mean((s - t)^2) / mean(t^2)
    with labels:                          + cross-entropy(s_0, labels)   (first output)

After every optimizer step the masks are multiplied into the weights, so a
pruned weight stays exactly zero.  Models exported with a static batch of 1 are
run batched when the graph allows it (checked numerically on two samples);
otherwise one sample at a time with the gradient accumulated over the minibatch.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from compressor.verify import is_classifier_like

log = logging.getLogger(__name__)


@dataclass
class DistillResult:
    epochs: int
    seconds: float
    batched: bool | str  # True: one batch, "vmap": vectorized over samples, False: one sample at a time
    loss_before: float
    loss_after: float
    losses: list[float] = field(default_factory=list)  # mean training loss per epoch
    steps: int = 0
    held_out: int = 0  # samples kept out of training to pick the epoch (0: none, the last epoch is kept)
    val_before: float | None = None  # held-out loss before training
    val_losses: list[float] = field(default_factory=list)  # held-out loss after each epoch
    best_epoch: int | None = None  # the epoch whose weights were kept (0 = before training)
    lr: float | None = None  # the learning rate of the run whose epochs are reported
    lr_backoffs: list[float] = field(default_factory=list)  # rates abandoned after a first epoch that hurt the held-out loss

    def to_dict(self) -> dict[str, Any]:
        out = {"epochs": self.epochs, "steps": self.steps, "seconds": round(self.seconds, 3), "batched": self.batched,
               "loss_before": round(self.loss_before, 6), "loss_after": round(self.loss_after, 6),
               "loss_per_epoch": [round(v, 6) for v in self.losses]}
        if self.lr is not None:
            out["lr"] = self.lr
        if self.lr_backoffs:
            out["lr_backoffs"] = self.lr_backoffs
        if self.held_out:
            out.update(held_out=self.held_out, held_out_loss_before=round(self.val_before or 0.0, 6),
                       held_out_loss_per_epoch=[round(v, 6) for v in self.val_losses], best_epoch=self.best_epoch)
        return out


LR_BACKOFFS = 2  # at most two restarts at lr / 10
LR_FLOOR = 1e-6


def _outs(y: Any) -> tuple[torch.Tensor, ...]:
    return y if isinstance(y, tuple) else (y,)


class _Runner:
    """Feeds stacked samples to the student: as one batch when the graph allows it, else vectorized over
    samples with ``torch.func.vmap`` (each sample sees the batch-1 graph, so constants that bake batch 1 in
    -- a Reshape target, the gather indices of a transformers 5 attention-mask export -- stay right), else
    one sample at a time. Each mode is checked numerically against single-sample runs on two samples."""

    def __init__(self, student: nn.Module, input_names: list[str], feeds: list[dict[str, np.ndarray]]):
        self.student = student
        self.names = input_names
        self.x = {n: torch.from_numpy(np.stack([f[n] for f in feeds])) for n in input_names}  # [N, *model shape]
        self.mode = "single"
        if len(feeds) >= 2:
            if all(self.x[n].dim() >= 2 and self.x[n].shape[1] == 1 for n in input_names) and self._ok(self._forward_batched, "batched"):
                self.mode = "batched"
            elif self._ok(self._forward_vmap, "vmap"):
                self.mode = "vmap"
        if self.mode == "single":
            log.info("student runs one sample at a time")

    @property
    def batched(self) -> str | bool:
        """False (one sample at a time), True (one batch) or "vmap"."""
        return {"single": False, "batched": True}.get(self.mode, self.mode)

    def _ok(self, fwd, what: str) -> bool:
        idx = torch.arange(2)
        try:
            with torch.no_grad():
                both = fwd(idx)
                single = [self._forward_single(idx[i:i + 1]) for i in range(2)]
        except Exception as exc:  # the graph bakes in batch 1 (e.g. a Reshape to [1, ...]); an op vmap cannot take
            log.info("student: %s run failed: %s", what, str(exc)[:120])
            return False
        for k, b in enumerate(both):
            ref = torch.cat([s[k] for s in single])
            if b.shape != ref.shape or not torch.allclose(b, ref, rtol=1e-4, atol=1e-5):
                log.info("student: %s outputs differ from single-sample runs", what)
                return False
        return True

    def _forward_batched(self, idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
        args = [self.x[n][idx].flatten(0, 1) for n in self.names]
        return _outs(self.student(*args))

    def _forward_vmap(self, idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = _outs(torch.func.vmap(lambda *a: self.student(*a))(*[self.x[n][idx] for n in self.names]))
        return tuple(o.flatten(0, 1) if o.dim() >= 2 else o for o in outs)

    def _forward_single(self, idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = [_outs(self.student(*[self.x[n][int(i)] for n in self.names])) for i in idx]
        return tuple(torch.cat([o[k] for o in outs]) for k in range(len(outs[0])))

    def __call__(self, idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Outputs for samples ``idx``, each concatenated along axis 0."""
        if self.mode == "batched":
            return self._forward_batched(idx)
        if self.mode == "vmap":
            return self._forward_vmap(idx)
        return self._forward_single(idx)


def distill_loss(student_out: tuple[torch.Tensor, ...], teacher_out: list[torch.Tensor], classifier: list[bool],
                 labels: torch.Tensor | None, temperature: float = 1.0) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float32)
    for s, t, cls in zip(student_out, teacher_out, classifier):
        if cls:
            s2, t2 = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
            logp_s = F.log_softmax(s2 / temperature, -1)
            logp_t = F.log_softmax(t2 / temperature, -1)
            total = total + F.kl_div(logp_s, logp_t, reduction="batchmean", log_target=True) * temperature ** 2
        else:
            total = total + F.mse_loss(s, t) / t.pow(2).mean().clamp_min(1e-12)
    if labels is not None:
        s0 = student_out[0].reshape(-1, student_out[0].shape[-1])
        total = total + F.cross_entropy(s0, labels)
    return total


def distill(student: nn.Module, input_names: list[str], feeds: list[dict[str, np.ndarray]],
            teacher_runs: list[list[np.ndarray]], labels: np.ndarray | None = None, *,
            masks: dict[str, tuple[nn.Parameter, torch.Tensor]] | None = None, epochs: int = 3, lr: float = 1e-3,
            batch_size: int = 32, temperature: float = 1.0, seed: int = 0,
            classifier: list[bool] | None = None, min_steps: int = 0, holdout: float = 0.0) -> DistillResult:
    """Fine-tune ``student`` in place. ``teacher_runs[i]`` are the teacher's outputs on ``feeds[i]``;
    ``masks``: name -> (parameter, keep mask) re-applied after every step; ``classifier``: per
    output, KL on softmax over the last axis (True) or normalised MSE (False); default: detected
    (``verify.is_classifier_like``).

    ``min_steps``: at least this many optimizer steps (more epochs than ``epochs`` when the data is
    small: 128 samples at batch 32 are 4 steps an epoch). ``holdout``: that fraction of the samples
    (at least 4, only when 16 or more are given) is not trained on; after every epoch the loss on
    them is measured and the weights of the best epoch (or the untrained ones) are kept, so a small
    fine-tuning set cannot overfit the student away from the teacher."""
    t0 = time.perf_counter()
    masks = masks or {}
    n_all = len(feeds)
    n_val = max(4, int(round(holdout * n_all))) if holdout > 0 and n_all >= 16 else 0
    order = np.random.default_rng(seed).permutation(n_all)
    val_ix, train_ix = sorted(order[:n_val].tolist()), sorted(order[n_val:].tolist())
    val_feeds = [feeds[i] for i in val_ix]
    val_teacher = [teacher_runs[i] for i in val_ix]
    feeds = [feeds[i] for i in train_ix]
    teacher_runs = [teacher_runs[i] for i in train_ix]
    val_labels = labels[val_ix] if labels is not None and n_val else None
    labels = labels[train_ix] if labels is not None else None
    runner = _Runner(student, input_names, feeds)
    n = len(feeds)
    teacher = [torch.from_numpy(np.concatenate([np.asarray(r[k]) for r in teacher_runs])) for k in range(len(teacher_runs[0]))]
    classifier = classifier if classifier is not None else [is_classifier_like(tuple(np.asarray(teacher_runs[0][k]).shape), np.asarray(teacher_runs[0][k]).dtype)
                  for k in range(len(teacher))]
    per_sample_rows = [int(np.asarray(teacher_runs[0][k]).shape[0]) if np.asarray(teacher_runs[0][k]).ndim else 1 for k in range(len(teacher))]
    y = torch.from_numpy(labels.astype(np.int64)) if labels is not None else None

    def rows(k: int, idx: torch.Tensor) -> torch.Tensor:
        r = per_sample_rows[k]
        return teacher[k].reshape(n, r, *teacher[k].shape[1:])[idx].flatten(0, 1)

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        out = runner(idx)
        return distill_loss(out, [rows(k, idx) for k in range(len(teacher))], classifier,
                            None if y is None or not classifier[0] or per_sample_rows[0] != 1 else y[idx], temperature)

    @torch.no_grad()
    def full_loss() -> float:
        tot = 0.0
        for i in range(0, n, max(batch_size, 64)):
            idx = torch.arange(i, min(n, i + max(batch_size, 64)))
            tot += float(batch_loss(idx)) * len(idx)
        return tot / n

    @torch.no_grad()
    def apply() -> None:
        for p, m in masks.values():
            p.mul_(m.to(p.dtype))

    val_state = ((_Runner(student, input_names, val_feeds),  # built once: its batching check runs the model
                  [torch.from_numpy(np.concatenate([np.asarray(r[k]) for r in val_teacher])) for k in range(len(teacher))],
                  torch.from_numpy(val_labels.astype(np.int64)) if val_labels is not None else None) if n_val else None)

    @torch.no_grad()
    def val_loss() -> float:
        if not n_val:
            return 0.0
        vr, vt, vy = val_state
        tot = 0.0
        for i in range(0, n_val, max(batch_size, 64)):
            idx = torch.arange(i, min(n_val, i + max(batch_size, 64)))
            tgt = [vt[k].reshape(n_val, per_sample_rows[k], *vt[k].shape[1:])[idx].flatten(0, 1) for k in range(len(vt))]
            tot += float(distill_loss(vr(idx), tgt, classifier,
                                      None if vy is None or not classifier[0] or per_sample_rows[0] != 1 else vy[idx],
                                      temperature)) * len(idx)
        return tot / n_val

    apply()
    before = full_loss()
    steps_per_epoch = (n + batch_size - 1) // batch_size
    epochs = max(epochs, -(-min_steps // steps_per_epoch)) if min_steps else epochs
    val_before = val_loss()
    best = (val_before, 0, {k: v.detach().clone() for k, v in student.state_dict().items()}) if n_val else None
    params = [p for p in student.parameters() if p.requires_grad]
    backoffs: list[float] = []  # learning rates given up because the first epoch made the held-out loss worse
    while True:
        opt = torch.optim.Adam(params, lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * steps_per_epoch))
        gen = torch.Generator().manual_seed(seed)
        losses, val_losses = [], []
        restart = False
        for ep in range(epochs):
            perm = torch.randperm(n, generator=gen)
            tot = 0.0
            for i in range(0, n, batch_size):
                idx = perm[i:i + batch_size]
                opt.zero_grad()
                loss = batch_loss(idx)
                loss.backward()
                opt.step()
                sched.step()
                apply()
                tot += float(loss.detach()) * len(idx)
            losses.append(tot / n)
            if n_val:
                val_losses.append(val_loss())
                if val_losses[-1] < best[0]:
                    best = (val_losses[-1], ep + 1, {k: v.detach().clone() for k, v in student.state_dict().items()})
            log.info("fine-tune epoch %d/%d (lr %g): loss %.5f%s", ep + 1, epochs, lr, losses[-1],
                     f", held-out {val_losses[-1]:.5f}" if n_val else "")
            # a step size too large for these weights (a pretrained transformer at Adam 1e-3: the held-out loss
            # 10x the untrained one after the first epoch): start again from the untrained weights at lr / 10
            # (``best`` still holds them: nothing beat the untrained held-out loss)
            if ep == 0 and n_val and val_losses[-1] > val_before and len(backoffs) < LR_BACKOFFS and lr / 10 >= LR_FLOOR:
                backoffs.append(lr)
                lr /= 10
                student.load_state_dict(best[2])
                restart = True
                break
        if not restart:
            break
    if best is not None:
        student.load_state_dict(best[2])
    after = full_loss()
    return DistillResult(epochs, time.perf_counter() - t0, runner.batched, before, after, losses, epochs * steps_per_epoch,
                         n_val, val_before if n_val else None, val_losses, best[1] if best is not None else None,
                         lr, backoffs)
