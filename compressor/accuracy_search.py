"""Accuracy-aware search: when the gate fails, give weights back until it passes.

The user states the bound (``--min-cosine``, ``--min-top1``, ``--max-accuracy-drop``); one-shot
compression that misses it is not the end of the run. As in Intel Neural Compressor's
accuracy-aware tuning, the layers are ranked by how much of the output error they cause and the
worst are reverted one group at a time, re-verifying after each step, until the gate passes or
``--search-budget`` verification rounds are spent. Unlike INC's loop (a full re-quantization and
evaluation per candidate) every probe here is one onnxruntime session of the compressed model
whose searchable weights are graph inputs: a candidate is a different feed, not a new model.

Searchable: every weight the passes changed in value but not in name or shape (sparsify.*,
finetune.distill, plugin passes that rewrite values). A reverted weight gets its original
values back (dense, unpruned). What the search cannot revert (quantized or channel-pruned
weights: other names or shapes) is named in the result, with the flag that protects it.

Attribution (``gain``): with every other searchable weight compressed, how much the relative
output error  sum ||y - y_orig||^2 / sum ||y_orig||^2  drops when this one weight is reverted,
measured on the calibration samples (else the verification samples).

Steps, best gain first: each layer's half revert (half of its pruned weights back, the largest
original magnitudes first) with its own gain, and its full revert with what the second half adds.
Search: take the first 1, 2, 4, ... steps until the gate passes, then bisect between the last
failing and the first passing count for the fewest steps; each probe is one verification round
on the verification samples (the samples the gate itself uses).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import onnx
from onnx import numpy_helper

from compressor import runtime, verify
from compressor.sensitivity import _rel_error, weights_as_inputs

GateFn = Callable[[list[list[np.ndarray]]], list[str]]  # runs on the verification samples -> gate failures


@dataclass
class Layer:
    weight: str
    node: str  # the node that consumes the weight (for --ignore)
    gain: float  # error removed by reverting this weight alone
    numel: int
    zeros: float  # fraction of zeros in the compressed weight
    gain_half: float = 0.0  # error removed by giving back half of its pruned weights (largest first)

    def to_dict(self) -> dict[str, Any]:
        return {"weight": self.weight, "node": self.node, "gain": self.gain, "gain_half": self.gain_half,
                "numel": self.numel, "compressed_zeros": round(self.zeros, 4)}


@dataclass
class SearchResult:
    passed: bool
    rounds: int
    budget: int
    error_before: float
    error_after: float
    zeros_before: float = 0.0  # fraction of zeros over the searchable weights, one-shot
    zeros_after: float = 0.0  # ... after the reverts
    ranking: list[Layer] = field(default_factory=list)  # all searchable weights, worst first
    reverted: list[Layer] = field(default_factory=list)  # fully reverted (original values)
    halved: list[Layer] = field(default_factory=list)  # half of the pruned weights given back
    unsearchable: list[str] = field(default_factory=list)  # changes the search cannot revert (why)
    model: onnx.ModelProto | None = None  # the compressed model with the reverted weights restored

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "rounds": self.rounds, "budget": self.budget,
                "error_before": self.error_before, "error_after": self.error_after,
                "zeros_before": round(self.zeros_before, 4), "zeros_after": round(self.zeros_after, 4),
                "reverted": [x.to_dict() for x in self.reverted], "halved": [x.to_dict() for x in self.halved],
                "worst": [x.to_dict() for x in self.ranking[:10]], "unsearchable": self.unsearchable}

    def top3_hint(self) -> str:
        """The three layers that contribute most error and the flag that keeps them."""
        worst = [x for x in self.ranking if x not in self.reverted][:3] or self.ranking[:3]
        if not worst:
            return ""
        names = ", ".join(f"{x.node} ({x.gain:.2%} of the output error)" for x in worst)
        flags = " ".join(f"--ignore '{x.node}'" for x in worst)
        return f"most error comes from {names}; keep them dense with {flags}"


def searchable(original: onnx.ModelProto, compressed: onnx.ModelProto) -> tuple[dict[str, np.ndarray], list[str]]:
    """Original values of the float initializers the passes changed in value only; plus a note per
    kind of change that cannot be reverted by swapping values."""
    orig = {t.name: t for t in original.graph.initializer}
    changed: dict[str, np.ndarray] = {}
    for t in compressed.graph.initializer:
        o = orig.get(t.name)
        if o is None or list(o.dims) != list(t.dims) or o.data_type != t.data_type:
            continue
        if t.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
            continue
        a, b = numpy_helper.to_array(o), numpy_helper.to_array(t)
        if a.size >= 16 and not np.array_equal(a, b):
            changed[t.name] = a
    notes = []
    comp_dims = {t.name: list(t.dims) for t in compressed.graph.initializer}
    reshaped = [n for n, o in orig.items() if n in comp_dims and list(o.dims) != comp_dims[n]]
    if reshaped:
        notes.append(f"{len(reshaped)} weights changed shape (channel pruning): not revertible; "
                     "--ignore NODE keeps a layer's channels")
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear", "MatMulInteger", "ConvInteger", "QLinearConv",
                         "QLinearMatMul", "DynamicQuantizeLinear") for n in compressed.graph.node):
        notes.append("quantized layers: not revertible by the search; --keep-fp32 auto keeps the sensitive ones in fp32")
    return changed, notes


def _half_revert(orig: np.ndarray, comp: np.ndarray) -> np.ndarray:
    """``comp`` with half of its pruned weights (zero here, non-zero in ``orig``) given back: the
    largest original magnitudes first."""
    pruned = np.flatnonzero((comp.ravel() == 0) & (orig.ravel() != 0))
    out = comp.copy().ravel()
    if pruned.size:
        back = pruned[np.argsort(-np.abs(orig.ravel()[pruned]), kind="stable")[: (pruned.size + 1) // 2]]
        out[back] = orig.ravel()[back]
    return out.reshape(comp.shape)


def _consumers(model: onnx.ModelProto) -> dict[str, str]:
    out: dict[str, str] = {}
    for n in model.graph.node:
        for i in n.input:
            out.setdefault(i, n.name or n.op_type)
    return out


def search(original: onnx.ModelProto, compressed: onnx.ModelProto, attrib_feeds: list[dict[str, np.ndarray]],
           verif_feeds: list[dict[str, np.ndarray]], ref_verif: list[list[np.ndarray]], gate: GateFn, budget: int,
           say: Callable[[str], None] = lambda s: None) -> SearchResult:
    """Rank the searchable weights by error gain and revert the fewest that make ``gate`` pass."""
    changed, notes = searchable(original, compressed)
    comp_vals = {t.name: numpy_helper.to_array(t) for t in compressed.graph.initializer if t.name in changed}
    res = SearchResult(False, 0, budget, 0.0, 0.0, unsearchable=notes)
    if not changed:
        res.unsearchable.append("no weight changed in value only: nothing the search can revert")
        return res
    names = sorted(changed)
    sess = runtime.session(weights_as_inputs(compressed, names).SerializeToString())
    half_vals = {n: _half_revert(changed[n], comp_vals[n]) for n in names}

    def values(state: dict[str, str]) -> dict[str, np.ndarray]:
        pick = {"full": changed, "half": half_vals}
        return {n: pick[state[n]][n] if n in state else comp_vals[n] for n in names}

    def run(feeds: list[dict[str, np.ndarray]], state: dict[str, str]) -> list[list[np.ndarray]]:
        w = values(state)
        return [sess.run(None, {**f, **w}) for f in feeds]

    ref_attrib = runtime.run_all(runtime.session(original), attrib_feeds)
    base = _rel_error(run(attrib_feeds, {}), ref_attrib)
    cons = _consumers(compressed)
    say(f"      search: ranking {len(names)} changed weights by output error ({len(attrib_feeds)} samples)")
    layers = []
    for n in names:
        gain = base - _rel_error(run(attrib_feeds, {n: "full"}), ref_attrib)
        gain_half = base - _rel_error(run(attrib_feeds, {n: "half"}), ref_attrib)
        layers.append(Layer(n, cons.get(n, n), gain / max(base, 1e-30), int(comp_vals[n].size),
                            float(np.mean(comp_vals[n] == 0)), gain_half / max(base, 1e-30)))
    layers.sort(key=lambda x: -x.gain)
    res.ranking, res.error_before = layers, base
    total = sum(x.numel for x in layers)
    res.zeros_before = res.zeros_after = sum(x.zeros * x.numel for x in layers) / max(total, 1)
    # the steps, best gain first: a layer's half revert (half of its pruned weights back, the largest
    # originals first) counts its own gain, its full revert what the second half adds (a full step
    # taken before the half step covers it)
    steps = sorted([(x, "half", x.gain_half) for x in layers] + [(x, "full", x.gain - x.gain_half) for x in layers],
                   key=lambda t: -t[2])
    steps = [(x, level) for x, level, _ in steps]

    def state_of(k: int) -> dict[str, str]:
        st: dict[str, str] = {}
        for x, level in steps[:k]:
            if st.get(x.weight) != "full":
                st[x.weight] = level
        return st

    def passes(k: int) -> bool:
        res.rounds += 1
        st = state_of(k)
        fails = gate(run(verif_feeds, st))
        n_full = sum(v == "full" for v in st.values())
        say(f"      search round {res.rounds}/{budget}: {len(st) - n_full} layer(s) half, {n_full} fully reverted -> "
            f"{'gate passes' if not fails else fails[0]}")
        return not fails

    lo, hi = 0, None  # lo: largest step count known to fail (0 = the one-shot result, which failed)
    k = 1
    while res.rounds < budget and k <= len(steps):
        if passes(k):
            hi = k
            break
        lo = k
        k = min(2 * k, len(steps)) if k < len(steps) else k + 1
    while hi is not None and hi - lo > 1 and res.rounds < budget:
        mid = (lo + hi) // 2
        if passes(mid):
            hi = mid
        else:
            lo = mid
    if hi is None:
        return res
    res.passed = True
    final = state_of(hi)
    res.reverted = [x for x in layers if final.get(x.weight) == "full"]
    res.halved = [x for x in layers if final.get(x.weight) == "half"]
    vals = values(final)
    res.zeros_after = sum(float(np.sum(vals[x.weight] == 0)) for x in layers) / max(total, 1)
    res.error_after = _rel_error(run(attrib_feeds, final), ref_attrib)
    m = onnx.ModelProto()
    m.CopyFrom(compressed)
    for i, t in enumerate(m.graph.initializer):
        if t.name in final:
            m.graph.initializer[i].CopyFrom(numpy_helper.from_array(vals[t.name].astype(comp_vals[t.name].dtype), t.name))
    res.model = m
    return res


def gate_for(out_names: list[str], ref_runs: list[list[np.ndarray]], tol: verify.Tolerances, labels: np.ndarray | None,
             original_accuracy: float | None) -> GateFn:
    """The lossy gate of the pipeline (compressed vs original on the verification samples), as a function."""
    def gate(runs: list[list[np.ndarray]]) -> list[str]:
        comp = verify.compare("candidate", "original.onnx", "lossy", out_names, runs, ref_runs, tol,
                              gate_cosine=labels is None)
        fails = list(comp.failures)
        if labels is not None and original_accuracy is not None:
            fails += filter(None, [verify.accuracy_drop_failure(original_accuracy, verify.accuracy(runs, labels), tol)])
        return fails

    return gate
