"""x86-64 target: LLVM for the host ISA (``x86``) or a fixed ISA level
(``x86-avx2``, ``x86-avx512``, ``x86-avx512vnni``, ``x86-<llvm cpu>``)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from compressor.errors import UsageError
from targets.base import TVM_FRONTEND_PASSES, Artifact, CompileOptions, NotRunnableHere, Target, TargetSpec, library_artifact
from targets.host import (CPU_PROFILES, X86_FLAG_TO_LLVM, HostInfo, detect_host, host_isa_features, llvm_host_cpu,
                          llvm_mcpu_and_mattr, profile_host)

TRIPLE = "x86_64-linux-gnu"

# Fixed ISA levels: (LLVM mcpu, explicit mattr, cpuinfo flags the code needs).
_V3_FLAGS = ("avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "movbe", "abm", "popcnt", "sse4_2")
_V4_FLAGS = _V3_FLAGS + ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl")
LEVELS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "avx2": ("x86-64-v3", ("+avx2", "+fma", "+f16c", "+bmi", "+bmi2"), _V3_FLAGS),
    "avx512": (
        "x86-64-v4",
        ("+avx2", "+fma", "+avx512f", "+avx512bw", "+avx512cd", "+avx512dq", "+avx512vl"),
        _V4_FLAGS,
    ),
    "avx512vnni": (
        "x86-64-v4",
        ("+avx2", "+fma", "+avx512f", "+avx512bw", "+avx512cd", "+avx512dq", "+avx512vl", "+avx512vnni"),
        _V4_FLAGS + ("avx512_vnni",),
    ),
}


def _knobs(flags: set[str] | frozenset[str]) -> tuple[int, str, str | None]:
    """(round_to, preferred sparse pattern, int8 dot-product instruction) for an ISA."""
    wide = {"avx512f", "avx512bw"} <= set(flags)
    vnni = "avx512_vnni" if ("avx512_vnni" in flags and wide) else ("avx_vnni" if "avx_vnni" in flags else None)
    return (16 if wide else 8), "unstructured", vnni


def _patterns(tvm_target: dict) -> dict:
    """The cost model's speed-up per sparsity pattern and the int8 sparse kernel's block for this code
    (``targets.lower_sparse.pattern_speedups``; shown by ``compress explain-target``)."""
    from targets.lower_sparse import cost_isa, pattern_speedups

    return pattern_speedups(cost_isa(tvm_target), tvm_target=tvm_target)


class X86Target(Target):
    required_passes = TVM_FRONTEND_PASSES + ("lower.sparse",)  # BSR kernels where the cost model predicts a win
    name = "x86"
    aliases = ("x86_64", "x86-64", "amd64", "x86-host", "x86-avx2", "x86-avx512", "x86-avx512vnni")
    description = ("x86-64 Linux shared library (TVM Relax VM, LLVM), host ISA, a fixed AVX2/AVX-512 level, or "
                   "x86-<cpu> (the host target as it is built on that CPU: znver3, skylake-avx512, ...)")

    def expand(self, tag: str, host: HostInfo | None = None) -> TargetSpec:
        """``host``: the CPU the plain ``x86`` tag builds for (default: this one; tests pass
        ``targets.host.profile_host(cpu)`` to build for CPUs they do not run on)."""
        host = host or detect_host()
        level = tag.split("-", 1)[1] if tag.startswith("x86-") and tag not in ("x86-64", "x86-host") else ""
        level = level.lower().replace("_", "")
        if level == "":
            if host.arch != "x86_64":
                raise UsageError(
                    f"target {tag!r} means 'this host's x86 ISA' but the host is {host.arch}",
                    hint="pick a fixed level: x86-avx2 or x86-avx512",
                )
            mcpu, mattr = llvm_mcpu_and_mattr(host)
            required = host_isa_features(host)
            tvm_target = {"kind": "llvm", "mtriple": TRIPLE, "mattr": mattr}
            if mcpu:
                tvm_target["mcpu"] = mcpu
            isa = "host"
            artifact = "model_x86_64.so"
        elif level in LEVELS:
            mcpu, mattr_t, required = LEVELS[level]
            tvm_target = {"kind": "llvm", "mtriple": TRIPLE, "mcpu": mcpu, "mattr": list(mattr_t)}
            isa = level
            artifact = f"model_x86_64_{level}.so"
        elif level.replace("_", "-") in CPU_PROFILES or tag.split("-", 1)[1] in CPU_PROFILES:
            # what the plain x86 tag builds on that CPU: compile for a Zen 3 on a Zen 4 and get
            # exactly the artifact a Zen 3 user gets
            cpu = tag.split("-", 1)[1]
            prof = profile_host(cpu)
            mcpu, mattr = llvm_mcpu_and_mattr(prof)
            required = host_isa_features(prof)
            tvm_target = {"kind": "llvm", "mtriple": TRIPLE, "mcpu": mcpu, "mattr": mattr}
            isa = cpu
            artifact = f"model_x86_64_{cpu}.so"
        else:
            cpu = tag.split("-", 1)[1]
            from targets.host import _llvm_cpu_is_valid

            if not _llvm_cpu_is_valid(cpu, TRIPLE):
                raise UsageError(
                    f"unknown x86 target {tag!r}",
                    hint="use x86 (host ISA), x86-avx2, x86-avx512, x86-avx512vnni, x86-<cpu> with a CPU of "
                         f"{', '.join(CPU_PROFILES)} or x86-<llvm cpu name>",
                )
            tvm_target = {"kind": "llvm", "mtriple": TRIPLE, "mcpu": cpu}
            # the features LLVM enables for that CPU, as cpuinfo flags: what the runner must find
            from targets.sparse_kernels import llvm_features

            feats = llvm_features(tvm_target)
            required = tuple(sorted(f for f, llvm in X86_FLAG_TO_LLVM.items() if llvm in feats))
            isa = cpu
            artifact = f"model_x86_64_{cpu}.so"
        round_to, pattern, vnni = _knobs(set(required))
        here = detect_host()
        runs_here = here.arch == "x86_64" and all(f in here.features for f in required)
        return TargetSpec(
            tag=tag,
            family="x86",
            tvm_target=tvm_target,
            triple=TRIPLE,
            isa_features=tuple(required),
            preferred_pattern=pattern,
            round_to=round_to,
            quant_dtype="int8",
            cross_compiler=None,
            runs_here=runs_here,
            extra={
                "isa": isa,
                "artifact_name": artifact,
                "int8_dot": vnni,
                "host_cpu": host.model_name,
                "host_llvm_cpu": llvm_host_cpu() if host is detect_host() else host.model_name.removeprefix("profile:"),
                "host_simd": host.simd_summary,
                "patterns": _patterns(tvm_target),
            },
        )

    def compile(
        self, model_path: Path, spec: TargetSpec, out_dir: Path, input_shapes: dict[str, list[int]],
        options: CompileOptions | None = None,
    ) -> Artifact:
        """``options``: see ``CompileOptions`` (tuning, progress, the run's executor, forced RNN modes)."""
        from targets import tvm_backend

        name = spec.extra.get("artifact_name", "model_x86_64.so")
        out = Path(out_dir) / name
        t0 = time.perf_counter()
        opts = CompileOptions.of(options)
        mod = tvm_backend.import_onnx(model_path, input_shapes, target=spec.tvm_target,
                                     rnn_modes=opts.rnn_modes)
        kernels, kernel_warnings = tvm_backend.kernel_report(mod)
        trials = int(opts.tune_trials or 0)
        from targets import cpu_schedules

        stats: dict = {}  # filled by the pipeline: which fused functions got which schedule
        pipeline, tuning_info = cpu_schedules.pipeline(tvm_backend.make_target(spec.tvm_target), None, stats), None
        if trials > 0 or opts.tuning_db:
            from targets import tuning

            pipeline, tuning_info = tuning.prepare(mod, spec.tvm_target, Path(out_dir), trials, opts.tuning_db,
                                                   opts.progress, measure_here=spec.runs_here,
                                                   executor=opts.executor_session, stats=stats)
        timing = tvm_backend.compile_library(mod, spec.tvm_target, out, relax_pipeline=pipeline)
        kernels["schedules"] = stats
        kernel_warnings += tuple(w for w in [cpu_schedules.coverage_warning(stats)] if w)
        if tuning_info is not None and spec.runs_here and tuning_info.records_applied > tuning_info.default_kept:
            tuning.keep_faster(mod, spec.tvm_target, out, tuning_info)
        return library_artifact(
            out, t0, timing, "x86-64",
            {"tvm_target": spec.tvm_target, "isa_features": list(spec.isa_features),
             "tuning": tuning_info.to_dict() if tuning_info else {"mode": "untuned", "trials_run": 0},
             "kernels": kernels},
            extra_files=tuple(tuning_info.files) if tuning_info else (),
            warnings=(tuple(tuning_info.warnings) if tuning_info else ()) + kernel_warnings,
        )

    @staticmethod
    def _check_runnable(spec: TargetSpec) -> None:
        host = detect_host()
        missing = [f for f in spec.isa_features if f not in host.features]
        if host.arch != "x86_64" or missing:
            raise NotRunnableHere(
                f"target {spec.tag} needs an x86_64 CPU with {', '.join(missing) or 'x86_64'}; "
                f"this host is {host.arch} ({host.simd_summary})"
            )

    def run(self, artifact_path: Path, spec: TargetSpec, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        self._check_runnable(spec)
        from targets import tvm_backend

        return tvm_backend.run_library(artifact_path, inputs, "cpu")

    def time(self, artifact_path: Path, spec: TargetSpec, inputs: dict[str, np.ndarray], **kw) -> float:
        """Median seconds per inference of the compiled artifact on this host."""
        self._check_runnable(spec)
        from targets import tvm_backend

        return tvm_backend.time_library(artifact_path, inputs, "cpu", **kw)
