"""The numbers every comparison uses: one definition each (numpy only, no model code)."""
from __future__ import annotations

import numpy as np


def cosine(a: np.ndarray, r: np.ndarray) -> float:
    """Cosine similarity of the flattened tensors (float64): 1.0 when both are all zeros, 0.0 when only one
    is or when their element counts differ."""
    a64, r64 = np.ravel(np.asarray(a)).astype(np.float64), np.ravel(np.asarray(r)).astype(np.float64)
    if a64.shape != r64.shape:
        return 0.0
    na, nr = float(np.linalg.norm(a64)), float(np.linalg.norm(r64))
    if na == 0.0 and nr == 0.0:
        return 1.0
    if na == 0.0 or nr == 0.0:
        return 0.0
    return float(a64 @ r64 / (na * nr))


def rel_error(runs: list[list[np.ndarray]], ref: list[list[np.ndarray]]) -> float:
    """Relative squared error ``sum ||a - r||^2 / sum ||r||^2`` over samples and the floating-point outputs
    (integer outputs such as indices are not errors in this sense)."""
    num = sum(float(np.sum((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)) for ra, rb in zip(runs, ref)
              for a, b in zip(ra, rb) if np.asarray(b).dtype.kind == "f")
    den = sum(float(np.sum(np.asarray(b, np.float64) ** 2)) for rb in ref for b in rb if np.asarray(b).dtype.kind == "f")
    return num / max(den, 1e-30)
