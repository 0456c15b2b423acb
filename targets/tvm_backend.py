"""Shared TVM (apache-tvm 0.27, Relax-only) plumbing for the built-in targets.

* ``import_onnx``: ONNX file/model -> Relax IRModule (weights embedded as constants),
  with a precise ``TargetError`` for operators the Relax ONNX frontend lacks.
* ``compile_library``: ``tvm.compile`` with the target's default Relax pipeline,
  then ``export_library`` (optionally with a cross linker).
* ``run_library`` / ``time_library``: load the .so into a Relax VM and execute it.

TVM is imported lazily: ``import targets`` must stay cheap for the CLI.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
import statistics
import subprocess
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from compressor import sparse_ops as sparse_op_names
from compressor.errors import DependencyError, InputError, TargetError


def _tvm():
    try:
        import tvm  # noqa: F401
        from tvm import relax  # noqa: F401
    except ImportError as exc:  # pragma: no cover - tvm is a hard dependency
        raise DependencyError(
            f"apache-tvm is not importable ({exc})", hint="pip install apache-tvm==0.27.0.post1"
        ) from exc
    import tvm

    from targets.dense_kernels import default_runtime_threads

    default_runtime_threads()  # one pool worker per physical core (TVM halves the count on x86)
    return tvm


def one_line(exc: BaseException, limit: int = 300) -> str:
    """First meaningful line of a (possibly huge, multi-line) TVM error."""
    text = str(exc).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # TVM errors often end with the real message after a traceback.
    msg = ""
    for ln in reversed(lines):
        if not ln.startswith(("File ", "at ", "^", "#")) and "Traceback" not in ln:
            msg = ln
            break
    msg = msg or (lines[0] if lines else type(exc).__name__)
    msg = " ".join(msg.split())
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


# ---------------------------------------------------------------- ONNX import


def _load_onnx(model: str | Path | Any):
    import onnx

    if isinstance(model, (str, Path)):
        try:
            return onnx.load(str(model))
        except Exception as exc:
            raise InputError(f"cannot read ONNX model {model}: {one_line(exc)}") from exc
    return model


def graph_inputs(model) -> list[Any]:
    """ONNX graph inputs that are real inputs (initializers excluded), in graph order."""
    inits = {t.name for t in model.graph.initializer}
    return [vi for vi in model.graph.input if vi.name not in inits]


def unsupported_ops(model, extra: Sequence[str] = ()) -> list[str]:
    """Operator types (domain-qualified when not the default domain) the Relax ONNX
    frontend has no converter for. Empty when everything is supported. ``extra``: ops a
    converter of ours is registered for (``compressor``-domain ops, GRU/LSTM; see ``import_onnx``)."""
    try:
        from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

        known = set(_get_convert_map())
    except Exception:  # private helper moved: fall back to catching the import error
        return []
    known |= {"If", "Constant"}
    missing: set[str] = set()
    for node in model.graph.node:
        if node.domain in ("compressor", "", "ai.onnx") and node.op_type in extra:
            continue
        if node.op_type in known and node.domain in ("", "ai.onnx"):
            continue
        if node.op_type not in known or node.domain not in ("", "ai.onnx", "com.microsoft"):
            name = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
            missing.add(name)
    return sorted(missing)


def _opset(model) -> int | None:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return None


def import_onnx(
    model_path: str | Path | Any,
    input_shapes: dict[str, Sequence[int]] | None = None,
    target: dict[str, Any] | None = None,
    rnn_modes: tuple[str, str] | None = None,
):
    """ONNX -> Relax IRModule via ``tvm.relax.frontend.onnx.from_onnx``.

    Weights are embedded as constants (``keep_params_in_input=False``) so ``main``
    takes exactly the graph inputs in graph order. ``input_shapes`` overrides the
    shapes of named inputs (e.g. to pin a dynamic batch); input dtypes come from
    the graph. ``target`` (the TVM target dict) enables the converters for the
    ``compressor::SparseMatMul[Relu]`` ops of ``lower.sparse``, lowered to TIR kernels
    specialised for that target (``targets.sparse_kernels``), and runs ONNX GRU/LSTM as fused
    recurrence kernels (``targets.rnn_kernels``; ``rnn_modes`` forces their weights' modes,
    e.g. ``("dense", "dense")`` for a dense twin).
    """
    tvm = _tvm()
    import onnx
    from tvm.relax.frontend.onnx import from_onnx

    model = _load_onnx(model_path)
    extra_converters: dict[str, Any] = {}
    states: dict[str, Any] = {}
    if target is not None:
        for kc in KERNEL_CONVERTERS:  # later entries win where two convert the same op (conv's fused Relu)
            if kc.applies(model):
                converters, states[kc.name] = kc.make(target, model, rnn_modes)
                extra_converters.update(converters)
    conv_state, dense_state, rnn_state = states.get("conv"), states.get("dense"), states.get("rnn")
    missing = unsupported_ops(model, tuple(extra_converters))
    if missing:
        raise TargetError(
            f"TVM Relax ONNX frontend does not support operator(s): {', '.join(missing)}",
            hint="this target's artifact cannot be built for this model (replace the op or drop the target)",
        )
    shapes: dict[str, list] = {}
    dtypes: dict[str, str] = {}
    given = dict(input_shapes or {})
    for vi in graph_inputs(model):
        tt = vi.type.tensor_type
        dtypes[vi.name] = str(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
        if vi.name in given:
            shapes[vi.name] = [int(d) for d in given.pop(vi.name)]
        else:
            dims = []
            for d in tt.shape.dim:
                if d.HasField("dim_value") and d.dim_value > 0:
                    dims.append(int(d.dim_value))
                else:
                    dims.append(d.dim_param or "?")
            if all(isinstance(d, int) for d in dims):
                shapes[vi.name] = dims
    if given:
        raise InputError(
            f"input shape given for unknown input(s) {sorted(given)}",
            hint=f"graph inputs are {[vi.name for vi in graph_inputs(model)]}",
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Renaming name x.1 to x_1" noise
            # the frontend prints "Error converting operator ..." with every input before re-raising
            with _extra_onnx_converters(extra_converters), contextlib.redirect_stdout(io.StringIO()):
                mod = from_onnx(
                    model,
                    shape_dict=shapes or None,
                    dtype_dict=dtypes or "float32",
                    opset=_opset(model),
                    keep_params_in_input=False,
                )
    except TargetError:
        raise
    except tvm.error.OpNotImplemented as exc:
        raise TargetError(f"TVM Relax ONNX frontend: {one_line(exc)}") from exc
    except Exception as exc:
        raise TargetError(f"TVM Relax ONNX import failed: {type(exc).__name__}: {one_line(exc)}") from exc
    if dense_state is not None:
        from targets import dense_kernels

        mod = dense_kernels.annotate(mod, dense_state)  # logs + IRModule attr "compressor_dense"
    return mod.with_attr(KERNELS_ATTR, json.dumps(_kernel_record(dense_state, conv_state, rnn_state)))


@dataclass(frozen=True)
class KernelConverters:
    """One family of hand-scheduled kernels the importer plugs into the Relax ONNX frontend:
    ``applies(model)`` says whether the model has ops for it; ``make(target, model, rnn_modes)``
    returns ``({onnx op type: converter class}, state)`` (the state is kept by name for the kernel
    record). Registered in :data:`KERNEL_CONVERTERS`, in application order."""

    name: str
    applies: Callable[[Any], bool]
    make: Callable[[dict, Any, Any], tuple[dict[str, Any], Any]]


def _sparse_converters(target, model, rnn_modes):
    from targets import sparse_int8, sparse_kernels

    return {**sparse_kernels.relax_converters(target), **sparse_int8.relax_converters(target)}, None


def _conv_converters(target, model, rnn_modes):
    from targets import conv_kernels  # hand-scheduled CPU conv kernels (+ fused Relu/Clip); none for CUDA

    return conv_kernels.relax_converters(target, model)


def _dense_converters(target, model, rnn_modes):
    from targets import dense_kernels  # packed CPU kernels for constant-weight MatMul/Gemm; none for CUDA

    return dense_kernels.relax_converters(target, model)


def _rnn_converters(target, model, rnn_modes):
    from targets import rnn_kernels  # fused recurrence kernels (what lower.rnn leaves whole); none for CUDA

    return rnn_kernels.relax_converters(target, rnn_modes)


def _has(model, pred) -> bool:
    return any(pred(n) for n in model.graph.node)


KERNEL_CONVERTERS: list[KernelConverters] = [
    KernelConverters("sparse", lambda m: _has(m, lambda n: n.domain == sparse_op_names.DOMAIN), _sparse_converters),
    KernelConverters("conv", lambda m: _has(m, lambda n: n.op_type == "Conv" or n.domain == sparse_op_names.DOMAIN
                                             and n.op_type in sparse_op_names.CONV_OPS + sparse_op_names.KXK_OPS),
                     _conv_converters),
    KernelConverters("dense", lambda m: _has(m, lambda n: n.op_type in ("MatMul", "Gemm")), _dense_converters),
    KernelConverters("rnn", lambda m: _has(m, lambda n: n.op_type in ("GRU", "LSTM")), _rnn_converters),
]


KERNELS_ATTR = "compressor_kernels"
# dense fallbacks that are not weight layers (attention's activation x activation products):
# TVM's generic matmul is the right code for them, not a missed kernel
_NOT_WEIGHT_LAYER = ("is not a constant",)


def _kernel_record(dense_state: Any, conv_state: Any, rnn_state: Any = None) -> dict[str, Any]:
    rec: dict[str, Any] = {"dense_packed": 0, "dense_shared_weights": 0, "conv": {}, "fallbacks": [],
                           "rnn_fused": list(rnn_state.kernels) if rnn_state is not None else []}
    if dense_state is not None:
        rec["dense_packed"], rec["dense_shared_weights"] = dense_state.kernels, dense_state.shared
        rec["fallbacks"] += [f for f in dense_state.fallbacks if not any(t in f for t in _NOT_WEIGHT_LAYER)]
    if conv_state is not None:
        rec["conv"] = dict(conv_state.kernels)
        rec["fallbacks"] += [f"Conv {f}" for f in conv_state.fallbacks]
    return rec


def kernel_report(mod: Any) -> tuple[dict[str, Any], tuple[str, ...]]:
    """What :func:`import_onnx` recorded about the hand-scheduled CPU kernels: counts of
    packed dense layers and conv kernels by kind, the float32 ops compiled as fast-math
    approximations (``targets.fast_math``), and one warning per weight layer that was left to
    TVM's generic (unscheduled unless tuned) code, with its reason."""
    attrs = mod.attrs
    if attrs is None or KERNELS_ATTR not in attrs:
        return {}, ()
    rec = json.loads(str(attrs[KERNELS_ATTR]))
    from targets import fast_math

    rec["fast_math"] = fast_math.approximated_ops(mod)  # exp/tanh/... as polynomial approximations (CPU)
    warns = tuple(f"kernel: {f}; left to TVM's generic code (unscheduled unless tuned)" for f in rec["fallbacks"])
    return rec, warns


@contextlib.contextmanager
def _extra_onnx_converters(extra: dict[str, Any]):
    """Temporarily add converters to the Relax ONNX frontend's convert map (it looks the
    map up through the module-level ``_get_convert_map`` on every import)."""
    if not extra:
        yield
        return
    from tvm.relax.frontend.onnx import onnx_frontend

    original = onnx_frontend._get_convert_map

    def patched():
        return {**original(), **extra}

    onnx_frontend._get_convert_map = patched
    try:
        yield
    finally:
        onnx_frontend._get_convert_map = original


# ---------------------------------------------------------------- compilation


def make_target(tvm_target: dict[str, Any]):
    tvm = _tvm()
    try:
        return tvm.target.Target(tvm_target)
    except Exception as exc:
        raise TargetError(f"invalid TVM target {tvm_target}: {one_line(exc)}") from exc


def default_relax_pipeline(target):
    """The per-target default Relax pipeline (CPU: legalize + FoldConstant + FuseOps/FuseTIR,
    then default schedules for the fused functions no kernel covers, ``targets.cpu_schedules``;
    CUDA: the same plus dlight GPU schedules). ``tvm.compile``'s "default" string is the
    un-fused generic pipeline for CPU, so pick the target-specific one explicitly."""
    from tvm import relax

    if target.kind.name == "llvm":
        from targets import cpu_schedules

        return cpu_schedules.pipeline(target)
    return relax.get_default_pipeline(target)


def link_command_fcompile(cmd: Sequence[str]) -> Callable:
    """An ``export_library`` fcompile that links with an arbitrary (multi-word) compiler
    command, e.g. ``python -m ziglang cc -target aarch64-linux-gnu``."""

    def _fcompile(output, objects, options=None, **_kwargs):
        objs = [objects] if isinstance(objects, str) else list(objects)
        full = [*cmd, "-shared", "-fPIC", "-o", str(output), *objs, *(options or [])]
        proc = subprocess.run(full, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(
                f"link failed ({shlex.join(full)}):\n{proc.stdout}\n{proc.stderr}".strip()
            )

    _fcompile.output_format = "so"
    return _fcompile


def compile_library(
    mod,
    tvm_target: dict[str, Any],
    out_path: str | Path,
    cc: str | Sequence[str] | Callable | None = None,
    relax_pipeline=None,
    fpack_imports: Callable | None = None,
) -> dict[str, Any]:
    """``tvm.compile`` + ``export_library``. Returns timing details.

    ``cc``: None = host compiler; a str/list = a (cross) compiler command; a callable =
    an export_library fcompile.
    """
    tvm = _tvm()
    target = make_target(tvm_target)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        pipeline = relax_pipeline if relax_pipeline is not None else default_relax_pipeline(target)
        with target:
            ex = tvm.relax.build(mod, target=target, relax_pipeline=pipeline, exec_mode=exec_mode_for(target))
    except Exception as exc:
        raise TargetError(f"TVM compile for {target.kind.name} failed: {one_line(exc)}") from exc
    t1 = time.perf_counter()
    if cc is None:
        fcompile = None
    elif callable(cc):
        fcompile = cc
    else:
        fcompile = link_command_fcompile(shlex.split(cc) if isinstance(cc, str) else list(cc))
    kwargs: dict[str, Any] = {}
    if fcompile is not None:
        kwargs["fcompile"] = fcompile
    if fpack_imports is not None:
        kwargs["fpack_imports"] = fpack_imports
    tmp = out_path.with_name(out_path.name + ".tmp.so")
    try:
        ex.export_library(str(tmp), **kwargs)
        os.replace(tmp, out_path)
    except (TargetError, DependencyError):
        raise
    except Exception as exc:
        raise TargetError(f"exporting the {target.kind.name} library failed: {one_line(exc)}") from exc
    finally:
        if tmp.exists():
            tmp.unlink()
    t2 = time.perf_counter()
    return {"tvm_compile_seconds": round(t1 - t0, 3), "link_seconds": round(t2 - t1, 3),
            "vm_exec_mode": exec_mode_for(target)}


def exec_mode_for(target) -> str:
    """Relax VM mode: "compiled" (``main`` compiled to native code that calls the kernels;
    the bytecode interpreter's per-instruction dispatch is gone) on CPU targets, where a
    small model is dispatch-bound (bench/vm_exec_mode.md: 1.01-1.16x on the models in
    models/onnx, never slower, identical outputs); "bytecode" elsewhere."""
    return "compiled" if target.kind.name == "llvm" else "bytecode"


# ---------------------------------------------------------------- execution


def _sanitize(name: str) -> str:
    """What the Relax ONNX frontend does to input names (``x.1`` -> ``x_1``)."""
    new = name.replace(".", "_")
    if new and not (new[0].isalpha() or new[0] == "_"):
        new = "input_" + new
    return new


class LoadedLibrary:
    """A compiled Relax VM library loaded on a device, callable with named numpy inputs."""

    def __init__(self, path: str | Path, device: str = "cpu"):
        tvm = _tvm()
        from tvm import relax

        self.path = Path(path)
        self.device = tvm.device(device, 0)
        try:
            self.lib = tvm.runtime.load_module(str(self.path))
            self.vm = relax.VirtualMachine(self.lib, self.device)
        except Exception as exc:
            raise TargetError(f"cannot load {self.path.name}: {one_line(exc)}") from exc
        self.main = self.vm["main"]
        try:
            arity = int(self.vm._get_function_arity("main"))
            self.param_names = [str(self.vm._get_function_param_name("main", i)) for i in range(arity)]
        except Exception:
            self.param_names = None

    def order_inputs(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Inputs in ``main``'s parameter order (= ONNX graph input order). Matches by
        exact or frontend-sanitized name, else keeps the dict's order."""
        values = list(inputs.values())
        if self.param_names is None:
            return values
        if len(values) != len(self.param_names):
            raise InputError(
                f"{self.path.name} expects {len(self.param_names)} input(s) {self.param_names}, "
                f"got {len(values)} {list(inputs)}"
            )
        by_name: dict[str, np.ndarray] = {}
        for k, v in inputs.items():
            by_name.setdefault(k, v)
            by_name.setdefault(_sanitize(k), v)
        if all(p in by_name for p in self.param_names):
            return [by_name[p] for p in self.param_names]
        return values

    def __call__(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        tvm = _tvm()
        args = [tvm.runtime.tensor(np.ascontiguousarray(a), self.device) for a in self.order_inputs(inputs)]
        try:
            out = self.main(*args)
        except Exception as exc:
            raise TargetError(f"running {self.path.name} failed: {one_line(exc)}") from exc
        return flatten_outputs(out)

    def call_raw(self, args) -> Any:
        return self.main(*args)


def flatten_outputs(out: Any) -> list[np.ndarray]:
    """VM result (a tensor, or a possibly nested tuple/array of tensors) -> list of numpy
    arrays in graph output order."""
    if hasattr(out, "numpy"):
        return [out.numpy()]
    if isinstance(out, (list, tuple)) or hasattr(out, "__len__") and hasattr(out, "__getitem__"):
        res: list[np.ndarray] = []
        for item in out:
            res.extend(flatten_outputs(item))
        return res
    return [np.asarray(out)]


def run_library(path: str | Path, inputs: dict[str, np.ndarray], device: str = "cpu") -> list[np.ndarray]:
    """Run a compiled library once: outputs as numpy arrays in ONNX graph output order.
    The loaded library is cached per (path, size, mtime) so per-sample loops load it once."""
    st = Path(path).stat()
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns, device)
    lib = _LOADED.get(key)
    if lib is None:
        _LOADED.clear()  # keep at most one library alive
        lib = _LOADED[key] = LoadedLibrary(path, device)
    return lib(inputs)


_LOADED: dict = {}


def time_library(
    path: str | Path,
    inputs: dict[str, np.ndarray],
    device: str = "cpu",
    warmup: int = 3,
    repeat: int = 20,
    min_seconds: float = 0.0,
) -> float:
    """Median wall time in seconds of one ``main`` call (inputs already on device),
    after ``warmup`` calls; keeps measuring until ``repeat`` runs and ``min_seconds``."""
    tvm = _tvm()
    lib = LoadedLibrary(path, device)
    args = [tvm.runtime.tensor(np.ascontiguousarray(a), lib.device) for a in lib.order_inputs(inputs)]
    from compressor.runtime import warm_up

    warm_up(lambda: lib.call_raw(args), min_calls=max(0, warmup))
    lib.device.sync()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max(1, repeat) or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        lib.call_raw(args)
        lib.device.sync()
        times.append(time.perf_counter() - t0)
    return float(statistics.median(times))
