"""CUDA target: TVM Relax CUDA codegen with dlight GPU schedules, device code
compiled ahead of time by nvcc for the requested ``sm_XY``.

Tags: ``cuda`` (sm_80), ``cuda-sm75``, ``cuda-sm80``, ``cuda-sm86``, ``cuda-sm89``,
``cuda-sm90``, ``cuda-sm90a``, ... (any ``cuda-smXY[a]`` / ``cuda-sm_XY``).

Why the extra packing step: apache-tvm 0.27 compiles CUDA kernels lazily. Codegen
emits CUDA C++ and hands it to ``ffi.Module.create.cuda``, which JIT-compiles
through ``tvm_callback_cuda_compile`` (NVRTC by default) only when the CUDA
runtime library (libtvm_runtime_cuda.so, which needs the driver's libcuda.so.1)
is loadable. Without a driver (compile-only hosts like this one) codegen returns
a fallback module and the exported .so carries only CUDA *source* (format
"cuda"), compiled at load time on the deployment machine. A deployable artifact
should carry device code, so here we force the source path
(``TVM_COMPILE_FORCE_FALLBACK=1``, identical on every host), compile each CUDA
source with ``nvcc --fatbin`` (SASS for sm_XY + PTX compute_XY for newer GPUs),
rewrite those entries of TVM's serialized module blob to format "fatbin"
(``CUDAModuleNode`` then calls ``cuModuleLoadData`` on it directly), and link the
blob into the .so through ``export_library(fpack_imports=...)``. The embedded
fatbin is then parsed back out of the written .so to verify the arch.

Schedules: every fused PrimFunc gets a dlight GPU schedule, the rules tried one function at
a time in ``DLIGHT_RULES`` order (``schedule_functions``): a rule that raises on a function
(dlight's Matmul on a conv fused with Clip + Pad in MobileNetV2) is skipped for the next,
down to ``Fallback``, and the artifact's ``details["schedules"]`` records the rule of each
function plus a warning per function that fell back. A function nothing schedules is a
``TargetError`` naming it.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import struct
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from compressor.errors import DependencyError, TargetError, UsageError
from targets.base import TVM_FRONTEND_PASSES, Artifact, CompileOptions, NotRunnableHere, Target, TargetSpec, sha256_file
from targets.elf import EM_CUDA, parse_elf_header, read_elf_header
from targets.host import detect_host, host_triple

DEFAULT_ARCH = "sm_80"
DLIGHT_RULES = ("Matmul", "GEMV", "Reduction", "GeneralReduction", "Fallback")
FATBIN_MAGIC = 0xBA55ED50
BLOB_SYMBOL = "__tvm_ffi__library_bin"


def parse_arch(tag: str) -> str:
    """``cuda`` -> sm_80; ``cuda-sm90`` / ``cuda-sm_90`` -> sm_90; ``cuda-sm90a`` -> sm_90a."""
    if tag == "cuda":
        return DEFAULT_ARCH
    m = re.fullmatch(r"cuda-sm_?(\d{2,3})([a-z]?)", tag.lower())
    if not m:
        raise UsageError(f"unknown cuda target {tag!r}", hint="use cuda or cuda-smXY, e.g. cuda-sm80, cuda-sm90a")
    return f"sm_{m.group(1)}{m.group(2)}"


def find_nvcc() -> str | None:
    nvcc = shutil.which("nvcc")
    if nvcc:
        return nvcc
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and os.access(os.path.join(root, "bin", "nvcc"), os.X_OK):
            return os.path.join(root, "bin", "nvcc")
    return None


# ------------------------------------------------------------ fatbin parsing


def parse_fatbin(data: bytes, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Entries of a fatbin container at ``offset``: (entries, total size). Each entry:
    kind ("ptx" | "elf"), arch (e.g. 80), compressed, and for uncompressed ELF entries
    the cubin's e_machine."""
    magic, version, hsize, fat_size = struct.unpack_from("<IHHQ", data, offset)
    if magic != FATBIN_MAGIC or version != 1:
        raise ValueError("not a fatbin")
    entries = []
    off = offset + hsize
    end = off + fat_size
    while off + 32 <= end:
        kind, _ver, ehsize, payload = struct.unpack_from("<HHIQ", data, off)
        if ehsize < 48 or ehsize + payload == 0:
            break
        (arch,) = struct.unpack_from("<I", data, off + 28)
        (flags,) = struct.unpack_from("<Q", data, off + 40)
        body = data[off + ehsize : off + ehsize + 64]
        entry: dict[str, Any] = {
            "kind": {1: "ptx", 2: "elf"}.get(kind, f"kind{kind}"),
            "arch": int(arch),
            "compressed": bool(flags & 0x8000) or body[:4] == b"\x28\xb5\x2f\xfd",
        }
        if kind == 2 and body[:4] == b"\x7fELF":
            hdr = parse_elf_header(body)
            entry["e_machine"] = hdr.e_machine
            entry["elf_abi_version"] = hdr.abi_version
        entries.append(entry)
        off += ehsize + payload
    return entries, hsize + fat_size


def find_fatbins(data: bytes) -> list[list[dict[str, Any]]]:
    """All fatbin containers embedded anywhere in ``data`` (e.g. a linked .so)."""
    found = []
    magic = struct.pack("<I", FATBIN_MAGIC)
    pos = data.find(magic)
    while pos >= 0:
        try:
            entries, size = parse_fatbin(data, pos)
            if entries:
                found.append(entries)
                pos = data.find(magic, pos + size)
                continue
        except (ValueError, struct.error):
            pass
        pos = data.find(magic, pos + 4)
    return found


# ------------------------------------------------------------ TVM blob rewriting


class _Reader:
    def __init__(self, data: bytes, off: int = 0):
        self.data, self.off = data, off

    def u64(self) -> int:
        (v,) = struct.unpack_from("<Q", self.data, self.off)
        self.off += 8
        return v

    def raw(self) -> bytes:
        n = self.u64()
        if self.off + n > len(self.data):
            raise ValueError("truncated string")
        v = self.data[self.off : self.off + n]
        self.off += n
        return v

    def vec_u64(self) -> list[int]:
        n = self.u64()
        v = list(struct.unpack_from(f"<{n}Q", self.data, self.off))
        self.off += 8 * n
        return v


def _w_raw(b: bytes) -> bytes:
    return struct.pack("<Q", len(b)) + b


def rewrite_blob(blob: bytes, compile_source, sources: list[str]) -> tuple[bytes, list[dict[str, Any]]]:
    """Replace every CUDA module serialized as source (fmt "cuda") in TVM's packed
    import blob with ``compile_source(src) -> (fmt, binary)``.

    Blob layout (tvm-ffi): u64 body size | vec<u64> import-tree row_ptr |
    vec<u64> child indices | per module: str kind, then (unless kind == "_lib")
    str payload. CUDA payload: str fmt | fmap | str code (code last).
    """
    r = _Reader(blob)
    if r.u64() != len(blob) - 8:
        raise ValueError("unexpected TVM library blob header")
    row_ptr = r.vec_u64()
    children = r.vec_u64()
    modules: list[tuple[bytes, bytes | None]] = []
    for _ in range(len(row_ptr) - 1):
        kind = r.raw()
        modules.append((kind, None if kind == b"_lib" else r.raw()))
    if r.off != len(blob):
        raise ValueError("unexpected TVM library blob layout (trailing bytes)")
    out = struct.pack("<Q", len(row_ptr)) + struct.pack(f"<{len(row_ptr)}Q", *row_ptr)
    out += struct.pack("<Q", len(children)) + struct.pack(f"<{len(children)}Q", *children)
    done: list[dict[str, Any]] = []
    for kind, payload in modules:
        out += _w_raw(kind)
        if payload is None:
            continue
        if kind == b"cuda":
            p = _Reader(payload)
            fmt = p.raw()
            if fmt == b"cuda":
                # code (the source) is the last field; fmap sits between fmt and code.
                start = p.off
                match = next((src for src in sources if payload.endswith(_w_raw(src.encode()))), None)
                if match is None:
                    raise ValueError("cannot locate CUDA source in serialized module")
                code_at = len(payload) - len(_w_raw(match.encode()))
                fmap = payload[start:code_at]
                source = payload[code_at + 8 :].decode("utf-8")
                new_fmt, binary = compile_source(source)
                payload = _w_raw(new_fmt.encode()) + fmap + _w_raw(binary)
                done.append({"kernels": source.count("__global__"), "bytes": len(binary), "format": new_fmt})
        out += _w_raw(payload)
    return struct.pack("<Q", len(out)) + out, done


def _asm_blob_source(bin_path: Path) -> str:
    """GNU assembler source defining the library blob symbol from a binary file
    (avoids a multi-hundred-MB hex C array for large models)."""
    p = str(bin_path).replace("\\", "\\\\").replace('"', '\\"')
    return (
        f'\t.section .rodata.tvm_ffi_library_bin,"a"\n'
        f"\t.globl {BLOB_SYMBOL}\n"
        f"\t.type {BLOB_SYMBOL}, @object\n"
        f"\t.p2align 4\n"
        f"{BLOB_SYMBOL}:\n"
        f'\t.incbin "{p}"\n'
        f"\t.size {BLOB_SYMBOL}, .-{BLOB_SYMBOL}\n"
        f'\t.section .note.GNU-stack,"",@progbits\n'
    )


@contextlib.contextmanager
def _env(**kv: str):
    old = {k: os.environ.get(k) for k in kv}
    os.environ.update(kv)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def nvcc_fatbin(nvcc: str, source: str, arch: str, workdir: Path, index: int = 0) -> bytes:
    """CUDA C++ -> fatbin with SASS for ``arch`` and PTX for its virtual arch."""
    num = arch.split("_", 1)[1]
    src = workdir / f"tvm_kernels_{index}.cu"
    out = workdir / f"tvm_kernels_{index}.fatbin"
    src.write_text(source)
    cmd = [
        nvcc, "--fatbin", "-O3",
        "-gencode", f"arch=compute_{num},code=sm_{num}",
        "-gencode", f"arch=compute_{num},code=compute_{num}",
        "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
        "--expt-relaxed-constexpr",
        "-o", str(out), str(src),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        err = " ".join((proc.stderr or proc.stdout).split())[:400]
        raise TargetError(f"nvcc could not build device code for {arch}: {err}")
    return out.read_bytes()


def nvcc_version(nvcc: str) -> str:
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    m = re.search(r"release ([\d.]+), V([\d.]+)", out)
    return m.group(2) if m else "unknown"


# ------------------------------------------------------------ dlight scheduling, per function


def c_safe_param_names(func):
    """A PrimFunc whose parameter (buffer) names are C identifiers. The names become CUDA
    kernel parameter names and the Relax ONNX frontend keeps graph input names such as
    ``gpu_0/data_0`` or ``input:0`` (it only rewrites dots), which nvcc rejects. TVMScript
    prints every name as an identifier, so a print/parse round trip renames them; the result
    must be structurally equal to the input (names aside), else the input is returned.
    The Relax-level names (the VM's ``main`` signature) are untouched."""
    import tvm

    if all(p.name.isidentifier() for p in func.params):
        return func
    try:
        new = tvm.script.from_source(func.script())
        if func.attrs is None or "global_symbol" not in func.attrs:
            new = new.without_attr("global_symbol")
        tvm.ir.assert_structural_equal(func, new, map_free_vars=True)
    except Exception:  # noqa: BLE001 - keep the original; nvcc then names the problem
        return func
    return new


def _rule_name(rule: Any) -> str:
    return rule if isinstance(rule, str) else type(rule).__name__


def _is_scheduled(func) -> bool:
    return func.attrs is not None and "tirx.is_scheduled" in func.attrs and int(func.attrs["tirx.is_scheduled"]) == 1


def _check_builds(name: str, func, target) -> None:
    """Lower one scheduled PrimFunc alone and generate its code (``tvm.tirx.build``'s steps),
    raising what ``tvm.compile`` would, and also when it yields no GPU kernel (TVM compiles a
    function whose loops are not bound to GPU threads as host code, silently) or a kernel over
    the block limits (threads, shared memory)."""
    import importlib

    import tvm
    from tvm import s_tir

    tb = importlib.import_module("tvm.tirx.build")  # the module (``tvm.tirx.build`` is its function)
    if target.host is None:
        target = target.with_host(tvm.target.Target("llvm"))
    mod = tvm.IRModule({name: func.with_attr("global_symbol", name)})
    mod = tvm.tirx.transform.BindTarget(target)(mod)
    pipeline, finalize_host, finalize_device = tvm.tirx.get_default_tir_pipeline(target)
    host_mod, device_mods = tb.split_host_device_mods(pipeline(mod))
    kernels = [(gv, f) for dm in device_mods.values() for gv, f in dm.functions_items()]
    if not kernels:
        raise TargetError("no GPU kernel (loops not bound to GPU threads)")
    limits = {"max_threads_per_block": int(target.attrs.get("max_num_threads", 1024)),
              "max_shared_memory_per_block": int(target.attrs.get("max_shared_memory_per_block", 49152))}
    for gv, f in kernels:
        if not s_tir.analysis.verify_gpu_code(f, limits):
            raise TargetError(f"kernel {gv.name_hint} exceeds the GPU block limits {limits}")
    tb.tir_to_runtime(finalize_host()(host_mod), {t: finalize_device()(dm) for t, dm in device_mods.items()},
                      target.host)


def schedule_functions(mod, target, rules: Sequence[Any] | None = None, validate: bool = False,
                       report: dict[str, Any] | None = None):
    """Give every unscheduled PrimFunc of ``mod`` a dlight GPU schedule, one function at a time.

    dlight's ``ApplyDefaultSchedule`` takes the first rule whose ``apply`` returns a schedule and
    lets an exception of that rule abort the whole build (e.g. Matmul on a conv fused with a
    Clip and a Pad: "There are some consumers of the cache-write stage that are not properly
    inlined"). Here a rule that raises -- or, with ``validate``, whose schedule does not lower
    and generate code on its own, yields no GPU kernel or exceeds the block limits
    (``_check_builds``) -- is skipped and the next rule is tried, down to ``Fallback``; a
    function no rule schedules is a ``TargetError`` naming it.

    ``rules``: dlight GPU rule names or ``ScheduleRule`` objects, in order (default
    ``DLIGHT_RULES``). ``report`` (filled): ``functions`` {function: rule}, ``by_rule`` {rule: count},
    ``fallbacks`` [{function, rule, failed: [(rule, reason)]}] for the functions an earlier,
    matching rule failed on.
    """
    from tvm import tirx
    from tvm.s_tir import dlight as dl

    from targets.tvm_backend import one_line

    rule_objs = [(_rule_name(r), getattr(dl.gpu, r)() if isinstance(r, str) else r)
                 for r in (DLIGHT_RULES if rules is None else rules)]
    mod = mod.clone()
    rep = report if report is not None else {}
    rep.setdefault("functions", {})
    rep.setdefault("fallbacks", [])
    updated = {}
    for gv, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        name = gv.name_hint
        func = c_safe_param_names(func)
        if _is_scheduled(func):  # hand-written kernels (targets/sparse_kernels.py)
            updated[gv] = func
            rep["functions"][name] = "kernel"
            continue
        ftarget = func.attrs.get("target") if func.attrs is not None else None
        ftarget = ftarget or target
        failed: list[tuple[str, str]] = []
        chosen = None
        for rname, rule in rule_objs:
            try:
                space = rule.apply(func, ftarget, False)
            except Exception as exc:  # noqa: BLE001 - any rule failure: try the next rule
                failed.append((rname, one_line(exc, 200)))
                continue
            if space is None:
                continue
            sch = space[0] if isinstance(space, (list, tuple)) else space
            new = sch.mod["main"].with_attr("tirx.is_scheduled", True)
            if validate:
                try:
                    _check_builds(name, new, ftarget)
                except Exception as exc:  # noqa: BLE001
                    failed.append((rname, "does not build: " + one_line(exc, 200)))
                    continue
            chosen = (rname, new)
            break
        if chosen is None:
            why = "; ".join(f"{r}: {m}" for r, m in failed) or "no rule matches it"
            raise TargetError(f"no dlight GPU schedule for function {name} ({why})",
                              hint="this model cannot be compiled for cuda; drop the target or replace the op")
        rname, new = chosen
        updated[gv] = new
        rep["functions"][name] = rname
        if failed:
            rep["fallbacks"].append({"function": name, "rule": rname, "failed": failed})
    for gv, func in updated.items():
        mod[gv] = func
    by_rule: dict[str, int] = {}
    for r in rep["functions"].values():
        by_rule[r] = by_rule.get(r, 0) + 1
    rep["by_rule"] = dict(sorted(by_rule.items()))
    return mod


def fallback_warnings(report: dict[str, Any]) -> tuple[str, ...]:
    """One report line per function a matching dlight rule failed on (what scheduled it instead)."""
    out = []
    for f in report.get("fallbacks", ()):
        why = "; ".join(f"{r} failed: {m}" for r, m in f["failed"])
        out.append(f"kernel: {f['function']}: {why}; scheduled by dlight {f['rule']} instead")
    return tuple(out)


def cuda_pre_schedule(mod, target):
    """Relax CUDA pipeline up to (not including) the dlight schedules: library dispatch,
    legalize, fold constants, fuse."""
    import tvm
    from tvm import relax
    from tvm.relax.backend.cuda import pipeline as cuda_pipeline

    with target:
        return tvm.transform.Sequential(
            cuda_pipeline.library_dispatch_passes(target)
            + [
                relax.transform.LegalizeOps(),
                relax.transform.AnnotateTIROpPattern(),
                relax.transform.FoldConstant(),
                relax.transform.FuseOps(),
                relax.transform.FuseTIR(),
            ]
        )(mod)


def cuda_post_schedule_pipeline(target):
    """The rest of TVM's Relax CUDA pipeline (dataflow lowering, memory planning, VM lowering)."""
    import tvm
    from tvm.relax.backend.cuda import pipeline as cuda_pipeline

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod, _ctx):
        with target:
            return tvm.transform.Sequential(
                cuda_pipeline.dataflow_lower_passes(target) + cuda_pipeline.finalize_passes(target)
            )(mod)

    return _pipeline


class CudaTarget(Target):
    # lower.sparse: BSR ops -> the CUDA kernels of targets/sparse_kernels.py (tirx.is_scheduled,
    # so the dlight rules below skip them)
    required_passes = TVM_FRONTEND_PASSES + ("lower.sparse",)
    name = "cuda"
    aliases = ("cuda-sm75", "cuda-sm80", "cuda-sm86", "cuda-sm89", "cuda-sm90", "cuda-sm90a", "cuda-sm100", "cuda-sm120")
    description = "NVIDIA GPU shared library (TVM Relax VM + CUDA kernels, dlight schedules, nvcc fatbin for sm_XY)"

    def expand(self, tag: str) -> TargetSpec:
        arch = parse_arch(tag)
        sm = int(re.sub(r"\D", "", arch))
        host = detect_host()
        triple = host_triple(host)
        nvcc = find_nvcc()
        return TargetSpec(
            tag=tag,
            family="cuda",
            # 48 KiB: the static shared memory every block may use on all archs (dlight sizes its
            # tiles by it; without it dlight logs a warning per function and assumes the same)
            tvm_target={"kind": "cuda", "arch": arch, "max_shared_memory_per_block": 49152,
                        "host": {"kind": "llvm", "mtriple": triple}},
            triple=triple,
            isa_features=(arch,),
            # no 2:4 sparse tensor-core kernel here (the CUDA path lowers BSR): unstructured keeps accuracy
            preferred_pattern="unstructured",
            round_to=16 if sm >= 75 else 8,
            quant_dtype="int8",
            cross_compiler=None,
            runs_here=False,
            extra={
                "artifact_name": f"model_cuda_{arch}.so",
                "cuda_arch": arch,
                "device_code": f"fatbin: sm_{arch[3:]} SASS + compute_{arch[3:]} PTX",
                "schedules": f"dlight {', '.join(map(_rule_name, DLIGHT_RULES))} (per function: first that builds)",
                "nvcc": nvcc,
            },
        )

    def compile(
        self, model_path: Path, spec: TargetSpec, out_dir: Path, input_shapes: dict[str, list[int]],
        options: CompileOptions | None = None,
    ) -> Artifact:
        """``options``: tuning is not done for CUDA (dlight schedules only): a tuning request is a warning."""
        from targets import tvm_backend

        opts = CompileOptions.of(options)
        option_warnings = (("--tune-trials/--tuning-db ignored: the cuda target has no tuning (dlight schedules); "
                            "artifact untuned",) if opts.tuning_requested else ())

        arch = spec.extra.get("cuda_arch") or parse_arch(spec.tag)
        nvcc = find_nvcc()
        if nvcc is None:
            raise DependencyError(
                f"target {spec.tag} needs nvcc (CUDA toolkit) to build {arch} device code",
                hint="install the CUDA toolkit or put nvcc on PATH / set CUDA_HOME",
            )
        import tvm  # noqa: F401  (registers TVM's CUDA codegen)

        name = spec.extra.get("artifact_name", f"model_cuda_{arch}.so")
        out = Path(out_dir) / name
        t0 = time.perf_counter()
        mod = tvm_backend.import_onnx(model_path, input_shapes, target=spec.tvm_target)
        packed: list[dict[str, Any]] = []
        nvcc_seconds = [0.0]

        def fpack_imports(rt_mod, is_system_lib, prefix, workspace_dir):
            import tvm_ffi

            if is_system_lib or prefix:
                raise TargetError("cuda target does not support system-lib packaging")
            work = Path(workspace_dir)
            blob_t = tvm_ffi.get_global_func("runtime.ModulePackImportsToTensor")(rt_mod)
            blob = blob_t.numpy().tobytes()

            def compile_source(src: str):
                t = time.perf_counter()
                fb = nvcc_fatbin(nvcc, src, arch, work, len(packed))
                nvcc_seconds[0] += time.perf_counter() - t
                return "fatbin", fb

            sources = []
            stack = [rt_mod]
            while stack:
                m = stack.pop()
                if m.kind == "cuda":
                    sources.append(str(m.inspect_source("cuda")))
                stack.extend(m.imports)
            try:
                new_blob, info = rewrite_blob(blob, compile_source, sources)
            except ValueError as exc:
                raise TargetError(f"cannot embed CUDA device code: {exc} (TVM blob format changed?)") from exc
            packed.extend(info)
            bin_path = work / "devc_blob.bin"
            bin_path.write_bytes(new_blob)
            asm = work / "devc_blob.S"
            asm.write_text(_asm_blob_source(bin_path.resolve()))
            return str(asm)

        with _env(TVM_COMPILE_FORCE_FALLBACK="1"):
            timing, schedules = self._schedule_and_build(mod, spec, out, fpack_imports)
        if not packed:
            raise TargetError(f"{name}: TVM produced no CUDA kernels for this model")
        verified = self.verify_device_code(out, arch)
        hdr = read_elf_header(out)
        schedules["rules"] = [_rule_name(r) for r in DLIGHT_RULES]
        return Artifact(
            path=Path(name),
            kind="tvm-relax-vm-library",
            sha256=sha256_file(out),
            details={
                "compile_seconds": round(time.perf_counter() - t0, 3),
                **timing,
                "nvcc_seconds": round(nvcc_seconds[0], 3),
                "elf_machine": hdr.machine_name,
                "bytes": out.stat().st_size,
                "cuda_arch": arch,
                "nvcc": f"{nvcc} ({nvcc_version(nvcc)})",
                "kernels": sum(p["kernels"] for p in packed),
                "device_code": verified,
                "schedules": schedules,
                "tvm_target": spec.tvm_target,
            },
            warnings=option_warnings + tuple(fallback_warnings(schedules)),
        )

    @staticmethod
    def _schedule_and_build(mod, spec: TargetSpec, out: Path, fpack_imports) -> tuple[dict, dict]:
        """Pre-schedule passes, per-function dlight schedules, each built alone before it is
        taken (``schedule_functions(validate=True)``), then the rest of the pipeline + export.
        Returns (timing, schedule report); ``schedule_seconds``: fusion + scheduling, before
        ``tvm_compile_seconds``."""
        from targets import tvm_backend

        t0 = time.perf_counter()
        target = tvm_backend.make_target(spec.tvm_target)
        try:
            fused = cuda_pre_schedule(mod, target)
        except Exception as exc:
            raise TargetError(f"TVM compile for cuda failed: {tvm_backend.one_line(exc)}") from exc
        report: dict[str, Any] = {}
        with target:
            scheduled = schedule_functions(fused, target, validate=True, report=report)
        seconds = time.perf_counter() - t0
        timing = tvm_backend.compile_library(
            scheduled, spec.tvm_target, out,
            relax_pipeline=cuda_post_schedule_pipeline(target), fpack_imports=fpack_imports,
        )
        return {"schedule_seconds": round(seconds, 3), **timing}, report

    @staticmethod
    def verify_device_code(path: Path, arch: str) -> dict[str, Any]:
        """Find the fatbin(s) embedded in the .so and check they hold SASS for ``arch``."""
        num = int(re.sub(r"\D", "", arch))
        fatbins = find_fatbins(Path(path).read_bytes())
        sass = sorted({e["arch"] for fb in fatbins for e in fb if e["kind"] == "elf"})
        ptx = sorted({e["arch"] for fb in fatbins for e in fb if e["kind"] == "ptx"})
        cubin_ok = any(
            e["kind"] == "elf" and e["arch"] == num and e.get("e_machine") == EM_CUDA for fb in fatbins for e in fb
        )
        if not cubin_ok:
            raise TargetError(
                f"{Path(path).name}: no {arch} cubin found in the embedded device code "
                f"(fatbins={len(fatbins)}, sass={sass}, ptx={ptx})"
            )
        return {
            "format": "fatbin",
            "fatbins": len(fatbins),
            "sass": [f"sm_{a}" for a in sass],
            "ptx": [f"compute_{a}" for a in ptx],
            "verified_by": f"parsed fatbin headers in the .so: ELF cubin entry arch={num} with e_machine=EM_CUDA(190)",
        }

    def run(self, artifact_path: Path, spec: TargetSpec, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        raise NotRunnableHere(f"target {spec.tag} artifacts need an NVIDIA GPU; this host only compiles them")
