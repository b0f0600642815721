"""Fault injection: every resumable run is SIGKILLed at several points and resumed, or has its last record torn;
the final records and report must equal those of an uninterrupted run, and no finished unit may be recomputed.

Each run type runs as the CLI in a subprocess (one thread, so floats are reproducible): once uninterrupted (the
reference, timed), then again in a fresh folder killed after delays spread over the reference's duration until a
run finishes by itself. Then the reference's folder gets its last record cut in half and is resumed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DORMANT_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
FRACTIONS = (0.45, 0.6, 0.75, 0.9)  # kill points, as fractions of the uninterrupted run's wall time
TIMING = ("seconds", "finished", "wall", "elapsed")


def _cli(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dormant", *args], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _run(args: list[str]) -> float:
    t0 = time.perf_counter()
    p = _cli(args)
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-2000:]
    return time.perf_counter() - t0


def _run_with_kills(args: list[str], reference_seconds: float) -> int:
    """Run ``args`` killing it after each delay; returns how many kills landed before the run finished."""
    kills = 0
    for frac in FRACTIONS:
        p = _cli(args)
        try:
            _, err = p.communicate(timeout=frac * reference_seconds)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
            p.communicate()
            kills += 1
            continue
        assert p.returncode == 0, err[-2000:]
        return kills
    _run(args)
    return kills


def _strip(x):
    if isinstance(x, dict):
        return {k: _strip(v) for k, v in x.items() if not any(t in k for t in TIMING)}
    if isinstance(x, list):
        return [_strip(v) for v in x]
    return x


def _records(path: Path) -> list[dict]:
    return [_strip(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def _same_records(a: Path, b: Path, unit) -> None:
    ra, rb = _records(a), _records(b)
    ids_b = [json.dumps(unit(r)) for r in rb]
    assert len(ids_b) == len(set(ids_b)), f"a finished unit was recomputed: {ids_b}"
    assert sorted(ra, key=lambda r: json.dumps(unit(r))) == sorted(rb, key=lambda r: json.dumps(unit(r)))


def _tear_last_record(path: Path) -> None:
    text = path.read_text()
    last = text.rstrip("\n").splitlines()[-1]
    path.write_text(text[: len(text.rstrip("\n")) - len(last)] + last[: len(last) // 2])


def _check(tmp_path: Path, make_args, results: str, unit, compare=None) -> None:
    ref, killed = tmp_path / "reference", tmp_path / "killed"
    seconds = _run(make_args(ref))
    kills = _run_with_kills(make_args(killed), seconds)
    assert kills >= 1, "no kill landed before the run finished"
    print(f"{make_args(ref)[:2]}: {kills} kills landed, reference {seconds:.1f} s")
    _same_records(ref / results, killed / results, unit)
    if compare:
        compare(ref, killed)
    # the torn-write variant: the last record cut in half, as by a kill inside the append
    _tear_last_record(ref / results)
    _run(make_args(ref))
    _same_records(killed / results, ref / results, unit)
    assert (ref / (results + ".torn")).is_file()
    if compare:
        compare(killed, ref)


def _same_text(name):
    def compare(a: Path, b: Path) -> None:
        assert (a / name).read_text() == (b / name).read_text(), name

    return compare


def test_llm_sweep(tmp_path):
    def args(out):
        return ["sweep", "--model", "stories260k", "--seqlen", "64", "--max-windows", "2", "--calib-windows", "2",
                "--calib-seqlen", "64", "--sites", "paper,intermediate,gate_act", "--sparsity", "0,0.3,0.5",
                "--no-progress", "--out", str(out)]

    _check(tmp_path, args, "results.jsonl", lambda r: [r["site"], r["allocation"], r["target"]],
           _same_text("report.md"))


@pytest.fixture(scope="module")
def thresholds(tmp_path_factory):
    from dormant.cli import main

    path = tmp_path_factory.mktemp("thr") / "thr.safetensors"
    assert main(["calibrate", "--model", "stories260k", "--calib-windows", "2", "--calib-seqlen", "64",
                 "--seqlen", "64", "--sparsity", "0.5", "--no-progress", "--out", str(path)]) == 0
    return path


def test_predictor_fit(tmp_path, thresholds):
    from dormant.llm.predictors import load_predictor

    def args(out):
        return ["predictor", "fit", "--model", "stories260k", "--kind", "lowrank", "--lowrank-rank", "4",
                "--lowrank-epochs", "2", "--thresholds", str(thresholds), "--pairs", str(out / "pairs"),
                "--train-windows", "6", "--train-seqlen", "64", "--select-windows", "1", "--heldout-windows", "1",
                "--no-progress", "--out", str(out / "lowrank.safetensors")]

    ref, killed = tmp_path / "reference", tmp_path / "killed"
    seconds = _run(args(ref))
    assert _run_with_kills(args(killed), seconds) >= 1
    a, b = load_predictor(ref / "lowrank.safetensors"), load_predictor(killed / "lowrank.safetensors")
    for name, t in a.state_tensors().items():
        torch.testing.assert_close(b.state_tensors()[name], t, rtol=0, atol=0)
    torch.testing.assert_close(b.tau, a.tau, rtol=0, atol=0)
    assert json.loads((ref / "pairs" / "pairs.json").read_text())["key"] == \
        json.loads((killed / "pairs" / "pairs.json").read_text())["key"]
    assert not list(killed.glob("*.partial")) and not list(killed.glob("*.fit.jsonl"))  # resume state removed


def test_predictor_eval(tmp_path, thresholds):
    from dormant.cli import main

    pred = tmp_path / "cluster.safetensors"
    assert main(["predictor", "fit", "--model", "stories260k", "--kind", "cluster", "--cluster-k", "2",
                 "--cluster-epochs", "1", "--thresholds", str(thresholds), "--pairs", str(tmp_path / "pairs"),
                 "--train-windows", "4", "--train-seqlen", "64", "--select-windows", "1", "--heldout-windows", "1",
                 "--no-progress", "--out", str(pred)]) == 0

    def args(out):
        return ["predictor", "eval", "--model", "stories260k", "--predictors", str(pred), "--thresholds",
                str(thresholds), "--seqlen", "64", "--max-windows", "3", "--no-progress", "--out", str(out)]

    _check(tmp_path, args, "results.jsonl", lambda r: [r["unit"], r["name"]], _same_text("results.csv"))


SNN = ["--holdout", "20", "--calib-images", "20", "--test-images", "40", "--batch-size", "20", "--threads", "1",
       "--no-progress"]


def test_snn_sweep(tmp_path):
    def args(out):
        return ["snn", "sweep", "--model", "lenet", "--T", "1,2,4", "--methods", "none,bc,ftbc", "--ftbc-passes", "2",
                "--ftbc-batch-size", "20", "--corr-batch-size", "20", *SNN, "--out", str(out)]

    def compare(a, b):
        for name in ("accuracy_by_T.csv", "accuracy_per_step.csv", "firing_rates.csv"):
            assert (a / name).read_text() == (b / name).read_text(), name

    _check(tmp_path, args, "results.jsonl",
           lambda r: [r["kind"], r.get("method"), r.get("T"), r.get("calib_T"), r.get("snapshot")], compare)


def test_qcfs_training(tmp_path):
    from dormant.snn.qcfs import load_qcfs_model

    def args(out):
        return ["snn", "train-qcfs", "--model", "lenet", "--data", "mnist", "--train-images", "200", "--val-images",
                "20", "--batch-size", "50", "--no-augment", "--init-images", "20", "--threads", "1", "--no-progress",
                "--epochs", "4", "--lr", "0.01", "--out", str(out)]

    def compare(a, b):
        ma, _ = load_qcfs_model(a / "qcfs.safetensors")
        mb, _ = load_qcfs_model(b / "qcfs.safetensors")
        for (name, p), q in zip(ma.state_dict().items(), mb.state_dict().values()):
            torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)

    _check(tmp_path, args, "epochs.jsonl", lambda r: [r["epoch"]], compare)


def test_demo(tmp_path):
    def args(out):
        return ["demo", "--model", "stories260k", "--windows", "2", "--seqlen", "64", "--snn-images", "10",
                "--snn-T", "1,2", "--compare-images", "20", "--compare-T", "1,2", "--qcfs-images", "100",
                "--steps", "sparsity,offload,snn", "--out", str(out)]

    def compare(a, b):
        for name in ("sparsity/report.md", "snn/accuracy_by_T.csv"):
            assert (a / name).read_text() == (b / name).read_text(), name

    _check(tmp_path, args, "steps.jsonl", lambda r: [r["step"]], compare)
