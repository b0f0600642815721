"""Predicted masks through hooks equal manual masking; traces are token-aligned with the oracle."""

import copy

import pytest
import torch

from dormant.llm.adapters import Tap, ffn_layout
from dormant.llm.calibration import calibrate
from dormant.llm.configs import CalibrationConfig
from dormant.llm.masks import collect_trace
from dormant.llm.predictors import (
    ClusterConfig,
    ClusterPredictor,
    LowRankConfig,
    LowRankPredictor,
    collect_predicted_trace,
    predicted_masks,
)
from dormant.llm.predictors.lowrank import lowrank_logits
from dormant.llm.sparsify import sparsify_
from tests.llm.tiny import HIDDEN, INTER, LAYERS, VOCAB, tiny_model


def _setup():
    model = tiny_model("llama")
    ids = torch.randint(0, VOCAB, (2, 24))
    thr = calibrate(model, ids, CalibrationConfig("intermediate", [0.5], progress=False))
    return model, ids, thr


def _static(keep: torch.Tensor) -> ClusterPredictor:
    """k = 1 cluster predictor = a fixed mask per layer."""
    p = ClusterPredictor(ClusterConfig(k=1), LAYERS, HIDDEN, INTER)
    for layer in range(LAYERS):
        p.params[layer] = {"W": torch.zeros(HIDDEN, 1), "w0": torch.zeros(1), "C": keep[layer][None].float()}
    p.tau[:] = 0.5
    return p


def _random_lowrank(seed=0) -> LowRankPredictor:
    g = torch.Generator().manual_seed(seed)
    p = LowRankPredictor(LowRankConfig(rank=4), LAYERS, HIDDEN, INTER)
    for layer in range(LAYERS):
        p.params[layer] = {"A": torch.randn(HIDDEN, 4, generator=g), "c": torch.randn(4, generator=g),
                           "B": torch.randn(4, INTER, generator=g), "b": torch.zeros(INTER)}
    return p


@torch.no_grad()
def test_static_mask_equals_zeroed_weights():
    """A neuron predicted inactive is skipped: same as deleting its gate row, up row and down column."""
    model, ids, thr = _setup()
    keep = torch.rand(LAYERS, INTER) < 0.6
    ref = copy.deepcopy(model)
    lay = ffn_layout(ref)
    for layer in range(LAYERS):
        w = lay.weights(layer)
        w.gate[~keep[layer]] = 0
        w.up[~keep[layer]] = 0
        w.down[:, ~keep[layer]] = 0
    sparsify_(model, thr)
    sparsify_(ref, thr)
    with predicted_masks(model, _static(keep)) as run:
        got = model(ids).logits
    torch.testing.assert_close(got, ref(ids).logits, rtol=1e-5, atol=1e-5)
    assert run.confusion.overall()["pred_density"] == pytest.approx(float(keep.float().mean()))


@torch.no_grad()
def test_token_varying_masks_equal_manual_hooks():
    """Closed loop: each layer's mask comes from that layer's (already perturbed) FFN input."""
    model, ids, thr = _setup()
    pred = _random_lowrank()
    pred.tau[:] = 0.0
    sparsify_(model, thr)
    with predicted_masks(model, pred):
        got = model(ids).logits
    # Manual reference with plain torch hooks: remember the MLP input, mask the input of down_proj.
    lay = ffn_layout(model)
    xs, handles = {}, []
    for layer in range(LAYERS):
        mlp = lay.ffns[layer]

        def keep_input(mod, args, layer=layer):
            xs[layer] = args[0]

        def mask_mid(mod, args, layer=layer):
            m = lowrank_logits(xs[layer], pred.params[layer], "none") >= 0.0
            return (args[0] * m,)

        handles.append(mlp.register_forward_pre_hook(keep_input))
        handles.append(mlp.down_proj.register_forward_pre_hook(mask_mid))  # after sparsify_'s hook
    try:
        want = model(ids).logits
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    dense_pred = _random_lowrank()
    dense_pred.tau[:] = float("-inf")  # everything predicted active == the oracle-thresholded model, exactly
    oracle = model(ids).logits
    with predicted_masks(model, dense_pred) as run:
        assert torch.equal(model(ids).logits, oracle)
    assert run.confusion.overall()["recall"] == 1.0


@torch.no_grad()
def test_open_loop_traces_align_with_oracle():
    model, ids, thr = _setup()
    pred = _random_lowrank(1)
    sparsify_(model, thr)
    p_trace, o_trace, conf = collect_predicted_trace(model, pred, ids, model_id="tiny", progress=False)
    ref = collect_trace(model, ids, model_id="tiny", progress=False)
    assert torch.equal(o_trace.packed, ref.packed) and o_trace.source["kind"] == "oracle"
    assert p_trace.source["kind"] == "predicted" and p_trace.source["predictor"] == "lowrank"
    assert p_trace.packed.shape == ref.packed.shape == (ids.numel(), LAYERS, (INTER + 7) // 8)
    # The predicted masks are the predictor applied to the FFN inputs of the oracle run.
    xs = {}
    from dormant.llm.hooks import tap_hooks

    with tap_hooks(ffn_layout(model), [Tap.FFN_IN], lambda layer, tap, x: xs.__setitem__(layer, x.reshape(-1, HIDDEN))):
        model(ids[:1])
        first = {k: v.clone() for k, v in xs.items()}
    for layer in range(LAYERS):
        want = pred.predict(layer, first[layer])
        assert torch.equal(p_trace.masks(layer)[: ids.shape[1]], want)
    assert conf.tokens[0] == ids.numel()


def test_guard_neurons_pick_largest_gate_up_rows():
    from dormant.llm.predictors.base import guard_neurons

    model = tiny_model("llama")
    lay = ffn_layout(model)
    with torch.no_grad():
        lay.weights(1).gate[7] *= 100  # make neuron 7 of layer 1 the outlier
    g = guard_neurons(lay, 2)
    assert g.shape == (LAYERS, INTER) and g.sum(1).tolist() == [2, 2] and bool(g[1, 7])
    assert not guard_neurons(lay, 0).any()
