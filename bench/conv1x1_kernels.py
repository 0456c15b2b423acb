"""Sparse 1x1 convolutions: the channel-major BSR conv1x1 kernel vs the sparse direct kernel, per
ResNet-50 1x1 shape, what ``targets.lower_sparse.plain_1x1_kernel`` chooses between.

    .venv/bin/python bench/conv1x1_kernels.py                 # the host's ISA and AVX2 code
    .venv/bin/python bench/conv1x1_kernels.py --targets x86-avx2

Per shape, sparsity (70/90%) and block (1x1 = unstructured, 8x1): both kernels compiled for the
target, checked against each other (relative error < 1e-4), timed with TVM's time_evaluator
(10 calls x 5 repeats, median) on one thread per physical core. Printed: BSR ms, direct ms and
BSR / direct (> 1: the direct kernel is faster). Results: bench/cnn_zoo.md ("1x1 kernels").
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = [(256, 1024, 14), (1024, 256, 14), (64, 256, 56), (128, 512, 28), (512, 128, 28), (512, 2048, 7),
          (2048, 512, 7), (256, 64, 56)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", default="x86,x86-avx2")
    ap.add_argument("--sparsities", default="0.7,0.9")
    ap.add_argument("--blocks", default="1,8", help="R of the R x 1 blocks (1 = unstructured)")
    a = ap.parse_args(argv)
    from targets.dense_kernels import default_runtime_threads

    default_runtime_threads()
    import tvm

    from targets import conv_kernels as ck
    from targets import resolve
    from targets import sparse_kernels as sk

    dev = tvm.cpu()
    for tag in a.targets.split(","):
        tgt = tvm.target.Target(resolve(tag)[1].tvm_target)
        print(f"## {tag}")
        for ci, co, hw in SHAPES:
            s = ck.ConvShape(1, ci, hw, hw, co, 1, 1)
            rng = np.random.default_rng(0)
            x = rng.standard_normal((1, ci, hw, hw)).astype(np.float32)
            b = rng.standard_normal(co).astype(np.float32)
            line = f"{ci:4d}->{co:4d} {hw}x{hw}:"
            for sp in (float(v) for v in a.sparsities.split(",")):
                for r in (int(v) for v in a.blocks.split(",")):
                    w = rng.standard_normal((co, ci)).astype(np.float32)
                    w = (w * np.repeat(rng.random((co // r, ci)) >= sp, r, axis=0)).astype(np.float32)
                    bsr = sk.to_bsr(w, (r, 1), 1)
                    pf = sk.make_conv1x1_primfunc(1, hw * hw, co, ci, bsr.block, bsr.nnzb, "none", tgt)
                    with tgt:
                        l1 = tvm.compile(tvm.IRModule({"k": pf.with_attr("global_symbol", "k")}), target=tgt)
                    y1 = tvm.runtime.tensor(np.zeros((1, co, hw * hw), np.float32))
                    a1 = [tvm.runtime.tensor(v) for v in (x.reshape(1, ci, -1), sk.kernel_data(bsr),
                                                          sk.kernel_indices(bsr), bsr.indptr, b)] + [y1]
                    d, o, ip = ck.sparse_direct_arrays(s, w, r)
                    with tgt:
                        l2 = tvm.compile(tvm.IRModule({"k": ck.make_sparse_direct(s, r, len(d), ck.NONE, tgt)
                                                       .with_attr("global_symbol", "k")}), target=tgt)
                    y2 = tvm.runtime.tensor(np.zeros((1, co, hw, hw), np.float32))
                    a2 = [tvm.runtime.tensor(v) for v in (x, d, o, ip, b)] + [y2]
                    l1["k"](*a1)
                    l2["k"](*a2)
                    ref = y1.numpy()
                    err = float(np.abs(y2.numpy().reshape(ref.shape) - ref).max() / np.abs(ref).max())
                    if err > 1e-4:
                        raise SystemExit(f"{tag} {ci}->{co} {hw}px {sp} {r}x1: kernels disagree ({err:.1e})")
                    t1 = float(np.median(l1.mod.time_evaluator("k", dev, number=10, repeat=5)(*a1).results))
                    t2 = float(np.median(l2.mod.time_evaluator("k", dev, number=10, repeat=5)(*a2).results))
                    line += f" {int(sp * 100)}%/{r}x1 bsr {t1 * 1e3:.3f} direct {t2 * 1e3:.3f} ({t1 / t2:.2f}x)"
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
