"""Structured sparsity learning (SSL; Wen et al. 2016): group-lasso regularisation.

The training loss gets the term

    R(W) = lambda * sum_layers sum_groups ||W_g||_2

where the groups of a Conv weight ``[O, I, kh, kw]`` are its output filters
``W[o, :, :, :]`` (``"filters"``) and/or its input channels ``W[:, i, :, :]``
(``"channels"``), the groups of a Linear weight ``[O, I]`` its rows ``W[o, :]``
(output neurons), and optionally each BatchNorm scale ``gamma_c`` (``norm_scales``:
a filter followed by BatchNorm can shrink without changing the output, so there the
scale is what must reach zero; with one element per group this is network slimming's L1).  The L2 norm (not squared) has a kink at zero, so
the (sub)gradient pushes whole groups to zero rather than shrinking every
weight a little.  After training, ``zero_small_groups(tol)`` sets the groups
whose norm is below ``tol`` times the layer's largest group norm to exactly
zero; a zero filter (with its batch-norm/bias folded) is a removable channel,
which ``prune.channels`` turns into a smaller dense model.

API like the other sparsifiers: ``penalty()`` is added to the loss; ``step()``
after ``optimizer.step()`` re-applies the masks of groups already zeroed;
``masks`` and ``sparsity()`` as usual; ``group_report()`` counts the groups near
zero per layer.
"""
from __future__ import annotations

import fnmatch
from typing import Iterable

import torch
from torch import nn

from compressor.errors import UsageError

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class GroupLasso:
    def __init__(self, model: nn.Module, lam: float, structures: Iterable[str] = ("filters",), linear_rows: bool = True,
                 exclude: Iterable[str] = (), skip_last: bool = True, norm_scales: bool = False):
        """``structures``: subset of {"filters", "channels"} for Conv layers; ``linear_rows``: Linear
        output neurons; ``skip_last``: leave the last Linear/Conv (the classifier's outputs) alone;
        ``norm_scales``: also each BatchNorm scale gamma_c as a group of one (an L1 term, as in
        network slimming), for convs followed by BatchNorm, whose output does not depend on the
        filter's scale, so the filter penalty alone cannot switch a channel off."""
        if lam < 0:
            raise UsageError(f"lambda must be >= 0, got {lam}")
        structures = tuple(structures)
        bad = set(structures) - {"filters", "channels"}
        if bad:
            raise UsageError(f"unknown group structure(s) {sorted(bad)}; use filters and/or channels")
        self.lam = float(lam)
        mods = [(n, m) for n, m in model.named_modules() if isinstance(m, _CONV + (nn.Linear,))]
        if skip_last and mods:
            mods = mods[:-1]
        mods = [(n, m) for n, m in mods if not any(fnmatch.fnmatch(n, g) for g in exclude)]
        # (param name, parameter, dim of the group index)
        self.groups: list[tuple[str, nn.Parameter, int]] = []
        self._labels: list[str] = []
        for n, m in mods:
            if isinstance(m, _CONV):
                if "filters" in structures:
                    self.groups.append((f"{n}.weight", m.weight, 0))
                    self._labels.append(f"{n}.weight[filters]")
                if "channels" in structures and m.groups == 1:
                    self.groups.append((f"{n}.weight", m.weight, 1))
                    self._labels.append(f"{n}.weight[channels]")
            elif linear_rows:
                self.groups.append((f"{n}.weight", m.weight, 0))
                self._labels.append(f"{n}.weight[rows]")
        if norm_scales:
            for n, m in model.named_modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine and not any(fnmatch.fnmatch(n, g) for g in exclude):
                    self.groups.append((f"{n}.weight", m.weight, 0))
                    self._labels.append(f"{n}.weight[bn_scale]")
        if not self.groups:
            raise UsageError("no Conv/Linear groups to regularise")
        self.masks: dict[str, torch.Tensor] = {n: torch.ones_like(p, dtype=torch.bool) for n, p, _ in self.groups}
        self._params = {n: p for n, p, _ in self.groups}

    @staticmethod
    def _norms(p: torch.Tensor, dim: int) -> torch.Tensor:
        if p.dim() == 1:
            return p.abs()
        return p.transpose(0, dim).flatten(1).norm(dim=1)

    def penalty(self) -> torch.Tensor:
        total = sum(self._norms(p, d).sum() for _, p, d in self.groups)
        return self.lam * total

    @torch.no_grad()
    def group_report(self, tol: float = 1e-3) -> dict:
        """Per (param, dim): number of groups and those with norm <= tol * max group norm of that layer."""
        out = {}
        for (n, p, d), label in zip(self.groups, self._labels):
            norms = self._norms(p, d)
            ref = float(norms.max()) if norms.numel() else 0.0
            zero = int((norms <= tol * ref).sum()) if ref > 0 else int(norms.numel())
            out[label] = {"groups": int(norms.numel()), "near_zero": zero}
        return out

    @torch.no_grad()
    def zero_small_groups(self, tol: float = 1e-3) -> int:
        """Set groups with norm <= tol * (largest group norm in the layer) to exactly zero; returns how many."""
        count = 0
        for n, p, d in self.groups:
            norms = self._norms(p, d)
            ref = float(norms.max()) if norms.numel() else 0.0
            small = norms <= tol * ref
            shape = [1] * p.dim()
            shape[d] = -1
            keep = (~small).view(shape).expand_as(p)
            self.masks[n] &= keep
            count += int(small.sum())
        self.apply_masks()
        return count

    @torch.no_grad()
    def apply_masks(self) -> None:
        for n, p in self._params.items():
            p.mul_(self.masks[n].to(p.dtype))

    def step(self) -> None:
        self.apply_masks()

    def sparsity(self) -> dict:
        layers = {n: round(1.0 - m.sum().item() / m.numel(), 6) for n, m in self.masks.items()}
        total = sum(m.numel() for m in self.masks.values())
        zeros = sum(m.numel() - m.sum().item() for m in self.masks.values())
        return {"overall": round(zeros / total, 6), "layers": layers, "params": int(total), "kept": int(total - zeros)}
