"""Numerical verification: compare two runs output by output, and the accuracy gate.

Per output tensor (over all verification samples):
  abs error  |a - r|: max, mean, p99
  rel error  |a - r| / max(|r|, 1e-3 * max|r|): max, mean, p99
             (the floor keeps near-zero reference entries from dominating)
  cosine similarity of the flattened tensors
  top-1 agreement (argmax over the last axis) for classifier-like outputs,
  i.e. float outputs whose last axis has >= 2 entries and all other axes are 1
  or the batch.

Gate (defaults, all overridable from the CLI / recipe):
  lossy comparisons (compressed vs original):   top-1 agreement >= 0.95 (classifier outputs), and
                                               with --eval labels: task-accuracy drop <= 0.01,
                                               without labels: cosine >= 0.99 per output
                                               (with labels, cosine is reported, not gated: the
                                               task metric is the better judge of a lossy change)
  compile comparison (artifact vs compressed ONNX): cosine >= 0.9999,
                                               max abs error <= 1e-3 * max(1, max|ref|)
"""
from __future__ import annotations

import re

from dataclasses import asdict, dataclass, field

import numpy as np

from compressor.metrics import cosine


@dataclass(frozen=True)
class Tolerances:
    min_cosine: float = 0.99
    min_top1: float = 0.95
    max_accuracy_drop: float = 0.01
    compile_min_cosine: float = 0.9999
    compile_max_abs: float = 1e-3

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class OutputMetrics:
    name: str
    max_abs: float
    mean_abs: float
    p99_abs: float
    max_rel: float
    mean_rel: float
    p99_rel: float
    cosine: float
    top1_agreement: float | None
    ref_max_abs: float

    def to_dict(self) -> dict:
        return {k: (None if v is None else (round(v, 8) if isinstance(v, float) else v)) for k, v in asdict(self).items()}


@dataclass
class Comparison:
    """``candidate`` compared with ``reference`` on ``n_samples`` samples."""

    candidate: str
    reference: str
    kind: str  # "lossy" | "compile"
    n_samples: int
    outputs: list[OutputMetrics]
    passed: bool = True
    failures: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "candidate": self.candidate,
            "reference": self.reference,
            "kind": self.kind,
            "n_samples": self.n_samples,
            "passed": self.passed,
            "failures": self.failures,
            "outputs": [o.to_dict() for o in self.outputs],
        }


# output names that say "not class scores" although the shape looks like [batch, classes]: recurrent
# state (an LSTM's hn/cn), embeddings and hidden features. Their argmax means nothing: the top-1 gate
# failed silero-vad (LSTM state outputs) and a sentence encoder (the embedding) with their tasks intact.
_NOT_SCORES = re.compile(r"(^|[^a-z])(hn|cn|h_?n|c_?n|h0|c0|state\w*|hidden\w*|embed\w*|pooler\w*|features?|"
                         r"last_hidden_state|encoder\w*|memory|latent\w*)($|[^a-z])", re.I)


def is_classifier_like(shape: tuple[int, ...], dtype: np.dtype, name: str = "") -> bool:
    """[batch, (1, ...,) classes] float outputs, unless the name says state / embedding / features.
    1-D outputs are not: without a batch axis an argmax picks a position (silero-vad's per-chunk
    speech probabilities [32]), not a class."""
    if np.dtype(dtype).kind != "f" or len(shape) < 2 or shape[-1] < 2:
        return False
    if name and _NOT_SCORES.search(name):
        return False
    return all(d == 1 for d in shape[1:-1]) and len(shape) <= 3


def output_metrics(name: str, cand: list[np.ndarray], ref: list[np.ndarray]) -> OutputMetrics:
    a = np.concatenate([np.asarray(x, dtype=np.float64).ravel() for x in cand])
    r = np.concatenate([np.asarray(x, dtype=np.float64).ravel() for x in ref])
    if a.shape != r.shape:
        raise ValueError(f"output {name}: {a.shape} elements vs {r.shape} in the reference")
    err = np.abs(a - r)
    ref_max = float(np.max(np.abs(r))) if r.size else 0.0
    denom = np.maximum(np.abs(r), max(1e-3 * ref_max, 1e-12))
    rel = err / denom
    cos = cosine(a, r)
    top1 = None
    first = np.asarray(ref[0])
    if is_classifier_like(first.shape, first.dtype, name):
        c = first.shape[-1]
        ca = np.concatenate([np.asarray(x).reshape(-1, c) for x in cand]).argmax(-1)
        cr = np.concatenate([np.asarray(x).reshape(-1, c) for x in ref]).argmax(-1)
        top1 = float(np.mean(ca == cr))
    return OutputMetrics(
        name,
        float(err.max(initial=0.0)), float(err.mean()) if err.size else 0.0, float(np.percentile(err, 99)) if err.size else 0.0,
        float(rel.max(initial=0.0)), float(rel.mean()) if rel.size else 0.0, float(np.percentile(rel, 99)) if rel.size else 0.0,
        cos, top1, ref_max,
    )


def compare(
    candidate: str, reference: str, kind: str, output_names: list[str],
    cand_runs: list[list[np.ndarray]], ref_runs: list[list[np.ndarray]], tol: Tolerances,
    gate_cosine: bool = True,
) -> Comparison:
    """``*_runs[sample][output]``. Applies the gate of ``kind``. ``gate_cosine=False``
    (lossy comparisons when labelled eval data decides) reports cosine without gating on it."""
    metrics = [
        output_metrics(name, [run[i] for run in cand_runs], [run[i] for run in ref_runs])
        for i, name in enumerate(output_names)
    ]
    comp = Comparison(candidate, reference, kind, len(ref_runs), metrics)
    for m in metrics:
        if kind == "compile":
            if m.cosine < tol.compile_min_cosine:
                comp.failures.append(f"{m.name}: cosine {m.cosine:.6f} < {tol.compile_min_cosine}")
            limit = tol.compile_max_abs * max(1.0, m.ref_max_abs)
            if m.max_abs > limit:
                comp.failures.append(f"{m.name}: max abs error {m.max_abs:.3g} > {limit:.3g}")
        else:
            if gate_cosine and m.cosine < tol.min_cosine:
                comp.failures.append(f"{m.name}: cosine {m.cosine:.4f} < {tol.min_cosine}")
            if m.top1_agreement is not None and m.top1_agreement < tol.min_top1:
                comp.failures.append(f"{m.name}: top-1 agreement {m.top1_agreement:.3f} < {tol.min_top1}")
    comp.passed = not comp.failures
    return comp


def accuracy_drop_failure(original: float, compressed: float, tol: Tolerances) -> str | None:
    """The gate's task-accuracy check: a failure line when the drop exceeds ``max_accuracy_drop``
    (compared with a float tolerance: 0.99 - 0.98 = 0.010000000000000009 is a 1-point drop)."""
    drop = original - compressed
    return f"accuracy drop {drop:.4f} > {tol.max_accuracy_drop}" if drop > tol.max_accuracy_drop + 1e-9 else None


def accuracy(runs: list[list[np.ndarray]], labels: np.ndarray, output_index: int = 0) -> float:
    logits = np.concatenate([np.asarray(r[output_index]).reshape(-1, np.asarray(r[output_index]).shape[-1]) for r in runs])
    return float(np.mean(logits.argmax(-1) == labels[: len(logits)]))
