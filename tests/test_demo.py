"""``dormant demo``: the step ledger, and every step run on tiny inputs with what its report says checked."""

import pytest

from dormant.config import UsageError
from dormant.experiments import demo
from dormant.experiments.demo import DemoConfig, run_demo

TINY = dict(model="stories260k", windows=2, seqlen=64, snn_images=10, snn_T=[1, 2], compare_images=20,
            compare_T=[1, 2], qcfs_images=100)


def test_demo_runs_steps_once_and_links_their_reports(tmp_path, monkeypatch):
    calls = []

    def fake(cfg, out):
        calls.append(out.name)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.md").write_text("# step\n")
        return out / "report.md"

    monkeypatch.setattr(demo, "STEPS", {"sparsity": ("first", fake), "analysis": ("second", fake)})
    cfg = DemoConfig(out=str(tmp_path), steps=["sparsity", "analysis"])
    index = run_demo(cfg)
    assert calls == ["sparsity", "analysis"]
    text = index.read_text()
    assert "[sparsity/report.md](sparsity/report.md)" in text and "second" in text
    run_demo(cfg)  # finished steps are skipped
    assert calls == ["sparsity", "analysis"] and len((tmp_path / "steps.jsonl").read_text().splitlines()) == 2
    run_demo(DemoConfig(out=str(tmp_path), steps=["sparsity"], fresh=True))
    assert calls == ["sparsity", "analysis", "sparsity"]
    with pytest.raises(UsageError, match="choose from sparsity, analysis, predictors"):
        DemoConfig(out=str(tmp_path), steps=["c"])
    with pytest.raises(Exception, match="another configuration"):
        run_demo(DemoConfig(out=str(tmp_path), steps=["sparsity"], windows=9))


def test_demo_steps_are_the_documented_ones():
    from dormant.experiments.configs import DEMO_STEPS

    assert list(demo.STEPS) == list(DEMO_STEPS) == ["sparsity", "analysis", "predictors", "offload", "snn",
                                                    "snn_compare"]


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    run_demo(DemoConfig(out=str(out), **TINY))
    return out


@pytest.mark.slow
def test_sparsity_step(tiny_demo):
    report = (tiny_demo / "sparsity" / "report.md").read_text()
    assert "# Sparsity vs perplexity: stories260k" in report and "2 windows x 64 tokens of wikitext2-test" in report
    assert "| paper | 0.500 |" in report and "| intermediate | 0.300 |" in report


@pytest.mark.slow
def test_analysis_step(tiny_demo):
    report = (tiny_demo / "analysis" / "report.md").read_text()
    for section in ("## 1. FFN share", "## 2. Natural sparsity", "## 5. Calibrated thresholds vs depth",
                    "## 6. What sparsity buys"):
        assert section in report, section
    assert (tiny_demo / "analysis" / "accounting.csv").read_text().startswith("site,target,")


@pytest.mark.slow
def test_predictors_step(tiny_demo):
    report = (tiny_demo / "predictors" / "eval" / "report.md").read_text()
    assert "# Active-neuron predictors: stories260k" in report
    for name in ("static_k1", "static_k1_guard4", "lowrank_r32_guard4"):
        assert f"| predicted: {name} |" in report, name


@pytest.mark.slow
def test_offload_step(tiny_demo):
    report = (tiny_demo / "offload" / "report.md").read_text()
    assert "# Prefetch simulation" in report and "## Estimated tokens/s on `rpi5-nvme`" in report
    assert "| prefetch |" in report  # it reused the sparsity step's thresholds: no recalibration
    assert "thresholds intermediate at target 0.5" in report


@pytest.mark.slow
def test_snn_steps(tiny_demo):
    report = (tiny_demo / "snn" / "report.md").read_text()
    assert "# ANN -> SNN conversion: resnet20" in report and "| T | none | ftbc | ANN |" in report
    page = (tiny_demo / "snn_compare" / "report.md").read_text()
    assert "| T | plain | BC | PC | RTS | FTBC | QCFS | QCFS+FTBC | ANN | QCFS ANN |" in page
    index = (tiny_demo / "report.md").read_text()
    assert all(f"({step}/" in index for step in ("sparsity", "analysis", "offload", "snn"))
