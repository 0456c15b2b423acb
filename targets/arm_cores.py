"""Per-core time models of named Arm cores, applied to instruction counts measured under qemu.

No ARM hardware is available to the project, so kernel times on aarch64 are *modelled*: qemu's
instruction-count plugin (``targets/qemu_insn_count.c``) gives, per kernel call, the executed
instructions by class (loads, stores, SIMD/FP data processing, branches, other integer), exactly
and reproducibly; a core model turns them into cycles with the core's documented issue
resources, and adds the time to stream the kernel's weight bytes from the cache level they live
in. ``bench/cost_model_arm.py`` runs the kernel grid, applies these models and fits
``targets.lower_sparse``'s time model per core (``targets/cost_models/arm-<core>.json``).

Cycles of one kernel call (throughput bound, one thread)::

    core   = max(total / issue, simd / simd_pipes, load / load_pipes, store / store_pipes,
                 branch / branch_units) / efficiency
    memory = bytes from L2 / l2_bytes_per_cycle + from L3 / l3_bytes_per_cycle + from DRAM / dram_bytes_per_cycle
    cycles = max(core, memory)      (out-of-order core: the two overlap)
             core + memory / 2      (in-order core: misses stall the pipeline, the prefetcher hides half)

The issue resources are the ones the cores' Software Optimization Guides list (Arm, "Cortex-A76
Software Optimization Guide" and "Cortex-A55 Software Optimization Guide"): per cycle, the
A76 dispatches 4 instructions to 2 ASIMD/FP pipes (128-bit FMLA each), 2 load/store pipes of
which at most 1 stores, and 1 branch unit; the A55 is in-order dual-issue with one 128-bit
ASIMD op per cycle (its two 64-bit pipes paired), 1 load and 1 store pipe and 1 branch. Cache
sizes and clocks are those of common phone SoCs with the core (A76: 64 KiB L1D, 512 KiB L2,
2 MiB L3 share, 2.6 GHz; A55: 32 KiB L1D, 128 KiB L2, 1 MiB L3 share, 1.8 GHz); bandwidths
per core are round figures for those SoCs, not measurements. ``efficiency`` is the fraction of
the issue bound a tight kernel loop sustains (dependencies, front-end bubbles): 0.85 out of
order, 0.65 in order. What the model does not see: the cycles of individual instructions beyond
their class (a 128-bit FMLA and an integer ADD count alike for ``issue``), latency chains, TLB
misses, the activation traffic (the sparse kernels' gathers). The predictions it feeds are
compared with the measured whole-model instruction counts in ``bench/arm.md``.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CoreModel:
    name: str  # target variant suffix: arm-<name>
    llvm_cpu: str  # LLVM -mcpu the variant compiles for
    ghz: float
    issue: float  # instructions dispatched per cycle
    simd_pipes: float  # 128-bit ASIMD/FP data-processing ops per cycle
    load_pipes: float
    store_pipes: float
    branch_units: float
    l1d_bytes: int
    l2_bytes: int
    l3_bytes: int  # this core's share of the cluster's L3
    l2_bytes_per_cycle: float
    l3_bytes_per_cycle: float
    dram_gbs: float  # one core's sustained DRAM read bandwidth, GB/s
    out_of_order: bool
    efficiency: float

    def cycles(self, counts: dict[str, int], weight_bytes: float) -> float:
        """Modelled cycles of one kernel call: ``counts`` the instruction classes of
        ``targets.device_qemu.INSN_CLASSES``; ``weight_bytes`` streamed once per call."""
        core = max(counts["total"] / self.issue, counts["simd"] / self.simd_pipes,
                   counts["load"] / self.load_pipes, counts["store"] / self.store_pipes,
                   counts["branch"] / self.branch_units) / self.efficiency
        memory = self.memory_cycles(weight_bytes)
        return max(core, memory) if self.out_of_order else core + 0.5 * memory

    def memory_cycles(self, weight_bytes: float) -> float:
        """Cycles to stream ``weight_bytes`` from where they live after a previous call: the part
        beyond L1 from L2, beyond L2 from L3, beyond L3 from DRAM."""
        b = float(weight_bytes)
        from_l2 = min(max(b - self.l1d_bytes, 0.0), self.l2_bytes - self.l1d_bytes)
        from_l3 = min(max(b - self.l2_bytes, 0.0), self.l3_bytes - self.l2_bytes)
        from_dram = max(b - self.l3_bytes, 0.0)
        dram_bpc = self.dram_gbs / self.ghz
        return from_l2 / self.l2_bytes_per_cycle + from_l3 / self.l3_bytes_per_cycle + from_dram / dram_bpc

    def seconds(self, counts: dict[str, int], weight_bytes: float) -> float:
        return self.cycles(counts, weight_bytes) / (self.ghz * 1e9)


CORES: dict[str, CoreModel] = {
    "a76": CoreModel("a76", "cortex-a76", ghz=2.6, issue=4, simd_pipes=2, load_pipes=2, store_pipes=1,
                     branch_units=1, l1d_bytes=64 << 10, l2_bytes=512 << 10, l3_bytes=2 << 20,
                     l2_bytes_per_cycle=32, l3_bytes_per_cycle=16, dram_gbs=12.0, out_of_order=True,
                     efficiency=0.85),
    "a55": CoreModel("a55", "cortex-a55", ghz=1.8, issue=2, simd_pipes=1, load_pipes=1, store_pipes=1,
                     branch_units=1, l1d_bytes=32 << 10, l2_bytes=128 << 10, l3_bytes=1 << 20,
                     l2_bytes_per_cycle=16, l3_bytes_per_cycle=8, dram_gbs=5.0, out_of_order=False,
                     efficiency=0.65),
}
DEFAULT_CORE = "a76"  # plain --target arm decides as for a Cortex-A76-class big core
CORE_BY_LLVM_CPU = {c.llvm_cpu: c for c in CORES.values()}


def core_for(llvm_cpu: str | None) -> CoreModel | None:
    """The core model of an arm target's ``mcpu`` (None: generic aarch64 -> the default core;
    a CPU without a model -> None)."""
    if not llvm_cpu or llvm_cpu == "generic":
        return CORES[DEFAULT_CORE]
    return CORE_BY_LLVM_CPU.get(llvm_cpu)
