"""SNN evaluation and FTBC calibration on torch.distributed: two gloo processes equal one process.

Each rank simulates a share of the images (correct counts and monitor counts summed) and holds a share of every FTBC
batch (per-step channel errors as float64 sums and counts summed), so biases and accuracies equal one process's.
"""


import torch

from dormant.snn.conversion import ConvertConfig, convert
from dormant.snn.ftbc import FTBCConfig, calibrate_ftbc
from dormant.snn.simulate import evaluate_snn
from tests.gloo import on_ranks

from .tiny import synthetic, trained


def _run() -> dict:
    torch.set_num_threads(1)
    xc, _ = synthetic(96, seed=3)
    xh, yh = synthetic(41, seed=4)  # 41: shares of 21 and 20
    snn = convert(trained("max"), xc, ConvertConfig(percentile=99.9))
    res = calibrate_ftbc(snn, xc[:70], 5, FTBCConfig(passes=2, batch_size=35), holdout=(xh, yh),
                         eval_batch_size=8)
    ev = evaluate_snn(snn, xh, yh, 5, batch_size=8)
    return {"snapshots": res.snapshots, "holdout": res.holdout_correct, "correct": ev.correct, "n": ev.n,
            "rates": ev.rates, "synaptic": ev.synaptic_rates, "config": res.config}


def test_two_gloo_ranks_calibrate_and_evaluate_like_one_process(tmp_path):
    two, one = on_ranks(_run, tmp_path), _run()
    for a, b in zip(one["snapshots"], two["snapshots"]):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # FTBC biases identical
    assert any(bool(v.any()) for v in one["snapshots"][-1].values())
    assert torch.equal(one["holdout"], two["holdout"]) and torch.equal(one["correct"], two["correct"])
    assert one["n"] == two["n"] == 41
    for key in ("rates", "synaptic"):
        assert one[key].keys() == two[key].keys() and all(torch.equal(one[key][k], two[key][k]) for k in one[key])
    assert "world_size" not in one["config"] and two["config"]["world_size"] == 2
