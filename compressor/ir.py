"""Loading and normalising ONNX models, and moving between ModelProto and
onnx-graphsurgeon graphs.

Load stage (DESIGN.md step 1):
  1. read the protobuf without external data, refuse external-data locations
     that escape the model's folder, then load the external data; every
     tensor's data must match its dims (a file that lies about a tensor's size
     is refused before anything reads it);
  2. ``onnx.checker`` and opset bounds (default domain 7..current; below 13 is
     converted with ``onnx.version_converter`` and checked again);
  3. initializers listed as graph inputs (IR version < 4 requires it) are
     dropped from the inputs (they are weights, not inputs), and the IR version
     is raised to what the opset needs, so passes can add initializers;
  4. graph inputs and outputs must be tensors (sequence / optional / map types
     are refused); static shapes: dynamic input dims must be fixed with
     ``--input-shape``;
  5. resource limits, before anything is allocated: every statically known
     tensor (inputs, outputs, inferred intermediates, subgraphs too) must fit
     a quarter of the available memory, and Conv/Pool pads, strides,
     dilations and kernels must be sane (``check_resources``);
  6. normalise what exporters emit: ``Constant`` nodes lifted into
     initializers and constant subgraphs folded (onnx-graphsurgeon +
     onnxruntime; ``If`` nodes with a constant condition are replaced by the
     taken branch), then shape inference.
Control flow (``If``/``Loop``/``Scan`` bodies) is kept: the folder and the
cleanup passes see subgraphs and their outer-scope references.
The input file is only ever read.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError
from onnx import TensorProto, numpy_helper

from compressor.errors import InputError, UsageError

log = logging.getLogger(__name__)

MIN_OPSET = 7  # below this onnx's version converter is unreliable
TARGET_MIN_OPSET = 13  # models below this are converted up
MAX_OPSET = onnx.defs.onnx_opset_version()
MAX_ATTR_EXTENT = 1 << 16  # largest pad / stride / dilation / kernel extent accepted on Conv/Pool nodes
MEMORY_FRACTION = 4  # one tensor may take at most 1/MEMORY_FRACTION of the available memory
SPATIAL_OPS = {"Conv", "ConvTranspose", "ConvInteger", "QLinearConv", "DeformConv", "MaxPool", "AveragePool",
               "LpPool", "MaxUnpool"}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": str(self.dtype)}


def parse_input_shapes(items: list[str] | None) -> dict[str, list[int]]:
    """Parse ``name:1x3x224x224`` items (CLI ``--input-shape``)."""
    shapes: dict[str, list[int]] = {}
    for item in items or []:
        name, sep, dims = item.rpartition(":")
        try:
            parsed = [int(d) for d in dims.lower().split("x")]
        except ValueError:
            parsed = []
        if not sep or not name or not parsed or any(d <= 0 for d in parsed):
            raise UsageError(f"bad --input-shape {item!r}", hint="use NAME:1x3x224x224")
        shapes[name] = parsed
    return shapes


def _check_external_locations(model: onnx.ModelProto, base_dir: Path) -> None:
    base = base_dir.resolve()
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        loc = info.get("location", "")
        target = (base / loc).resolve()
        if os.path.isabs(loc) or base not in target.parents:
            raise InputError(
                f"external data of tensor {tensor.name!r} points outside the model's folder: {loc!r}",
                hint="external data files must live next to the model",
            )
        if not target.is_file():
            raise InputError(f"external data file missing for tensor {tensor.name!r}: {loc}")


def source_files(path: Path, model: onnx.ModelProto) -> list[Path]:
    """The files a model read from ``path`` consists of: the protobuf and its external data files."""
    locs = {e.value for t in onnx.external_data_helper._get_all_tensors(model) if t.data_location == TensorProto.EXTERNAL
            for e in t.external_data if e.key == "location"}
    return [path, *sorted(path.parent / loc for loc in locs)]


def read_model(path: Path, load_data: bool = True) -> onnx.ModelProto:
    """Read and check a model file; one-line InputError on any problem. ``load_data=False`` leaves
    external data on disk (``attach_external_data`` loads it): graph-level work before that point
    handles the graph, not the weights."""
    if not path.exists():
        raise InputError(f"model file not found: {path}")
    if not path.is_file():
        raise InputError(f"model path is not a file: {path}")
    data = path.read_bytes()
    try:
        model = onnx.load_model_from_string(data)
    except (DecodeError, RuntimeError, ValueError, TypeError) as exc:
        raise InputError(f"not an ONNX model (truncated or corrupt protobuf): {path}: {type(exc).__name__}") from exc
    del data
    if model.ir_version <= 0 or not model.HasField("graph") or not model.graph.node:
        raise InputError(f"not an ONNX model (no graph found): {path}")
    bad = _bad_string(model)
    if bad:
        raise InputError(f"not an ONNX model (corrupt protobuf): {path}: field {bad} is not valid UTF-8")
    _check_external_locations(model, path.parent)
    check_tensor_data(model)
    opset = default_opset(model)
    if opset is None or opset < MIN_OPSET or opset > MAX_OPSET:
        raise InputError(
            f"unsupported opset {opset} for the default ONNX domain",
            hint=f"supported: {MIN_OPSET}..{MAX_OPSET} (below {TARGET_MIN_OPSET} is converted)",
        )
    if has_external_data(model):
        # the file's own check: onnx resolves the external data beside the model and reads only the graph
        _checker(str(path), "model fails onnx.checker")
        if load_data:
            attach_external_data(model, path.parent)
    else:
        _checker(model, "model fails onnx.checker")  # the weights' structure: check_tensor_data above
    return model


def has_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == TensorProto.EXTERNAL for t in onnx.external_data_helper._get_all_tensors(model))


def attach_external_data(model: onnx.ModelProto, base_dir: Path) -> None:
    """Load the model's external data (locations checked by ``read_model``) into its tensors, and check
    that every tensor holds as many values as its dims say."""
    if not has_external_data(model):
        return
    try:
        onnx.load_external_data_for_model(model, str(base_dir))
    except (OSError, ValueError, RuntimeError) as exc:
        raise InputError(f"cannot read the model's external data: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}") from exc
    check_tensor_data(model)


def _bad_string(msg, where: str = "model") -> str | None:
    """The path of the first string field that does not hold valid UTF-8 (ONNX is proto2: the parser
    accepts such bytes, and they fail later wherever a name is copied)."""
    from google.protobuf.descriptor import FieldDescriptor as FD

    for fd, value in msg.ListFields():
        if fd.type not in (FD.TYPE_STRING, FD.TYPE_MESSAGE):
            continue
        repeated = fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == FD.LABEL_REPEATED
        values = value if repeated else [value]
        for i, v in enumerate(values):
            here = f"{where}.{fd.name}" + (f"[{i}]" if repeated else "")
            if fd.type == FD.TYPE_STRING:
                if not isinstance(v, str):
                    return here
            else:
                found = _bad_string(v, here)
                if found:
                    return found
    return None


def _checker(model: onnx.ModelProto | str, what: str) -> None:
    try:
        if isinstance(model, str):
            onnx.checker.check_model(model, full_check=False)
        else:  # the graph without the data of its large weights (serializing them costs a copy each)
            check_weightless(model, full_check=False)
    except Exception as exc:  # ValidationError, and the C++ checker's other errors on corrupt files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{what}: {first}") from exc


_TYPED_FIELD = {
    TensorProto.FLOAT: ("float_data", 1), TensorProto.COMPLEX64: ("float_data", 2),
    TensorProto.DOUBLE: ("double_data", 1), TensorProto.COMPLEX128: ("double_data", 2),
    TensorProto.INT64: ("int64_data", 1), TensorProto.UINT32: ("uint64_data", 1), TensorProto.UINT64: ("uint64_data", 1),
    TensorProto.STRING: ("string_data", 1),
}
_PACKED_4BIT = {getattr(TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(TensorProto, n)}


def _itemsize(elem_type: int) -> int:
    if elem_type in _PACKED_4BIT:
        return 1
    try:
        return max(1, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).itemsize)
    except Exception:
        return 4


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if n < 1024 or unit == "EiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def check_tensor_data(model: onnx.ModelProto) -> None:
    """Every tensor (initializers and Constant attributes, subgraphs included) must hold exactly as many
    elements as its dims say: a corrupt or hand-edited file whose raw_data is shorter than its dims would
    otherwise fail deep inside numpy or onnxruntime."""
    for t in onnx.external_data_helper._get_all_tensors(model):
        what = f"tensor {t.name!r}" if t.name else "a Constant tensor"
        if any(d < 0 for d in t.dims):
            raise InputError(f"{what} has negative dims {list(t.dims)}")
        if t.data_type == TensorProto.UNDEFINED:
            raise InputError(f"{what} has no data type")
        count = 1
        for d in t.dims:
            count *= int(d)
        if t.data_location == TensorProto.EXTERNAL:
            continue  # refused or loaded before this check
        if t.HasField("segment"):
            raise InputError(f"{what} is stored in segments (unsupported)")
        if t.data_type in _PACKED_4BIT:
            want_raw, field, per = (count + 1) // 2, "int32_data", None
        else:
            want_raw = count * _itemsize(t.data_type)
            field, per = _TYPED_FIELD.get(t.data_type, ("int32_data", 1))
        if t.raw_data:
            have, want = len(t.raw_data), want_raw
            unit = "bytes"
        else:
            have = len(getattr(t, field))
            want = (count + 1) // 2 if per is None else count * per
            unit = "values"
        if t.data_type == TensorProto.STRING and t.raw_data:
            raise InputError(f"{what}: string tensor with raw_data")
        if have != want:
            shape = "x".join(map(str, t.dims)) or "scalar"
            raise InputError(f"{what} claims shape {shape} ({count} elements) but holds {have} {unit}, not {want}",
                             hint="the model file is corrupt or was edited by hand")


def default_opset(model: onnx.ModelProto) -> int | None:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return None


def _convert_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    opset = default_opset(model)
    if opset is not None and opset < TARGET_MIN_OPSET:
        try:
            model = onnx.version_converter.convert_version(model, TARGET_MIN_OPSET)
        except Exception as exc:
            raise InputError(f"cannot convert opset {opset} to {TARGET_MIN_OPSET}: {' '.join(str(exc).split())[:200]}") from exc
        _checker(model, f"opset {opset} -> {TARGET_MIN_OPSET} conversion gave an invalid model")
        log.info("converted opset %s -> %s", opset, TARGET_MIN_OPSET)
    return model


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _normalize_ir(model: onnx.ModelProto) -> None:
    """Initializers listed as graph inputs (required below IR version 4, allowed after it as
    "overridable" weights) become plain initializers, and the IR version is raised to what the
    opset needs: a pass that adds an initializer (a folded BN weight) must not have to list it
    as an input too. The tool treats weights as constants either way."""
    inits = {i.name for i in model.graph.initializer}
    if any(i.name in inits for i in model.graph.input):
        keep = [i for i in model.graph.input if i.name not in inits]
        del model.graph.input[:]
        model.graph.input.extend(keep)
        log.info("initializers listed as graph inputs dropped from the inputs (IR version %d)", model.ir_version)
    try:
        need = onnx.helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    except Exception:
        need = 7
    if model.ir_version < max(need, 4):
        log.info("IR version %d raised to %d", model.ir_version, max(need, 4))
        model.ir_version = max(need, 4)


def _type_name(tp: onnx.TypeProto) -> str:
    kind = tp.WhichOneof("value")
    if kind == "tensor_type":
        try:
            return f"tensor({np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tp.tensor_type.elem_type)).name})"
        except Exception:
            return f"tensor(elem_type {tp.tensor_type.elem_type})"
    if kind == "sequence_type":
        return f"sequence<{_type_name(tp.sequence_type.elem_type)}>"
    if kind == "optional_type":
        return f"optional<{_type_name(tp.optional_type.elem_type)}>"
    return kind or "no type"


def _check_io_types(model: onnx.ModelProto) -> None:
    """Graph inputs and outputs must be numeric or bool tensors: verification feeds and compares arrays."""
    for role, vis in (("input", graph_inputs(model)), ("output", model.graph.output)):
        for vi in vis:
            tp = vi.type
            ok = tp.WhichOneof("value") == "tensor_type"
            if ok:
                try:
                    ok = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tp.tensor_type.elem_type)).kind in "biuf"
                except Exception:
                    ok = False
            if not ok:
                raise InputError(f"graph {role} {vi.name!r} has type {_type_name(tp)}: only numeric/bool tensor inputs and outputs are supported",
                                 hint="export the model with tensor inputs/outputs (sequence/optional/map/string types are not supported)")
    for g, where in _all_graphs(model.graph):
        if not where:
            continue
        for vi in [*g.input, *g.output]:
            if vi.type.WhichOneof("value") not in ("tensor_type", "sequence_type", None):
                raise InputError(f"{where}subgraph value {vi.name!r} has type {_type_name(vi.type)}: optional/map values "
                                 "crossing a control-flow body are not supported")


BATCH_NAMES = ("batch", "batch_size", "batchsize", "n", "b", "bs", "num_samples")


def _dim_hint(name: str) -> str:
    return "1" if name.lower() in BATCH_NAMES or "batch" in name.lower() else f"<{name or '?'}>"


def _fix_shapes(model: onnx.ModelProto, overrides: dict[str, list[int]],
                data_shapes: dict[str, tuple[int, ...]] | None = None, notes: list[str] | None = None) -> None:
    """Static input shapes. Dynamic dims are fixed, in this order, by ``--input-shape``; by another input's
    dim with the same name (``input_ids:1x128`` fixes ``attention_mask[batch, sequence]`` too); by the
    per-sample shape of the ``--calib`` / ``--eval`` data (``data_shapes``: array shapes, samples on axis
    0). What is left is one error naming every dynamic input, with a complete ``--input-shape`` hint."""
    names = [i.name for i in graph_inputs(model)]
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise UsageError(f"--input-shape names unknown inputs: {', '.join(unknown)}", hint=f"model inputs: {', '.join(names)}")
    named: dict[str, int] = {}  # dim_param -> value, from the overrides
    for vi in graph_inputs(model):
        dims = vi.type.tensor_type.shape.dim
        if vi.name in overrides:
            want = overrides[vi.name]
            if dims and len(dims) != len(want):
                raise UsageError(f"--input-shape {vi.name}: rank {len(want)} but the model's input has rank {len(dims)}")
            for i, d in enumerate(dims):
                if d.HasField("dim_value") and d.dim_value != want[i]:
                    raise UsageError(f"--input-shape {vi.name}: dim {i} is fixed to {d.dim_value} in the model, got {want[i]}")
                if not d.HasField("dim_value") and d.dim_param:
                    named.setdefault(d.dim_param, want[i])
    changed = bool(overrides)
    missing: list[tuple[str, list[str], set[str] | None]] = []  # input, hint dims, its open dim names (None: unnamed)
    for vi in graph_inputs(model):
        tt = vi.type.tensor_type
        dims = tt.shape.dim
        if vi.name in overrides:
            del tt.shape.dim[:]
            for w in overrides[vi.name]:
                tt.shape.dim.add().dim_value = w
            continue
        dyn = [i for i, d in enumerate(dims) if not d.HasField("dim_value") or d.dim_value <= 0]
        if not tt.HasField("shape"):
            missing.append((vi.name, ["<rank unknown>"], None))
            continue
        if not dyn:
            continue
        vals: list[int | None] = [d.dim_value if i not in dyn else named.get(d.dim_param) if d.dim_param else None
                                  for i, d in enumerate(dims)]
        how = "dims of the same name in another input"
        ds = (data_shapes or {}).get(vi.name)
        if any(v is None for v in vals) and ds is not None:
            sample = tuple(ds[1:])
            if len(sample) == len(dims) - 1:  # batch-1 layout: the samples stack along the batch axis
                sample = (1, *sample)
            if len(sample) == len(dims) and all(v is None or v == sample[i] for i, v in enumerate(vals)):
                vals = list(sample)
                how = "the --calib/--eval data's shape"
        if any(v is None for v in vals):
            missing.append((vi.name, [str(v) if v is not None else _dim_hint(dims[i].dim_param) for i, v in enumerate(vals)],
                            {d.dim_param for i, d in enumerate(dims) if vals[i] is None and d.dim_param}
                            if all(d.dim_param for i, d in enumerate(dims) if vals[i] is None) else None))
            continue
        shown = "x".join(d.dim_param or "?" if not d.HasField("dim_value") else str(d.dim_value) for d in dims)
        for i, d in enumerate(dims):
            if d.dim_param:
                named.setdefault(d.dim_param, int(vals[i]))
        del tt.shape.dim[:]
        for v in vals:
            tt.shape.dim.add().dim_value = int(v)
        changed = True
        if notes is not None:
            notes.append(f"input {vi.name!r}: dynamic dims ({shown}) fixed to {'x'.join(map(str, vals))} from {how}")
    if missing:
        covered: set[str] = set()
        flags, follow = [], []
        for n, d, params in missing:  # an input whose open dims are all named in an earlier one follows it
            if params is not None and params and params <= covered:
                follow.append(n)
                continue
            flags.append(f"--input-shape {n}:{'x'.join(d)}")
            covered |= params or set()
        hint = " ".join(flags) + (f" ({', '.join(follow)}: same dim names, fixed with them)" if follow else "")
        placeholders = any("<" in x for _, d, _ in missing for x in d)
        raise InputError(
            f"input{'s' if len(missing) > 1 else ''} {', '.join(repr(n) for n, _, _ in missing)} "
            f"{'have' if len(missing) > 1 else 'has'} dynamic dimensions",
            hint=f"fix them with {hint}" + (" (replace each <name> with its size)" if placeholders else "")
                 + "; or pass --calib/--eval data: their shapes fix them",
        )
    if changed:
        # drop stale intermediate shapes so inference recomputes them from the fixed inputs
        del model.graph.value_info[:]
        for out in model.graph.output:
            out.type.tensor_type.ClearField("shape")


def npz_shapes(*paths: str | Path | None) -> dict[str, tuple[int, ...]]:
    """Array shapes of ``.npz`` files, read from the array headers (no data is loaded); the first file
    that holds a name wins. Unreadable files are skipped here (the data loader reports them)."""
    import zipfile

    out: dict[str, tuple[int, ...]] = {}
    for p in paths:
        if not p or not Path(p).is_file():
            continue
        try:
            with zipfile.ZipFile(p) as zf:
                for member in zf.namelist():
                    name = member[:-4] if member.endswith(".npy") else member
                    if name in out:
                        continue
                    with zf.open(member) as f:
                        major, _ = np.lib.format.read_magic(f)
                        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                        out[name] = tuple(read(f)[0])
        except (OSError, ValueError, zipfile.BadZipFile, EOFError):
            continue
    return out


def _has_shape_ops(model: onnx.ModelProto) -> bool:
    return any(n.op_type in ("Shape", "Size") for g, _ in _all_graphs(model.graph) for n in g.node)


def _infer_guarded(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shape inference with data propagation in a forked child under an address-space limit (the
    model's memory limit above what the process already maps): onnx's data propagation materialises
    the values it propagates, and a shape computed as [2**42] allocated that many elements (the
    kernel's OOM killer, not an exception). The child may map 1 GiB (at most the memory limit) plus
    four copies of the model; it sends the inferred model back over a pipe."""
    import resource

    # inference copies the model a few times; propagated shape values are small
    limit = min(memory_limit_bytes(), 1 << 30) + 4 * model_bytes(model)
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: infer, write "K"+model or "E"+message, exit without cleanup handlers
        try:
            os.close(rfd)
            try:
                with open("/proc/self/statm") as f:
                    mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
                resource.setrlimit(resource.RLIMIT_AS, (mapped + limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
            except (OSError, ValueError):
                pass
            try:
                out = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
                payload = b"K" + out.SerializeToString()
            except BaseException as exc:  # noqa: BLE001 - reported to the parent
                payload = b"E" + f"{type(exc).__name__}: {exc}".encode("utf-8", "replace")
            with os.fdopen(wfd, "wb") as f:
                f.write(payload)
        finally:
            os._exit(0)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as f:
        payload = f.read()
    _, status = os.waitpid(pid, 0)
    if not payload:
        raise InputError(f"shape inference failed: the inferring process ended with status {status}")
    if payload[:1] == b"E":
        msg = payload[1:].decode("utf-8", "replace")
        if "bad_alloc" in msg or "MemoryError" in msg:
            msg = f"it needs more than {_human_bytes(limit)} (a computed shape is absurd): {msg}"
        raise InputError(f"shape inference failed: {' '.join(msg.split())[:300]}")
    return onnx.load_model_from_string(payload[1:])


WEIGHTLESS_MIN_BYTES = 1 << 16  # initializers at least this large are left out of weightless copies
IN_MEMORY = "__compressor_in_memory__"  # the external-data location of a weightless placeholder


def tensor_nbytes(t: onnx.TensorProto) -> int:
    """Bytes of a tensor's values from its dims and type (4-bit types packed two per byte), without
    reading them (``len(t.raw_data)`` copies the data)."""
    n = 1
    for d in t.dims:
        n *= int(d)
    return (n + 1) // 2 if t.data_type in _PACKED_4BIT else n * _itemsize(t.data_type)


def constant_values(c: gs.Constant) -> np.ndarray:
    """A graphsurgeon constant's values without caching them in the graph: a lazily loaded constant stays
    lazy (``c.values`` would keep a loaded copy in the graph for the rest of the pass)."""
    from onnx_graphsurgeon.ir.tensor import LazyValues

    vals = c._values
    return vals.load() if isinstance(vals, LazyValues) else np.asarray(vals)


def _left_out(t: onnx.TensorProto, min_bytes: int = WEIGHTLESS_MIN_BYTES) -> bool:
    """Whether ``weightless`` replaces this initializer by a placeholder: its data is in memory and large."""
    return t.data_location != TensorProto.EXTERNAL and tensor_nbytes(t) >= min_bytes


def _repeated(fd) -> bool:
    rep = getattr(fd, "is_repeated", None)  # protobuf >= 5; ``label`` before
    return bool(rep) if rep is not None else fd.label == fd.LABEL_REPEATED


def inferred_structure(model: onnx.ModelProto) -> onnx.ModelProto:
    """``onnx.shape_inference.infer_shapes(model)`` (its defaults) on the weightless copy: the inferred
    value_info, inputs and outputs of ``model`` without a copy of its weights (and over 2 GB). The
    large initializers in the result are placeholders; read values from ``model``."""
    return onnx.shape_inference.infer_shapes(weightless(model)[0])


def model_bytes(model: onnx.ModelProto) -> int:
    """The model's serialized size, also over protobuf's 2 GB limit (where ``ByteSize()`` raises): the
    weightless graph plus each large initializer on its own."""
    skel, big = weightless(model)
    return skel.ByteSize() + sum(t.ByteSize() + 8 for t in big)  # + the field key and length of each


def _copy_fields(src, dst, skip: str) -> None:
    """Copy every set field of message ``src`` into the empty ``dst`` of the same type, but ``skip``."""
    for fd, val in src.ListFields():
        if fd.name == skip:
            continue
        if _repeated(fd):
            getattr(dst, fd.name).extend(val)
        elif fd.message_type is not None:
            getattr(dst, fd.name).CopyFrom(val)
        else:
            setattr(dst, fd.name, val)


def weightless(model: onnx.ModelProto, min_bytes: int = WEIGHTLESS_MIN_BYTES) -> tuple[onnx.ModelProto, list[onnx.TensorProto]]:
    """A copy of ``model`` without the data of its large main-graph initializers, and those initializers.
    Each one left out becomes a placeholder of the same name, type and dims marked as external data
    (location ``IN_MEMORY``): shape inference and the checker's structure see the same graph, and
    onnxruntime takes the values through ``add_external_initializers``. What graph-level tools
    serialize is then the graph, not the weights (a protobuf copy per call; over 2 GB, impossible)."""
    skel = onnx.ModelProto()
    _copy_fields(model, skel, "graph")
    big: list[onnx.TensorProto] = []
    _copy_fields(model.graph, skel.graph, "initializer")
    for t in model.graph.initializer:
        if _left_out(t, min_bytes):
            big.append(t)
            ph = skel.graph.initializer.add(name=t.name, data_type=t.data_type, dims=t.dims)
            ph.data_location = TensorProto.EXTERNAL
            ph.external_data.add(key="location", value=IN_MEMORY)
        else:
            skel.graph.initializer.append(t)
    return skel, big


def check_weightless(model: onnx.ModelProto, full_check: bool = True) -> None:
    """``onnx.checker.check_model`` (with strict shape inference when ``full_check``) on the model's
    structure: a model with large initializers is checked as its weightless copy, saved with an empty
    data file the placeholders point to (the checker resolves external data by path and reads none of
    it), so the weights are never serialized and a model over 2 GB can be checked. Raises what the
    checker raises."""
    skel, big = weightless(model)
    if not big:
        onnx.checker.check_model(model, full_check=full_check)
        if full_check:
            onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
        return
    import tempfile

    for t in skel.graph.initializer:
        for e in t.external_data:
            if e.key == "location" and e.value == IN_MEMORY:
                e.value = "weights.bin"
    with tempfile.TemporaryDirectory(prefix="compressor-check-") as d:
        (Path(d) / "weights.bin").touch()
        onnx.save_model(skel, str(Path(d) / "model.onnx"))
        onnx.checker.check_model(str(Path(d) / "model.onnx"), full_check=full_check)


def _infer_weightless(model: onnx.ModelProto, data_prop: bool) -> onnx.ModelProto:
    """Shape inference on the model's weightless copy; the inferred graph structure (nodes with their
    subgraphs, value_info, inputs, outputs) is moved back into ``model`` itself, whose weights are
    never copied. Returns ``model``."""
    skel, _ = weightless(model)
    out = _infer(skel, data_prop)
    g = model.graph
    for name in ("node", "value_info", "input", "output"):
        field = getattr(g, name)
        del field[:]
        field.extend(getattr(out.graph, name))
    return model


def infer_shapes(model: onnx.ModelProto, data_prop: bool = True) -> onnx.ModelProto:
    """Strict shape inference. Data propagation (the values of Shape computations, so a Reshape whose
    target is computed from Shape gets a static output) runs only where a graph has Shape/Size nodes,
    and, where ``os.fork`` exists, in a child process under a memory limit (``_infer_guarded``).
    A model with large initializers is inferred on its weightless copy (``weightless``) and updated in
    place: onnx's inference serializes the model it gets, twice."""
    if any(_left_out(t) for t in model.graph.initializer):
        return _infer_weightless(model, data_prop)
    return _infer(model, data_prop)


def _infer(model: onnx.ModelProto, data_prop: bool) -> onnx.ModelProto:
    try:
        if data_prop and _has_shape_ops(model):
            if hasattr(os, "fork") and model_bytes(model) < 1_800_000_000:
                return _infer_guarded(model)
            return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
        return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=False)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"shape inference failed: {' '.join(str(exc).split())[:300]}") from exc


_GS_TYPES = ("tensor_type", "sequence_type", "sparse_tensor_type")  # value types graphsurgeon can export


def to_graph(model: onnx.ModelProto) -> gs.Graph:
    """Import into onnx-graphsurgeon. Intermediate values of a type graphsurgeon cannot export
    (optional, map) lose their recorded type: they are exported untyped and shape inference
    recomputes it (load refuses such types on graph and subgraph inputs/outputs)."""
    graph = gs.import_onnx(model)
    for g in [graph, *graph.subgraphs(recursive=True)]:
        io = {id(t) for t in [*g.inputs, *g.outputs]}
        for t in g.tensors().values():
            if isinstance(t, gs.Variable) and getattr(t, "type", "tensor_type") not in _GS_TYPES and id(t) not in io:
                t.dtype = None
    return graph


def to_model(graph: gs.Graph, like: onnx.ModelProto) -> onnx.ModelProto:
    """Export a graphsurgeon graph, keeping the original model's metadata."""
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    model = _export_filled(graph)
    model.ir_version = like.ir_version
    model.producer_name = like.producer_name or "compressor"
    del model.opset_import[:]
    model.opset_import.extend(like.opset_import)
    for imp in graph.import_domains or []:
        have = [o for o in model.opset_import if o.domain == imp.domain]
        if not have:
            model.opset_import.append(imp)
        elif imp.domain in ("", "ai.onnx") and imp.version > have[0].version:
            have[0].version = imp.version  # a pass relabelled the default domain (lower.sparse: 13..15 -> 16)
            model.ir_version = max(model.ir_version, onnx.helper.find_min_ir_version_for(
                list(model.opset_import), ignore_unknown=True))
    del model.metadata_props[:]
    model.metadata_props.extend(like.metadata_props)
    return model


def _export_filled(graph: gs.Graph, fill: bool = True, type_check: bool = True) -> onnx.ModelProto:
    """``gs.export_onnx`` with the data of large constants written once, into the final model: exported
    as they are, each passes through graphsurgeon's GraphProto and again through ``make_model``'s
    copy (three weight-sized copies alive at once). They are exported as placeholders and filled
    in the model afterwards; the graph is left as it was. ``fill=False``: left as placeholders (external
    data at ``IN_MEMORY``), a weightless model for graph-level tools."""
    from onnx_graphsurgeon.ir.tensor import LazyValues

    swapped: dict[str, tuple[gs.Constant, Any]] = {}
    for g in [graph, *graph.subgraphs(recursive=True)]:
        for t in g.tensors().values():
            if not isinstance(t, gs.Constant) or t.name in swapped or t._values is None:
                continue
            vals = t._values
            lazy = isinstance(vals, LazyValues)
            if lazy and (type(vals) is not LazyValues or vals.tensor.data_location == TensorProto.EXTERNAL):
                continue  # sparse values; data still on disk
            nbytes = vals.nbytes if lazy else getattr(vals, "nbytes", 0)
            if nbytes < WEIGHTLESS_MIN_BYTES or (not lazy and not isinstance(vals, np.ndarray)):
                continue
            dtype = vals.tensor.data_type if lazy else onnx.helper.np_dtype_to_tensor_dtype(vals.dtype)
            ph = TensorProto(name=t.name, data_type=dtype, dims=list(vals.shape))
            ph.data_location = TensorProto.EXTERNAL
            ph.external_data.add(key="location", value=IN_MEMORY)
            swapped[t.name] = (t, vals)
            t._values = LazyValues(ph)
    try:
        model = gs.export_onnx(graph, do_type_check=type_check)
    finally:
        for t, vals in swapped.values():
            t._values = vals
    if swapped and fill:
        for tp in onnx.external_data_helper._get_all_tensors(model):
            hit = swapped.get(tp.name)
            if hit is None or tp.data_location != TensorProto.EXTERNAL:
                continue
            vals = hit[1]
            if isinstance(vals, LazyValues):
                tp.CopyFrom(vals.tensor)
            else:
                tp.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(vals), hit[0].name))
            tp.name = hit[0].name
    return model


def export_weightless(graph: gs.Graph, type_check: bool = False) -> onnx.ModelProto:
    """The graph exported without the data of its large constants (``weightless``'s placeholders), for
    shape inference and checks; the graph itself is not changed (no cleanup, no sort)."""
    return _export_filled(graph, fill=False, type_check=type_check)


def _rename(t: gs.Tensor, name: str) -> None:
    """Rename a tensor without touching the model it was imported from: graphsurgeon exports a lazily
    loaded constant by renaming the *source* TensorProto in place, so it gets a copy first."""
    from onnx_graphsurgeon.ir.tensor import LazyValues

    if isinstance(t, gs.Constant) and isinstance(t._values, LazyValues):
        proto = TensorProto()
        proto.CopyFrom(t._values.tensor)
        t._values = LazyValues(proto)
    t.name = name


def _rebind(tensors, old: gs.Tensor, new: gs.Tensor) -> None:
    for i, t in enumerate(list(tensors)):
        if t is old:
            tensors[i] = new


def _flatten_constant_ifs(graph: gs.Graph) -> int:
    """Replace every ``If`` whose condition is a constant by the nodes of the taken branch.
    onnx-graphsurgeon's own flattening loses the If's output when the branch output has no
    producer node inside the branch (a folded constant, an outer-scope value) and leaves other
    readers of a rebound branch output dangling; here such outputs get an Identity node."""
    count = 0
    for g in [graph, *graph.subgraphs(recursive=True)]:
        index = 0
        while index < len(g.nodes):
            node = g.nodes[index]
            cond = node.inputs[0] if node.op == "If" and node.inputs else None
            if not isinstance(cond, gs.Constant) or np.asarray(cond.values).size != 1:
                index += 1
                continue
            sub = node.attrs["then_branch" if bool(np.asarray(cond.values).reshape(-1)[0]) else "else_branch"]
            for t in sub._local_tensors().values():
                _rename(t, f"{t.name}_if{count}_{sub.name}")
            outs = list(node.outputs)
            node.inputs.clear()
            node.outputs.clear()
            new_nodes = list(sub.nodes)
            bound: dict[int, gs.Tensor] = {}
            for node_out, sub_out in zip(outs, sub.outputs):
                producer = sub_out.inputs[0] if sub_out.inputs and any(sub_out.inputs[0] is n for n in sub.nodes) else None
                if producer is not None and id(sub_out) not in bound and not isinstance(sub_out, gs.Constant):
                    bound[id(sub_out)] = node_out
                    for consumer in list(sub_out.outputs):  # other readers inside the branch (and deeper)
                        _rebind(consumer.inputs, sub_out, node_out)
                    _rebind(producer.outputs, sub_out, node_out)
                else:
                    src = bound.get(id(sub_out), sub_out)
                    new_nodes.append(gs.Node("Identity", name=f"{node.name or 'If'}_out{len(new_nodes)}_if{count}",
                                             inputs=[src], outputs=[node_out]))
            g.nodes[index:index + 1] = new_nodes
            index += len(new_nodes)
            count += 1
    return count


def _produce_outputs(graph: gs.Graph) -> None:
    """A graph output (main graph or a subgraph) that folding turned into a constant is produced by an
    Identity of that constant again, so every output stays the output of a node."""
    for g in [graph, *graph.subgraphs(recursive=True)]:
        for i, t in enumerate(list(g.outputs)):
            if isinstance(t, gs.Constant):
                out = gs.Variable(t.name, dtype=t.dtype, shape=t.shape)
                _rename(t, t.name + "_value")
                g.nodes.append(gs.Node("Identity", name=f"{out.name}_identity", inputs=[t], outputs=[out]))
                g.outputs[i] = out


def fold_constants(graph: gs.Graph) -> gs.Graph:
    """Fold constant subgraphs (onnx-graphsurgeon's folder run with onnxruntime; subgraphs too), lift
    ``Constant`` nodes, replace constant-condition ``If`` nodes by their branch. Nothing larger than
    the memory limit is folded; every graph output stays a node output; nodes and constants that a
    subgraph reads from the outer scope are kept (graphsurgeon's cleanup follows outer-scope reads)."""
    import onnxruntime

    # graphsurgeon evaluates with onnxruntime sessions on the default logger, and a failed evaluation is
    # expected (error_ok): its warnings/errors would reach the terminal's stderr, not only the report
    onnxruntime.set_default_logger_severity(4)
    limit = memory_limit_bytes()
    graph.fold_constants(error_ok=True, flatten_subgraphs=False, size_threshold=limit)
    if _flatten_constant_ifs(graph):
        graph.cleanup(remove_unused_graph_inputs=False)
        graph.fold_constants(error_ok=True, flatten_subgraphs=False, size_threshold=limit)
    # fold_constants turns Constant nodes into gs.Constant tensors; cleanup drops the nodes
    for g in [graph, *graph.subgraphs(recursive=True)]:
        for node in list(g.nodes):
            if node.op == "Constant" and node.outputs and isinstance(node.outputs[0], gs.Constant):
                node.outputs.clear()
    _produce_outputs(graph)
    graph.cleanup(remove_unused_graph_inputs=False)
    return graph


def normalize(model: onnx.ModelProto) -> onnx.ModelProto:
    """Lift Constant nodes into initializers and fold constant subgraphs."""
    graph = to_graph(model)
    fold_constants(graph)
    out = to_model(graph, model)
    del graph
    collect()
    return out


def collect() -> None:
    """Collect reference cycles now: a dropped graphsurgeon graph (nodes and tensors refer to each other)
    holds, through its lazily loaded constants, the protobuf it was imported from, and a sub-message
    keeps its whole model's memory alive; left to the next automatic collection, that is one more
    weight-sized copy alive per stage."""
    import gc

    gc.collect()


def available_memory() -> int:
    """Bytes this process can still allocate: MemAvailable, capped by a cgroup limit if one is set."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (OSError, ValueError, AttributeError):
            avail = 8 << 30
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
            if text.isdigit():
                avail = min(avail, int(text))
        except OSError:
            pass
    return avail


def memory_limit_bytes() -> int:
    """The largest single tensor the tool accepts: a quarter of the available memory (at least 256 MiB):
    reference runs, verification inputs and the passes hold several tensors of that size at once."""
    return max(available_memory() // MEMORY_FRACTION, 256 << 20)


def _node_name(node: onnx.NodeProto) -> str:
    return f"{node.op_type} node {node.name!r}" if node.name else f"an unnamed {node.op_type} node"


def _all_graphs(graph: onnx.GraphProto, where: str = ""):
    yield graph, where
    for node in graph.node:
        for attr in node.attribute:
            subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for sub in subs:
                yield from _all_graphs(sub, f"{where}{_node_name(node)} / {attr.name}: ")


def check_resources(model: onnx.ModelProto, limit: int | None = None) -> None:
    """Refuse, before anything is allocated, a model whose statically known tensors would not fit in
    memory (inputs, outputs and inferred intermediates of every graph, subgraphs included; each must fit
    ``memory_limit_bytes()``) or whose Conv/Pool nodes carry absurd pads, strides, dilations or kernels.
    Exit 4 naming the tensor or node and the size."""
    limit = memory_limit_bytes() if limit is None else limit
    top_inputs = {vi.name for vi in graph_inputs(model)}
    for g, where in _all_graphs(model.graph):
        inits = {i.name for i in g.initializer}
        infos = {vi.name: vi for vi in [*g.value_info, *g.output, *g.input]}
        # graph inputs first, then node outputs in graph order: the first offending node is named
        order = [(vi.name, None) for vi in g.input] + [(o, n) for n in g.node for o in n.output]
        for name, n in order:
            vi = infos.get(name)
            if vi is None or name in inits or vi.type.WhichOneof("value") != "tensor_type" \
                    or not vi.type.tensor_type.HasField("shape"):
                continue
            dims = [d.dim_value for d in vi.type.tensor_type.shape.dim if d.HasField("dim_value")]
            if not where and name in top_inputs:
                what = f"input {name!r}"
            elif n is not None:
                what = f"{where}tensor {name!r} (output of {_node_name(n)})"
            else:
                what = f"{where}tensor {name!r}"
            shape = "x".join(str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?")
                             for d in vi.type.tensor_type.shape.dim) or "scalar"
            if any(d < 0 for d in dims):
                raise InputError(f"{what} has a negative dimension ({shape})", hint="the model is corrupt")
            count = 1
            for d in dims:
                count *= d
            size = count * _itemsize(vi.type.tensor_type.elem_type)
            if size > limit:
                raise InputError(f"{what} has shape {shape}: {_human_bytes(size)}, over the limit of {_human_bytes(limit)} "
                                 f"(1/{MEMORY_FRACTION} of the available memory)",
                                 hint="check the model's static dims (or fix them with --input-shape)")
        for node in g.node:
            if node.op_type not in SPATIAL_OPS:
                continue
            for attr in node.attribute:
                if attr.name not in ("pads", "strides", "dilations", "kernel_shape", "output_padding"):
                    continue
                vals = list(attr.ints)
                low = 0 if attr.name in ("pads", "output_padding") else 1
                bad = [v for v in vals if v < low or v > MAX_ATTR_EXTENT]
                if bad:
                    raise InputError(f"{where}{_node_name(node)} has {attr.name} {vals}: "
                                     f"each must be in [{low}, {MAX_ATTR_EXTENT}]", hint="the model is corrupt or was edited by hand")


def name_nodes(model: onnx.ModelProto) -> int:
    """Give every unnamed node (subgraphs included) a unique name ``<op_type>_<k>``; returns how
    many were named. Exporters may leave names empty, and every per-layer rule (``--ignore``
    globs, the final-classifier and stem rules, report rows) is keyed by node name: with all
    names "" the classifier rule matched every MatMul of such a model and kept it dense."""
    graphs = [g for g, _ in _all_graphs(model.graph)]
    taken = {n.name for g in graphs for n in g.node}
    named = 0
    counters: dict[str, int] = {}
    for g in graphs:
        for n in g.node:
            if n.name:
                continue
            while True:
                counters[n.op_type] = counters.get(n.op_type, 0) + 1
                cand = f"{n.op_type}_{counters[n.op_type]}"
                if cand not in taken:
                    break
            n.name = cand
            taken.add(cand)
            named += 1
    return named


def load(path: Path, input_shapes: dict[str, list[int]] | None = None, data_shapes: dict[str, tuple[int, ...]] | None = None,
         notes: list[str] | None = None, files: list[Path] | None = None) -> onnx.ModelProto:
    """Full load stage: read, check, convert opset, fix shapes, check resources, normalise, infer shapes.
    ``data_shapes``: array shapes of the run's data files (``npz_shapes``), which fix dynamic dims left
    open by ``input_shapes``; ``notes`` receives a line per input fixed that way; ``files`` the files
    the model was read from (``source_files``)."""
    model = read_model(path, load_data=False)  # external data stays on disk through the graph-level checks
    if files is not None:
        files[:] = source_files(path, model)
    if (default_opset(model) or TARGET_MIN_OPSET) < TARGET_MIN_OPSET:
        attach_external_data(model, path.parent)  # the version converter's result is checked in memory
    model = _convert_opset(model)
    _normalize_ir(model)
    name_nodes(model)
    _check_io_types(model)
    _fix_shapes(model, input_shapes or {}, data_shapes, notes)
    check_resources(model)  # declared shapes and node attributes, before anything is computed
    model = infer_shapes(model, data_prop=False)
    check_resources(model)  # inferred intermediates, before data propagation, folding or running anything
    model = infer_shapes(model)
    check_resources(model)  # shapes computed from Shape chains
    attach_external_data(model, path.parent)
    model = normalize(model)
    model = infer_shapes(model)
    for _ in range(4):  # a folded Shape chain gives the next Reshape a static shape, whose output feeds the next
        # Shape: fold to a fixpoint (Swin's window/head Reshapes need two rounds; prune.channels needs them constant)
        if not any(n.op_type == "Shape" for n in model.graph.node):
            break
        count = len(model.graph.node)
        model = infer_shapes(normalize(model))
        if len(model.graph.node) == count:
            break
    return model


def input_specs(model: onnx.ModelProto) -> list[TensorSpec]:
    return [_spec(vi) for vi in graph_inputs(model)]


def output_specs(model: onnx.ModelProto) -> list[TensorSpec]:
    return [_spec(vi) for vi in model.graph.output]


def _spec(vi: onnx.ValueInfoProto) -> TensorSpec:
    tt = vi.type.tensor_type
    shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim)
    return TensorSpec(vi.name, shape, onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))


SINGLE_FILE_MAX = 1_800_000_000  # above this, a model is saved with its weights in ``<name>.data``


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Save without serializing the model as a whole (one weight-sized copy, and impossible over 2 GB):
    the graph is written without its initializers, then each initializer on its own. Up to
    ``SINGLE_FILE_MAX`` bytes one protobuf file (the same message ``onnx.save_model`` writes, fields in
    another order); above it the weights go to ``<name>.data`` beside it (page-aligned external data).
    ``model`` is not modified."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    if model_bytes(model) <= SINGLE_FILE_MAX:
        _save_streamed(model, path)
        if data.exists():
            data.unlink()  # a stale weight file from an earlier, larger save
        return
    skel, big = weightless(model, min_bytes=1024)
    offsets: dict[str, tuple[int, int]] = {}
    with open(data, "wb") as f:
        for t in big:
            pad = (-f.tell()) % 4096
            f.write(b"\0" * pad)
            raw = t.raw_data if t.raw_data else numpy_helper.to_array(t).tobytes()
            offsets[t.name] = (f.tell(), len(raw))
            f.write(raw)
            del raw
    for t in skel.graph.initializer:
        if t.name in offsets and any(e.key == "location" and e.value == IN_MEMORY for e in t.external_data):
            del t.external_data[:]
            off, n = offsets[t.name]
            for k, v in (("location", data.name), ("offset", str(off)), ("length", str(n))):
                t.external_data.add(key=k, value=v)
    _save_streamed(skel, path)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


_GRAPH_KEY = bytes([(7 << 3) | 2])  # ModelProto.graph, length-delimited
_INIT_KEY = bytes([(5 << 3) | 2])  # GraphProto.initializer, length-delimited


def _save_streamed(model: onnx.ModelProto, path: Path) -> None:
    """Write ``model`` as one protobuf, its main-graph initializers serialized one at a time."""
    rest = onnx.ModelProto()
    _copy_fields(model, rest, "graph")
    graph = onnx.GraphProto()
    _copy_fields(model.graph, graph, "initializer")
    head = graph.SerializeToString()
    sizes = [t.ByteSize() for t in model.graph.initializer]
    glen = len(head) + sum(1 + len(_varint(n)) + n for n in sizes)
    with open(path, "wb") as f:
        f.write(rest.SerializeToString())
        if model.HasField("graph"):
            f.write(_GRAPH_KEY + _varint(glen) + head)
            for t, n in zip(model.graph.initializer, sizes):
                f.write(_INIT_KEY + _varint(n))
                f.write(t.SerializeToString())
