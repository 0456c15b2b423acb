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
from compressor.metrics import rel_error as _rel_error
from compressor.sensitivity import _sweep_session, weights_as_inputs

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
    kind: str = "values"  # values: pruned weights given back | quantized: int8 layers back to fp32
    steps: int = 0  # how many of the ranked steps (half / full reverts, best gain first) the passing configuration takes
    # the configuration after the first k steps: (model, reverted, halved, zeros over the searchable weights);
    # set by search() (values kind) for callers that probe other counts (the fine-tuning bisection)
    configure: Callable[[int], tuple[onnx.ModelProto, list[Layer], list[Layer], float]] | None = field(
        default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "passed": self.passed, "rounds": self.rounds, "budget": self.budget,
                "error_before": self.error_before, "error_after": self.error_after,
                "zeros_before": round(self.zeros_before, 4), "zeros_after": round(self.zeros_after, 4),
                "reverted": [x.to_dict() for x in self.reverted], "halved": [x.to_dict() for x in self.halved],
                "worst": [x.to_dict() for x in self.ranking[:10]], "unsearchable": self.unsearchable}

    def top3_hint(self) -> str:
        """The three layers that contribute most error and the flag that keeps them."""
        helpful = [x for x in self.ranking if x.gain > 0]
        worst = [x for x in helpful if x not in self.reverted][:3] or helpful[:3]
        if not worst:
            if not self.ranking:
                return ""
            return ("no single layer, given back alone, lowers the output error (the layers after it were "
                    "fitted to its compressed outputs); try a lower ratio or --finetune DATA")
        names = ", ".join(f"{x.node} ({x.gain:.2%} of the output error)" for x in worst)
        flags = " ".join(f"--ignore '{x.node}'" for x in worst)
        keep = "fp32" if self.kind == "quantized" else "dense"
        return f"most error comes from {names}; keep them {keep} with {flags}"


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
        notes.append("quantized layers: searched separately (back to fp32), see quantized_search")
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


def _rank_probe(sweep: str, model_bytes: np.ndarray, feeds: list[dict[str, np.ndarray]], comp: dict[str, np.ndarray],
                ref: list[list[np.ndarray]], wname: str, value: np.ndarray) -> float:
    """One ranking probe (an executor task): the relative output error vs the original model with every
    searchable weight compressed but ``wname``, which is fed ``value`` (its full or half revert)."""
    sess = _sweep_session(sweep, model_bytes)
    w = {**comp, wname: value}
    return _rel_error([sess.run(None, {**f, **w}) for f in feeds], ref)


def search(original: onnx.ModelProto, compressed: onnx.ModelProto, attrib_feeds: list[dict[str, np.ndarray]],
           verif_feeds: list[dict[str, np.ndarray]], ref_verif: list[list[np.ndarray]], gate: GateFn, budget: int,
           say: Callable[[str], None] = lambda s: None, executor: Any = None) -> SearchResult:
    """Rank the searchable weights by error gain and revert the fewest that make ``gate`` pass.
    The ranking probes (two per weight: full and half revert) are independent tasks of ``executor``
    (``--executor ray``: spread over the cluster; default: in this process, same numbers)."""
    import uuid

    from compressor.executor import ExecutorError, LocalExecutor

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
    ex = executor or LocalExecutor()
    say(f"      search: ranking {len(names)} changed weights by output error ({len(attrib_feeds)} samples"
        + (f", on {ex.describe()}" if not isinstance(ex, LocalExecutor) else "") + ")")
    mbytes = np.frombuffer(weights_as_inputs(compressed, names).SerializeToString(), dtype=np.uint8)
    shared = (uuid.uuid4().hex, ex.put(mbytes), ex.put(attrib_feeds), ex.put(comp_vals), ex.put(ref_attrib))
    jobs = [(n, level) for n in names for level in ("full", "half")]
    outs = ex.map(_rank_probe, ((n, (changed if level == "full" else half_vals)[n]) for n, level in jobs), shared,
                  label="accuracy search ranking", total=len(jobs))
    bad = [o for o in outs if not o.ok]
    if bad:
        raise ExecutorError(f"accuracy search: {len(bad)} of {len(jobs)} ranking probes failed: {bad[0].error}")
    err = {job: o.value for job, o in zip(jobs, outs)}
    layers = []
    for n in names:
        gain, gain_half = base - err[(n, "full")], base - err[(n, "half")]
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

    def configure(k: int) -> tuple[onnx.ModelProto, list[Layer], list[Layer], float]:
        st = state_of(k)
        vals = values(st)
        m = onnx.ModelProto()
        m.CopyFrom(compressed)
        for i, t in enumerate(m.graph.initializer):
            if t.name in st:
                m.graph.initializer[i].CopyFrom(numpy_helper.from_array(vals[t.name].astype(comp_vals[t.name].dtype), t.name))
        zeros = sum(float(np.sum(vals[x.weight] == 0)) for x in layers) / max(total, 1)
        return (m, [x for x in layers if st.get(x.weight) == "full"], [x for x in layers if st.get(x.weight) == "half"],
                zeros)

    res.passed, res.steps, res.configure = True, hi, configure
    res.model, res.reverted, res.halved, res.zeros_after = configure(hi)
    res.error_after = _rel_error(run(attrib_feeds, state_of(hi)), ref_attrib)
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


# ------------------------------------------------------------------ quantized layers (QDQ) back to fp32

QDQ_COMPUTE = ("Conv", "ConvTranspose", "Gemm", "MatMul")
DYNAMIC_INT8 = ("MatMulInteger", "ConvInteger", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul")


def _float_source(name: str) -> str:
    """The float initializer a QDQ-quantized weight came from (onnxruntime's naming: ``W_quantized``)."""
    return name[: -len("_quantized")] if name.endswith("_quantized") else name


def _dequantize(inits: dict[str, onnx.TensorProto], dq: onnx.NodeProto) -> np.ndarray:
    q = numpy_helper.to_array(inits[dq.input[0]]).astype(np.float64)
    scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64)
    zp = (numpy_helper.to_array(inits[dq.input[2]]).astype(np.float64)
          if len(dq.input) > 2 and dq.input[2] in inits else np.zeros_like(scale))
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
    if scale.ndim == 1 and scale.size > 1:
        shape = [1] * q.ndim
        shape[axis % q.ndim] = scale.size
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    return ((q - zp) * scale).astype(np.float32)


def qdq_layers(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Compute nodes (Conv/Gemm/MatMul) that read at least one DequantizeLinear output."""
    dq_out = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return [n for n in model.graph.node if n.op_type in QDQ_COMPUTE and n.name and any(i in dq_out for i in n.input)]


def revert_qdq(model: onnx.ModelProto, names: set[str], floats: dict[str, np.ndarray]) -> onnx.ModelProto:
    """``model`` with the QDQ layers ``names`` computing in fp32 again: each input that comes through a
    DequantizeLinear reads the float tensor instead (an activation: the QuantizeLinear's input; a
    weight or bias: the float original from ``floats`` by name, else its dequantized values). Q/DQ
    nodes and initializers nothing reads any more are removed."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    prod = {o: n for n in g.node for o in n.output}
    inits = {t.name: t for t in g.initializer}
    added: dict[str, np.ndarray] = {}
    for n in g.node:
        if n.name not in names:
            continue
        for i, x in enumerate(n.input):
            d = prod.get(x)
            if d is None or d.op_type != "DequantizeLinear":
                continue
            q = prod.get(d.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                n.input[i] = _saturate(g, q, inits, added, f"{d.output[0]}__fp32")
            elif d.input[0] in inits:
                src = _float_source(d.input[0])
                shape = tuple(inits[d.input[0]].dims)
                val = floats.get(src)
                if val is None or tuple(val.shape) != shape:
                    val = _dequantize(inits, d)
                fname = f"{src}__fp32"
                added[fname] = val.astype(np.float32)
                n.input[i] = fname
    g.initializer.extend(numpy_helper.from_array(v, k) for k, v in added.items() if k not in inits)
    # the reverted layers' outputs: a Q -> DQ pair on them becomes an Identity unless a layer that stays
    # int8 reads it (that is the int8 layer's own input quantization)
    int8_left = {n.name for n in qdq_layers(m)} - names
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    for n in [n for n in g.node if n.name in names]:
        for o in n.output:
            for q in [r for r in readers.get(o, []) if r.op_type == "QuantizeLinear"]:
                for d in [r for r in readers.get(q.output[0], []) if r.op_type == "DequantizeLinear"]:
                    if any(c.name in int8_left for c in readers.get(d.output[0], [])):
                        continue
                    idx = list(g.node).index(d)
                    g.node.remove(d)
                    g.node.insert(idx, onnx.helper.make_node("Identity", [_saturate(g, q, inits, added, f"{o}__sat")],
                                                             [d.output[0]], name=f"{d.name}__fp32"))
    g.initializer.extend(numpy_helper.from_array(v, k) for k, v in added.items()
                         if k not in inits and k not in {t.name for t in g.initializer})
    _topo_sort(g)
    _prune_dead(g)
    return m


def _saturate(g: onnx.GraphProto, q: onnx.NodeProto, inits: dict[str, onnx.TensorProto], added: dict[str, np.ndarray],
              name: str) -> str:
    """The float tensor a QuantizeLinear reads, clipped to the range that quantizer represents. onnxruntime's
    QDQ quantizer removes a Relu/Clip before a QuantizeLinear whose range already clamps like it; bypassing
    the Q/DQ pair without the clamp would drop that activation."""
    src = q.input[0]
    if len(q.input) < 3 or q.input[1] not in inits or q.input[2] not in inits:
        return src
    scale = float(numpy_helper.to_array(inits[q.input[1]]).reshape(-1)[0])
    zp_arr = numpy_helper.to_array(inits[q.input[2]])
    if zp_arr.size != 1 or zp_arr.dtype.kind not in "iu":
        return src
    info = np.iinfo(zp_arr.dtype)
    zp = float(zp_arr.reshape(-1)[0])
    added[f"{name}_lo"] = np.array((info.min - zp) * scale, dtype=np.float32)
    added[f"{name}_hi"] = np.array((info.max - zp) * scale, dtype=np.float32)
    if not any(n.output and n.output[0] == name for n in g.node):
        g.node.append(onnx.helper.make_node("Clip", [src, f"{name}_lo", f"{name}_hi"], [name], name=name))
    return name


def _topo_sort(g: onnx.GraphProto) -> None:
    known = {i.name for i in g.input} | {t.name for t in g.initializer} | {""}
    nodes, order = list(g.node), []
    while nodes:
        rest = []
        for n in nodes:
            if all(i in known for i in n.input):
                order.append(n)
                known.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(nodes):  # subgraph-scoped inputs or a cycle: keep the remaining order
            order += rest
            break
        nodes = rest
    del g.node[:]
    g.node.extend(order)


def _prune_dead(g: onnx.GraphProto) -> None:
    while True:
        used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        for n in g.node:  # subgraph reads (If/Loop bodies) count as uses
            for a in n.attribute:
                for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                    used |= {i for sn in sub.node for i in sn.input}
        dead = [n for n in g.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") and not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
    used = {i for n in g.node for i in n.input}
    for n in g.node:
        for a in n.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                used |= {i for sn in sub.node for i in sn.input}
    keep = [t for t in g.initializer if t.name in used or t.name in {o.name for o in g.output}]
    del g.initializer[:]
    g.initializer.extend(keep)


def search_quantized(original: onnx.ModelProto, compressed: onnx.ModelProto, attrib_feeds: list[dict[str, np.ndarray]],
                     verif_feeds: list[dict[str, np.ndarray]], ref_verif: list[list[np.ndarray]], gate: GateFn, budget: int,
                     say: Callable[[str], None] = lambda s: None) -> SearchResult:
    """The accuracy search for int8 (QDQ) models: rank the quantized layers by the output error that
    computing each one in fp32 removes (one onnxruntime session per layer on ``attrib_feeds``), then
    give the worst back to fp32 (weights: the ``original``'s float values, so a pruned-and-quantized
    layer becomes dense fp32) 1, 2, 4, ... at a time and bisect for the fewest that pass ``gate``.
    ``budget`` counts verification rounds; 0 ranks only (the hint of a failed gate)."""
    res = SearchResult(False, 0, budget, 0.0, 0.0, kind="quantized")
    if any(n.op_type in DYNAMIC_INT8 for n in compressed.graph.node):
        res.unsearchable.append("dynamic int8 layers (MatMulInteger/ConvInteger): not revertible by the search; "
                                "--ignore NODE keeps a layer fp32")
    layers = qdq_layers(compressed)
    if not layers:
        res.unsearchable.append("no QDQ layer to give back to fp32")
        return res
    floats = {t.name: numpy_helper.to_array(t) for t in original.graph.initializer
              if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)}
    ref_attrib = runtime.run_all(runtime.session(original), attrib_feeds)

    def run(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
        return runtime.run_all(runtime.session(model), feeds)

    base = _rel_error(run(compressed, attrib_feeds), ref_attrib)
    say(f"      search: ranking {len(layers)} quantized layers by output error ({len(attrib_feeds)} samples)")
    inits = {t.name: t for t in compressed.graph.initializer}
    prod = {o: n for n in compressed.graph.node for o in n.output}
    ranked = []
    for n in layers:
        err = _rel_error(run(revert_qdq(compressed, {n.name}, floats), attrib_feeds), ref_attrib)
        w = next((prod[i].input[0] for i in n.input[1:2] if i in prod and prod[i].input[0] in inits), n.name)
        numel = int(np.prod(inits[w].dims)) if w in inits else 0
        ranked.append(Layer(_float_source(w), n.name, (base - err) / max(base, 1e-30), numel, 0.0))
    ranked.sort(key=lambda x: -x.gain)
    res.ranking, res.error_before = ranked, base
    if budget <= 0:
        return res

    def passes(k: int) -> bool:
        res.rounds += 1
        fails = gate(run(revert_qdq(compressed, {x.node for x in ranked[:k]}, floats), verif_feeds))
        say(f"      search round {res.rounds}/{budget}: {k} layer(s) back to fp32 -> {'gate passes' if not fails else fails[0]}")
        return not fails

    lo, hi, k = 0, None, 1
    while res.rounds < budget and k <= len(ranked):
        if passes(k):
            hi = k
            break
        lo = k
        k = min(2 * k, len(ranked)) if k < len(ranked) else k + 1
    while hi is not None and hi - lo > 1 and res.rounds < budget:
        mid = (lo + hi) // 2
        if passes(mid):
            hi = mid
        else:
            lo = mid
    if hi is None:
        return res
    res.passed = True
    res.reverted = ranked[:hi]
    res.model = revert_qdq(compressed, {x.node for x in res.reverted}, floats)
    res.error_after = _rel_error(run(res.model, attrib_feeds), ref_attrib)
    return res
