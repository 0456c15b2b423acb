"""GradualPruner (Narang et al. / Zhu & Gupta schedules) and GaPPruner: schedule properties."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from compressor.errors import UsageError
from compressor.training import GaPPruner, GradualPruner, NarangSchedule, prunable_parameters
from compressor.training.schedules import CubicSchedule


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.gru = nn.GRU(8, 16, batch_first=True)
        self.fc = nn.Linear(16, 5)
        self.ln = nn.LayerNorm(5)

    def forward(self, x):
        h = self.bn(self.conv(x)).relu().mean(dim=(2, 3))  # [B, 8]
        y, _ = self.gru(h[:, None, :].repeat(1, 3, 1))
        return self.ln(self.fc(y[:, -1]))


def _net(seed=0):
    torch.manual_seed(seed)
    return Net()


def _zeros(t):
    return int((t == 0).sum())


def test_prunable_parameters_are_weights_only():
    names = set(prunable_parameters(_net()))
    assert names == {"conv.weight", "gru.weight_ih_l0", "gru.weight_hh_l0", "fc.weight"}


def test_narang_threshold_formula_and_monotone():
    s = NarangSchedule(start_itr=10, ramp_itr=50, end_itr=90, freq=5)
    q = 0.37
    theta = s.theta_for(q)
    # theta*(ramp-start) + 1.5*theta*(end-ramp) == q*freq (the paper's heuristic)
    assert theta * 40 + 1.5 * theta * 40 == pytest.approx(q * 5, rel=1e-12)
    eps = [s.threshold(i, theta, 1.5 * theta) for i in range(0, 120)]
    assert all(e == 0 for e in eps[:10])
    assert eps[10] == pytest.approx(theta / 5)
    assert all(b >= a for a, b in zip(eps, eps[1:]))
    assert eps[60] == pytest.approx((theta * 41 + 1.5 * theta * 11) / 5)
    assert eps[119] == eps[90]  # frozen after end_itr
    with pytest.raises(UsageError):
        NarangSchedule(10, 5, 90)


def _train_steps(model, sp, steps, lr=0.05, record=None):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    for it in range(steps):
        x = torch.randn(8, 2, 6, 6, generator=g)
        y = torch.randint(0, 5, (8,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sp.step()
        if record is not None:
            record.append(({n: m.clone() for n, m in sp.masks.items()}, dict(getattr(sp, "thresholds", {}))))


@pytest.mark.parametrize("schedule", ["narang", "cubic"])
def test_gradual_monotone_fixed_between_updates_and_reaches_target(schedule):
    model = _net()
    sp = GradualPruner(model, 0.8, start_itr=5, ramp_itr=20, end_itr=40, freq=5, schedule=schedule, exact_final=True)
    rec = []
    _train_steps(model, sp, 50, record=rec)
    sparsities = [1 - sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values()) for masks, _ in rec]
    assert all(v == 0.0 for v in sparsities[:5]) and sparsities[-1] >= 0.8 - 1e-2  # nothing before start_itr
    assert all(b >= a for a, b in zip(sparsities, sparsities[1:]))  # monotone
    for it in range(1, 50):
        prev, cur = rec[it - 1][0], rec[it][0]
        for n in cur:
            assert bool((cur[n] <= prev[n]).all())  # a pruned weight never comes back
        if not sp.schedule.is_update(it):
            assert all(torch.equal(prev[n], cur[n]) for n in cur)  # fixed between updates
    # exactly the target per layer at end_itr, and zeros in the weights where the masks say
    for n, p in sp.params.items():
        zeros = int((~sp.masks[n]).sum())
        if schedule == "cubic":
            assert zeros == round(0.8 * p.numel())
        else:  # narang + exact_final: at least the target (the threshold may overshoot, masks never regrow)
            assert round(0.8 * p.numel()) <= zeros <= round(0.9 * p.numel())
        assert bool((p[~sp.masks[n]] == 0).all())
    if schedule == "narang":
        th = [t for _, t in rec]
        for n in sp.params:
            assert all(b[n] >= a[n] for a, b in zip(th, th[1:]))  # per-layer thresholds rise monotonically
            assert th[-1][n] > 0
    else:  # cubic: exact per-layer sparsity at each update
        masks, _ = rec[20]
        want = sp.schedule.sparsity(20, 0.8)
        for n, m in masks.items():
            assert int((~m).sum()) == round(want * m.numel())


def test_narang_without_exact_final_is_close_and_biases_untouched():
    model = _net()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    sp = GradualPruner(model, 0.9, start_itr=0, ramp_itr=400, end_itr=1200, freq=50)
    for _ in range(1201):  # no training: weights do not move, the paper's theta lands on the target
        sp.step()
    s = sp.sparsity()
    # eps(end_itr) = q * (1 + 5 / (2 (ramp - start) + 3 (end - ramp))): a hair above the target percentile
    assert 0.9 <= s["overall"] <= 0.905
    for n, p in model.named_parameters():
        if n in sp.params:
            assert bool((p[sp.masks[n]] == frozen[n][sp.masks[n]]).all())
        else:  # biases, BN, LayerNorm: never masked
            assert torch.equal(p, frozen[n]), n


def test_gap_partitions_cycle_and_final_sparsity_exact():
    model = _net()
    sp = GaPPruner(model, 0.75, period=4, num_partitions=3, total_steps=30)
    assert [len(p) for p in sp.partitions] == [2, 1, 1]
    seen = []
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for it in range(30):
        x = torch.randn(4, 2, 6, 6)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        sp.step()
        if not sp.finished:
            # exactly one partition dense, all others at exactly the target sparsity
            for i, part in enumerate(sp.partitions):
                for n in part:
                    zeros = int((~sp.masks[n]).sum())
                    assert zeros == (0 if i == sp.current else round(0.75 * sp.params[n].numel()))
            seen.append(sp.current)
    assert [c for _, c in sp.history] == [0, 1, 2, 0, 1, 2, 0, 1]
    assert seen[:4] == [0, 0, 0, 1]
    assert sp.finished
    for n, p in sp.params.items():
        assert int((~sp.masks[n]).sum()) == round(0.75 * p.numel())
        assert _zeros(p) >= round(0.75 * p.numel())


def test_gap_bad_partitions_and_bad_args():
    model = _net()
    with pytest.raises(UsageError):
        GaPPruner(model, 0.5, period=2, partitions=[["fc.weight"]])
    with pytest.raises(UsageError):
        GradualPruner(model, 1.0, start_itr=0, end_itr=10)
    with pytest.raises(UsageError):
        GradualPruner(model, 0.5, start_itr=0, end_itr=10, schedule="linear")
    with pytest.raises(UsageError):
        CubicSchedule(5, 5)
