"""BC removes the mean output error per channel on its calibration batch; PC sets the initial potentials; RTS sets
the shift; every method installs its state on top of plain conversion; the registry names its options."""

import pytest
import torch

from dormant.snn.calibrate import CALIBRATIONS, NoCalibration, get_calibration
from dormant.snn.configs import CorrectionConfig
from dormant.snn.conversion import ConvertConfig, convert
from dormant.snn.corrections import CorrectionResult, ShiftResult, calibrate_correction, output_error

from .tiny import synthetic, trained

T = 4


def _setup():
    xc, _ = synthetic(128, seed=3)
    return convert(trained(), xc, ConvertConfig(percentile=99.99, granularity="layer")), xc


def _channel_errors(snn, x):
    """{neuron: [C]} mean over batch, space and steps of (SNN output - ANN activation), with the current state."""
    names = list(snn.neurons)
    _, targets = snn.ann_forward(x, record=names)
    outs = {}
    snn.simulate(x, T, observer=lambda name, o: outs.__setitem__(name, o))
    return {n: output_error(outs[n], targets[n]).mean(dim=[0] + list(range(2, targets[n].dim()))) for n in names}


def test_bias_correction_removes_the_mean_output_error_per_channel_on_its_calibration_batch():
    snn, xc = _setup()
    weights = {k: v.clone() for k, v in snn.net.state_dict().items() if "neurons" not in k}
    before = _channel_errors(snn, xc)
    res = calibrate_correction(snn, xc, T, "bias", CorrectionConfig(batches=1, batch_size=128, passes=6))
    after = _channel_errors(snn, xc)
    for name, e in before.items():
        assert after[name].abs().max() < 0.2 * e.abs().max(), name
    for name in ("relu1", "relu2", "relu3"):  # conv layers: many values per channel, the fixed point is reached
        assert after[name].abs().max() < 0.01, (name, after[name])
    # the state is a constant bias per channel; weights and thresholds are untouched; nothing else moved
    for name, nrn in snn.neurons.items():
        assert nrn.bias.shape == (nrn.channels,) and nrn.bias.abs().sum() > 0
        assert torch.equal(nrn.bias.cpu(), res.values[name])
        assert nrn.v_init.numel() == 0 and nrn.step_bias.shape[0] == 0
    assert all(torch.equal(v, snn.net.state_dict()[k]) for k, v in weights.items())
    assert res.errors["relu1"].shape == (6, 8)  # channel errors before each of the 6 updates
    torch.testing.assert_close(res.errors["relu1"][0], before["relu1"].cpu())


def test_potential_correction_sets_the_initial_membrane_per_element():
    snn, xc = _setup()
    # by hand, for the first layer (its input does not depend on any correction): v0 = theta/2 - T * mean_N(e)
    _, targets = snn.ann_forward(xc, record=["relu1"])
    outs = {}
    snn.simulate(xc, T, observer=lambda name, o: outs.__setitem__(name, o))
    nrn = snn.neurons["relu1"]
    want = 0.5 * nrn.theta.view(-1, 1, 1) - T * output_error(outs["relu1"], targets["relu1"]).mean(0)
    before = _channel_errors(snn, xc)
    res = calibrate_correction(snn, xc, T, "potential", CorrectionConfig(batches=1, batch_size=128))
    assert nrn.v_init.shape == (8, 8, 8)  # [C, H, W]: one initial potential per element
    torch.testing.assert_close(nrn.v_init, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(res.values["relu1"], want)
    # the simulation starts from it: one step without input gives v[1] = v[0] - theta * s[1]
    nrn.reset()
    out = nrn(torch.zeros(1, 2, 8, 8, 8))
    torch.testing.assert_close(nrn._v[1] + out[0, 1], want, atol=1e-5, rtol=0)
    assert all(n.v_init.dim() == 3 or n.v_init.shape == (n.channels,) for n in snn.neurons.values())
    after = _channel_errors(snn, xc)
    assert sum(float(e.abs().mean()) for e in after.values()) < 0.5 * sum(float(e.abs().mean()) for e in before.values())


def test_methods_install_on_top_of_plain_conversion_and_round_trip(tmp_path):
    snn, xc = _setup()
    pc = calibrate_correction(snn, xc, T, "potential", CorrectionConfig(batches=1, batch_size=64))
    again = CorrectionResult.load(pc.save(tmp_path / "pc.safetensors"))
    assert again.state == "potential" and again.T == T
    rts = ShiftResult.load(ShiftResult(T).save(tmp_path / "rts.safetensors"))
    rts.apply_(snn, T)
    for nrn in snn.neurons.values():
        assert nrn.shift == pytest.approx(1 / (2 * T)) and nrn.v0 == 0.0 and nrn.v_init.numel() == 0
    with pytest.raises(ValueError, match="not causal"):
        rts.apply_(snn, 2 * T)
    again.apply_(snn, T)
    for name, nrn in snn.neurons.items():
        assert nrn.shift == 0.0 and nrn.v0 == 0.5 and torch.equal(nrn.v_init, pc.values[name])
    NoCalibration().apply_(snn, T)
    assert all(n.v_init.numel() == 0 and not n.bias.any() and n.shift == 0.0 for n in snn.neurons.values())


def test_registry_lists_its_methods():
    assert list(CALIBRATIONS) == ["none", "bc", "pc", "rts", "ftbc"]
    assert [CALIBRATIONS[m].causal for m in CALIBRATIONS] == [True, False, False, False, True]
    with pytest.raises(KeyError, match="registered: none, bc, pc, rts, ftbc"):
        get_calibration("lp")
