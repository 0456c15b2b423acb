"""Training-time sparsity with ``compressor.training``: a runnable example (seconds on a CPU).

Trains a small MLP on scikit-learn's bundled 8x8 digits three ways, at 90% sparsity of the
Linear weights (the last layer included), and exports the gradual one to ONNX, where the
pruned weights are exact zeros that ``compress model.onnx --target x86`` then lowers:

    python examples/train_sparse.py [--out sparse_mlp.onnx]

The whole API is: build a sparsifier on the model, call ``sp.step()`` after every
``optimizer.step()``, read ``sp.masks`` / ``sp.sparsity()``.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compressor.training import GaPPruner, GradualPruner, GroupLasso  # noqa: E402


def data():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    return [torch.from_numpy(a) for a in train_test_split(x, d.target.astype(np.int64), test_size=0.2, random_state=0)]


def train(kind: str, steps: int = 900) -> tuple[nn.Module, float, dict]:
    x_tr, x_te, y_tr, y_te = data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    if kind == "gradual":  # Narang et al.: threshold rises from itr 100 to 600, masks every 25 steps
        sp = GradualPruner(model, 0.9, start_itr=100, ramp_itr=350, end_itr=600, freq=25, exact_final=True)
    elif kind == "cubic":  # Zhu & Gupta cubic schedule
        sp = GradualPruner(model, 0.9, start_itr=100, end_itr=600, freq=25, schedule="cubic")
    else:  # scheduled grow-and-prune: 2 partitions (one per layer), swap every 100 steps, sparse from step 0
        sp = GaPPruner(model, 0.9, period=100, num_partitions=2, total_steps=700)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(x_tr), (32,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x_tr[idx]), y_tr[idx]).backward()
        opt.step()
        sp.step()  # <- after optimizer.step()
    with torch.no_grad():
        acc = float((model(x_te).argmax(1) == y_te).float().mean())
    return model, acc, sp.sparsity()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="export the gradually pruned model to this ONNX file")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    for kind in ("gradual", "cubic", "gap"):
        model, acc, s = train(kind)
        print(f"{kind:8s} test accuracy {acc:.4f}  sparsity {s['overall']:.3f} ({s['kept']} of {s['params']} weights kept)")
        if kind == "gradual" and a.out:
            warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter, on purpose
            torch.onnx.export(model, (torch.zeros(1, 64),), str(a.out), input_names=["input"], output_names=["logits"],
                              opset_version=17, dynamo=False)
            print(f"wrote {a.out}")
    # SSL: group lasso on the hidden units (rows of the first Linear), then remove the ~zero ones
    x_tr, x_te, y_tr, y_te = data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    gl = GroupLasso(model, lam=5e-3)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(900):
        idx = torch.randint(0, len(x_tr), (32,), generator=gen)
        opt.zero_grad()
        (nn.functional.cross_entropy(model(x_tr[idx]), y_tr[idx]) + gl.penalty()).backward()
        opt.step()
    n = gl.zero_small_groups(1e-2)
    with torch.no_grad():
        acc = float((model(x_te).argmax(1) == y_te).float().mean())
    print(f"ssl      test accuracy {acc:.4f}  {n} of 256 hidden units driven to zero (removable)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
