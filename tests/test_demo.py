import pytest

from dormant import demo
from dormant.artifacts import read_jsonl


def test_demo_runs_steps_once_and_links_their_reports(tmp_path, monkeypatch):
    calls = []

    def fake(cfg, out):
        calls.append(out.name)
        out.mkdir(parents=True)
        (out / "report.md").write_text("# step\n")
        return out / "report.md"

    monkeypatch.setattr(demo, "STEPS", {"a": ("first", fake), "b": ("second", fake)})
    cfg = demo.DemoConfig(out=str(tmp_path), steps=["a", "b"])
    index = demo.run_demo(cfg)
    assert calls == ["a", "b"]
    text = index.read_text()
    assert "[a/report.md](a/report.md)" in text and "second" in text
    demo.run_demo(cfg)  # finished steps are skipped
    assert calls == ["a", "b"] and len(read_jsonl(tmp_path / "steps.jsonl")) == 2
    with pytest.raises(ValueError, match="choose from a, b"):
        demo.run_demo(demo.DemoConfig(out=str(tmp_path), steps=["c"]))


def test_demo_steps_are_the_documented_ones():
    assert list(demo.STEPS) == ["sparsity", "analysis", "predictors", "offload", "snn", "snn_compare"]
