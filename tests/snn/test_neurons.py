"""IF neuron and spike-count max pooling on hand-computed spike trains."""

import pytest
import torch
from torch import nn

from dormant.snn.neurons import IFNeuron, SpikeMaxPool2d


def _run(neuron, currents):
    """currents: list over t of per-channel values for one sample -> output [T, C]."""
    x = torch.tensor(currents, dtype=torch.float32).view(len(currents), 1, -1)
    neuron.reset()
    return neuron(x)[:, 0]


def test_if_neuron_hand_computed_spike_train():
    # theta = 1, v0 = 1/2, constant input 0.3: m = 0.8, 1.1 (spike, v=0.1), 0.4, 0.7, 1.0 (spike, v=0), 0.3
    n = IFNeuron(torch.tensor([1.0]))
    out = _run(n, [[0.3]] * 6)
    assert out[:, 0].tolist() == [0.0, 1.0, 0.0, 0.0, 1.0, 0.0]


def test_if_neuron_amplitude_threshold_bias_and_v0():
    # two channels: theta 2 and 0.5; v0 = 0; channel 1 gets a constant bias +0.25 per step
    n = IFNeuron(torch.tensor([2.0, 0.5]), v0=0.0)
    n.bias = torch.tensor([0.0, 0.25])
    out = _run(n, [[1.0, 0.0], [1.0, 0.0], [1.5, 0.0], [0.0, 0.0]])
    # ch0: m = 1, 2 (spike 2, v=0), 1.5, 1.5 -> spikes at t=2 only, amplitude theta=2
    # ch1: m = .25, .5 (spike .5, v=0), .25, .5 (spike) -> amplitude 0.5
    assert out[:, 0].tolist() == [0.0, 2.0, 0.0, 0.0]
    assert out[:, 1].tolist() == [0.0, 0.5, 0.0, 0.5]


def test_if_neuron_step_bias_applies_per_step_and_shift():
    n = IFNeuron(torch.tensor([1.0]), v0=0.0, shift=0.25)
    n.step_bias = torch.tensor([[0.5], [-0.25]])  # steps 1 and 2; later steps: 0
    # drive = x + step_bias + 0.25 = [0.75+0.0, 0.0, 0.25, 0.25] with x = 0 -> m = .75, .75, 1.0 (spike), .25
    out = _run(n, [[0.0]] * 4)
    assert out[:, 0].tolist() == [0.0, 0.0, 1.0, 0.0]


def test_if_rate_approaches_clipped_input():
    theta = torch.tensor([1.0])
    n = IFNeuron(theta)
    a = torch.linspace(-0.5, 1.5, 41)
    x = a.view(1, -1, 1).expand(400, -1, -1).contiguous()
    rate = n(x).mean(0)[:, 0]
    torch.testing.assert_close(rate, a.clamp(0, 1), atol=1 / 400 + 1e-6, rtol=0)


def test_chunked_equals_single_run():
    n = IFNeuron(torch.rand(3) + 0.5)
    n.step_bias = torch.randn(7, 3) * 0.1
    x = torch.randn(10, 4, 3, 5, 5)
    full = n(x)
    n.reset()
    parts = torch.cat([n(x[:3]), n(x[3:4]), n(x[4:])])
    assert torch.equal(full, parts)


def test_ftbc_calibration_trajectory_equals_forward_with_new_biases():
    n = IFNeuron(torch.rand(3) + 0.5)
    x = torch.randn(6, 8, 3, 4, 4)
    target = torch.rand(8, 3, 4, 4)
    out_cal = n.calibrate_ftbc_(x, target, alpha=0.5)
    assert n.step_bias.shape == (6, 3) and n.step_bias.abs().sum() > 0
    n.reset()
    assert torch.equal(n(x), out_cal)


def test_ftbc_fixed_point_on_constant_input():
    # one layer, constant input a*theta per element; repeated updates drive the per-step mean output to the target
    n = IFNeuron(torch.ones(1), v0=0.0)  # v0 = 0: no spike at all at t = 1 without a bias
    a = torch.rand(256, 1) * 0.8
    x = a.unsqueeze(0).expand(4, -1, -1).contiguous()
    before = (n(x).mean(1) - a.mean()).abs().max().item()
    for _ in range(30):
        n.reset()
        n.calibrate_ftbc_(x, a, alpha=0.5)
    n.reset()
    after = (n(x).mean(1) - a.mean()).abs().max().item()
    assert after < 0.05 and before > 0.3


def test_spike_count_maxpool_outputs_running_max_count():
    torch.manual_seed(0)
    pool = SpikeMaxPool2d(nn.MaxPool2d(2))
    p = torch.tensor([0.1, 0.5, 0.3, 0.8]).view(1, 1, 1, 2, 2)
    s = (torch.rand(50, 3, 1, 2, 2) < p).float() * 2.0  # amplitude theta = 2
    out = torch.cat([pool(s[:20]), pool(s[20:])])  # two chunks share the counters
    counts_in = (s > 0).float().cumsum(0).flatten(2).max(-1).values  # [T, N, 1]
    counts_out = (out > 0).float().cumsum(0).flatten(2)[..., 0]
    assert torch.equal(counts_out, counts_in)
    assert set(out.unique().tolist()) <= {0.0, 2.0}


def test_neuron_rejects_bad_thresholds():
    n = IFNeuron(torch.ones(2))
    with pytest.raises(ValueError, match="positive"):
        n.set_theta_(torch.tensor([1.0, 0.0]))
