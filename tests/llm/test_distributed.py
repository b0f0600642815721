"""Data-parallel calibration and perplexity on torch.distributed: two gloo processes equal one process.

Each rank streams its share of the windows; histograms, NaN/Inf counts, window losses and the extra probes of the
greedy, loss and sensitivity allocations are summed across ranks (:mod:`dormant.distributed`), so thresholds are
identical and perplexity equal to one process over the same windows.
"""

import json
import os
import subprocess
import sys

import torch

from dormant.llm.calibration import CalibrationConfig, calibrate
from dormant.llm.evaluate import perplexity
from dormant.llm.sparsify import measure_sparsity, sparsified
from tests.gloo import on_ranks
from tests.llm.tiny import VOCAB, tiny_model

# (site, score, allocation, refine): the one streaming pass, its refinement, and every allocation with probes.
CASES = [("intermediate", "magnitude", "uniform", 1), ("chess", "chess", "uniform", 0),
         ("linear", "magnitude", "greedy", 0), ("linear_head", "wina", "loss", 0), ("paper", "magnitude",
                                                                                     "sensitivity", 0)]


def _windows() -> torch.Tensor:
    return torch.randint(0, VOCAB, (5, 24), generator=torch.Generator().manual_seed(1))  # 5: shares of 3 and 2


def _run() -> dict:
    """Everything compared: per case the thresholds, their calibration record, perplexity and measured sparsity."""
    model, win = tiny_model("llama"), _windows()
    out = {}
    for site, score, allocation, refine in CASES:
        cfg = CalibrationConfig(site, [0.4], score=score, allocation=allocation, refine=refine, greedy_tokens=48,
                                probe_tokens=48, progress=False)
        thr = calibrate(model, win, cfg, sensitivity_windows=win[:3])
        with sparsified(model, thr), measure_sparsity(model, thr.taps) as meter:
            r = perplexity(model, win, progress=False)
        out[allocation if site != "chess" else "chess"] = {
            "values": thr.values, "calibration": thr.calibration, "ppl": r.ppl, "window_nll": r.window_nll,
            "tokens": r.tokens, "sparsity": meter.summary()["per_tap"]}
    return out


def test_two_gloo_ranks_equal_one_process(tmp_path):
    two = on_ranks(_run, tmp_path)
    one = _run()
    for name, a in one.items():
        b = two[name]
        assert torch.equal(a["values"], b["values"]), name  # thresholds identical, every allocation
        torch.testing.assert_close(b["ppl"], a["ppl"], rtol=1e-9, atol=0)
        assert b["window_nll"] == a["window_nll"] and b["tokens"] == a["tokens"]
        assert b["sparsity"] == a["sparsity"]
        assert "world_size" not in a["calibration"]  # one process: the record is as before
        assert b["calibration"]["world_size"] == 2 and b["calibration"]["rank_windows"] == [[0, 3], [3, 5]]


def _torchrun(args: list[str], cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "dormant", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


SMALL = ["--model", "stories260k", "--seqlen", "128", "--max-windows", "5", "--calib-windows", "5",
         "--calib-seqlen", "128"]


def test_torchrun_calibrate_and_eval_equal_one_process(tmp_path, capsys):
    from dormant.cli import main
    from dormant.llm.thresholds import Thresholds

    one, two = tmp_path / "one.safetensors", tmp_path / "two" / "thr.safetensors"
    flags = ["--site", "intermediate", "--sparsity", "0.5", "--refine", "1", "--no-progress"]
    assert main(["calibrate", *SMALL, *flags, "--out", str(one)]) == 0
    assert main(["eval", *SMALL[:6], "--thresholds", str(one), "--json-out", str(tmp_path / "one.json")]) == 0
    capsys.readouterr()
    r = _torchrun(["calibrate", *SMALL, *flags, "--out", str(two)], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["thresholds"] == str(two)  # one JSON: the other rank prints nothing
    a, b = Thresholds.load(one), Thresholds.load(two)
    assert torch.equal(a.values, b.values)
    assert b.calibration["world_size"] == 2 and b.calibration["rank_windows"] == [[0, 3], [3, 5]]
    assert sorted(p.name for p in two.parent.iterdir()) == ["thr.safetensors"]  # rank 0 alone wrote

    r = _torchrun(["eval", *SMALL[:6], "--thresholds", str(one), "--json-out", str(tmp_path / "two.json")], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    e1, e2 = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    torch.testing.assert_close(e2["ppl"], e1["ppl"], rtol=1e-9, atol=0)
    assert e2["windows"] == e1["windows"] == 5 and e2["tokens"] == e1["tokens"]
    assert e2["sparsity"] == e1["sparsity"] and e2["neuron_sparsity"] == e1["neuron_sparsity"]
