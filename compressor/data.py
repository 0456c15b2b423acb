"""Calibration / evaluation data files and verification inputs.

An ``.npz`` holds one array per graph input; the leading axis lists samples.
For a model whose input is ``[1, 3, 224, 224]`` the file holds
``[N, 3, 224, 224]``; for an input without a batch axis the file holds
``[N, *shape]`` as well. Labels (for ``--eval``) are under ``labels``.
Without user data, verification uses seeded random inputs, which the report
flags as weak evidence.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compressor.errors import InputError
from compressor.ir import TensorSpec


@dataclass
class Samples:
    """Per-sample feeds: ``feeds[i]`` is a dict input-name -> array with the model's exact shape."""

    feeds: list[dict[str, np.ndarray]]
    labels: np.ndarray | None
    source: str  # "file:PATH" or "random(seed=0)"

    @property
    def weak(self) -> bool:
        return self.source.startswith("random")

    def head(self, n: int) -> "Samples":
        return Samples(self.feeds[:n], None if self.labels is None else self.labels[:n], self.source)


def _per_sample_shape(spec: TensorSpec) -> tuple[int, ...]:
    # batch-1 models: the file stacks samples along axis 0 instead of the batch axis
    return spec.shape[1:] if spec.shape and spec.shape[0] == 1 else spec.shape


def load_npz(path: Path, inputs: list[TensorSpec], flag: str, need_labels: bool = False) -> Samples:
    if not path.is_file():
        raise InputError(f"{flag} data file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise InputError(f"{flag} data file is not a readable .npz: {path}: {type(exc).__name__}") from exc
    expected = ", ".join(f"{s.name}: [N, {', '.join(map(str, _per_sample_shape(s)))}] {s.dtype}" for s in inputs)
    hint = f"the model expects {expected}" + ("; labels: [N] int" if need_labels else "")
    missing = [s.name for s in inputs if s.name not in arrays]
    if missing:
        raise InputError(f"{flag} data {path.name} lacks input(s) {', '.join(missing)} (has {', '.join(sorted(arrays)) or 'nothing'})", hint=hint)
    extra = sorted(set(arrays) - {s.name for s in inputs} - {"labels"})
    if extra:
        raise InputError(f"{flag} data {path.name} has arrays that are not model inputs: {', '.join(extra)}", hint=hint)
    counts = set()
    for s in inputs:
        arr = arrays[s.name]
        want = _per_sample_shape(s)
        if arr.ndim != len(want) + 1 or tuple(arr.shape[1:]) != tuple(want):
            raise InputError(f"{flag} data {path.name}: {s.name} has shape {list(arr.shape)}, expected [N, {', '.join(map(str, want))}]", hint=hint)
        if arr.dtype.kind != np.dtype(s.dtype).kind:
            raise InputError(f"{flag} data {path.name}: {s.name} has dtype {arr.dtype}, expected {s.dtype}", hint=hint)
        counts.add(arr.shape[0])
    labels = arrays.get("labels")
    if need_labels and labels is None:
        raise InputError(f"{flag} data {path.name} has no 'labels' array", hint=hint)
    if labels is not None:
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise InputError(f"{flag} data {path.name}: labels must be a 1-D integer array, got {labels.dtype} {list(labels.shape)}")
        counts.add(labels.shape[0])
    if len(counts) != 1 or 0 in counts:
        raise InputError(f"{flag} data {path.name}: arrays disagree on the number of samples ({sorted(counts)})", hint=hint)
    n = counts.pop()
    feeds = [{s.name: arrays[s.name][i].reshape(s.shape).astype(s.dtype, copy=False) for s in inputs} for i in range(n)]
    return Samples(feeds, labels, f"file:{path}")


def random_samples(inputs: list[TensorSpec], n: int, seed: int = 0) -> Samples:
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(n):
        feed = {}
        for s in inputs:
            if np.dtype(s.dtype).kind == "f":
                feed[s.name] = rng.standard_normal(s.shape).astype(s.dtype)
            elif np.dtype(s.dtype).kind == "b":
                feed[s.name] = rng.integers(0, 2, s.shape).astype(s.dtype)
            else:
                feed[s.name] = rng.integers(0, 8, s.shape).astype(s.dtype)
        feeds.append(feed)
    return Samples(feeds, None, f"random(seed={seed})")


def save_samples(path: Path, feeds: list[dict[str, np.ndarray]]) -> None:
    """Stack per-sample feeds into one npz (the self-check file format)."""
    names = feeds[0].keys() if feeds else []
    np.savez(path, **{k: np.stack([f[k] for f in feeds]) for k in names})
