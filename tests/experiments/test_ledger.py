"""The results ledger: one configuration per folder, torn records recovered, caches keyed by their inputs."""

import json

import pytest

from dormant.artifacts import ArtifactError
from dormant.experiments.ledger import Ledger


def test_records_round_trip_and_another_configuration_is_refused_before_any_record(tmp_path):
    path = tmp_path / "results.jsonl"
    led = Ledger(path, "k1", {"lr": 1})
    led.append({"unit": "a", "x": 1})
    assert Ledger(path, "k1").records == [{"key": "k1", "unit": "a", "x": 1}]
    assert json.loads((tmp_path / "results.config.json").read_text()) == {"config": {"lr": 1}, "key": "k1"}
    with pytest.raises(ArtifactError, match="another configuration"):
        Ledger(path, "k2")
    # the configuration is pinned even when no record was written yet (a run killed before its first unit)
    with pytest.raises(ArtifactError, match="another configuration"):
        Ledger(tmp_path / "other" / "results.jsonl", "k1") and Ledger(tmp_path / "other" / "results.jsonl", "k9")


@pytest.mark.parametrize("cut", [1, 5, 12, -2])
def test_a_torn_last_record_is_set_aside_and_the_file_stays_valid(tmp_path, cut):
    path = tmp_path / "results.jsonl"
    led = Ledger(path, "k")
    for i in range(3):
        led.append({"unit": i})
    text = path.read_text()
    last = text.splitlines()[-1]
    torn = text[: len(text) - len(last) - 1] + last[:cut]  # a kill while the last record was written
    path.write_text(torn)
    again = Ledger(path, "k")
    assert [r["unit"] for r in again.records] == [0, 1]  # the torn unit is recomputed
    assert (tmp_path / "results.jsonl.torn").read_text() == last[:cut] + "\n"  # kept, not deleted
    again.append({"unit": 2})
    assert [r["unit"] for r in Ledger(path, "k").records] == [0, 1, 2]  # and every later run reads it


def test_a_complete_record_whose_newline_was_cut_is_kept(tmp_path):
    path = tmp_path / "results.jsonl"
    Ledger(path, "k").append({"unit": 0})
    path.write_text(path.read_text().rstrip("\n"))
    led = Ledger(path, "k")
    assert [r["unit"] for r in led.records] == [0] and path.read_text().endswith("\n")
    led.append({"unit": 1})
    assert [r["unit"] for r in Ledger(path, "k").records] == [0, 1]


def test_damage_before_the_last_line_is_an_error(tmp_path):
    path = tmp_path / "results.jsonl"
    led = Ledger(path, "k")
    led.append({"unit": 0})
    led.append({"unit": 1})
    lines = path.read_text().splitlines()
    path.write_text(lines[0][:5] + "\n" + lines[1] + "\n")
    with pytest.raises(ArtifactError, match="line 1"):
        Ledger(path, "k")


def test_cache_paths_are_keyed_by_their_inputs(tmp_path):
    led = Ledger(tmp_path / "results.jsonl", "k")
    a = led.cache_path("stats_paper", {"windows": 4, "seqlen": 256}, ".safetensors")
    assert a == led.cache_path("stats_paper", {"seqlen": 256, "windows": 4}, ".safetensors")
    assert a != led.cache_path("stats_paper", {"windows": 1, "seqlen": 64}, ".safetensors")


def test_a_sweep_killed_after_its_statistics_does_not_reuse_them_under_another_configuration(tmp_path):
    """Issue 14, item 2: statistics cached by a killed sweep must not be read by a sweep of other text."""
    from dormant.cli import main

    base = ["sweep", "--model", "stories260k", "--seqlen", "64", "--max-windows", "1", "--sites", "intermediate",
            "--sparsity", "0.5", "--no-progress"]
    out = tmp_path / "a"
    assert main([*base, "--calib-windows", "2", "--calib-seqlen", "128", "--out", str(out)]) == 0
    for f in ("results.jsonl", "results.config.json", "report.md"):  # as if killed right after the stats
        (out / f).unlink()
    assert main([*base, "--calib-windows", "1", "--calib-seqlen", "64", "--out", str(out)]) == 0
    (rec,) = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert rec["calibration"]["windows"] == 1 and rec["calibration"]["seqlen"] == 64
    assert len(list(out.glob("stats_intermediate_*.safetensors"))) == 2  # one per calibration text
    assert "1 windows of 64 tokens" in (out / "report.md").read_text()
