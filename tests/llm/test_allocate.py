import pytest
import torch

from dormant.artifacts import read_jsonl
from dormant.cli import main
from dormant.llm.allocate import Sensitivity, allocate


def _sens(delta):
    return Sensitivity([0.0, 0.25, 0.5, 0.75], torch.tensor(delta, dtype=torch.float64), base_nll=2.0)


def test_cheap_layers_get_the_sparsity_first():
    # layer 0 is free up to 0.75; layer 1 costs a lot from the first step.
    sens = _sens([[0, 0.0, 0.0, 0.01], [0, 1.0, 2.0, 3.0]])
    assert allocate(sens, 0.375) == [0.75, 0.0]
    assert allocate(sens, 0.5) == [0.75, 0.25]


def test_mean_target_is_met_exactly_with_a_partial_step():
    sens = _sens([[0, 0.1, 0.3, 0.6], [0, 0.2, 0.4, 0.7], [0, 0.05, 0.5, 0.9]])
    for target in (0.1, 0.3, 0.42, 0.6):
        t = allocate(sens, target)
        assert sum(t) / 3 == pytest.approx(target)
    assert allocate(sens, 0.0) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="mean target"):
        allocate(sens, 0.9)


def test_noisy_dips_do_not_attract_sparsity():
    # layer 1's dip at 0.5 is measurement noise; the monotone envelope ignores it
    sens = _sens([[0, 0.1, 0.2, 0.3], [0, 0.5, -0.2, 0.6]])
    assert allocate(sens, 0.25) == [0.5, 0.0]


def test_sweep_with_sensitivity_allocation(tmp_path):
    out = tmp_path / "s"
    assert main(["sweep", "--model", "stories260k", "--seqlen", "128", "--max-windows", "2", "--calib-windows", "2",
                 "--calib-seqlen", "128", "--sens-windows", "1", "--sens-seqlen", "128", "--sites", "intermediate",
                 "--allocation", "uniform,sensitivity", "--sparsity", "0.5", "--out", str(out), "--no-progress"]) == 0
    recs = {r["allocation"]: r for r in read_jsonl(out / "results.jsonl")}
    assert set(recs) == {"uniform", "sensitivity"}
    layer_targets = recs["sensitivity"]["layer_targets"]
    assert len(layer_targets) == 5 and sum(layer_targets) / 5 == pytest.approx(0.5)
    assert abs(recs["sensitivity"]["site_sparsity"] - 0.5) < 0.05
    assert len(list(out.glob("sensitivity_intermediate_*.json"))) == 1  # cached under a name keyed by its inputs
    assert "intermediate (sensitivity)" in (out / "report.md").read_text()
