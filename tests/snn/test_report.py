"""``dormant snn train-qcfs`` (checkpoint per epoch, resume) and ``dormant snn report`` on the MNIST LeNet
(tiny slices)."""

import json

import pytest

from dormant.cli import main

from .test_models_data import _have

pytestmark = pytest.mark.skipif(not (_have("lenet-mnist") and _have("mnist-train-images")),
                                reason="needs ../shared/data/mnist")


def test_train_qcfs_and_report_cli(tmp_path, capsys):
    from dormant.snn.qcfs import QCFS, load_qcfs_model

    qdir = tmp_path / "qcfs"
    train = ["snn", "train-qcfs", "--model", "lenet", "--data", "mnist", "--train-images", "100", "--val-images",
             "50", "--batch-size", "50", "--no-augment", "--init-images", "50", "--threads", "1", "--no-progress",
             "--lr", "0.01", "--out", str(qdir)]
    assert main(train + ["--epochs", "1"]) == 0
    assert (qdir / "epoch_001.safetensors").exists() and (qdir / "history.json").exists()
    first = (qdir / "epoch_001.safetensors").read_bytes()
    assert main(train + ["--epochs", "2"]) == 0  # resumes after epoch 1: epoch 1 is not redone
    assert (qdir / "epoch_001.safetensors").read_bytes() == first
    model, meta = load_qcfs_model(qdir / "qcfs.safetensors")
    assert meta["epoch"] == 2 and meta["levels"] == 4 and meta["data"]["train"]["n"] == 100
    assert [h["epoch"] for h in meta["history"]] == [0, 1, 2]
    assert sum(isinstance(m, QCFS) for m in model.modules()) == 3
    assert main(train[:-4] + ["--lr", "0.5", "--out", str(qdir)]) == 2
    assert "another configuration" in capsys.readouterr().err

    out = tmp_path / "report"
    args = ["snn", "report", "--model", "lenet", "--qcfs", str(qdir / "qcfs.safetensors"), "--T", "1,2",
            "--holdout", "20", "--calib-images", "20", "--test-images", "20", "--batch-size", "20", "--no-progress",
            "--ftbc-passes", "1", "--ftbc-batch-size", "20", "--corr-batches", "1", "--corr-batch-size", "20",
            "--ltb-methods", "none,ftbc", "--ltb-batches", "2", "--ltb-batch-size", "10", "--ftbc-percentiles", "99.9",
            "--out", str(out)]
    assert main(args) == 0
    page = (out / "report.md").read_text()
    for text in ("Test accuracy (%) vs T", "| T | plain | BC | PC | RTS | FTBC | LTB | LTB+FTBC | FTBC (p99.9) | QCFS | QCFS+FTBC | FTBC (p per T) | ANN |"
                 " QCFS ANN |", "FTBC (p per T): for each T, the threshold percentile",
                 "LTB network: the same ReLU ANN with thresholds by local threshold balancing",
                 "Synaptic operations and energy", "Calibration time", "QCFS fine-tuning", "Firing rate per layer",
                 "mnist:test[:20]"):
        assert text in page, text
    for png in ("accuracy", "energy", "firing_rates", "calibration_time"):
        assert (out / f"{png}.png").stat().st_size > 0
    rows = (out / "comparison.csv").read_text().splitlines()
    assert rows[0].startswith("method,family,calibration,T,accuracy,sops") and len(rows) == 1 + 11 * 2
    data = json.loads((out / "comparison.json").read_text())
    assert {r["method"] for r in data["rows"]} == {"plain", "BC", "PC", "RTS", "FTBC", "LTB", "LTB+FTBC", "FTBC (p99.9)",
                                                         "QCFS", "QCFS+FTBC", "FTBC (p per T)"}
    assert all(r["accuracy"] is not None and r["energy_uj"] > 0 for r in data["rows"])
    assert set(data["firing_rates"]["plain"]) == {"relu1", "relu2", "relu3"}
    assert len(list(out.glob("*/*/results.jsonl"))) == 10  # one resumable folder per method


def test_percentile_per_T_is_chosen_on_held_out_accuracy_only():
    from dormant.experiments.snn_report import _percentile_per_T

    def fam(holdout, test):  # one FTBC calibration at T = 2 (snapshot 1 serves both T) and its test accuracies
        return [{"kind": "calibration", "method": "ftbc", "T": 2, "selected": {"1": 1, "2": 1},
                 "holdout_accuracy": [[0.0, 0.0], holdout]}], test

    families, test = {}, {}
    families["relu"], test["relu"] = fam([0.5, 0.9], [0.7, 0.6])
    families["p99.9"], test["p99.9"] = fam([0.6, 0.8], [0.1, 0.9])  # better on test at T = 2: must not matter
    rows = [{"method": "FTBC", "family": f, "calibration": "ftbc", "T": t, "accuracy": 100 * test[f][t - 1]}
            for f in families for t in (1, 2)]
    chosen = _percentile_per_T(families, rows, {"relu": ["ftbc"], "p99.9": ["ftbc"]}, [1, 2], 99.0)
    assert chosen == {1: "p99.9", 2: "relu"}
    per_t = {r["T"]: r for r in rows if r["method"] == "FTBC (p per T)"}
    assert per_t[1]["accuracy"] == 10.0 and per_t[1]["chosen_percentile"] == 99.9
    assert per_t[2]["accuracy"] == 60.0 and per_t[2]["chosen_percentile"] == 99.0
