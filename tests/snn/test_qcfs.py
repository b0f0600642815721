"""QCFS: forward equals the paper's formula, straight-through gradients, it trains and converts with theta as
threshold. (The training loop's checkpoints and resumption are tested with the CLI in ``test_report.py``.)"""

import math

import pytest
import torch
from torch import nn

from dormant.snn.conversion import ConvertConfig, convert
from dormant.snn.qcfs import QCFS, qcfs_from_relu, relu_activation_percentiles

from .tiny import synthetic, trained


def _formula(z: float, theta: float, L: int, phi: float = 0.5) -> float:
    """h(z) = theta * clip(floor(z L / theta + phi) / L, 0, 1) (Bu et al., ICLR 2022, Eq. 15), in float64."""
    return theta * min(max(math.floor(z * L / theta + phi) / L, 0.0), 1.0)


@pytest.mark.parametrize("L", [1, 4, 8])
def test_qcfs_forward_matches_the_paper_formula(L):
    theta = 1.7
    act = QCFS(L, theta)
    # negatives, values above theta, and points just either side of every level boundary (z L / theta + 1/2 = k)
    edges = [(k - 0.5) * theta / L + d for k in range(L + 2) for d in (-1e-3, 1e-3)]
    grid = torch.linspace(-2, 3, 401)
    grid = grid[(((grid * L / theta + 0.5) - torch.round(grid * L / theta + 0.5)).abs() > 1e-4)]  # no exact ties
    z = torch.cat([grid, torch.tensor(edges)])
    with torch.no_grad():
        out = act(z)
    want = torch.tensor([_formula(float(v), theta, L) for v in z])
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)
    assert set(torch.unique(torch.round(out / theta * L, decimals=4)).tolist()) <= set(float(k) for k in range(L + 1))


def test_qcfs_straight_through_gradients():
    act = QCFS(4, 2.0)
    z = torch.tensor([-1.0, 0.3, 1.1, 1.9, 2.5, 5.0], requires_grad=True)
    act(z).sum().backward()
    # dh/dz = 1 inside (0, theta), 0 outside
    assert z.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    # dh/dtheta = h/theta - z/theta inside, 1 above theta, 0 below 0
    with torch.no_grad():
        h = act(z)
    inside = (z > 0) & (z < 2.0)
    want = float(((h - z) / 2.0)[inside].sum()) + 2.0
    assert act.theta.grad.item() == pytest.approx(want, abs=1e-6)


def test_qcfs_network_trains_and_converts_with_theta_as_threshold():
    torch.manual_seed(0)
    relu = trained()
    x, y = synthetic(128, seed=5)
    th = relu_activation_percentiles(relu, x, 99.5)
    assert set(th) == {"relu1", "relu2", "relu3", "relu4"} and all(v > 0 for v in th.values())
    model = qcfs_from_relu(relu, 2, th)
    assert sum(isinstance(m, QCFS) for m in model.modules()) == 4
    assert not any(isinstance(m, QCFS) for m in relu.modules())  # the ReLU net is untouched
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    thetas0 = [float(m.theta) for m in model.modules() if isinstance(m, QCFS)]
    losses = []
    for _ in range(10):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    assert [float(m.theta) for m in model.modules() if isinstance(m, QCFS)] != thetas0  # theta is trained
    model.eval()
    snn = convert(model, x, ConvertConfig(percentile=50.0))  # the percentile must not matter for QCFS neurons
    qs = [m for m in model.modules() if isinstance(m, QCFS)]
    for q, nrn in zip(qs, snn.neurons.values()):
        assert int(nrn.levels) == 2
        torch.testing.assert_close(nrn.theta, q.theta.detach().expand(nrn.channels))
    with torch.no_grad():
        ref = model(x[:32])
    torch.testing.assert_close(snn.ann_forward(x[:32])[0], ref, atol=1e-4, rtol=1e-4)  # ANN mode = QCFS net
    # a few steps already track the QCFS network closely
    logits = snn.simulate(x[:64], 8).mean(0)
    with torch.no_grad():
        agree = (logits.argmax(1) == model(x[:64]).argmax(1)).float().mean()
    assert agree > 0.85
