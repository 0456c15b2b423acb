"""aarch64 Linux target: LLVM ``aarch64-linux-gnu`` + NEON, cross-linked.

The shared library is linked with ``aarch64-linux-gnu-gcc`` when it is on PATH,
otherwise with Zig's bundled clang (``python -m ziglang cc -target
aarch64-linux-gnu``; ``ziglang`` is a pip dependency, so this always works).
On a non-aarch64 host the artifact is built and checked (ELF e_machine =
AArch64) but not executed.
"""
from __future__ import annotations

import importlib.util
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from compressor.errors import DependencyError, UsageError
from targets.base import TVM_FRONTEND_PASSES, Artifact, CompileOptions, NotRunnableHere, Target, TargetSpec, library_artifact
from targets.host import detect_host

TRIPLE = "aarch64-linux-gnu"
ARTIFACT = "model_aarch64.so"


def find_cross_linker() -> str | None:
    """Command (shell-quoted string) that links aarch64 shared objects, or None."""
    gcc = shutil.which("aarch64-linux-gnu-gcc")
    if gcc:
        return gcc
    if importlib.util.find_spec("ziglang") is not None:
        return shlex.join([sys.executable, "-m", "ziglang", "cc", "-target", TRIPLE])
    return None


class ArmTarget(Target):
    required_passes = TVM_FRONTEND_PASSES + ("lower.sparse",)  # BSR kernels where the cost model predicts a win
    name = "arm"
    aliases = ("arm64", "arm64-linux", "aarch64", "aarch64-linux", "aarch64-linux-gnu")
    description = "aarch64 Linux shared library (TVM Relax VM, LLVM +neon), cross-linked"

    def expand(self, tag: str) -> TargetSpec:
        host = detect_host()
        tvm_target: dict = {"kind": "llvm", "mtriple": TRIPLE, "mattr": ["+neon"]}
        artifact = ARTIFACT
        if tag.startswith("arm-"):
            from targets.arm_cores import CORES
            from targets.host import _llvm_cpu_is_valid

            cpu = CORES[tag[4:]].llvm_cpu if tag[4:] in CORES else tag[4:]  # arm-a76 = arm-cortex-a76

            if not _llvm_cpu_is_valid(cpu, TRIPLE):
                raise UsageError(
                    f"unknown arm target {tag!r}",
                    hint="use arm (generic aarch64 + NEON), arm-a76 / arm-a55 (cores with a cost model) or "
                         "arm-<llvm cpu>, e.g. arm-cortex-a78",
                )
            tvm_target["mcpu"] = cpu
            artifact = f"model_aarch64_{cpu}.so"
        required: tuple[str, ...] = ("asimd",)  # /proc/cpuinfo name of NEON on aarch64
        from targets.sparse_kernels import llvm_features

        if "dotprod" in llvm_features(tvm_target):  # the int8 sdot kernels (targets.sparse_int8) use it
            required += ("asimddp",)
        runs_here = host.arch == "aarch64" and all(f in host.features for f in required)
        from targets.arm_cores import core_for
        from targets.lower_sparse import cost_isa, pattern_speedups

        core = core_for(tvm_target.get("mcpu"))
        return TargetSpec(
            tag=tag,
            family="arm",
            tvm_target=tvm_target,
            triple=TRIPLE,
            isa_features=required,
            # on matrix products block patterns run 3-4x faster than unstructured on these kernels, on 1x1 convs
            # they are on par (extra["patterns"]); at 90% they fail the gate where unstructured passes (the digits demo: 8x1 / 4x1 are given back to
            # 45% zeros by the accuracy search, unstructured keeps 88.5% and lowers): --pattern 8x1 is the
            # faster choice where the model's accuracy allows it (bench/cost_model_arm.md)
            preferred_pattern="unstructured",
            round_to=4,
            quant_dtype="int8",
            cross_compiler=None if host.arch == "aarch64" else find_cross_linker(),
            runs_here=runs_here,
            extra={"artifact_name": artifact, "simd": "neon-128",
                   "core_model": core.llvm_cpu if core else None,
                   "patterns": pattern_speedups(cost_isa(tvm_target), tvm_target=tvm_target)},
        )

    def compile(
        self, model_path: Path, spec: TargetSpec, out_dir: Path, input_shapes: dict[str, list[int]],
        options: CompileOptions | None = None,
    ) -> Artifact:
        """``options`` as for x86: tuning needs measurements on the device, so here an existing
        tuning database (``--tuning-db``, or the per-target default) is only applied."""
        from targets import tvm_backend

        host = detect_host()
        linker = spec.cross_compiler
        if host.arch != "aarch64" and not linker:
            raise DependencyError(
                "no aarch64 linker: neither aarch64-linux-gnu-gcc on PATH nor the ziglang package",
                hint="pip install ziglang",
            )
        name = spec.extra.get("artifact_name", ARTIFACT)
        out = Path(out_dir) / name
        t0 = time.perf_counter()
        opts = CompileOptions.of(options)
        mod = tvm_backend.import_onnx(model_path, input_shapes, target=spec.tvm_target,
                                     rnn_modes=opts.rnn_modes)
        kernels, kernel_warnings = tvm_backend.kernel_report(mod)
        from targets import cpu_schedules

        stats: dict = {}  # filled by the pipeline: which fused functions got which schedule
        pipeline, info = cpu_schedules.pipeline(tvm_backend.make_target(spec.tvm_target), None, stats), None
        if opts.tuning_requested:
            from targets import tuning

            pipeline, info = tuning.prepare(mod, spec.tvm_target, Path(out_dir), int(opts.tune_trials or 0),
                                            opts.tuning_db, opts.progress, measure_here=False,
                                            stats=stats)
        timing = tvm_backend.compile_library(mod, spec.tvm_target, out, cc=linker, relax_pipeline=pipeline)
        kernels["schedules"] = stats
        kernel_warnings += tuple(w for w in [cpu_schedules.coverage_warning(stats)] if w)
        return library_artifact(out, t0, timing, "AArch64",
                                {"linker": linker or "host cc", "tvm_target": spec.tvm_target,
                                 "tuning": info.to_dict() if info else {"mode": "untuned", "trials_run": 0},
                                 "kernels": kernels},
                                extra_files=tuple(info.files) if info else (),
                                warnings=(tuple(info.warnings) if info else ()) + kernel_warnings)

    def run(self, artifact_path: Path, spec: TargetSpec, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        host = detect_host()
        if host.arch == "aarch64":
            from targets import tvm_backend

            return tvm_backend.run_library(artifact_path, inputs, "cpu")
        why = "qemu-aarch64 is not installed" if not shutil.which("qemu-aarch64") else (
            "run its self-check under qemu with: compress bench BUNDLE --device qemu-aarch64"
        )
        raise NotRunnableHere(f"target {spec.tag} builds aarch64 code; this host is {host.arch} ({why})")
