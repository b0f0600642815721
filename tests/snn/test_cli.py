"""End-to-end smoke of ``dormant snn convert`` and ``dormant snn sweep`` on the MNIST LeNet (small slices)."""

import json

import pytest

from dormant.cli import main
from dormant.snn.network import SpikingNetwork

from .test_models_data import _have

pytestmark = pytest.mark.skipif(not (_have("lenet-mnist") and _have("mnist-train-images")),
                                reason="needs ../shared/data/mnist")

SMALL = ["--model", "lenet", "--holdout", "40", "--calib-images", "40", "--test-images", "40", "--batch-size", "40",
         "--no-progress", "--ftbc-passes", "1", "--ftbc-batch-size", "40"]


def test_convert_and_sweep_cli(tmp_path, capsys):
    out = tmp_path / "convert"
    assert main(["snn", "convert", "--T", "3", "--calibrate", "ftbc", "--out", str(out)] + SMALL) == 0
    report = (out / "report.md").read_text()
    assert "Test accuracy" in report and "Firing rate per layer" in report and "Calibration time" in report
    assert (out / "accuracy.png").stat().st_size > 0 and (out / "accuracy_per_step.csv").exists()
    snn = SpikingNetwork.load(out / "snn_ftbc_T3.safetensors")
    assert all(n.step_bias.shape[0] == 3 for n in snn.neurons.values())
    # rerun: everything is read back, nothing recomputed
    n_records = len((out / "results.jsonl").read_text().splitlines())
    assert main(["snn", "convert", "--T", "3", "--calibrate", "ftbc", "--out", str(out)] + SMALL) == 0
    assert len((out / "results.jsonl").read_text().splitlines()) == n_records

    out2 = tmp_path / "sweep"
    assert main(["snn", "sweep", "--T", "1,2,4", "--methods", "none,ftbc", "--maxpool", "pre_neuron",
                 "--out", str(out2)] + SMALL) == 0
    rows = (out2 / "accuracy_by_T.csv").read_text().splitlines()
    assert rows[0] == "T,none,ftbc,ANN" and len(rows) == 4
    recs = [json.loads(line) for line in (out2 / "results.jsonl").read_text().splitlines()]
    assert [r["T"] for r in recs if r["kind"] == "calibration"] == [4, 4]  # one calibration at the largest T
    assert main(["snn", "sweep", "--T", "1,2,4", "--out", str(out2)] + SMALL) == 2


def test_sweep_with_the_reference_engine_writes_the_same_results(tmp_path):
    runs = {}
    for engine in ("fast", "reference"):
        out = tmp_path / engine
        assert main(["snn", "sweep", "--T", "1,3", "--methods", "none,ftbc", "--engine", engine,
                     "--out", str(out)] + SMALL) == 0
        recs = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
        runs[engine] = [(r["method"], r["T"], r["accuracy"], r["firing_rate_per_step"])
                        for r in recs if r["kind"] == "eval"]
    assert runs["fast"] == runs["reference"] and runs["fast"]


def test_torchrun_sweep_writes_what_one_process_writes(tmp_path):
    import os
    import subprocess
    import sys

    flags = ["snn", "sweep", "--T", "1,3", "--methods", "none,ftbc,rts"] + SMALL
    assert main(flags + ["--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "dormant", *flags, "--out", str(tmp_path / "two")], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("report:") == 1  # rank 1 prints nothing

    def evals(folder):
        recs = [json.loads(line) for line in (tmp_path / folder / "results.jsonl").read_text().splitlines()]
        return [(r["method"], r["T"], r["accuracy"], r["firing_rate_per_step"]) for r in recs if r["kind"] == "eval"]

    assert evals("one") == evals("two") and evals("one")
    assert (tmp_path / "one" / "report.md").read_text().count("|") == (tmp_path / "two" / "report.md").read_text().count("|")
    bad = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "dormant", "snn", "sweep", "--methods", "bc"] + SMALL + ["--out", str(tmp_path / "bc")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "bias/potential correction runs in one process" in bad.stderr
