"""MACs, SOPs and energy on hand-made layers and spike tensors; the monitor measures what the neurons emit."""

import pytest
import torch
from torch import nn

from dormant.snn.configs import EnergyConfig
from dormant.snn.conversion import ConvertConfig, convert
from dormant.snn.energy import (
    E_AC_PJ,
    E_MAC_PJ,
    SynapticLayer,
    energy_estimate,
    layer_macs,
    synaptic_layers,
    synaptic_ops,
)
from dormant.snn.monitors import SynapticMonitor
from dormant.snn.simulate import evaluate_snn

from .tiny import synthetic, trained


def test_layer_macs_by_hand():
    assert layer_macs(nn.Conv2d(3, 16, 3, padding=1), (3, 32, 32), (16, 32, 32)) == 16 * 32 * 32 * 3 * 9
    assert layer_macs(nn.Conv2d(8, 8, 3, groups=4), (8, 10, 10), (8, 8, 8)) == 8 * 8 * 8 * 2 * 9
    assert layer_macs(nn.Linear(800, 500), (800,), (500,)) == 400_000
    with pytest.raises(TypeError, match="no MAC count"):
        layer_macs(nn.ReLU(), (1,), (1,))


def test_sop_and_energy_formulas_on_hand_made_rates():
    assert E_AC_PJ == 0.9 and E_MAC_PJ == 4.6
    layers = {"first": SynapticLayer(macs=100, analog=True, in_elements=10),
              "hidden": SynapticLayer(macs=1000, analog=False, in_elements=4)}
    rates = {"hidden": [0.5, 0.25, 0.0, 1.0]}
    assert synaptic_ops(torch.tensor(rates["hidden"]), 1000).tolist() == [500.0, 750.0, 750.0, 1750.0]
    est = energy_estimate(layers, rates, 4)
    # SOP = T * mean rate * MACs = 4 * 0.4375 * 1000; the analog layer multiplies once
    assert est.sops == 1750.0 and est.macs == 100.0
    assert est.energy_pj == pytest.approx(4.6 * 100 + 0.9 * 1750)
    assert est.ann_macs == 1100.0 and est.ann_energy_pj == pytest.approx(4.6 * 1100)
    assert est.ratio == pytest.approx((460 + 1575) / 5060)
    assert est.per_layer_sops == {"first": 100.0, "hidden": 1750.0}
    every = energy_estimate(layers, rates, 2, EnergyConfig(analog_input="every_step"))
    assert every.sops == 750.0 and every.macs == 200.0
    assert every.energy_pj == pytest.approx(4.6 * 200 + 0.9 * 750)
    with pytest.raises(ValueError, match="rates for 4 steps"):
        energy_estimate(layers, rates, 5)


def test_monitor_counts_hand_made_spike_tensors():
    layer = SynapticLayer(macs=3 * 4 * 4 * 2 * 9, analog=False, in_elements=2 * 4 * 4)  # conv 2->3, 3x3, same size
    mon = SynapticMonitor({"conv": layer})
    spikes = torch.zeros(3, 2, 2, 4, 4)  # [T, n, C, H, W]
    spikes[0, 0, 0, 1, 1] = 1.5  # step 1: one spike (amplitude theta = 1.5)
    spikes[1, :, 1] = 1.5  # step 2: every position of channel 1 in both samples (2 * 16 spikes)
    mon.start_batch(2)
    mon.observe("conv", spikes[:2].reshape(4, 2, 4, 4))  # a chunk of 2 steps, merged [T_c * n, ...]
    mon.observe("conv", spikes[2:].reshape(2, 2, 4, 4))  # then the last step
    rates = mon.rates()["conv"]
    torch.testing.assert_close(rates, torch.tensor([1 / 64, 32 / 64, 0.0], dtype=torch.float64))
    # SOP per sample = spikes per sample x fan-out (C_out * k * k = 27 for a same-size conv)
    est = energy_estimate({"conv": layer}, {"conv": rates}, 3)
    assert est.sops == pytest.approx((1 + 32) / 2 * 27)
    mon.observe("conv", torch.zeros(3, 2, 4, 4))  # a batch size that does not fit n (an ANN call): ignored
    assert torch.equal(mon.rates()["conv"], rates)


def test_synaptic_rates_in_a_simulation_are_the_firing_rates_of_the_neurons_before():
    x, y = synthetic(32, seed=7)
    snn = convert(trained("max"), x, ConvertConfig())
    layers = synaptic_layers(snn)
    assert list(layers) == ["conv1", "conv2", "conv3", "fc1", "fc2"]
    assert [lay.analog for lay in layers.values()] == [True, False, False, False, False]
    assert layers["conv1"].macs == 8 * 8 * 8 * 1 * 9 and layers["fc1"].macs == 128 * 32
    ev = evaluate_snn(snn, x, y, 5, batch_size=16)
    torch.testing.assert_close(ev.synaptic_rates["conv2"], ev.rates["relu1"])  # conv2 reads relu1's spikes
    torch.testing.assert_close(ev.synaptic_rates["fc2"], ev.rates["relu4"])
    assert ev.synaptic_rates["conv1"].eq(1.0).all()  # the analog input is dense (x has no zeros)
    est = energy_estimate(layers, ev.synaptic_rates, 5)
    want = sum(5 * float(ev.synaptic_rates[k][:5].mean()) * layers[k].macs for k in layers if k != "conv1")
    assert est.sops == pytest.approx(want) and est.macs == layers["conv1"].macs
