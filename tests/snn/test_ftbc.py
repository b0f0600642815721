"""FTBC: weights untouched, low-T accuracy improves, cached == straightforward, causality, artifacts."""

import torch

from dormant.snn.conversion import ConvertConfig, convert
from dormant.snn.ftbc import FTBCConfig, FTBCResult, calibrate_ftbc
from dormant.snn.simulate import evaluate_snn

from .tiny import synthetic, trained


def _snn(pool="avg"):
    xc, _ = synthetic(256, seed=3)
    return convert(trained(pool), xc, ConvertConfig(percentile=99.99, granularity="layer")), xc


def _weights(snn):
    return {k: v.clone() for k, v in snn.net.state_dict().items() if "step_bias" not in k}


def test_ftbc_leaves_weights_and_thresholds_untouched_and_improves_low_T():
    snn, xc = _snn()
    xt, yt = synthetic(400, seed=2)
    xh, yh = synthetic(200, seed=4)
    plain = evaluate_snn(snn, xt, yt, 4, batch_size=400)
    before = _weights(snn)
    res = calibrate_ftbc(snn, xc, 4, FTBCConfig(passes=3, batch_size=64), holdout=(xh, yh))
    after = _weights(snn)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    cal = evaluate_snn(snn, xt, yt, 4, batch_size=400)
    assert cal.at(1) > plain.at(1) + 0.1
    assert cal.accuracy.mean() > plain.accuracy.mean()
    assert res.holdout_correct.shape == (4, 4)
    # the selected snapshot per T is the best on held-out data
    for t in range(1, 5):
        assert res.holdout_correct[res.select(t), t - 1] == res.holdout_correct[:, t - 1].max()


def test_cached_and_straightforward_implementations_agree_exactly():
    snn, xc = _snn("max")
    cfg = FTBCConfig(passes=2, batch_size=64, batches=2, select="last")
    fast = calibrate_ftbc(snn, xc, 6, cfg, chunk=4)
    slow = calibrate_ftbc(snn, xc, 6, FTBCConfig(**{**cfg.__dict__, "implementation": "reforward"}))
    for k in range(3):
        for name, b in fast.snapshots[k].items():
            assert torch.equal(b, slow.snapshots[k][name]), (k, name)
    assert any(b.abs().sum() > 0 for b in fast.snapshots[-1].values())


def test_calibrating_once_at_the_largest_T_serves_every_smaller_T():
    snn, xc = _snn()
    cfg = FTBCConfig(passes=2, batch_size=64, batches=2, select="last")
    long = calibrate_ftbc(snn, xc, 8, cfg)
    short = calibrate_ftbc(snn, xc, 3, cfg)
    for k in range(3):
        for name, b in short.snapshots[k].items():
            torch.testing.assert_close(b, long.snapshots[k][name][:3], atol=1e-6, rtol=0)
    # and the simulation of the first 3 steps does not depend on steps after them
    long.apply_(snn, 8)
    a = snn.simulate(xc[:32], 8)[:3]
    long.apply_(snn, 3)
    assert torch.equal(a, snn.simulate(xc[:32], 3))


def test_ftbc_result_round_trip(tmp_path):
    snn, xc = _snn()
    xh, yh = synthetic(64, seed=4)
    res = calibrate_ftbc(snn, xc, 3, FTBCConfig(passes=1, batch_size=128), holdout=(xh, yh))
    again = FTBCResult.load(res.save(tmp_path / "ftbc.safetensors"))
    assert again.T == 3 and again.holdout_n == 64 and again.config == res.config
    assert torch.equal(again.holdout_correct, res.holdout_correct)
    for name, b in res.biases(3).items():
        assert torch.equal(again.biases(3)[name], b)
