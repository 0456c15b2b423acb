"""onnxruntime as the reference runtime: sessions, batched runs, latency.

Reference numerics use ``ORT_DISABLE_ALL`` (no graph rewrites), so what is
compared is the model itself, not onnxruntime's fusions. Latency uses the
default optimisation level, as a user would ship it.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort

from compressor.errors import InputError


def session(model: onnx.ModelProto | bytes | str, optimized: bool = False, threads: int = 0) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    so.log_severity_level = 4  # errors come back as exceptions (one line from the CLI); no log lines on stderr
    if threads:
        so.intra_op_num_threads = threads
    keep: list[np.ndarray] = []
    if isinstance(model, onnx.ModelProto):
        src = _weightless_source(model, so, keep)
    else:
        src = model
    try:
        sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types
        raise InputError(f"onnxruntime cannot load the model: {' '.join(str(exc).split())[:300]}") from exc
    if keep and not _copies_external_initializers():
        sess._compressor_initializers = keep  # onnxruntime reads these buffers for the session's lifetime
    return sess


_COPIES: bool | None = None


def _copies_external_initializers() -> bool:
    """Whether this onnxruntime copies the arrays given to ``add_external_initializers`` (1.32 does: then
    the caller's arrays can go as soon as the session exists, one weight-sized copy less per session).
    Measured once per process on a 64x64 MatMul + Gather: the array is zeroed after the session is made."""
    global _COPIES
    if _COPIES is None:
        from onnx import TensorProto, helper

        w = np.arange(64 * 64, dtype=np.float32).reshape(64, 64) / 4096
        g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"]), helper.make_node("Gather", ["W", "i"], ["z"])],
                              "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64]),
                                        helper.make_tensor_value_info("i", TensorProto.INT64, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64]),
                               helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 64])])
        ph = g.initializer.add(name="W", data_type=TensorProto.FLOAT, dims=[64, 64])
        ph.data_location = TensorProto.EXTERNAL
        ph.external_data.add(key="location", value="probe")
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8
        a = w.copy()
        so = ort.SessionOptions()
        so.log_severity_level = 4
        so.add_external_initializers(["W"], [ort.OrtValue.ortvalue_from_numpy(a)])
        try:
            sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
            a[...] = 0
            y, z = sess.run(None, {"x": np.ones((1, 64), np.float32), "i": np.array([1], np.int64)})
            _COPIES = bool(np.allclose(y, w.sum(0, keepdims=True), rtol=1e-4) and np.array_equal(z, w[1:2]))
        except Exception:  # noqa: BLE001 - an onnxruntime without the API: keep the arrays
            _COPIES = False
    return _COPIES


def _weightless_source(model: onnx.ModelProto, so: ort.SessionOptions, keep: list[np.ndarray]) -> bytes:
    """The serialized model for onnxruntime, its large initializers handed over as arrays
    (``add_external_initializers``; onnxruntime 1.32 copies them once when the session is made, see
    ``_copies_external_initializers``) instead of inside the bytes (serialized, parsed and copied again:
    three weight-sized copies at once, and impossible over 2 GB). ``keep`` receives the arrays."""
    from onnx import numpy_helper

    from compressor import ir

    skel, big = ir.weightless(model)
    if not big:
        return model.SerializeToString()
    names, values = [], []
    for t in big:
        arr = numpy_helper.to_array(t)  # a new contiguous array
        keep.append(arr)
        names.append(t.name)
        values.append(ort.OrtValue.ortvalue_from_numpy(arr))
    so.add_external_initializers(names, values)
    return skel.SerializeToString()


def run_all(sess: ort.InferenceSession, feeds: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
    """Run each sample; returns outputs[sample][output_index]."""
    return [sess.run(None, f) for f in feeds]


SETTLE_S = 0.05


def settle() -> None:
    """Pause before timing another engine. onnxruntime's intra-op threads (and torch's OpenMP
    threads) keep spinning for a while after a run; a TVM call timed right after them finds its
    pool threads without a core and ran up to 40x slower here (2-thread 512x512 GEMV: 0.005 ms
    alone, 0.19 ms right after onnxruntime, 0.002 ms after a 50 ms pause). Each engine is timed
    as a user would run it: alone."""
    time.sleep(SETTLE_S)


WARMUP_S = 0.2


def warm_up(fn: Callable[[], object], seconds: float = WARMUP_S, min_calls: int = 3) -> None:
    """Call ``fn`` for ``seconds`` (at least ``min_calls`` times) before timing it: onnxruntime
    ran its first ~1000 calls of a small GEMV up to 3x slower than the steady state here, so a
    fixed 3-call warm-up made it look slower than it is."""
    t0 = time.perf_counter()
    n = 0
    while n < min_calls or time.perf_counter() - t0 < seconds:
        fn()
        n += 1


def median_latency(fn: Callable[[], object], warmup: int = 3, repeats: int = 20, budget_s: float = 5.0) -> float:
    """Median wall time of ``fn`` in seconds, bounded by a time budget."""
    warm_up(fn, min_calls=warmup)
    times = []
    start = time.perf_counter()
    while len(times) < repeats and (len(times) < 3 or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def compare_latency(fns: dict[str, Callable[[], object]], rounds: int = 5, per_round: int = 5) -> dict[str, float]:
    """Interleave the candidates round by round (noisy machines) and return median seconds each."""
    for fn in fns.values():
        settle()
        warm_up(fn)
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            settle()
            for _ in range(per_round):
                t0 = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) for k, v in samples.items()}
