"""SparsityPlan: checks its contents, says which projections go column-major, saves and loads itself."""

import pytest
import torch

from dormant.artifacts import ArtifactError
from dormant.llm.decode import LayerPlan, SparsityPlan


def test_round_trip(tmp_path):
    plan = SparsityPlan(
        [LayerPlan({"q": torch.rand(8), "down": torch.rand(12)}, mid=0.1), LayerPlan(act=0.25), LayerPlan()],
        {"method": "teal", "target": 0.5},
    )
    plan.save(tmp_path / "p.safetensors")
    back = SparsityPlan.load(tmp_path / "p.safetensors")
    assert back.meta == plan.meta and back.n_layers == 3
    for a, b in zip(plan.layers, back.layers):
        assert (a.mid, a.act) == (b.mid, b.act) and a.inputs.keys() == b.inputs.keys()
        assert all(torch.equal(a.inputs[k], b.inputs[k]) for k in a.inputs)
    assert [back.sparse_projections(n) for n in range(3)] == [{"q", "down"}, {"down"}, set()]
    assert back.head is None


def test_round_trip_with_head_thresholds(tmp_path):
    head = torch.rand(8)
    plan = SparsityPlan([LayerPlan()], head=head)
    assert not plan.is_dense()
    plan.save(tmp_path / "p.safetensors")
    assert torch.equal(SparsityPlan.load(tmp_path / "p.safetensors").head, head)
    assert SparsityPlan([LayerPlan()], head=torch.zeros(8)).is_dense()  # all zero: dense
    with pytest.raises(ValueError, match="head: thresholds must be finite"):
        SparsityPlan([LayerPlan()], head=torch.tensor([0.1, float("nan")]))
    with pytest.raises(ValueError, match="head: 8 thresholds for 4 input channels"):
        plan.check(1, {"head": 4})


def test_dense_and_zero_thresholds():
    assert SparsityPlan.dense(4).is_dense()
    assert LayerPlan(mid=0.0, act=0.0).dense  # t = 0 changes nothing, so it is stored as off
    assert not LayerPlan({"o": torch.zeros(4)}).dense  # a zero vector still puts o in cols (reads all non-zeros)


def test_invalid_plans_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="finite and >= 0"):
        LayerPlan({"q": torch.tensor([0.1, -1.0])})
    with pytest.raises(ValueError, match="finite and >= 0"):
        LayerPlan(mid=float("inf"))
    with pytest.raises(ValueError, match="1-D"):
        LayerPlan({"q": torch.zeros(2, 2)})
    with pytest.raises(ArtifactError, match="not found"):
        SparsityPlan.load(tmp_path / "missing.safetensors")
