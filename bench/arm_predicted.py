"""The cost model's predicted dense/sparse time ratio over the layers ``lower.sparse`` lowered in arm
bundles (what bench/arm.md puts beside the measured qemu instruction-count ratio).

    .venv/bin/python bench/arm_predicted.py BUNDLE [BUNDLE ...]

Per bundle: the sum over the lowered layers of the modelled dense-kernel time over the sum of the
modelled sparse-kernel time (``targets.lower_sparse.kernel_time`` with the fit arm uses), and the range
and median of the per-layer predicted ratios from report.json.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from targets import lower_sparse as ls
from targets.sparse_kernels import parse_block
for b in sys.argv[1:]:
    r = json.load(open(f"{b}/report.json"))
    lay = [L for p in r["target_passes"] if p["name"] == "lower.sparse" for L in p["stats"]["layers"] if L["lowered"]]
    td = ts = 0.0
    ratios = []
    for L in lay:
        n, k = L["shape"]; m = L["batch"]; blk = parse_block(L["block"]); op = L["op"]
        td += ls.kernel_time(op, "dense", n, k, m, 1.0, blk, isa="arm")
        ts += ls.kernel_time(op, "sparse", n, k, m, L["stored_density"], blk, isa="arm")
        ratios.append(L["predicted_ratio"])
    ratios.sort()
    print(f"{b}: {len(lay)} layers, predicted dense/sparse over the lowered layers {td/ts:.2f}x, per layer {ratios[0]:.2f}..{ratios[-1]:.2f} (median {ratios[len(ratios)//2]:.2f}), basis {lay[0]['cost_model']}")
