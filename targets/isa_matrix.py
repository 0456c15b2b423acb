"""Compile every hand-written CPU kernel variant for one target, at the sizes users have.

The x86 host expansion, the fixed ISA levels and the aarch64 target each make the kernel
builders (``dense_kernels``, ``conv_kernels``, ``sparse_kernels``, ``rnn_kernels``) pick other
vector widths, variants and intrinsics. A kernel LLVM cannot legalize for one ISA aborts the
whole process (``report_fatal_error``) -- on a Zen 3 the 16-lane AVX-512 unstructured kernel did
for the host target at 2048-wide layers (issue 16). This module is the check that finds such a
kernel on any host: it builds the catalogue (:func:`cases`) for a target and compiles it, and
where the host can execute the code, runs a subset against numpy oracles.

It is meant to run in a child process (an abort must not take the caller down)::

    python -m targets.isa_matrix --target '{"kind": "llvm", "mtriple": ..., "mcpu": ..., "mattr": [...]}' \\
        [--run] [--each] [--json OUT]

exit 0 when every case compiled (and ran within tolerance), 1 otherwise; a code-generation
abort ends the process with SIGABRT and LLVM's message on stderr (``--each`` prints the case
before compiling it, so the last ``compiling`` line names the culprit).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# (n, k) of the sparse/dense GEMM cases: up to 4096 wide (the seed paper's MLP is 4x2048; the
# Zen 3 abort appeared at 2048, not at the 128-256 widths the unit tests used)
GEMM_SHAPES = ((2048, 2048), (4096, 1024), (1024, 4096))
SPARSITY = 0.9


def _err(y: np.ndarray, ref: np.ndarray) -> float:
    """Max abs error relative to max(1, max |ref|)."""
    ref = np.asarray(ref, np.float64)
    return float(np.max(np.abs(y - ref)) / max(1.0, float(np.max(np.abs(ref)))))


@dataclass
class Case:
    name: str
    make: Callable[[Any], Any]  # tvm Target -> PrimFunc
    # (call, target) -> max error vs oracle, relative to max(1, |ref|); call(inputs) -> outputs
    run: Callable[[Callable[[list[np.ndarray]], list[np.ndarray]], Any], float] | None = None
    n_out: int = 1  # trailing PrimFunc buffers that are outputs


def _rng() -> np.random.Generator:
    return np.random.default_rng(0)


def _sparse_weight(n: int, k: int, block: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    r, c = block
    keep = rng.random((n // r, k // c)) >= SPARSITY
    mask = np.kron(keep, np.ones((r, c), bool))
    return (rng.standard_normal((n, k)).astype(np.float32) * mask).astype(np.float32)


def _sparse_cases() -> list[Case]:
    from targets import sparse_kernels as sk

    out: list[Case] = []
    # (block, batch rows): unstructured at 1 (lanes / perm), 4 (perm / xt), 16 (xt); 1x4 lanes; Rx1 rows
    combos = [((1, 1), 1), ((1, 1), 4), ((1, 1), 16), ((1, 4), 1), ((8, 1), 1), ((8, 1), 16), ((16, 1), 8),
              ((4, 4), 2)]
    for n, k in GEMM_SHAPES:
        for block, m in combos:
            if (n, k) != GEMM_SHAPES[0] and block not in ((1, 1), (8, 1)):
                continue

            st: dict[str, Any] = {}

            def make(tgt, n=n, k=k, block=block, m=m, st=st):
                w = _sparse_weight(n, k, block, _rng())
                b = sk.to_bsr(w, block, sk.lanes_group(block, tgt))
                p = sk.kernel_params(block, m, tgt, n, k)
                st["state"] = (w, b, p)
                return sk.make_primfunc(m, n, k, block, len(sk.kernel_weights(b, p)[0]), "relu6", tgt, p)

            def run(call, tgt, st=st, m=m, n=n, k=k):
                w, b, p = st["state"]
                x = _rng().standard_normal((m, k)).astype(np.float32)
                bias = _rng().standard_normal(n).astype(np.float32)
                return _err(call(sk.kernel_args(x, b, bias, p))[0], sk.reference(x, b, bias, "relu6"))

            out.append(Case(f"sparse_matmul {n}x{k} block {block[0]}x{block[1]} m={m}", make,
                            run if (n, k) == GEMM_SHAPES[0] else None))
    # channel-major sparse 1x1 convolution (ResNet bottleneck / MobileNet expansion sizes)
    for (o, i, h, w), block in (((256, 64, 56, 56), (1, 1)), ((2048, 512, 7, 7), (1, 1)), ((512, 1024, 14, 14), (8, 1))):
        def make_c(tgt, o=o, i=i, h=h, w=w, block=block):
            wt = _sparse_weight(o, i, block, _rng())
            b = sk.to_bsr(wt, block, sk.lanes_group(block, tgt))
            return sk.make_conv1x1_primfunc(1, h * w, o, i, block, b.nnzb, "relu", tgt, hw=(h, w))

        out.append(Case(f"sparse_conv1x1 {o}x{i} {h}x{w} block {block[0]}x{block[1]}", make_c))
    return out


def _dense_cases() -> list[Case]:
    from targets import dense_kernels as dk

    out = []
    for m, n, k in ((1, 4096, 4096), (16, 2048, 2048), (1, 1000, 2048), (128, 768, 3072)):
        def make(tgt, m=m, n=n, k=k):
            return dk.make_primfunc(m, n, k, "relu", tgt, dk.kernel_params(m, n, k, tgt))

        def run(call, tgt, m=m, n=n, k=k):
            rng = _rng()
            p = dk.kernel_params(m, n, k, tgt)
            x = rng.standard_normal((m, k)).astype(np.float32)
            w = rng.standard_normal((n, k)).astype(np.float32)
            bias = rng.standard_normal(n).astype(np.float32)
            return _err(call(dk.kernel_args(x, w, bias, p))[0], dk.reference(x, w, bias, "relu"))

        out.append(Case(f"dense_matmul {m}x{n}x{k}", make, run if m * n * k <= 1 << 23 else None))
    return out


def _conv_cases() -> list[Case]:
    from targets import conv_kernels as ck

    shapes = {
        "stem 7x7 s2": ck.ConvShape(1, 3, 224, 224, 64, 7, 7, 2, 2, (3, 3, 3, 3)),
        "3x3 s1 64": ck.ConvShape(1, 64, 56, 56, 64, 3, 3, 1, 1, (1, 1, 1, 1)),
        "3x3 s2 256": ck.ConvShape(1, 256, 28, 28, 256, 3, 3, 2, 2, (1, 1, 1, 1)),
        "3x3 s1 512 7x7": ck.ConvShape(1, 512, 7, 7, 512, 3, 3, 1, 1, (1, 1, 1, 1)),
        "1x1 256->64": ck.ConvShape(1, 256, 56, 56, 64, 1, 1),
        "1x1 1024->2048": ck.ConvShape(1, 1024, 7, 7, 2048, 1, 1),
        "depthwise 3x3 s1 144": ck.ConvShape(1, 144, 56, 56, 144, 3, 3, 1, 1, (1, 1, 1, 1), 144),
        "depthwise 3x3 s2 960": ck.ConvShape(1, 960, 14, 14, 960, 3, 3, 2, 2, (0, 0, 1, 1), 960),
    }
    out = []
    for name, s in shapes.items():
        def make(tgt, s=s):
            return ck.make_primfunc(s, ck.Act(0.0, 6.0), tgt)

        def run(call, tgt, s=s):
            rng = _rng()
            x = rng.standard_normal((s.b, s.i, s.h, s.w)).astype(np.float32)
            w = rng.standard_normal((s.o, s.i // s.group, s.kh, s.kw)).astype(np.float32) * 0.1
            bias = rng.standard_normal(s.o).astype(np.float32)
            wk, bk = ck.kernel_weights(s, w, bias, tgt)
            return _err(call([x, wk, bk])[0], ck.reference(x, w, bias, s, ck.Act(0.0, 6.0)))

        out.append(Case(f"conv {name}", make, run if s.o * s.i // s.group * s.kh * s.kw * s.h * s.w <= 1 << 28 else None))
    out.append(Case("add+relu 1x256x56x56", lambda tgt: ck.make_add((1, 256, 56, 56), ck.Act(0.0, ck.INF), tgt)))
    out.append(Case("global_avgpool 1x2048x7x7", lambda tgt: ck.make_global_avgpool((1, 2048, 7, 7), tgt)))
    return out


def _rnn_cases() -> list[Case]:
    from targets import rnn_kernels as rk

    out = []
    for cell, inp, hid, modes in (("GRU", 256, 1024, ("dense", "dense")), ("GRU", 256, 1024, ("seg", "seg")),
                                  ("LSTM", 64, 256, ("seg", "dense")), ("GRU", 8, 32, ("dense", "seg"))):
        spec = rk.RNNSpec(cell, 4, 1, inp, hid, "forward")

        st: dict[str, Any] = {}

        def make(tgt, spec=spec, modes=modes, st=st):
            rng = _rng()
            g = spec.gates * spec.hidden
            w = rng.standard_normal((1, g, spec.input)).astype(np.float32) * (rng.random((1, g, spec.input)) > SPARSITY)
            r = rng.standard_normal((1, g, spec.hidden)).astype(np.float32) * (rng.random((1, g, spec.hidden)) > SPARSITY)
            st["state"] = (w * 0.1, r * 0.1, rk.kernel_weights(spec, w * 0.1, r * 0.1, None, tgt, modes))
            return rk.make_primfunc(spec, *st["state"][2].sizes, tgt, st["state"][2].modes)

        def run(call, tgt, spec=spec, st=st):
            w, r, kw = st["state"]
            x = _rng().standard_normal((spec.seq, 1, spec.input)).astype(np.float32)
            h0 = np.zeros((1, 1, spec.hidden), np.float32)
            states = [h0] + ([h0.copy()] if spec.cell == "LSTM" else [])
            ref = rk.reference(spec, x, w, r, None, h0, h0 if spec.cell == "LSTM" else None)
            return _err(call([x, *states, *kw.args()])[0], ref[0])

        out.append(Case(f"fused {cell} {inp}->{hid} {'/'.join(modes)}", make, run, 3 if cell == "LSTM" else 2))
    return out


def cases() -> list[Case]:
    """Every kernel family and variant: sparse GEMM (lanes / perm / xt / rows, unstructured, 1x4,
    Rx1, RxC), sparse 1x1 conv, dense GEMM, dense convs (stem, 3x3 s1/s2, 1x1, depthwise s1/s2),
    residual add, global pooling, fused GRU/LSTM (dense and ELL weights)."""
    return _sparse_cases() + _dense_cases() + _conv_cases() + _rnn_cases()


def _objects_only(output: str, objects: list[str], options: Any = None, **_kw: Any) -> None:
    """export_library's fcompile that links nothing (any ISA, no cross linker needed)."""


_objects_only.object_format = "o"  # type: ignore[attr-defined]


def relax_module(prims: list[Any], n_outs: list[int]):
    """One Relax function ``case<i>`` per PrimFunc: its inputs as parameters, ``call_tir`` into the
    kernel -- how the ONNX converters embed the kernels, so the module goes through the same
    Relax pipeline (fusion, default schedules, VM codegen) as a model's artifact does."""
    from tvm import relax

    bb = relax.BlockBuilder()
    for i, (prim, n_out) in enumerate(zip(prims, n_outs)):
        bufs = list(prim.params)  # tirx: the parameters are the buffers (shape, dtype)
        sinfo = [relax.TensorType([int(d) for d in b.shape], str(b.dtype)) for b in bufs]
        gv = bb.add_func(prim.without_attr("global_symbol"), f"k{i}")
        params = [relax.Var(f"a{j}", si) for j, si in enumerate(sinfo[:-n_out])]
        with bb.function(f"case{i}", params):
            with bb.dataflow():
                out = sinfo[-1] if n_out == 1 else sinfo[-n_out:]
                y = bb.emit_output(bb.emit(relax.call_tir(gv, params, out)))
            bb.emit_func_output(y)
    return bb.get()


def check(target: dict[str, Any], run: bool = False, each: bool = False,
          say: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Compile the catalogue for ``target`` through the project's Relax CPU pipeline
    (``cpu_schedules.pipeline``, the VM's exec mode; one module, or case by case with ``each``);
    with ``run``, execute the cases that have an oracle and record their error."""
    import tvm
    from tvm import relax

    from targets import cpu_schedules
    from targets.tvm_backend import exec_mode_for

    tgt = tvm.target.Target(target)
    result: dict[str, Any] = {"target": target, "cases": {}, "ok": True}
    cs = cases()
    prims = []
    t0 = time.perf_counter()
    for c in cs:
        prims.append(c.make(tgt))
        result["cases"][c.name] = {"compiled": False}
    groups = [[i] for i in range(len(cs))] if each else [list(range(len(cs)))]
    exes: dict[int, Any] = {}
    for g in groups:
        if each:
            say(f"compiling {cs[g[0]].name}")
        mod = relax_module([prims[i] for i in g], [cs[i].n_out for i in g])
        with tgt:
            ex = relax.build(mod, target=tgt, relax_pipeline=cpu_schedules.pipeline(tgt), exec_mode=exec_mode_for(tgt))
        with tempfile.TemporaryDirectory() as tmp:
            # machine code is emitted when the objects are written, not by relax.build: this is
            # where LLVM's report_fatal_error fires (the Zen 3 abort came from export_library)
            ex.export_library(str(Path(tmp) / "lib.so"), fcompile=_objects_only, workspace_dir=tmp)
        for j, i in enumerate(g):
            exes[i] = (ex, f"case{j}")
            result["cases"][cs[i].name]["compiled"] = True
    result["compile_seconds"] = round(time.perf_counter() - t0, 2)
    if run:
        vms: dict[int, Any] = {}
        for i, c in enumerate(cs):
            if c.run is None:
                continue
            ex, fname = exes[i]
            vm = vms.setdefault(id(ex), relax.VirtualMachine(ex, tvm.cpu()))

            def call(args, vm=vm, fname=fname):
                out = vm[fname](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in args])
                return [o.numpy() for o in out] if isinstance(out, (list, tuple)) or hasattr(out, "__len__") and not hasattr(out, "numpy") else [out.numpy()]

            err = c.run(call, tgt)
            rec = result["cases"][c.name]
            rec["max_rel_err"] = err
            rec["ok"] = bool(err <= 1e-5)
            result["ok"] &= rec["ok"]
            say(f"ran {c.name}: max error {err:.2e} (of max(1, |ref|))")
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m targets.isa_matrix", description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", required=True, help="TVM target JSON dict")
    ap.add_argument("--run", action="store_true", help="also execute the cases with an oracle (the host must run the ISA)")
    ap.add_argument("--each", action="store_true", help="compile case by case, naming each before it compiles")
    ap.add_argument("--json", help="write the result here")
    a = ap.parse_args(argv)
    res = check(json.loads(a.target), a.run, a.each, lambda s: print(s, flush=True))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    n = len(res["cases"])
    print(f"{n} kernels compiled in {res['compile_seconds']} s; {'ok' if res['ok'] else 'NUMERICS FAIL'}")
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
