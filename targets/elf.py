"""Tiny ELF header reader: which machine a compiled artifact is for.

Only the identification bytes and ``e_machine`` / ``e_flags`` are read, so it
works for any ELF (host .so, cross-compiled .so, CUDA cubin) without tools.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

# e_machine values (elf.h) for the machines this project produces or checks.
EM_NAMES = {
    3: "x86",
    40: "ARM",
    62: "x86-64",
    183: "AArch64",
    190: "CUDA",
    243: "RISC-V",
}
EM_X86_64 = 62
EM_AARCH64 = 183
EM_CUDA = 190


@dataclass(frozen=True)
class ElfHeader:
    bits: int  # 32 | 64
    little_endian: bool
    osabi: int
    abi_version: int
    e_type: int  # 1 REL, 2 EXEC, 3 DYN (shared object)
    e_machine: int
    e_flags: int

    @property
    def machine_name(self) -> str:
        return EM_NAMES.get(self.e_machine, f"EM_{self.e_machine}")


def parse_elf_header(data: bytes) -> ElfHeader:
    """Parse an ELF header from the first bytes of a file (>= 64 bytes)."""
    if len(data) < 52 or data[:4] != b"\x7fELF":
        raise ValueError("not an ELF file")
    bits = {1: 32, 2: 64}.get(data[4])
    if bits is None:
        raise ValueError(f"bad ELF class {data[4]}")
    little = data[5] == 1
    end = "<" if little else ">"
    e_type, e_machine = struct.unpack_from(end + "HH", data, 16)
    flags_off = 48 if bits == 64 else 36
    (e_flags,) = struct.unpack_from(end + "I", data, flags_off)
    return ElfHeader(bits, little, data[7], data[8], e_type, e_machine, e_flags)


def read_elf_header(path: str | Path) -> ElfHeader:
    with open(path, "rb") as f:
        return parse_elf_header(f.read(64))


def elf_machine(path: str | Path) -> str:
    """Human-readable machine of an ELF file: "x86-64", "AArch64", "CUDA"..."""
    return read_elf_header(path).machine_name
