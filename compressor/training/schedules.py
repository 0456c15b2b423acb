"""Pruning schedules used during training.

Narang et al. 2017 ("Exploring Sparsity in Recurrent Neural Networks"), gradual
magnitude pruning.  Each layer has a threshold ``eps(itr)`` that rises
monotonically; every ``freq`` iterations between ``start_itr`` and ``end_itr``
the weights with ``|w| < eps`` are masked (and stay masked):

    start_itr <= itr < ramp_itr:  eps = theta * (itr - start_itr + 1) / freq
    ramp_itr  <= itr < end_itr:   eps = (theta * (ramp_itr - start_itr + 1)
                                         + phi * (itr - ramp_itr + 1)) / freq

The paper's heuristic for the start slope: pick ``q``, the |w| at the target
sparsity percentile of the layer, and

    theta = 2 * q * freq / (2 * (ramp_itr - start_itr) + 3 * (end_itr - ramp_itr)),
    phi   = 1.5 * theta,

so that the threshold reaches (about) ``q`` at ``end_itr``
(``theta * (ramp - start) + 1.5 * theta * (end - ramp) = q * freq``).

Zhu & Gupta 2017 ("To prune, or not to prune"), cubic schedule: at mask
update times ``t`` in ``[t0, t0 + n * dt]`` each layer is pruned to exactly

    s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3

by magnitude.  Both schedules are monotone non-decreasing in sparsity.
"""
from __future__ import annotations

from dataclasses import dataclass

from compressor.errors import UsageError


@dataclass(frozen=True)
class NarangSchedule:
    start_itr: int
    ramp_itr: int
    end_itr: int
    freq: int = 100

    def __post_init__(self) -> None:
        if not 0 <= self.start_itr < self.ramp_itr < self.end_itr:
            raise UsageError(f"need 0 <= start_itr < ramp_itr < end_itr, got {self.start_itr}, {self.ramp_itr}, {self.end_itr}")
        if self.freq < 1:
            raise UsageError(f"freq must be >= 1, got {self.freq}")

    def theta_for(self, q: float) -> float:
        """The paper's start slope for a layer whose target-percentile magnitude is ``q`` (phi = 1.5 theta)."""
        return 2.0 * q * self.freq / (2.0 * (self.ramp_itr - self.start_itr) + 3.0 * (self.end_itr - self.ramp_itr))

    def threshold(self, itr: int, theta: float, phi: float) -> float:
        """eps(itr); 0 before start_itr, frozen at its end_itr value afterwards."""
        if itr < self.start_itr:
            return 0.0
        itr = min(itr, self.end_itr)
        if itr < self.ramp_itr:
            return theta * (itr - self.start_itr + 1) / self.freq
        return (theta * (self.ramp_itr - self.start_itr + 1) + phi * (itr - self.ramp_itr + 1)) / self.freq

    def is_update(self, itr: int) -> bool:
        """Masks are updated every freq iterations in [start_itr, end_itr], and at end_itr."""
        return self.start_itr <= itr <= self.end_itr and ((itr - self.start_itr) % self.freq == 0 or itr == self.end_itr)


@dataclass(frozen=True)
class CubicSchedule:
    start_itr: int
    end_itr: int
    freq: int = 100
    initial_sparsity: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.start_itr < self.end_itr:
            raise UsageError(f"need 0 <= start_itr < end_itr, got {self.start_itr}, {self.end_itr}")
        if self.freq < 1:
            raise UsageError(f"freq must be >= 1, got {self.freq}")
        if not 0.0 <= self.initial_sparsity < 1.0:
            raise UsageError(f"initial_sparsity must be in [0, 1), got {self.initial_sparsity}")

    def sparsity(self, itr: int, final: float) -> float:
        if itr < self.start_itr:
            return 0.0
        frac = min(1.0, (itr - self.start_itr) / (self.end_itr - self.start_itr))
        return final + (self.initial_sparsity - final) * (1.0 - frac) ** 3

    def is_update(self, itr: int) -> bool:
        return self.start_itr <= itr <= self.end_itr and ((itr - self.start_itr) % self.freq == 0 or itr == self.end_itr)
