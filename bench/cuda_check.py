"""CUDA BSR kernels (targets/sparse_kernels.py) on a real GPU: correctness against numpy
(float64) and timing of sparse vs dense, side by side in one run.

    .venv/bin/python bench/cuda_check.py                 # full grid on GPU 0
    .venv/bin/python bench/cuda_check.py --quick         # one size
    .venv/bin/python bench/cuda_check.py --compile-only  # build every kernel, run nothing (no GPU needed)

Without a GPU (no CUDA device visible to TVM) it prints a 'no GPU' line and exits 0.

Engines, each timed with TVM's ``time_evaluator`` / CUDA events (device time, median):

* ``sparse``: our BSR kernel (``SparseMatMul``: one thread block per block row; ``--conv1x1``
  shapes: the channel-major conv kernel, one thread per pixel), JIT-compiled by TVM for the
  GPU's arch;
* ``tvm_dense``: the same product as a dense TE matmul scheduled by dlight (Matmul/GEMV
  rules: what the cuda target's dense layers get);
* ``torch``: ``torch.nn.functional.linear`` / ``conv2d`` on CUDA (cuBLAS / cuDNN), when the
  installed torch has CUDA.

The ratios ``dense/sparse`` are what ``targets/lower_sparse.py``'s CUDA prior
(``CUDA_PRIOR_EFFICIENCY``) should be replaced with.
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def gpu_present() -> tuple[bool, str]:
    try:
        import tvm

        dev = tvm.cuda(0)
        if dev.exist:
            return True, f"{dev.device_name} (compute {dev.compute_version})"
        return False, "TVM sees no CUDA device"
    except Exception as exc:  # no CUDA runtime in this TVM build / no driver
        return False, f"no CUDA runtime ({type(exc).__name__}: {exc})"


def random_block_sparse(n, k, block, sparsity, rng):
    r, c = block
    nb = (n // r) * (k // c)
    keep = np.ones(nb, dtype=bool)
    keep[rng.permutation(nb)[: int(round(sparsity * nb))]] = False
    return (rng.standard_normal((n, k)) * np.kron(keep.reshape(n // r, k // c), np.ones(block))).astype(np.float32)


def dense_tvm(m, n, k, target):
    """Dense Y = X @ W^T as a TE compute, scheduled by the cuda target's dlight rules."""
    import tvm
    from tvm import te

    from targets.cuda import schedule_functions

    x = te.placeholder((m, k), "float32", name="x")
    w = te.placeholder((n, k), "float32", name="w")
    kk = te.reduce_axis((0, k), name="kk")
    y = te.compute((m, n), lambda i, j: te.sum(x[i, kk] * w[j, kk], axis=kk), name="y")
    mod = tvm.IRModule({"dense": te.create_prim_func([x, w, y]).with_attr("global_symbol", "dense")})
    with target:
        mod = schedule_functions(mod, target, validate=True)  # what CudaTarget.compile does per function
        return tvm.compile(mod, target=target)


def build_sparse(kind, bsz, m, b, target):
    import tvm

    from targets import sparse_kernels as sk

    if kind == "conv1x1":
        f = sk.make_conv1x1_primfunc(bsz, m, b.shape[0], b.shape[1], b.block, b.nnzb, "none", target)
    else:
        f = sk.make_primfunc(m, b.shape[0], b.shape[1], b.block, b.nnzb, "none", target)
    mod = tvm.IRModule({"bsr": f.with_attr("global_symbol", "bsr")})
    with target:
        return tvm.compile(mod, target=target)


def median_ms(lib, name, dev, args, number=50, repeat=7) -> float:
    ev = lib.time_evaluator(name, dev, number=number, repeat=repeat)
    return float(statistics.median(ev(*args).results)) * 1e3


def torch_ms(fn, reps=50, rounds=7) -> float:
    import torch

    times = []
    for _ in range(rounds):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / reps)
    return float(statistics.median(times))


def case(kind, size, m, sparsity, pattern, target, dev, run, rng, tol=1e-4):
    import tvm

    from targets import sparse_kernels as sk

    block = sk.parse_block(pattern)
    w = random_block_sparse(size, size, block, sparsity, rng)
    b = sk.to_bsr(w, block)
    bsz = 1
    sparse = build_sparse(kind, bsz, m, b, target)
    dense = dense_tvm(m, size, size, target)
    row = {"kind": kind, "N=K": size, "M": m, "sparsity": sparsity, "pattern": pattern}
    if not run:
        return {**row, "built": True}
    x = rng.standard_normal((m, size)).astype(np.float32)  # gemm: X [M, K]; conv: X^T
    ref = x.astype(np.float64) @ w.astype(np.float64).T  # [M, N]
    if kind == "conv1x1":
        xs = np.ascontiguousarray(x.T)[None]  # [1, K, M]
        ys = np.zeros((1, size, m), np.float32)
    else:
        xs, ys = x, np.zeros((m, size), np.float32)
    sargs = [tvm.runtime.tensor(a, dev) for a in (xs, sk.kernel_data(b), sk.kernel_indices(b), b.indptr,
                                                  np.zeros(size, np.float32), ys)]
    dargs = [tvm.runtime.tensor(a, dev) for a in (x, w, np.zeros((m, size), np.float32))]
    sparse["bsr"](*sargs)
    dense["dense"](*dargs)
    ysp = sargs[-1].numpy()
    ysp = ysp[0].T if kind == "conv1x1" else ysp
    scale = float(np.abs(ref).max()) or 1.0
    errs = {"sparse": float(np.abs(ysp - ref).max()) / scale,
            "tvm_dense": float(np.abs(dargs[-1].numpy() - ref).max()) / scale}
    row["sparse_ms"] = median_ms(sparse, "bsr", dev, sargs)
    row["tvm_dense_ms"] = median_ms(dense, "dense", dev, dargs)
    try:
        import torch

        if torch.cuda.is_available():
            xt, wt = torch.from_numpy(x).cuda(), torch.from_numpy(w).cuda()
            errs["torch"] = float((torch.nn.functional.linear(xt, wt).cpu().numpy() - ref).__abs__().max()) / scale
            row["torch_ms"] = torch_ms(lambda: torch.nn.functional.linear(xt, wt))
    except ImportError:
        pass
    row["x_vs_tvm_dense"] = row["tvm_dense_ms"] / row["sparse_ms"]
    if "torch_ms" in row:
        row["x_vs_torch"] = row["torch_ms"] / row["sparse_ms"]
    row["max_rel_err"] = max(errs.values())
    row["ok"] = all(v <= tol for v in errs.values())
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--compile-only", action="store_true", help="build every kernel for --arch, run nothing")
    ap.add_argument("--arch", default=None, help="sm_XY (default: the GPU's, or sm_80 with --compile-only)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2560, 4096])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--conv-shapes", nargs="+", default=["64:3136", "256:196", "512:49"], help="C:M for 1x1 convs")
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.9])
    ap.add_argument("--patterns", nargs="+", default=["unstructured", "8x1"])
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    import tvm

    present, what = gpu_present()
    if not present and not a.compile_only:
        print(f"no GPU: {what}; nothing to check (use --compile-only to build the kernels)")
        return 0
    if a.quick:
        a.sizes, a.batches, a.conv_shapes = [1024], [1], ["256:196"]
    arch = a.arch
    if arch is None:
        arch = "sm_" + tvm.cuda(0).compute_version.replace(".", "") if present else "sm_80"
    # max_shared_memory_per_block as in targets/cuda.py's tvm_target
    target = tvm.target.Target({"kind": "cuda", "arch": arch, "max_shared_memory_per_block": 49152})
    dev = tvm.cuda(0) if present else None
    print(f"device: {what if present else 'none (compile only)'}; target arch {arch}")
    rng = np.random.default_rng(a.seed)
    grid = [("gemm", n, m, s, p) for n, m, s, p in itertools.product(a.sizes, a.batches, a.sparsities, a.patterns)]
    grid += [("conv1x1", *map(int, cs.split(":")), s, p) for cs in a.conv_shapes for s in a.sparsities for p in a.patterns]
    rows = []
    for kind, n, m, s, p in grid:
        r = case(kind, n, m, s, p, target, dev, not a.compile_only, rng)
        rows.append(r)
        if a.compile_only:
            print(f"{kind} N=K={n} M={m} s={s} {p}: built")
            continue
        torch_part = f"  torch {r['torch_ms']:.4f} ms ({r['x_vs_torch']:.2f}x)" if "torch_ms" in r else ""
        print(f"{kind} N=K={n} M={m} s={s} {p:>12}: sparse {r['sparse_ms']:.4f} ms  tvm dense {r['tvm_dense_ms']:.4f} ms "
              f"({r['x_vs_tvm_dense']:.2f}x){torch_part}  err {r['max_rel_err']:.1e}"
              f"{'' if r['ok'] else '  NUMERICS FAIL'}", flush=True)
    return 0 if all(r.get("ok", True) for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
