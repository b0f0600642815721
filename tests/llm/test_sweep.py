"""End-to-end: the CLI on the tiny real Llama (stories260K)."""

import json

from dormant.artifacts import read_jsonl
from dormant.cli import main

SMALL = ["--model", "stories260k", "--seqlen", "128", "--max-windows", "3", "--calib-windows", "4",
         "--calib-seqlen", "128"]


def test_sweep_writes_report_and_resumes(tmp_path, caplog):
    out = tmp_path / "sweep"
    args = ["sweep", *SMALL, "--sites", "paper,intermediate", "--sparsity", "0,0.3,0.5", "--out", str(out),
            "--no-progress"]
    assert main(args) == 0
    records = read_jsonl(out / "results.jsonl")
    assert sorted((r["site"], r["target"]) for r in records) == [
        ("dense", 0.0), ("intermediate", 0.3), ("intermediate", 0.5), ("paper", 0.3), ("paper", 0.5)]
    dense = next(r for r in records if r["site"] == "dense")
    for r in records:
        assert r["windows"] == 3 and r["calibration"]["source"] == "wikitext2-valid"
        if r["site"] != "dense":
            assert abs(r["site_sparsity"] - r["target"]) < 0.05
    assert dense["neuron_sparsity"] == 0.0
    paper50 = next(r for r in records if r["site"] == "paper" and r["target"] == 0.5)
    assert paper50["neuron_sparsity"] > 0.6  # three 50%-sparse tensors silence more than half of the neurons
    report = (out / "report.md").read_text()
    assert "| paper | 0.500 |" in report and (out / "sweep.png").stat().st_size > 1000
    # A rerun measures nothing new; a new target is added on top of the existing points.
    assert main(args) == 0
    assert len(read_jsonl(out / "results.jsonl")) == 5
    assert main(["sweep", *SMALL, "--sites", "intermediate", "--sparsity", "0.4", "--out", str(out), "--no-progress"]) == 0
    assert len(read_jsonl(out / "results.jsonl")) == 6


def test_sweep_refuses_to_mix_configurations(tmp_path, capsys):
    out = tmp_path / "sweep"
    base = ["sweep", *SMALL, "--sites", "intermediate", "--sparsity", "0.3", "--out", str(out), "--no-progress"]
    assert main(base) == 0
    assert main([*base, "--calib-windows", "2"]) == 2  # a user error: one line, exit 2
    assert "another configuration" in capsys.readouterr().err


def test_calibrate_then_eval(tmp_path, capsys):
    thr = tmp_path / "thr.safetensors"
    assert main(["calibrate", *SMALL, "--site", "gate_act", "--sparsity", "0.5", "--out", str(thr)]) == 0
    assert json.loads(capsys.readouterr().out)["thresholds"] == str(thr)
    assert main(["eval", *SMALL[:6], "--thresholds", str(thr), "--json-out", str(tmp_path / "e.json")]) == 0
    res = json.loads((tmp_path / "e.json").read_text())
    assert abs(res["sparsity"]["act"] - 0.5) < 0.05 and res["windows"] == 3


def test_calibrating_on_the_evaluation_text_must_be_explicit(tmp_path, capsys):
    assert main(["calibrate", *SMALL, "--calib-data", "wikitext2-test", "--out", str(tmp_path / "t.safetensors")]) == 2
    assert "calib-on-eval" in capsys.readouterr().err
    assert main(["calibrate", *SMALL, "--calib-on-eval", "--out", str(tmp_path / "t.safetensors")]) == 0
    from dormant.llm.thresholds import Thresholds

    assert Thresholds.load(tmp_path / "t.safetensors").calibration["calib_on_eval"] is True


def test_sweep_report_is_unchanged_by_the_redesign(tmp_path):
    """``tests/golden/sweep_stories260k.md`` was written by the code before the library/experiments split
    (commit 78126f8) with exactly these flags; the same sweep must give the same report: the same text, and each
    printed number equal up to one unit in its last printed digit (another CPU's float kernels round differently)."""
    import re
    from pathlib import Path

    golden = Path(__file__).parents[1] / "golden" / "sweep_stories260k.md"
    out = tmp_path / "sweep"
    assert main(["sweep", "--model", "stories260k", "--seqlen", "128", "--max-windows", "2", "--calib-windows", "2",
                 "--calib-seqlen", "128", "--sens-windows", "1", "--sens-seqlen", "128", "--sites", "paper,intermediate",
                 "--sparsity", "0,0.3,0.5", "--allocation", "uniform,sensitivity", "--refine", "1", "--out", str(out),
                 "--no-progress"]) == 0
    number = re.compile(r"-?\d+(?:\.(\d+))?")
    got, want = (out / "report.md").read_text(), golden.read_text()
    assert number.sub("#", got) == number.sub("#", want)
    for g, w in zip(number.finditer(got), number.finditer(want), strict=True):
        ulp = 10.0 ** -len(w.group(1) or "")
        assert abs(float(g.group()) - float(w.group())) <= ulp * 1.001, (g.group(), w.group())


def test_sweep_of_methods_reports_perplexity_against_linear_bytes_skipped(tmp_path, caplog):
    out = tmp_path / "methods"
    args = ["sweep", *SMALL, "--sites", "", "--methods", "teal,wina,chess,dormant,linear:magnitude:greedy",
            "--sparsity", "0.3,0.5", "--greedy-tokens", "128", "--probe-tokens", "128", "--out", str(out),
            "--no-progress"]
    assert main(args) == 0
    records = read_jsonl(out / "results.jsonl")
    methods = sorted((r.get("method", r["site"]), r["target"]) for r in records)
    assert methods == [("chess", 0.3), ("chess", 0.5), ("dense", 0.0), ("dormant", 0.3), ("dormant", 0.5),
                       ("linear:magnitude:greedy", 0.3), ("linear:magnitude:greedy", 0.5), ("teal", 0.3),
                       ("teal", 0.5), ("wina", 0.3), ("wina", 0.5)]
    for r in records:
        skipped = r["bytes_skipped"]["fp16"]
        assert 0.0 <= skipped["fraction"] < 1.0 and set(r["bytes_skipped"]) >= {"fp16", "int8", "int4"}
        if r.get("method") in ("teal", "wina", "linear:magnitude:greedy"):  # the blocks' budget, measured
            assert abs(skipped["fraction_no_head"] - r["target"]) < 0.06, r["method"]
        if r.get("method") == "dormant":  # its budget covers the head too
            assert abs(skipped["fraction"] - r["target"]) < 0.06
    report = (out / "report.md").read_text()
    assert "## Perplexity vs linear weight bytes skipped" in report and "| teal | linear:magnitude:uniform |" in report
    assert "Protocol: thresholds from 4 x 128 tokens of wikitext2-valid (held out)" in report
    assert (out / "bytes.png").stat().st_size > 1000
    assert main(args) == 0 and len(read_jsonl(out / "results.jsonl")) == len(records)  # resumes: nothing new


def test_a_bad_method_is_refused_with_the_options(capsys):
    assert main(["sweep", *SMALL, "--methods", "teal,tael"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tael" in err and "teal-greedy" in err
    assert main(["sweep", *SMALL, "--methods", "intermediate:wina:greedy"]) == 2
    assert "use site linear" in capsys.readouterr().err


def test_calibrate_takes_a_named_method(tmp_path, capsys):
    from dormant.llm.thresholds import Thresholds

    out = tmp_path / "t.safetensors"
    assert main(["calibrate", *SMALL, "--method", "wina", "--sparsity", "0.4", "--out", str(out)]) == 0
    thr = Thresholds.load(out)
    assert thr.site == "linear" and thr.calibration["score"] == "wina"
    assert main(["calibrate", *SMALL, "--method", "teal-fast", "--out", str(out)]) == 2
    assert "teal-greedy" in capsys.readouterr().err  # the error lists the methods
