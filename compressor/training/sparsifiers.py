"""Training-time sparsifiers for any ``torch.nn.Module`` with Linear / Conv /
GRU / LSTM / RNN layers.

All sparsifiers share one small API::

    sp = GradualPruner(model, sparsity=0.9, start_itr=200, ramp_itr=600, end_itr=1000, freq=50)
    for batch in data:
        loss = ...; opt.zero_grad(); loss.backward(); opt.step()
        sp.step()                 # after optimizer.step(): update masks on schedule, re-apply them
    sp.masks                      # {param name: bool tensor}, True = kept
    sp.sparsity()                 # {"overall": s, "layers": {name: s}}

Pruned are the weights of Linear/Conv (``weight``) and of recurrent layers
(``weight_ih*`` / ``weight_hh*``), never biases or normalisation parameters
(Narang et al. 2017).  Masks are multiplied into the weights after every
optimizer step, so a pruned weight is exactly zero whatever the optimizer's
momentum does; when exported to ONNX the zeros are ordinary zeros in the
initializers and the rest of the pipeline lowers them.

* ``GradualPruner``: Narang et al.'s per-layer monotone threshold schedule
  (``schedule="narang"``, see ``schedules.NarangSchedule``) or Zhu & Gupta's
  cubic sparsity schedule (``schedule="cubic"``).
* ``GaPPruner``: scheduled grow-and-prune (Ma et al. 2021).  The layers are split
  into ``num_partitions`` consecutive partitions; all start sparse (magnitude at
  initialisation, no dense pre-training) except one that is dense.  Every
  ``period`` steps the dense partition is pruned back to the target sparsity by
  magnitude and the next partition (cyclically) is grown to dense (its pruned
  weights re-enter training from zero).  ``finalize()`` (or reaching
  ``total_steps``) prunes the last dense partition, so every layer ends at
  exactly the target sparsity.
"""
from __future__ import annotations

import fnmatch
import logging
from typing import Iterable

import numpy as np
import torch
from torch import nn

from compressor.errors import UsageError
from compressor.training.schedules import CubicSchedule, NarangSchedule

log = logging.getLogger(__name__)

_WEIGHT_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_RECURRENT = (nn.RNNBase, nn.RNNCellBase)


def prunable_parameters(model: nn.Module, exclude: Iterable[str] = (), min_elements: int = 0) -> dict[str, nn.Parameter]:
    """Weights a sparsifier prunes, by qualified parameter name, in module order.

    Linear/Conv ``weight``; GRU/LSTM/RNN (and cells) ``weight_ih*`` and ``weight_hh*``.
    ``exclude``: globs on the parameter or module name."""
    found: dict[str, nn.Parameter] = {}
    for mod_name, mod in model.named_modules():
        if isinstance(mod, _WEIGHT_MODULES):
            names = ["weight"]
        elif isinstance(mod, _RECURRENT):
            names = [n for n, _ in mod.named_parameters(recurse=False) if n.startswith(("weight_ih", "weight_hh"))]
        else:
            continue
        for n in names:
            p = getattr(mod, n, None)
            if not isinstance(p, nn.Parameter):
                continue
            full = f"{mod_name}.{n}" if mod_name else n
            if any(fnmatch.fnmatch(full, g) or fnmatch.fnmatch(mod_name, g) for g in exclude):
                continue
            if p.numel() < min_elements:
                continue
            found[full] = p
    return found


def magnitude_keep_mask(w: torch.Tensor, sparsity: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Keep-mask with exactly round(sparsity * numel) False entries; already-masked
    entries (``mask`` False) are pruned first, so masks only ever shrink as sparsity rises."""
    n = w.numel()
    k = int(round(sparsity * n))
    score = w.detach().abs().flatten().double()
    if mask is not None:
        score = torch.where(mask.flatten(), score, torch.full_like(score, -1.0))
    keep = torch.ones(n, dtype=torch.bool, device=w.device)
    if k > 0:
        order = torch.from_numpy(np.argsort(score.cpu().numpy(), kind="stable")).to(w.device)
        keep[order[:k]] = False
    return keep.view_as(w)


class Sparsifier:
    """Common state: the pruned parameters, their masks and the iteration counter."""

    def __init__(self, model: nn.Module, sparsity: float, exclude: Iterable[str] = (), min_elements: int = 0,
                 params: dict[str, nn.Parameter] | None = None):
        if not 0.0 <= sparsity < 1.0:
            raise UsageError(f"sparsity must be in [0, 1), got {sparsity}")
        self.model = model
        self.target = float(sparsity)
        self.params = dict(params) if params is not None else prunable_parameters(model, exclude, min_elements)
        if not self.params:
            raise UsageError("no prunable Linear/Conv/recurrent weights found in the model")
        self.masks: dict[str, torch.Tensor] = {n: torch.ones_like(p, dtype=torch.bool) for n, p in self.params.items()}
        self.itr = 0

    @torch.no_grad()
    def apply_masks(self) -> None:
        for n, p in self.params.items():
            p.mul_(self.masks[n].to(p.dtype))

    def mask_gradients(self) -> None:
        """Optional: zero the gradients of pruned weights (call between backward() and step())."""
        for n, p in self.params.items():
            if p.grad is not None:
                p.grad.mul_(self.masks[n].to(p.grad.dtype))

    def sparsity(self) -> dict:
        layers = {n: round(1.0 - m.sum().item() / m.numel(), 6) for n, m in self.masks.items()}
        total = sum(m.numel() for m in self.masks.values())
        zeros = sum(m.numel() - m.sum().item() for m in self.masks.values())
        return {"overall": round(zeros / total, 6), "layers": layers, "params": int(total), "kept": int(total - zeros)}

    def update_masks(self, itr: int) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def step(self) -> None:
        """Call after ``optimizer.step()``: update masks if the schedule says so, then apply them."""
        self.update_masks(self.itr)
        self.apply_masks()
        self.itr += 1


class GradualPruner(Sparsifier):
    """Gradual magnitude pruning during training.

    ``schedule="narang"``: per-layer threshold eps(itr) = NarangSchedule.threshold, with
    theta from the paper's heuristic computed per layer at ``start_itr`` (q = the layer's
    |w| at the target percentile then), phi = 1.5 theta, unless ``theta``/``phi`` are given.
    Because weights keep moving after start_itr the reached sparsity is close to, not exactly,
    the target; ``exact_final=True`` prunes each layer still below the target up to exactly
    the target at end_itr by magnitude (a deviation from the paper, for comparisons at equal
    parameter count); a layer the threshold took past the target stays there (masks never regrow).
    ``schedule="cubic"``: Zhu & Gupta, exact per-layer sparsity at every update."""

    def __init__(self, model: nn.Module, sparsity: float, start_itr: int, end_itr: int, ramp_itr: int | None = None,
                 freq: int = 100, schedule: str = "narang", theta: float | None = None, phi: float | None = None,
                 exact_final: bool = False, exclude: Iterable[str] = (), min_elements: int = 0,
                 params: dict[str, nn.Parameter] | None = None):
        super().__init__(model, sparsity, exclude, min_elements, params)
        if schedule == "narang":
            ramp = ramp_itr if ramp_itr is not None else start_itr + (end_itr - start_itr) // 2
            self.schedule: NarangSchedule | CubicSchedule = NarangSchedule(start_itr, ramp, end_itr, freq)
        elif schedule == "cubic":
            self.schedule = CubicSchedule(start_itr, end_itr, freq)
        else:
            raise UsageError(f"schedule must be 'narang' or 'cubic', got {schedule!r}")
        if (theta is not None and theta <= 0) or (phi is not None and phi <= 0):
            raise UsageError("theta and phi must be > 0")
        self.kind = schedule
        self.exact_final = exact_final
        self._theta_given, self._phi_given = theta, phi
        self.theta: dict[str, float] = {}
        self.phi: dict[str, float] = {}
        self.thresholds: dict[str, float] = {n: 0.0 for n in self.params}

    def _init_slopes(self) -> None:
        for n, p in self.params.items():
            a = np.sort(p.detach().abs().flatten().cpu().numpy().astype(np.float64))
            k = int(round(self.target * a.size))
            # q: a magnitude with exactly k weights strictly below it (midpoint between the k-th and k+1-th)
            q = 0.0 if k == 0 else (a[k - 1] + a[min(k, a.size - 1)]) / 2.0 if k < a.size else a[-1] * (1 + 1e-6)
            th = self._theta_given if self._theta_given is not None else self.schedule.theta_for(q)
            self.theta[n] = th
            self.phi[n] = self._phi_given if self._phi_given is not None else 1.5 * th

    @torch.no_grad()
    def update_masks(self, itr: int) -> None:
        if not self.schedule.is_update(itr):
            return
        if self.kind == "narang":
            if not self.theta:
                self._init_slopes()
            for n, p in self.params.items():
                eps = self.schedule.threshold(itr, self.theta[n], self.phi[n])
                self.thresholds[n] = max(self.thresholds[n], eps)
                self.masks[n] &= p.detach().abs() >= self.thresholds[n]
        else:
            s = self.schedule.sparsity(itr, self.target)
            for n, p in self.params.items():
                self.masks[n] = magnitude_keep_mask(p, s, self.masks[n])
        if itr == self.schedule.end_itr and self.exact_final and self.kind == "narang":
            for n, p in self.params.items():
                if int((~self.masks[n]).sum()) < round(self.target * p.numel()):  # never regrow: only prune up
                    self.masks[n] = magnitude_keep_mask(p * self.masks[n], self.target, self.masks[n])
        log.debug("itr %d: masks updated, sparsity %.4f", itr, self.sparsity()["overall"])


class GaPPruner(Sparsifier):
    """Scheduled grow-and-prune (cyclic): see the module docstring."""

    def __init__(self, model: nn.Module, sparsity: float, period: int, num_partitions: int = 4,
                 partitions: list[list[str]] | None = None, total_steps: int | None = None,
                 exclude: Iterable[str] = (), min_elements: int = 0, params: dict[str, nn.Parameter] | None = None):
        super().__init__(model, sparsity, exclude, min_elements, params)
        if period < 1:
            raise UsageError(f"period must be >= 1, got {period}")
        names = list(self.params)
        if partitions is None:
            if num_partitions < 1:
                raise UsageError(f"num_partitions must be >= 1, got {num_partitions}")
            k = min(num_partitions, len(names))
            partitions = [list(map(str, chunk)) for chunk in np.array_split(np.array(names, dtype=object), k)]
        flat = [n for part in partitions for n in part]
        if sorted(flat) != sorted(names) or len(set(flat)) != len(flat):
            raise UsageError("GaP partitions must cover every pruned parameter exactly once")
        self.partitions = [list(p) for p in partitions]
        self.period = period
        self.total_steps = total_steps
        self.current = 0
        self.finished = False
        self.history: list[tuple[int, int]] = [(0, 0)]  # (itr, partition grown at itr)
        for i, part in enumerate(self.partitions):
            if i != self.current:
                self._prune(part)
        self.apply_masks()

    def _prune(self, part: list[str]) -> None:
        for n in part:
            self.masks[n] = magnitude_keep_mask(self.params[n], self.target)

    @torch.no_grad()
    def update_masks(self, itr: int) -> None:
        done = itr + 1  # optimizer steps taken, including this one
        if self.finished:
            return
        if self.total_steps is not None and done >= self.total_steps:
            self.finalize()
            return
        if done % self.period == 0:
            self._prune(self.partitions[self.current])
            self.current = (self.current + 1) % len(self.partitions)
            for n in self.partitions[self.current]:
                self.masks[n] = torch.ones_like(self.masks[n])
            self.history.append((done, self.current))
            log.debug("GaP step %d: grew partition %d", done, self.current)

    @torch.no_grad()
    def finalize(self) -> None:
        """Prune the dense partition: every layer at exactly the target sparsity."""
        if not self.finished:
            self._prune(self.partitions[self.current])
            self.finished = True
            self.apply_masks()
