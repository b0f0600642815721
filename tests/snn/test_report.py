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
            "--ltb-methods", "none,ftbc", "--ltb-batches", "2", "--ltb-batch-size", "10", "--out", str(out)]
    assert main(args) == 0
    page = (out / "report.md").read_text()
    for text in ("Test accuracy (%) vs T", "| T | plain | BC | PC | RTS | FTBC | LTB | LTB+FTBC | QCFS | QCFS+FTBC | ANN | QCFS ANN |",
                 "LTB network: the same ReLU ANN with thresholds by local threshold balancing",
                 "Synaptic operations and energy", "Calibration time", "QCFS fine-tuning", "Firing rate per layer",
                 "mnist:test[:20]"):
        assert text in page, text
    for png in ("accuracy", "energy", "firing_rates", "calibration_time"):
        assert (out / f"{png}.png").stat().st_size > 0
    rows = (out / "comparison.csv").read_text().splitlines()
    assert rows[0].startswith("method,family,calibration,T,accuracy,sops") and len(rows) == 1 + 9 * 2
    data = json.loads((out / "comparison.json").read_text())
    assert {r["method"] for r in data["rows"]} == {"plain", "BC", "PC", "RTS", "FTBC", "LTB", "LTB+FTBC", "QCFS",
                                                         "QCFS+FTBC"}
    assert all(r["accuracy"] is not None and r["energy_uj"] > 0 for r in data["rows"])
    assert set(data["firing_rates"]["plain"]) == {"relu1", "relu2", "relu3"}
    assert len(list(out.glob("*/*/results.jsonl"))) == 9  # one resumable folder per method
