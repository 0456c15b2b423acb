"""A single-file target plugin:

    compress models/digits_cnn.onnx --plugin examples/plugin_target_example.py --target ort-cpu --sparsity 0.5

Defines the target ``ort-cpu``: the artifact is the compressed model after onnxruntime's full graph
optimizations (``SessionOptions.optimized_model_filepath``), for deployments that run onnxruntime. It shows
the whole target contract (``targets/base.py``): ``expand`` (tag -> spec), ``compile`` (which takes
``CompileOptions``), ``run`` and ``time`` (what the pipeline uses to verify the artifact against the
compressed model and to measure it). The same class in a package goes under the ``compressor.targets``
entry-point group; in a script, ``compressor.register_target(OrtCpuTarget)``.
"""
from __future__ import annotations

import platform
import time
from pathlib import Path

import numpy as np

from targets.base import Artifact, CompileOptions, NotRunnableHere, Target, TargetSpec, sha256_file


class OrtCpuTarget(Target):
    name = "ort-cpu"
    description = "onnxruntime-optimized ONNX for the CPU execution provider (example plugin)"
    required_passes = ()  # onnxruntime runs LSTM/GRU and every standard op: nothing to lower first

    def expand(self, tag: str) -> TargetSpec:
        return TargetSpec(tag=tag, family="ort", tvm_target={}, triple=f"{platform.machine()}-onnxruntime",
                          isa_features=(), preferred_pattern="unstructured", round_to=8, quant_dtype="int8",
                          cross_compiler=None, runs_here=True, extra={"provider": "CPUExecutionProvider"})

    def compile(self, model_path: Path, spec: TargetSpec, out_dir: Path, input_shapes: dict[str, list[int]],
                options: CompileOptions | None = None) -> Artifact:
        import onnxruntime as ort

        t0 = time.perf_counter()
        out = Path(out_dir) / "model.ort.onnx"
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED  # portable across CPUs
        so.optimized_model_filepath = str(out)
        so.log_severity_level = 3
        ort.InferenceSession(str(model_path), so, providers=[spec.extra["provider"]])
        opts = CompileOptions.of(options)
        warnings = ("ort-cpu: no tuning (onnxruntime picks its kernels at load time)",) if opts.tuning_requested else ()
        return Artifact(path=Path(out.name), kind="onnxruntime-optimized-onnx", sha256=sha256_file(out),
                        details={"compile_seconds": round(time.perf_counter() - t0, 3), "bytes": out.stat().st_size,
                                 "onnxruntime": ort.__version__}, warnings=warnings)

    def _session(self, artifact_path: Path, spec: TargetSpec):
        import onnxruntime as ort

        if not Path(artifact_path).is_file():
            raise NotRunnableHere(f"no artifact at {artifact_path}")
        so = ort.SessionOptions()
        so.log_severity_level = 3
        return ort.InferenceSession(str(artifact_path), so, providers=[spec.extra["provider"]])

    def run(self, artifact_path: Path, spec: TargetSpec, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        return list(self._session(artifact_path, spec).run(None, inputs))

    def time(self, artifact_path: Path, spec: TargetSpec, inputs: dict[str, np.ndarray], **kw) -> float:
        sess = self._session(artifact_path, spec)
        sess.run(None, inputs)
        ts = []
        for _ in range(int(kw.get("repeat", 20))):
            t = time.perf_counter()
            sess.run(None, inputs)
            ts.append(time.perf_counter() - t)
        return float(np.median(ts))
