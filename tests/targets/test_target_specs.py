"""Tag expansion, host ISA detection and ELF helpers (no compilation)."""
from __future__ import annotations

import json

import pytest

from compressor.errors import UsageError
from targets import TARGETS, resolve
from targets.elf import EM_AARCH64, EM_X86_64, parse_elf_header
from targets.host import HostInfo, detect_host, llvm_mcpu_and_mattr, parse_cpuinfo

tvm = pytest.importorskip("tvm")

TAGS = [
    ("x86", "x86"),
    ("x86_64", "x86"),
    ("x86-avx2", "x86"),
    ("x86-avx512", "x86"),
    ("x86-avx512vnni", "x86"),
    ("x86-znver3", "x86"),
    ("arm", "arm"),
    ("arm64", "arm"),
    ("arm64-linux", "arm"),
    ("aarch64", "arm"),
    ("arm-cortex-a76", "arm"),
    ("cuda", "cuda"),
    ("cuda-sm80", "cuda"),
    ("cuda-sm_86", "cuda"),
    ("cuda-sm90", "cuda"),
    ("cuda-sm90a", "cuda"),
]


def test_builtins_registered():
    assert {"x86", "arm", "cuda"} <= {e.name for e in TARGETS}


@pytest.mark.parametrize("tag,family", TAGS)
def test_expand_gives_valid_tvm_target(tag, family):
    if tag in ("x86", "x86_64") and detect_host().arch != "x86_64":
        pytest.skip("host-ISA x86 tag needs an x86_64 host")
    _, spec = resolve(tag)
    assert spec.tag == tag and spec.family == family
    json.dumps(spec.to_dict())  # printable / serialisable
    target = tvm.target.Target(spec.tvm_target)  # dict accepted by TVM 0.27
    assert target.kind.name == spec.tvm_target["kind"]
    assert spec.round_to > 0 and spec.quant_dtype
    if family == "x86":
        assert spec.triple == "x86_64-linux-gnu" and spec.cross_compiler is None
    if family == "arm":
        assert spec.tvm_target["mtriple"] == "aarch64-linux-gnu" and "+neon" in spec.tvm_target["mattr"]
        if detect_host().arch != "aarch64":
            assert spec.cross_compiler and not spec.runs_here
    if family == "cuda":
        assert str(target.attrs["arch"]) == spec.extra["cuda_arch"]
        assert target.host is not None and target.host.kind.name == "llvm"
        assert not spec.runs_here


def test_cuda_arch_parsing():
    from targets.cuda import parse_arch

    assert parse_arch("cuda") == "sm_80"
    assert parse_arch("cuda-sm90") == "sm_90"
    assert parse_arch("cuda-sm_75") == "sm_75"
    assert parse_arch("cuda-sm90a") == "sm_90a"


@pytest.mark.parametrize("tag", ["cuda-foo", "x86-notacpu", "arm-notacpu", "riscv"])
def test_unknown_tags_are_usage_errors(tag):
    with pytest.raises(UsageError):
        resolve(tag)


def test_fixed_levels_runs_here_matches_host():
    host = detect_host()
    _, avx2 = resolve("x86-avx2")
    _, avx512 = resolve("x86-avx512")
    assert avx2.round_to == 8 and avx512.round_to == 16
    assert avx2.runs_here == (host.arch == "x86_64" and {"avx2", "fma"} <= host.features)
    assert avx512.runs_here == (host.arch == "x86_64" and {"avx512f", "avx512bw", "avx512vl"} <= host.features)


ZEN3 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7763 64-Core Processor
flags\t\t: fpu sse sse2 ssse3 sse4_1 sse4_2 popcnt avx avx2 fma f16c bmi1 bmi2 movbe abm
"""
ZEN4 = ZEN3.replace("7763", "9654").replace(
    "abm", "abm avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni avx512_bf16"
)


def test_cpuinfo_parsing_and_mattr_zen3_vs_zen4():
    model, flags = parse_cpuinfo(ZEN3, "x86_64")
    assert model.startswith("AMD EPYC 7763") and "avx2" in flags and "avx512f" not in flags
    zen3 = HostInfo("x86_64", model, flags)
    _, mattr3 = llvm_mcpu_and_mattr(zen3)
    assert "+avx2" in mattr3 and "-avx512f" in mattr3 and "-avx512vnni" in mattr3
    assert zen3.simd_summary == "avx2"
    zen4 = HostInfo("x86_64", *parse_cpuinfo(ZEN4, "x86_64"))
    _, mattr4 = llvm_mcpu_and_mattr(zen4)
    assert "+avx512f" in mattr4 and "+avx512vnni" in mattr4 and "+avx512bf16" in mattr4
    assert zen4.simd_summary == "avx512+vnni"


def test_host_spec_reflects_cpuinfo():
    host = detect_host()
    if host.arch != "x86_64":
        pytest.skip("x86_64 host only")
    _, spec = resolve("x86")
    mattr = spec.tvm_target["mattr"]
    assert ("+avx2" in mattr) == ("avx2" in host.features)
    assert ("+avx512f" in mattr) == ("avx512f" in host.features)
    assert spec.runs_here
    assert set(spec.isa_features) <= host.features


def test_parse_elf_header():
    x86 = b"\x7fELF\x02\x01\x01" + b"\x00" * 9 + (3).to_bytes(2, "little") + EM_X86_64.to_bytes(2, "little")
    hdr = parse_elf_header(x86 + b"\x00" * 46)
    assert hdr.machine_name == "x86-64" and hdr.bits == 64 and hdr.e_type == 3
    arm = x86[:18] + EM_AARCH64.to_bytes(2, "little")
    assert parse_elf_header(arm + b"\x00" * 44).machine_name == "AArch64"
    with pytest.raises(ValueError):
        parse_elf_header(b"MZ" + b"\x00" * 62)
