"""End-to-end: run_simulation writes its results; every offload CLI command runs."""

import json

import pytest

from dormant.cli import main
from dormant.experiments.offload import SimulateConfig, run_simulation
from dormant.offload import StorageLayout, synthetic_trace


@pytest.fixture
def trace_file(tmp_path):
    tr = synthetic_trace(120, 3, 64, density=0.4, hidden_size=32, seed=0)
    p = tmp_path / "trace.safetensors"
    tr.save(p)
    return p


def test_run_simulation_outputs(tmp_path, trace_file):
    out = tmp_path / "sim"
    cfg = SimulateConfig(trace=str(trace_file), predicted="synthetic", profiles=["rpi5-microsd", "phone-ufs4"],
                         policies=["dense", "demand", "lru", "hot", "window", "prefetch"], budgets=[0.25, 1.0],
                         warmup=4, out=str(out))
    recs = run_simulation(cfg, StorageLayout(align=1))
    assert len(recs) == 6 * 2 * 2
    for f in ("results.json", "results.csv", "report.md", "bytes.png", "time.png"):
        assert (out / f).stat().st_size > 0
    meta = json.loads((out / "results.json").read_text())["meta"]
    assert meta["profiles"]["rpi5-microsd"]["storage"]["seq_read_MBps"]["source"]
    demand = [r for r in recs if r["policy"] == "demand"]
    assert len({r["bytes_per_token"] for r in demand}) == 1  # budget-independent
    dense = {(r["budget"], r["profile"]): r for r in recs if r["policy"] == "dense"}
    assert dense[(1.0, "rpi5-microsd")]["bytes_per_token"] == 0  # everything fits
    assert dense[(0.25, "rpi5-microsd")]["bytes_per_token"] == pytest.approx(0.75 * meta["ffn_bytes"], rel=0.02)


def test_prefetch_without_prediction_is_an_error(tmp_path, trace_file):
    cfg = SimulateConfig(trace=str(trace_file), policies=["prefetch"], out=str(tmp_path / "x"))
    with pytest.raises(ValueError, match="--predicted"):
        run_simulation(cfg)


def test_cli_simulate_and_profiles(tmp_path, trace_file, capsys):
    out = tmp_path / "cli"
    assert main(["simulate", "--trace", str(trace_file), "--policies", "demand,lru:pin=0.5", "--budgets", "0.5",
                 "--profiles", "rpi5-nvme", "--chunk", "4", "--bundling", "separate", "--warmup", "0",
                 "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "## MB read from storage per token" in report and "## Estimated tokens/s on `rpi5-nvme`" in report
    assert "| demand |" in report and "| lru:pin=0.5 |" in report
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 and rows[0].startswith("policy,")  # 2 policies x 1 budget x 1 profile
    capsys.readouterr()
    assert main(["profiles"]) == 0
    listing = capsys.readouterr().out
    assert "rpi5-microsd" in listing and "laptop-nvme" in listing and "MB/s" in listing
    assert main(["profiles", "laptop-nvme"]) == 0
    assert "storage:" in capsys.readouterr().out


def test_cli_storage_check(tmp_path, trace_file):
    out = tmp_path / "sc"
    assert main(["storage-check", "--path", str(tmp_path / "w.bin"), "--trace", str(trace_file), "--batches", "6",
                 "--fit-reads", "50", "--queue-depths", "1,2", "--chunks", "1,4", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["fit"]["mode"] in ("O_DIRECT", "posix_fadvise(DONTNEED)")
    assert len(res["results"]) == 4 and all(r["measured_s"] > 0 for r in res["results"])
    assert (out / "this-machine.yaml").exists() and not (tmp_path / "w.bin").exists()
    assert main(["profiles", str(out / "this-machine.yaml")]) == 0


@pytest.mark.slow
def test_cli_trace_records_a_real_model(tmp_path):
    from dormant.traces import ActivationTrace

    out = tmp_path / "t.safetensors"
    assert main(["trace", "--model", "stories260k", "--seqlen", "32", "--max-windows", "2", "--max-tokens", "50",
                 "--out", str(out)]) == 0
    tr = ActivationTrace.load(out)
    assert tr.n_tokens == 50 and tr.model["dtype"] == "float32" and tr.source["params"]["attn_per_layer"] > 0
