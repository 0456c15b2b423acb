"""Loading and normalising ONNX models, and moving between ModelProto and
onnx-graphsurgeon graphs.

Load stage (DESIGN.md step 1):
  1. read the protobuf without external data, refuse external-data locations
     that escape the model's folder, then load the external data;
  2. ``onnx.checker`` (full check) and opset bounds (default domain 7..current;
     below 13 is converted with ``onnx.version_converter``);
  3. static shapes: dynamic input dims must be fixed with ``--input-shape``;
  4. normalise what exporters emit: ``Constant`` nodes lifted into
     initializers and constant subgraphs folded (onnx-graphsurgeon +
     onnxruntime), then shape inference.
The input file is only ever read.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError
from onnx import TensorProto

from compressor.errors import InputError, UsageError

log = logging.getLogger(__name__)

MIN_OPSET = 7  # below this onnx's version converter is unreliable
TARGET_MIN_OPSET = 13  # models below this are converted up
MAX_OPSET = onnx.defs.onnx_opset_version()


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


def read_model(path: Path) -> onnx.ModelProto:
    """Read and check a model file; one-line InputError on any problem."""
    if not path.exists():
        raise InputError(f"model file not found: {path}")
    if not path.is_file():
        raise InputError(f"model path is not a file: {path}")
    data = path.read_bytes()
    try:
        model = onnx.load_model_from_string(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise InputError(f"not an ONNX model (truncated or corrupt protobuf): {path}: {type(exc).__name__}") from exc
    if model.ir_version <= 0 or not model.HasField("graph") or not model.graph.node:
        raise InputError(f"not an ONNX model (no graph found): {path}")
    _check_external_locations(model, path.parent)
    if any(t.data_location == TensorProto.EXTERNAL for t in onnx.external_data_helper._get_all_tensors(model)):
        onnx.load_external_data_for_model(model, str(path.parent))
    opset = default_opset(model)
    if opset is None or opset < MIN_OPSET or opset > MAX_OPSET:
        raise InputError(
            f"unsupported opset {opset} for the default ONNX domain",
            hint=f"supported: {MIN_OPSET}..{MAX_OPSET} (below {TARGET_MIN_OPSET} is converted)",
        )
    try:
        onnx.checker.check_model(model, full_check=False)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"model fails onnx.checker: {first}") from exc
    return model


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
            raise InputError(f"cannot convert opset {opset} to {TARGET_MIN_OPSET}: {exc}") from exc
        log.info("converted opset %s -> %s", opset, TARGET_MIN_OPSET)
    return model


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _fix_shapes(model: onnx.ModelProto, overrides: dict[str, list[int]]) -> None:
    names = [i.name for i in graph_inputs(model)]
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise UsageError(f"--input-shape names unknown inputs: {', '.join(unknown)}", hint=f"model inputs: {', '.join(names)}")
    for vi in graph_inputs(model):
        dims = vi.type.tensor_type.shape.dim
        if vi.name in overrides:
            want = overrides[vi.name]
            if dims and len(dims) != len(want):
                raise UsageError(f"--input-shape {vi.name}: rank {len(want)} but the model's input has rank {len(dims)}")
            for i, d in enumerate(dims):
                if d.HasField("dim_value") and d.dim_value != want[i]:
                    raise UsageError(f"--input-shape {vi.name}: dim {i} is fixed to {d.dim_value} in the model, got {want[i]}")
            del vi.type.tensor_type.shape.dim[:]
            for w in want:
                vi.type.tensor_type.shape.dim.add().dim_value = w
            continue
        dyn = [i for i, d in enumerate(dims) if not d.HasField("dim_value") or d.dim_value <= 0]
        if dyn or not vi.type.tensor_type.HasField("shape"):
            shown = "x".join(d.dim_param or "?" if not d.HasField("dim_value") else str(d.dim_value) for d in dims)
            raise InputError(
                f"input {vi.name!r} has dynamic dimensions ({shown})",
                hint=f"fix them with --input-shape {vi.name}:" + "x".join("1" if i in dyn else str(d.dim_value) for i, d in enumerate(dims)),
            )
    if overrides:
        # drop stale intermediate shapes so inference recomputes them from the fixed inputs
        del model.graph.value_info[:]
        for out in model.graph.output:
            out.type.tensor_type.ClearField("shape")


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except Exception as exc:
        raise InputError(f"shape inference failed: {' '.join(str(exc).split())[:300]}") from exc


def to_graph(model: onnx.ModelProto) -> gs.Graph:
    return gs.import_onnx(model)


def to_model(graph: gs.Graph, like: onnx.ModelProto) -> onnx.ModelProto:
    """Export a graphsurgeon graph, keeping the original model's metadata."""
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    model = gs.export_onnx(graph, do_type_check=True)
    model.ir_version = like.ir_version
    model.producer_name = like.producer_name or "compressor"
    del model.opset_import[:]
    model.opset_import.extend(like.opset_import)
    for imp in graph.import_domains or []:
        if imp.domain not in {o.domain for o in model.opset_import}:
            model.opset_import.append(imp)
    del model.metadata_props[:]
    model.metadata_props.extend(like.metadata_props)
    return model


def normalize(model: onnx.ModelProto) -> onnx.ModelProto:
    """Lift Constant nodes into initializers and fold constant subgraphs."""
    graph = to_graph(model)
    graph.fold_constants(error_ok=True).cleanup()
    # fold_constants turns Constant nodes into gs.Constant tensors; cleanup drops the nodes
    for node in list(graph.nodes):
        if node.op == "Constant" and isinstance(node.outputs[0], gs.Constant):
            node.outputs.clear()
    graph.cleanup(remove_unused_graph_inputs=False)
    return to_model(graph, model)


def load(path: Path, input_shapes: dict[str, list[int]] | None = None) -> onnx.ModelProto:
    """Full load stage: read, check, convert opset, fix shapes, normalise, infer shapes."""
    model = read_model(path)
    model = _convert_opset(model)
    _fix_shapes(model, input_shapes or {})
    model = infer_shapes(model)
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


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Save, using external data when the model is too large for one protobuf."""
    if model.ByteSize() > 1_800_000_000:
        onnx.save_model(model, str(path), save_as_external_data=True, location=path.name + ".data")
    else:
        onnx.save_model(model, str(path))
