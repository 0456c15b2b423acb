"""Calibration / evaluation data files and verification inputs.

An ``.npz`` holds one array per graph input; the leading axis lists samples.
For a model whose input is ``[1, 3, 224, 224]`` the file holds
``[N, 3, 224, 224]``; for an input without a batch axis the file holds
``[N, *shape]`` as well. Labels (for ``--eval``) are under ``labels``.
Without user data, verification uses seeded random inputs, which the report
flags as weak evidence. Random inputs follow what the model does with them
(``input_ranges``): an integer input that indexes a table (``Gather`` on an
initializer, directly or through Cast/Unsqueeze/Reshape/...) gets ids within the
table's rows; an input named like a mask (``attention_mask``) gets 0/1 padding
masks (ones then zeros along the last axis, at least one 1); bool inputs get
0/1; integer inputs used only in arithmetic or comparisons get 0..7. An integer
input whose valid range the tool cannot tell (a shape, a loop count, an index
into a computed tensor) is refused (exit 4): pass --calib or --eval.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from compressor.errors import InputError
from compressor.ir import TensorSpec


@dataclass
class Samples:
    """Per-sample feeds: ``feeds[i]`` is a dict input-name -> array with the model's exact shape."""

    feeds: list[dict[str, np.ndarray]]
    labels: np.ndarray | None
    source: str  # "file:PATH" or "random(seed=0)"
    notes: list[str] = field(default_factory=list)  # how random inputs were chosen (report warnings)

    @property
    def weak(self) -> bool:
        return self.source.startswith("random")

    def head(self, n: int) -> "Samples":
        return Samples(self.feeds[:n], None if self.labels is None else self.labels[:n], self.source, self.notes)


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


@dataclass(frozen=True)
class InputRange:
    """How random values are drawn for one input: ``kind`` is ``normal`` (floats), ``ids`` (integers in
    ``[0, high)``), ``mask`` (0/1 padding masks) or ``bits`` (bool 0/1)."""

    kind: str
    high: int = 8
    why: str = ""


# ops whose output holds the same index values as their (first) input, rearranged
_INDEX_PRESERVING = {"Unsqueeze", "Squeeze", "Reshape", "Flatten", "Identity", "Expand", "Tile", "Transpose", "Concat",
                     "Slice", "Split", "Gather", "GatherElements", "GatherND", "Compress", "Pad"}
# ops for which any small integer is a valid operand (arithmetic, comparisons, reductions, shape queries)
_VALUE_OPS = {"Add", "Sub", "Mul", "Div", "Neg", "Abs", "Sign", "Min", "Max", "Mod", "Equal", "Less", "Greater",
              "LessOrEqual", "GreaterOrEqual", "Not", "And", "Or", "Xor", "Where", "ReduceSum", "ReduceMax",
              "ReduceMin", "ReduceMean", "ReduceProd", "CumSum", "Shape", "Size", "ArgMax", "ArgMin", "BitShift",
              "BitwiseAnd", "BitwiseOr", "BitwiseXor", "BitwiseNot", "IsNaN", "IsInf", "Clip", "Relu"}
_TABLE_OPS = {"Gather", "GatherElements", "GatherND"}  # input 1 holds indices into input 0
_INT_KINDS = "iu"


def _is_mask_name(name: str) -> bool:
    return "mask" in name.lower()


def padding_keep(feed: dict[str, np.ndarray], act_shape: tuple[int, ...]) -> np.ndarray | None:
    """Rows of an activation ``[B, S, ...D]`` (flattened to ``[B * S, D]``) at positions that are not padding:
    the positions an attention-mask input marks 0. A padded token's activations never reach the output of an
    encoder that masks its keys and pools over the mask, so the statistics that choose weights (OBS
    Hessians, least-squares refits) are taken over the real tokens only. The mask is an integer or bool
    input whose name says ``mask``, holding only 0 and 1, of shape ``[B, S]`` equal to the activation's
    first two dims. None when there is no such input, it masks nothing, or it masks everything."""
    if len(act_shape) < 3:
        return None
    for name, v in feed.items():
        if not _is_mask_name(name) or v.ndim != 2 or v.dtype.kind not in "biu" or tuple(v.shape) != tuple(act_shape[:2]):
            continue
        if not np.isin(v, (0, 1)).all():
            continue
        keep = v.reshape(-1) != 0
        if keep.all() or not keep.any():
            return None
        return keep
    return None


class _ModelIndex:
    """Consumers, constant shapes and inferred shapes by tensor name, over the main graph and every
    subgraph (a subgraph reads outer values by name)."""

    def __init__(self, model: onnx.ModelProto):
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        self.shapes: dict[str, list[int | None]] = {}
        self.graph_outputs: set[str] = set()
        self._walk(model.graph, top=True)

    def _walk(self, g: onnx.GraphProto, top: bool) -> None:
        if top:
            self.graph_outputs |= {o.name for o in g.output}
        for init in g.initializer:
            self.shapes[init.name] = list(init.dims)
        for vi in [*g.input, *g.output, *g.value_info]:
            if vi.type.WhichOneof("value") == "tensor_type" and vi.type.tensor_type.HasField("shape") and vi.name not in self.shapes:
                self.shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
        for node in g.node:
            for i, name in enumerate(node.input):
                if name:
                    self.consumers.setdefault(name, []).append((node, i))
            if node.op_type == "Constant":
                for a in node.attribute:
                    if a.name == "value" and node.output:
                        self.shapes[node.output[0]] = list(a.t.dims)
            for a in node.attribute:
                for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                    self._walk(sub, top=False)


def _node_desc(node: onnx.NodeProto) -> str:
    return f"{node.op_type} node {node.name!r}" if node.name else f"a {node.op_type} node"


def _cast_to_int(node: onnx.NodeProto) -> bool:
    to = next((a.i for a in node.attribute if a.name == "to"), None)
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(to)).kind in _INT_KINDS
    except Exception:
        return False


def _index_bound(idx: _ModelIndex, name: str, seen: set[str]) -> tuple[int | None, str]:
    """Largest exclusive bound the integer values of tensor ``name`` must respect, following them through
    index-preserving ops: ``(bound, why)``; ``(None, why)`` when any small value is fine; raises ValueError
    with the reason when a use has no inferable range."""
    if name in seen:
        return None, ""
    seen.add(name)
    bound, why = None, ""

    def tighten(b: int, w: str) -> None:
        nonlocal bound, why
        if bound is None or b < bound:
            bound, why = b, w

    for node, slot in idx.consumers.get(name, []):
        op = node.op_type
        if op in _TABLE_OPS and slot == 1:
            data = node.input[0]
            shape = idx.shapes.get(data)
            axis = next((a.i for a in node.attribute if a.name in ("axis", "batch_dims")), 0)
            if shape is not None and -len(shape) <= axis < len(shape):
                # GatherND: the index tuple addresses the axes from batch_dims on; the smallest bounds them all
                sizes = shape[axis:] if op == "GatherND" else [shape[axis]]
                rows = None if any(d is None for d in sizes) else min(sizes)
                if rows is not None and rows > 0:
                    tighten(rows, f"rows of the table {data!r} read by {_node_desc(node)}")
                    continue
            raise ValueError(f"it indexes {data!r} in {_node_desc(node)}, whose size is not known statically")
        if op == "Cast":
            if _cast_to_int(node):
                for out in node.output:
                    b, w = _index_bound(idx, out, seen)
                    if b is not None:
                        tighten(b, w)
            continue  # cast to float/bool: a value, any small integer is fine
        if op in _INDEX_PRESERVING and (slot == 0 or op == "Concat"):
            for out in node.output:
                b, w = _index_bound(idx, out, seen)
                if b is not None:
                    tighten(b, w)
            continue
        if op in _VALUE_OPS:
            for out in node.output:
                b, w = _index_bound(idx, out, seen)
                if b is not None:  # arithmetic on ids before they index a table: the valid range is not known
                    raise ValueError(f"it is changed by {_node_desc(node)} before it indexes a table ({w})")
            continue
        raise ValueError(f"it feeds input {slot} of {_node_desc(node)}")
    return bound, why


def input_ranges(model: onnx.ModelProto, inputs: list[TensorSpec]) -> dict[str, InputRange]:
    """Choose how to draw random values for each graph input from what the model does with it
    (see the module docstring). Raises InputError for an integer input without an inferable range."""
    idx = _ModelIndex(model)
    ranges: dict[str, InputRange] = {}
    for s in inputs:
        kind = np.dtype(s.dtype).kind
        if kind == "b":
            ranges[s.name] = InputRange("bits")
            continue
        if _is_mask_name(s.name) and s.shape:
            ranges[s.name] = InputRange("mask", 2, "named like a mask")
            continue
        if kind not in _INT_KINDS:
            ranges[s.name] = InputRange("normal")
            continue
        try:
            bound, why = _index_bound(idx, s.name, set())
        except ValueError as exc:
            raise InputError(f"cannot choose random values for integer input {s.name!r}: {exc}; the tool cannot tell its valid range",
                             hint="pass real inputs with --calib DATA.npz or --eval DATA.npz (one array per input)") from exc
        if bound is None:
            ranges[s.name] = InputRange("ids", 8, "used as a value (0..7)")
        else:
            ranges[s.name] = InputRange("ids", bound, why)
    return ranges


def _padding_mask(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Ones then zeros along the last axis, at least one 1 per row (a padded batch's attention mask)."""
    length = shape[-1]
    rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    keep = rng.integers(1, length + 1, rows) if length > 0 else np.zeros(rows, np.int64)
    m = (np.arange(length)[None, :] < keep[:, None]).astype(np.int64)
    return m.reshape(shape)


def random_samples(inputs: list[TensorSpec], n: int, seed: int = 0, model: onnx.ModelProto | None = None) -> Samples:
    """Seeded random verification inputs. With ``model``, value ranges follow ``input_ranges`` (ids within
    the table they index, 0/1 masks; integer inputs without an inferable range: InputError); without it,
    floats are standard normal and integers 0..7."""
    rng = np.random.default_rng(seed)
    ranges = input_ranges(model, inputs) if model is not None else {}
    notes = [f"random input {name}: {'0/1 padding mask' if r.kind == 'mask' else f'ids in [0, {r.high})'} ({r.why})"
             for name, r in ranges.items() if r.kind in ("mask", "ids") and r.why]
    feeds = []
    for _ in range(n):
        feed = {}
        for s in inputs:
            kind = np.dtype(s.dtype).kind
            r = ranges.get(s.name)
            if r is not None and r.kind == "mask":
                feed[s.name] = _padding_mask(rng, tuple(s.shape)).astype(s.dtype)
            elif kind == "f":
                feed[s.name] = rng.standard_normal(s.shape).astype(s.dtype)
            elif kind == "b":
                feed[s.name] = rng.integers(0, 2, s.shape).astype(s.dtype)
            else:
                feed[s.name] = rng.integers(0, r.high if r is not None else 8, s.shape).astype(s.dtype)
        feeds.append(feed)
    return Samples(feeds, None, f"random(seed={seed})", notes)


def save_samples(path: Path, feeds: list[dict[str, np.ndarray]]) -> None:
    """Stack per-sample feeds into one npz (the self-check file format)."""
    names = feeds[0].keys() if feeds else []
    np.savez(path, **{k: np.stack([f[k] for f in feeds]) for k in names})
