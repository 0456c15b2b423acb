"""Host ISA detection (never hard-coded: CI may be Zen 3 = AVX2 or Zen 4 = AVX-512+VNNI).

Features come from ``/proc/cpuinfo`` (what the kernel reports as usable, which
also reflects what a hypervisor masks), the CPU name for LLVM ``-mcpu`` from
LLVM's own host detection through TVM when TVM is importable.
"""
from __future__ import annotations

import functools
import platform
from dataclasses import dataclass, field
from pathlib import Path

# /proc/cpuinfo flag -> LLVM target feature, for the x86 features that matter
# to generated kernels (vector width, FMA, int8 dot products, bf16/fp16, AMX).
X86_FLAG_TO_LLVM: dict[str, str] = {
    "sse2": "sse2",
    "ssse3": "ssse3",
    "sse4_1": "sse4.1",
    "sse4_2": "sse4.2",
    "popcnt": "popcnt",
    "avx": "avx",
    "avx2": "avx2",
    "fma": "fma",
    "f16c": "f16c",
    "bmi1": "bmi",
    "bmi2": "bmi2",
    "movbe": "movbe",
    "abm": "lzcnt",
    "avx512f": "avx512f",
    "avx512dq": "avx512dq",
    "avx512cd": "avx512cd",
    "avx512bw": "avx512bw",
    "avx512vl": "avx512vl",
    "avx512ifma": "avx512ifma",
    "avx512vbmi": "avx512vbmi",
    "avx512_vbmi2": "avx512vbmi2",
    "avx512_vnni": "avx512vnni",
    "avx512_bitalg": "avx512bitalg",
    "avx512_vpopcntdq": "avx512vpopcntdq",
    "avx512_bf16": "avx512bf16",
    "avx512_fp16": "avx512fp16",
    "avx_vnni": "avxvnni",
    "gfni": "gfni",
    "vaes": "vaes",
    "vpclmulqdq": "vpclmulqdq",
    "amx_tile": "amx-tile",
    "amx_int8": "amx-int8",
    "amx_bf16": "amx-bf16",
}

# /proc/cpuinfo "Features" on aarch64 -> LLVM feature.
ARM_FLAG_TO_LLVM: dict[str, str] = {
    "asimd": "neon",
    "fphp": "fullfp16",
    "asimdhp": "fullfp16",
    "asimddp": "dotprod",
    "i8mm": "i8mm",
    "bf16": "bf16",
    "sve": "sve",
    "sve2": "sve2",
}


@dataclass(frozen=True)
class HostInfo:
    arch: str  # "x86_64" | "aarch64" | other platform.machine()
    model_name: str  # e.g. "AMD EPYC 9654 96-Core Processor"
    features: frozenset[str] = field(default_factory=frozenset)  # /proc/cpuinfo flag names

    def has(self, *flags: str) -> bool:
        return all(f in self.features for f in flags)

    @property
    def simd_summary(self) -> str:
        """Short human summary: "avx512+vnni", "avx2", "neon"..."""
        if self.arch == "x86_64":
            if self.has("avx512f", "avx512bw", "avx512vl"):
                return "avx512+vnni" if "avx512_vnni" in self.features else "avx512"
            if self.has("avx2", "fma"):
                return "avx2+vnni" if "avx_vnni" in self.features else "avx2"
            return "sse"
        if self.arch == "aarch64":
            return "sve" if "sve" in self.features else "neon"
        return "unknown"


def _normalize_arch(machine: str) -> str:
    m = machine.lower()
    if m in ("amd64", "x86_64", "x64"):
        return "x86_64"
    if m in ("arm64", "aarch64"):
        return "aarch64"
    return m


def parse_cpuinfo(text: str, arch: str) -> tuple[str, frozenset[str]]:
    """(model name, feature flags) from /proc/cpuinfo text (first processor block)."""
    model = ""
    flags: set[str] = set()
    for line in text.splitlines():
        if ":" not in line:
            continue
        key, _, val = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and not model:
            model = val.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(val.split())
    if not model and arch == "aarch64":
        # aarch64 cpuinfo has no model name; keep implementer/part ids.
        ids = {}
        for line in text.splitlines():
            key, _, val = line.partition(":")
            if key.strip() in ("CPU implementer", "CPU part"):
                ids.setdefault(key.strip(), val.strip())
        if ids:
            model = " ".join(f"{k}={v}" for k, v in ids.items())
    return model, frozenset(flags)


@functools.lru_cache(maxsize=1)
def detect_host() -> HostInfo:
    arch = _normalize_arch(platform.machine())
    text = ""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        pass
    model, flags = parse_cpuinfo(text, arch)
    return HostInfo(arch=arch, model_name=model or platform.processor() or "unknown", features=flags)


def host_triple(host: HostInfo | None = None) -> str:
    host = host or detect_host()
    return {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu"}.get(
        host.arch, f"{host.arch}-linux-gnu"
    )


@functools.lru_cache(maxsize=1)
def _llvm_system_cpu() -> str | None:
    """LLVM's name for the host CPU (e.g. "znver4"), via TVM; None if unavailable."""
    try:
        from tvm.target import codegen  # heavy import, only when needed

        cpu = str(codegen.llvm_get_system_cpu())
    except Exception:  # TVM missing or built without LLVM
        return None
    return cpu or None


def _llvm_cpu_is_valid(cpu: str, triple: str) -> bool:
    try:
        from tvm.target import codegen

        return bool(codegen.llvm_is_valid_cpu(cpu, triple))
    except Exception:
        return False


# The ISA levels of the x86-64 psABI, as cpuinfo flags: the host expansion names the highest
# level the host covers as ``-mcpu`` (a generic CPU LLVM legalizes every kernel for) and lists
# every curated feature as ``+f``/``-f`` on top.
X86_LEVEL_FLAGS: tuple[tuple[str, frozenset[str]], ...] = (
    ("x86-64-v4", frozenset({"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx2", "fma", "f16c",
                             "bmi1", "bmi2", "movbe", "abm", "avx"})),
    ("x86-64-v3", frozenset({"avx2", "fma", "f16c", "bmi1", "bmi2", "movbe", "abm", "avx"})),
    ("x86-64-v2", frozenset({"sse4_2", "sse4_1", "ssse3", "popcnt"})),
)

_HASWELL = frozenset({"sse2", "ssse3", "sse4_1", "sse4_2", "popcnt", "avx", "avx2", "fma", "f16c", "bmi1", "bmi2",
                      "movbe", "abm"})
_SKX = _HASWELL | {"avx512f", "avx512dq", "avx512cd", "avx512bw", "avx512vl"}
_ICX = _SKX | {"avx512ifma", "avx512vbmi", "avx512_vbmi2", "avx512_vnni", "avx512_bitalg", "avx512_vpopcntdq",
               "gfni", "vaes", "vpclmulqdq"}
# /proc/cpuinfo flag sets (the curated ones) of CPUs users run on, keyed by LLVM's CPU name: the
# x86 host target is built from these in tests on any host (issue 16: a Zen 3 host's expansion
# aborted LLVM, and no Zen 4 host could have found it by compiling x86-avx2).
CPU_PROFILES: dict[str, frozenset[str]] = {
    "haswell": _HASWELL,
    "skylake": _HASWELL,
    "znver2": _HASWELL,
    "znver3": _HASWELL | {"vaes", "vpclmulqdq"},
    "skylake-avx512": _SKX,
    "icelake-server": _ICX,
    "znver4": _ICX | {"avx512_bf16", "avx_vnni"},
    "sapphirerapids": _ICX | {"avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16"},
}


def profile_host(cpu: str) -> HostInfo:
    """A HostInfo as :func:`detect_host` would report it on CPU ``cpu`` (a key of ``CPU_PROFILES``)."""
    return HostInfo(arch="x86_64", model_name=f"profile:{cpu}", features=CPU_PROFILES[cpu])


def x86_level(features: frozenset[str] | set[str]) -> str:
    """The highest x86-64 psABI level (LLVM CPU name) whose flags are all in ``features``."""
    for level, need in X86_LEVEL_FLAGS:
        if need <= set(features):
            return level
    return "x86-64"


def llvm_mcpu_and_mattr(host: HostInfo | None = None) -> tuple[str | None, list[str]]:
    """``-mcpu`` and ``-mattr`` for code that must run on this host.

    x86: mcpu is the generic psABI level the host covers (``x86-64-v3``/``-v4``), not LLVM's name
    for the host CPU: a named CPU with its defaults switched off feature by feature (``znver3``
    with ``-avx512f``, ...) is a combination LLVM is not tested on, and it aborted code generation
    on a Zen 3; on a Zen 4 ``znver4`` bought nothing measurable over ``x86-64-v4`` plus features
    (bench/end_to_end.md). mattr lists every curated feature explicitly: ``+f`` when /proc/cpuinfo
    reports it and ``-f`` when it does not, so a hypervisor that masks e.g. AVX-512 on a CPU model
    that normally has it never gets instructions it cannot run. aarch64: LLVM's host CPU name.
    """
    host = host or detect_host()
    if host.arch == "x86_64":
        table = X86_FLAG_TO_LLVM
        mcpu: str | None = x86_level(host.features)
    elif host.arch == "aarch64":
        table = ARM_FLAG_TO_LLVM
        mcpu = _llvm_system_cpu()
        if mcpu in (None, "generic") or not _llvm_cpu_is_valid(mcpu, host_triple(host)):
            mcpu = None
    else:
        return None, []
    mattr: list[str] = []
    seen: set[str] = set()
    present = {table[f] for f in host.features if f in table}
    for flag, feat in table.items():
        if feat in seen:
            continue
        seen.add(feat)
        mattr.append(("+" if feat in present else "-") + feat)
    return mcpu, mattr


def llvm_host_cpu() -> str | None:
    """LLVM's name for this host's CPU (recorded in the target spec; not used as ``-mcpu``)."""
    return _llvm_system_cpu()


def host_isa_features(host: HostInfo | None = None) -> tuple[str, ...]:
    """The curated SIMD feature flags (cpuinfo names) this host has, sorted."""
    host = host or detect_host()
    table = X86_FLAG_TO_LLVM if host.arch == "x86_64" else ARM_FLAG_TO_LLVM
    return tuple(sorted(f for f in host.features if f in table))
