"""Golden values of the mask metrics, decision thresholds and perturbations on hand-made inputs."""

import numpy as np
import pytest
import torch

from dormant.llm.predictors import MaskConfusion, choose_tau, mask_metrics
from dormant.llm.predictors.base import operating_point
from dormant.llm.predictors.predictability import (
    independent_baseline,
    pattern_metrics,
    perturb,
    perturbation_plan,
)


def _m(rows):
    return torch.tensor(rows, dtype=torch.bool)


# token 0: pred {0,1}, true {0}       -> TP 1, FP 1, FN 0, TN 2
# token 1: pred {0,2}, true {0,1,2,3} -> TP 2, FP 0, FN 2, TN 0
PRED = _m([[1, 1, 0, 0], [1, 0, 1, 0]])
TRUE = _m([[1, 0, 0, 0], [1, 1, 1, 1]])


def test_metrics_hand_made():
    m = mask_metrics(PRED, TRUE)
    assert m["recall"] == pytest.approx(3 / 5)
    assert m["precision"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(6 / 9)
    assert m["jaccard"] == pytest.approx(3 / 6)
    assert m["pred_density"] == pytest.approx(4 / 8)
    assert m["true_density"] == pytest.approx(5 / 8)
    assert m["density_ratio"] == pytest.approx(4 / 5)


def test_confusion_pools_layers_and_edge_cases():
    c = MaskConfusion(3)
    c.update(0, PRED, TRUE)
    c.update(1, TRUE, TRUE)  # perfect layer
    assert c.layer(1)["recall"] == 1.0 and c.layer(1)["precision"] == 1.0 and c.layer(1)["jaccard"] == 1.0
    o = c.overall()  # layer 2 saw nothing and is left out
    assert o["recall"] == pytest.approx((3 + 5) / (5 + 5))
    assert o["precision"] == pytest.approx((3 + 5) / (4 + 5))
    empty = mask_metrics(_m([[0, 0]]), _m([[0, 0]]))
    assert empty["recall"] == 1.0 and empty["precision"] == 1.0 and empty["pred_density"] == 0.0
    s = c.summary()
    assert s["per_layer"]["recall"][0] == pytest.approx(0.6) and len(s["per_layer"]["recall"]) == 3
    with pytest.raises(ValueError):
        c.update(0, PRED, TRUE[:1])


def test_choose_tau_and_operating_points():
    pos = torch.arange(1, 11, dtype=torch.float32) / 10  # 0.1 .. 1.0
    assert choose_tau(pos, 0.9) == pytest.approx(0.2)  # keeps 9 of 10
    assert choose_tau(pos, 1.0) == pytest.approx(0.1)
    assert choose_tau(pos, 0.0) == pytest.approx(1.0)
    assert choose_tau(torch.tensor([]), 0.99) == float("-inf")
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.2], [0.7, 0.3, 0.6, 0.05]])
    true = _m([[1, 1, 0, 0], [1, 0, 0, 0]])
    op = operating_point(scores, true, recall=1.0)
    assert op["tau"] == pytest.approx(0.7) and op["recall"] == 1.0 and op["density"] == pytest.approx(3 / 8)
    op = operating_point(scores, true, recall=1.0, density_ratio=2.0)  # 6 of 8 entries
    assert op["density"] == pytest.approx(6 / 8) and op["recall"] == 1.0
    op = operating_point(scores, true, recall=1.0, density_ratio=1 / 3)  # 1 of 8: only the 0.9
    assert op["density"] == pytest.approx(1 / 8) and op["recall"] == pytest.approx(1 / 3)


def test_pattern_metrics_hand_made():
    a = _m([[1, 1, 0, 0], [0, 0, 0, 0]])
    b = _m([[1, 0, 1, 0], [0, 0, 0, 0]])
    m = pattern_metrics(a, b, unchanged=torch.tensor([False, True]))
    assert m["jaccard"] == pytest.approx((1 / 3 + 1) / 2)  # empty vs empty counts as 1
    assert m["recall"] == pytest.approx((1 / 2 + 1) / 2)
    assert m["hamming"] == pytest.approx((2 / 4 + 1) / 2)
    assert m["exact"] == pytest.approx(0.5)
    assert m["jaccard_unchanged"] == pytest.approx(1.0)
    ind = independent_baseline(0.5, 0.5)
    assert ind["jaccard"] == pytest.approx(1 / 3) and ind["recall"] == 0.5 and ind["hamming"] == 0.5


def test_perturbation_is_exact_nested_and_seeded():
    ids = torch.arange(100) % 7
    pool = np.arange(7)
    order, repl = perturbation_plan(ids, pool, seed=3, sample=1, bos=True)
    assert 0 not in order and len(order) == 99
    assert (repl != ids.numpy()[order]).all()  # a replacement never equals the original token
    prev = torch.zeros(100, dtype=torch.bool)
    for s in (0.95, 0.9, 0.7):
        v, changed = perturb(ids, order, repl, s)
        assert int(changed.sum()) == round((1 - s) * 99) == int((v != ids).sum())
        assert not changed[0]
        assert (changed | ~prev).all()  # nested: earlier edits are kept
        prev = changed
    order2, repl2 = perturbation_plan(ids, pool, seed=3, sample=1, bos=True)
    assert (order == order2).all() and (repl == repl2).all()
    order3, _ = perturbation_plan(ids, pool, seed=3, sample=2, bos=True)
    assert not (order == order3).all()
