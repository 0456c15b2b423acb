"""GroupLasso (SSL) drives whole groups to zero on a toy problem where few groups are needed."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from compressor.errors import UsageError
from compressor.training import GroupLasso


def _fit(lam: float, steps: int = 600):
    torch.manual_seed(0)
    # y depends on 2 of 12 inputs; 16 hidden units, only a few needed
    x = torch.randn(256, 12)
    y = (x[:, :2] @ torch.tensor([[1.5], [-2.0]])).relu()
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 1))
    gl = GroupLasso(model, lam, linear_rows=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        (loss + gl.penalty()).backward()
        opt.step()
        gl.step()
    with torch.no_grad():
        mse = float(nn.functional.mse_loss(model(x), y))
    return model, gl, mse, x, y


def test_group_lasso_zeroes_groups_and_removal_is_harmless():
    _, gl0, _, _, _ = _fit(0.0)
    model, gl, mse, x, y = _fit(0.02)
    assert [n for n, _, _ in gl.groups] == ["0.weight"]  # the last Linear (outputs) is skipped
    near0 = gl0.group_report(1e-2)["0.weight[rows]"]["near_zero"]
    rep = gl.group_report(1e-2)["0.weight[rows]"]
    assert rep["groups"] == 16
    assert rep["near_zero"] >= near0 + 6  # lasso drives many rows to ~0, plain training does not
    norms_before = model[0].weight.detach().norm(dim=1)
    n = gl.zero_small_groups(1e-2)
    assert n == rep["near_zero"]
    w = model[0].weight.detach()
    zero_rows = (w == 0).all(dim=1)
    assert int(zero_rows.sum()) == n and bool((norms_before[zero_rows] <= 1e-2 * norms_before.max()).all())
    assert gl.sparsity()["overall"] == pytest.approx(n / 16)
    with torch.no_grad():
        mse_after = float(nn.functional.mse_loss(model(x), y))
    assert mse_after <= mse * 1.05 + 1e-4  # removing ~zero groups changes little
    # step() keeps zeroed groups at zero through further updates
    model[0].weight.data += 1.0
    gl.step()
    assert bool((model[0].weight[zero_rows] == 0).all())


def test_group_lasso_conv_filters_and_channels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.Flatten(), nn.Linear(6, 2))
    gl = GroupLasso(model, 0.1, structures=("filters", "channels"))
    w0, w2 = model[0].weight, model[2].weight
    expect = 0.1 * (w0.flatten(1).norm(dim=1).sum() + w0.transpose(0, 1).flatten(1).norm(dim=1).sum()
                    + w2.flatten(1).norm(dim=1).sum() + w2.transpose(0, 1).flatten(1).norm(dim=1).sum())
    assert float(gl.penalty().detach()) == pytest.approx(float(expect.detach()), rel=1e-6)
    bn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        bn[1].weight.copy_(torch.tensor([0.5, -1.0, 2.0, 0.001]))
    glb = GroupLasso(bn, 1.0, norm_scales=True)
    assert sorted(glb.group_report()) == ["0.weight[filters]", "1.weight[bn_scale]"]
    expect = bn[0].weight.flatten(1).norm(dim=1).sum() + 3.501
    assert float(glb.penalty().detach()) == pytest.approx(float(expect.detach()), rel=1e-5)
    assert glb.zero_small_groups(1e-3) == 1 and float(bn[1].weight[3].detach()) == 0.0  # |0.001| <= 1e-3 * 2.0
    with pytest.raises(UsageError):
        GroupLasso(model, 0.1, structures=("rows",))
    with pytest.raises(UsageError):
        GroupLasso(model, -1.0)
