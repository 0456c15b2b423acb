#!/usr/bin/env python3
"""On-device runner shipped in every bundle as ``run_bundle.py``.

    python3 run_bundle.py [BUNDLE_DIR] [--onnx | --tvm]

1. checks that this CPU has every ISA feature the manifest requires
   (exit 6 with the missing list otherwise, instead of crashing on an illegal
   instruction);
2. verifies the sha256 of every file listed in the manifest;
3. runs the compiled artifact (TVM runtime) -- or, with ``--onnx``, the
   compressed ONNX model (onnxruntime) -- on selfcheck/inputs.npz and compares
   with selfcheck/expected.npz. Exit 0 when all outputs agree (cosine >= 0.9999).
Needs only numpy plus ``tvm`` (or ``onnxruntime`` with --onnx). Standalone: no compressor import.
"""
from __future__ import annotations

import hashlib
import json
import platform
import sys
from pathlib import Path

import numpy as np


# Linux arm64 AT_HWCAP bits, named as /proc/cpuinfo "Features" names them (asm/hwcap.h)
AARCH64_HWCAP = ("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma "
                 "lrcpc dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs sb paca pacg").split()


def _aarch64_hwcap_features() -> set[str] | None:
    """Features from getauxval(AT_HWCAP): what the kernel (or qemu-user, whose /proc/cpuinfo
    is the host's) tells this process; None when unavailable."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.getauxval.restype = ctypes.c_ulong
        libc.getauxval.argtypes = [ctypes.c_ulong]
        hwcap = int(libc.getauxval(16))  # AT_HWCAP
    except (OSError, AttributeError, ImportError):
        return None
    return {name for bit, name in enumerate(AARCH64_HWCAP) if hwcap >> bit & 1} if hwcap else None


def cpu_features() -> set[str]:
    feats: set[str] = set()
    if platform.machine().lower() in ("aarch64", "arm64"):
        hw = _aarch64_hwcap_features()
        if hw is not None:
            return hw
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                feats.update(line.split(":", 1)[1].split())
    except OSError:
        pass
    return feats


def _region_marker():
    """``COMPRESSOR_INSN_REGIONS=1`` (set by ``compress bench --device qemu-aarch64``): bracket
    each inference with a no-op system call that the qemu instruction-count plugin
    (targets/qemu_insn_count.c) recognises; elsewhere the call just fails with ENOSYS."""
    import os

    if os.environ.get("COMPRESSOR_INSN_REGIONS") != "1":
        return lambda phase: None
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    return lambda phase: libc.syscall(0x4321, ctypes.c_ulong(0xC0FFEE), ctypes.c_ulong(phase))


def _physical_cores() -> int:
    """Distinct (package, core) pairs among the CPUs this process may use; the CPU count
    where sysfs has no topology."""
    import os

    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for c in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{c}/topology")
        try:
            cores.add((topo.joinpath("physical_package_id").read_text(), topo.joinpath("core_id").read_text()))
        except OSError:
            cores.add(("cpu", str(c)))
    return max(1, len(cores))


def main(argv: list[str]) -> int:
    use_onnx = "--onnx" in argv
    args = [a for a in argv if not a.startswith("--")]
    bdir = Path(args[0]) if args else Path(__file__).resolve().parent
    manifest = json.loads((bdir / "manifest.json").read_text())
    # quantized bundles run in onnxruntime (manifest "runtime"; TVM would dequantize them)
    # a float bundle whose artifact measured slower than onnxruntime defaults to onnxruntime too; --tvm forces the artifact
    use_onnx = use_onnx or ((manifest.get("runtime") or {}).get("name") == "onnxruntime"
                            and not ("--tvm" in argv and manifest.get("artifact") and not (manifest["runtime"].get("quantized_ops"))))
    if not use_onnx:
        want = str(((manifest.get("target") or {}).get("triple") or "")).split("-")[0]
        here = {"arm64": "aarch64", "amd64": "x86_64"}.get(platform.machine().lower(), platform.machine().lower())
        if want in ("aarch64", "x86_64") and want != here:
            print(f"this CPU ({here}) cannot run an artifact built for {want}")
            return 6
        need = set(manifest.get("required_isa_features", []))
        missing = sorted(need - cpu_features())
        if missing:
            print(f"this CPU ({platform.machine()}) lacks ISA features the artifact needs: {', '.join(missing)}")
            return 6
    for name, info in manifest["files"].items():
        if hashlib.sha256((bdir / name).read_bytes()).hexdigest() != info["sha256"]:
            print(f"sha256 mismatch: {name}")
            return 7
    with np.load(bdir / "selfcheck" / "inputs.npz") as z:
        inputs = {k: z[k] for k in z.files}
    with np.load(bdir / "selfcheck" / "expected.npz") as z:
        expected = {k: z[k] for k in z.files}
    names = [o["name"] for o in manifest["outputs"]]
    order = [i["name"] for i in manifest["inputs"]]
    n = len(next(iter(inputs.values())))
    if use_onnx:
        import onnxruntime as ort

        sess = ort.InferenceSession(str(bdir / "model.onnx"), providers=["CPUExecutionProvider"])
        run = lambda feed: sess.run(None, feed)
    else:
        import os

        # one TVM pool thread per physical core (TVM alone halves the CPU count on x86, assuming SMT)
        os.environ.setdefault("TVM_NUM_THREADS", str(_physical_cores()))
        import tvm

        try:  # the runtime-only TVM (TVM_USE_RUNTIME_LIB=1, as on a device) has no tvm.relax
            from tvm.runtime.vm import VirtualMachine
        except ImportError:
            from tvm.relax import VirtualMachine

        if not manifest.get("artifact"):
            print("bundle has no compiled artifact; use --onnx")
            return 8
        lib = tvm.runtime.load_module(str(bdir / manifest["artifact"]["path"]))
        vm = VirtualMachine(lib, tvm.cpu())

        def run(feed):
            out = vm["main"](*[tvm.runtime.tensor(feed[k]) for k in order])
            outs = list(out) if not hasattr(out, "numpy") else [out]
            return [o.numpy() for o in outs]
    worst = 1.0
    mark = _region_marker()
    for i in range(n):
        feed = {k: inputs[k][i] for k in order}
        mark(1)
        outs = run(feed)
        mark(2)
        for name, got in zip(names, outs):
            a, r = np.ravel(got).astype(np.float64), np.ravel(expected[name][i]).astype(np.float64)
            denom = np.linalg.norm(a) * np.linalg.norm(r)
            cos = 1.0 if denom == 0 and np.allclose(a, r) else float(a @ r / denom) if denom else 0.0
            worst = min(worst, cos)
    ok = worst >= 0.9999
    print(f"SELFCHECK {'PASSED' if ok else 'FAILED'} samples={n} min_cosine={worst:.6f} runtime={'onnxruntime' if use_onnx else 'tvm'}")
    return 0 if ok else 9


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
