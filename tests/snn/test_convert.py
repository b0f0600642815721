"""Conversion: what it accepts and rejects, BN folding, thresholds, convergence to the ANN, artifacts."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dormant.artifacts import ArtifactError
from dormant.snn.conversion import ConversionError, ConvertConfig, build_spiking_network, convert
from dormant.snn.network import SpikingNetwork
from dormant.snn.neurons import IFNeuron
from dormant.snn.simulate import evaluate_ann, evaluate_snn

from .tiny import TinyResNet, synthetic, trained


class FunctionalRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return F.relu(self.fc(x))


class WithGelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.act = nn.GELU()

    def forward(self, x):
        return self.act(self.fc(x))


class BatchFlatten(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.relu = nn.ReLU()

    def forward(self, x):
        return torch.flatten(self.relu(self.fc(x)))


@pytest.mark.parametrize("model, match", [
    (FunctionalRelu(), "functional activation relu"),
    (WithGelu(), "module type GELU cannot be converted"),
    (BatchFlatten(), "would mix the batch"),
    (nn.Sequential(nn.Linear(4, 4)), "no nn.ReLU"),
])
def test_unsupported_pieces_raise_clear_errors(model, match):
    with pytest.raises(ConversionError, match=match):
        build_spiking_network(model, torch.zeros(1, 4))


def test_bn_folding_keeps_the_ann_function_and_leaves_the_ann_untouched():
    model = TinyResNet()
    for m in model.modules():  # non-trivial BN statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, _ = synthetic(16, seed=5)
    snn = build_spiking_network(model, x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in snn.modules())
    out, _ = snn.ann_forward(x)
    torch.testing.assert_close(out, model(x), atol=1e-5, rtol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_thresholds_max_and_channelwise():
    x, _ = synthetic(64, seed=3)
    model = trained()
    snn = convert(model, x, ConvertConfig(threshold="max", granularity="layer"))
    _, rec = snn.ann_forward(x, record=list(snn.neurons))
    for name, nrn in snn.neurons.items():
        torch.testing.assert_close(nrn.theta, rec[name].max().expand(nrn.channels))
    snn_c = convert(model, x, ConvertConfig(threshold="max", granularity="channel"))
    name = "relu1"
    per_channel = rec[name].transpose(0, 1).reshape(8, -1).max(1).values
    torch.testing.assert_close(snn_c.neurons[name].theta, per_channel)
    snn_p = convert(model, x, ConvertConfig(percentile=90.0))
    assert all((snn_p.neurons[n].theta <= snn_c.neurons[n].theta).all() for n in snn.neurons)  # per channel, both


def test_local_threshold_balancing_steps_against_the_clipping_error():
    x, _ = synthetic(96, seed=3)
    model = trained()
    one = convert(model, x, ConvertConfig(threshold="ltb", ltb_batches=1, ltb_batch_size=32, ltb_step=0.5))
    # from theta = 0 one update is c * 2 * mean(relu(z)) per channel; the first layer's currents do not depend
    # on thresholds
    _, rec = one.ann_forward(x[:32], record=["relu1"])
    mean_relu = rec["relu1"].transpose(0, 1).reshape(8, -1).mean(1)
    torch.testing.assert_close(one.neurons["relu1"].theta, 0.5 * 2 * mean_relu)
    more = convert(model, x, ConvertConfig(threshold="ltb", ltb_batches=3, ltb_batch_size=32, ltb_step=0.5))
    for name, nrn in more.neurons.items():
        assert (nrn.theta > 0).all() and nrn.theta.shape == (nrn.channels,)
        assert (nrn.theta >= one.neurons[name].theta - 1e-6).all()  # each step raises theta towards the max
    layer = convert(model, x, ConvertConfig(threshold="ltb", granularity="layer", ltb_batches=2, ltb_batch_size=32))
    assert all(bool((n.theta == n.theta[0]).all()) for n in layer.neurons.values())


@pytest.mark.parametrize("pool", ["avg", "max"])
def test_snn_approaches_ann_as_T_grows(pool):
    model = trained(pool)
    xc, _ = synthetic(256, seed=3)
    xt, yt = synthetic(300, seed=2)
    ann = evaluate_ann(model, xt, yt)
    snn = convert(model, xc, ConvertConfig(threshold="max"))
    ev = evaluate_snn(snn, xt, yt, 64, batch_size=300)
    assert ev.at(64) >= ann - 0.02
    assert ev.at(64) > ev.at(1)
    # logits: the running mean approaches the (clipped) ANN output
    logits = snn.simulate(xt, 64).cumsum(0) / torch.arange(1, 65).view(-1, 1, 1)
    ann_out, _ = snn.ann_forward(xt, clip=True)
    err = (logits - ann_out).abs().mean((1, 2))
    assert err[63] < 0.5 * err[3]


def test_pre_neuron_maxpool_matches_ann():
    model = trained("max")
    xc, _ = synthetic(128, seed=3)
    snn = convert(model, xc, ConvertConfig(threshold="max", maxpool="pre_neuron"))
    out, _ = snn.ann_forward(xc)
    torch.testing.assert_close(out, model(xc), atol=1e-4, rtol=1e-4)
    assert snn.simulate(xc[:8], 4).shape == (4, 8, 4)


def test_network_artifact_round_trip(tmp_path):
    model = trained()
    xc, _ = synthetic(64, seed=3)
    snn = convert(model, xc, ConvertConfig(granularity="channel", v0=0.25), meta={"model": "tiny"})
    for nrn in snn.neurons.values():
        nrn.step_bias = torch.randn(5, nrn.channels)
    path = snn.save(tmp_path / "snn.safetensors")
    with pytest.raises(ArtifactError, match="not in the zoo"):
        SpikingNetwork.load(path)
    again = SpikingNetwork.load(path, TinyResNet())
    for name, nrn in again.neurons.items():
        assert torch.equal(nrn.step_bias, snn.neurons[name].step_bias)
        assert torch.equal(nrn.theta, snn.neurons[name].theta)
        assert nrn.v0 == 0.25
    assert torch.equal(again.simulate(xc[:16], 6), snn.simulate(xc[:16], 6))
    with pytest.raises(ArtifactError, match="does not fit"):
        SpikingNetwork.load(path, nn.Sequential(nn.Flatten(), nn.Linear(64, 4), nn.ReLU(), nn.Linear(4, 4)))


def test_neurons_are_per_call_site():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.relu = nn.Linear(4, 4), nn.Linear(4, 3), nn.ReLU()

        def forward(self, x):
            return self.b(self.relu(self.a(self.relu(x))))

    snn = build_spiking_network(Shared(), torch.zeros(2, 4))
    assert len(snn.neurons) == 2 and all(isinstance(n, IFNeuron) for n in snn.neurons.values())
