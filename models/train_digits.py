"""Train the embedded default model: a small CNN on scikit-learn's bundled 8x8 digits.

Offline (``sklearn.datasets.load_digits`` ships with scikit-learn), seeded, a few seconds
on one CPU thread.  Writes, next to this file:

* ``digits_cnn.onnx``   - opset 17, input ``input`` [1,1,8,8] float32 (pixels scaled to [0,1]),
                          output ``logits`` [1,10]; BatchNormalization kept unfused.
* ``digits_eval.npz``   - test split: ``input`` [N,1,8,8] float32, ``labels`` [N] int64.
* ``digits_calib.npz``  - calibration set: ``input`` [256,1,8,8] float32 (train samples).

Usage (from the repository root)::

    python -m models.train_digits [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.build import export_onnx

SEED = 0
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
N_CALIB = 256
EPOCHS = 30
BATCH = 32
OUT_DIR = Path(__file__).resolve().parent


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * 8 * 8, 64), nn.ReLU(), nn.Linear(64, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test); x float32 [N,1,8,8] in [0,1], y int64."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = d.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=SEED, stratify=y)
    return x_tr, y_tr, x_te, y_te


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    with torch.no_grad():
        pred = model(torch.from_numpy(x)).argmax(1).numpy()
    return float((pred == y).mean())


def train(x_tr: np.ndarray, y_tr: np.ndarray) -> nn.Module:
    torch.manual_seed(SEED)
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=EPOCHS)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(SEED)
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    for _ in range(EPOCHS):
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), BATCH):
            idx = perm[i:i + BATCH]
            opt.zero_grad()
            loss_fn(model(xt[idx]), yt[idx]).backward()
            opt.step()
        sched.step()
    return model.eval()


def onnx_accuracy(path: Path | str, x: np.ndarray, y: np.ndarray) -> float:
    """Accuracy of the ONNX file via onnxruntime (batch-1 model: one run per sample)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    pred = [int(sess.run(None, {name: x[i:i + 1]})[0].argmax()) for i in range(len(x))]
    return float((np.asarray(pred) == y).mean())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.train_digits", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=OUT_DIR, help="output directory (default: models/)")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)

    torch.set_num_threads(1)  # bit-reproducible training on a given CPU
    torch.use_deterministic_algorithms(True)
    t0 = time.perf_counter()
    x_tr, y_tr, x_te, y_te = load_split()
    model = train(x_tr, y_tr)
    train_acc, test_acc = accuracy(model, x_tr, y_tr), accuracy(model, x_te, y_te)
    print(f"trained in {time.perf_counter() - t0:.1f}s: train acc {train_acc:.4f}, test acc {test_acc:.4f} "
          f"(n_train={len(x_tr)}, n_test={len(x_te)})")

    onnx_path = a.out / "digits_cnn.onnx"
    export_onnx(model, {INPUT_NAME: torch.from_numpy(x_te[:1])}, onnx_path, [OUTPUT_NAME])
    np.savez_compressed(a.out / "digits_eval.npz", **{INPUT_NAME: x_te, "labels": y_te})
    calib_idx = np.random.default_rng(SEED).choice(len(x_tr), size=N_CALIB, replace=False)
    calib_idx.sort()
    np.savez_compressed(a.out / "digits_calib.npz", **{INPUT_NAME: x_tr[calib_idx]})
    print(f"onnxruntime test acc {onnx_accuracy(onnx_path, x_te, y_te):.4f}")
    for f in ("digits_cnn.onnx", "digits_eval.npz", "digits_calib.npz"):
        print(f"wrote {a.out / f} ({(a.out / f).stat().st_size / 1024:.1f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
