import pytest
import torch

from dormant.artifacts import ArtifactError
from dormant.llm.adapters import Tap, ffn_layout
from dormant.llm.hooks import tap_hooks
from dormant.llm.sites import SITES, site_taps
from dormant.llm.sparsify import is_sparsified, measure_sparsity, sparsify_, unsparsify_
from dormant.llm.stats import StatsConfig, collect_stats
from dormant.llm.thresholds import Thresholds
from tests.llm.tiny import MODEL_TYPES, tiny_model

IDS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))


def _thresholds(model, site, target=0.5):
    taps = site_taps(site, ffn_layout(model))
    stats = collect_stats(model, IDS, taps, StatsConfig(progress=False), model_id="tiny")
    return stats.thresholds(target, site)


def _hooks_left(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_threshold_zero_is_exactly_dense_and_removal_restores(model_type):
    model = tiny_model(model_type)
    with torch.inference_mode():
        dense = model(IDS).logits
        for site in SITES:
            thr = _thresholds(model, site)
            sparsify_(model, thr.scaled(0.0))
            assert torch.equal(model(IDS).logits, dense), site
            sparsify_(model, thr)  # replaces the previous thresholds
            assert not torch.equal(model(IDS).logits, dense), site
            unsparsify_(model)
            assert not is_sparsified(model) and _hooks_left(model) == 0
            assert torch.equal(model(IDS).logits, dense)


@pytest.mark.parametrize("model_type", ["llama", "phi3", "gpt2", "opt"])
def test_golden_rule_zeroes_below_and_keeps_at_threshold(model_type):
    model = tiny_model(model_type)
    layout = ffn_layout(model)
    seen = {}
    with torch.inference_mode(), tap_hooks(layout, [Tap.MID], lambda layer, t, x: seen.setdefault(layer, x.clone())):
        model(IDS)
    # Threshold = an actual non-zero |value| of layer 0: it must survive, everything smaller must vanish.
    nonzero = seen[0].abs().flatten()
    nonzero = nonzero[nonzero > 0].sort().values
    t0 = nonzero[len(nonzero) // 3].item()
    thr = Thresholds(torch.tensor([[t0], [0.0]]), torch.tensor([0.33, 0.0]), (Tap.MID,), "intermediate",
                     {"id": "tiny", **layout.describe()})
    sparsify_(model, thr)
    after = {}
    with torch.inference_mode(), tap_hooks(layout, [Tap.MID], lambda layer, t, x: after.setdefault(layer, x.clone())):
        model(IDS)
    unsparsify_(model)
    before = seen[0]
    expected = torch.where(before.abs() < t0, torch.zeros_like(before), before)
    assert torch.equal(after[0], expected)
    assert (after[0] == 0).float().mean().item() >= 0.3
    assert (after[0].abs() == t0).any()  # kept at equality


@pytest.mark.parametrize("site", list(SITES))
def test_kv_cache_decode_matches_full_forward(site):
    model = tiny_model("llama")
    sparsify_(model, _thresholds(model, site))
    ids = IDS[:1]
    with torch.inference_mode():
        full = model(ids).logits[0, -1]
        out = model(ids[:, :-1], use_cache=True)
        step = model(ids[:, -1:], past_key_values=out.past_key_values, use_cache=True).logits[0, -1]
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-5)
    unsparsify_(model)


def test_generate_and_parameter_names_are_untouched():
    from dormant.llm.models import load_model

    model, tok, _ = load_model("stories260k")
    names = list(model.state_dict())
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    dense = model.generate(ids, max_new_tokens=12, do_sample=False)
    sparsify_(model, _thresholds_for(model, tok, "intermediate", 0.5))
    assert list(model.state_dict()) == names
    sparse = model.generate(ids, max_new_tokens=12, do_sample=False)
    # generate() with its KV cache decodes exactly what greedy argmax over the full thresholded forward gives
    seq = ids
    with torch.inference_mode():
        for _ in range(12):
            seq = torch.cat([seq, model(seq, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
        sparse_logits = model(dense, use_cache=False).logits
    assert torch.equal(sparse, seq)
    unsparsify_(model)
    assert torch.equal(model.generate(ids, max_new_tokens=12, do_sample=False), dense)
    with torch.inference_mode():  # and the thresholds really act: the same tokens score differently
        assert (model(dense, use_cache=False).logits - sparse_logits).abs().max() > 1e-3


def _thresholds_for(model, tok, site, target, source="wikitext2-valid", windows=8):
    from dormant.llm.text import load_text, make_windows

    w = make_windows(tok, load_text(source), 256, windows, source=source)
    stats = collect_stats(model, w.ids, site_taps(site, ffn_layout(model)), StatsConfig(progress=False))
    return stats.thresholds(target, site)


@pytest.mark.parametrize("site", ["intermediate", "paper", "gate_act", "inputs"])
def test_held_out_sparsity_per_layer_is_within_two_points(site):
    """Calibrate on WikiText-2 validation, measure on 8k test tokens: every layer and tap within +-2 points.

    The one exception is the FFN input of this tiny, out-of-domain model (TinyStories on Wikipedia): the
    shared validation file is the *tokenized* split (rare words replaced by ``<unk>``), which shifts the
    normalised FFN-input distribution of layer 1 by about 2 points; it is held to 3 points.
    """
    from dormant.llm.models import load_model
    from dormant.llm.text import load_text, make_windows

    model, tok, _ = load_model("stories260k")
    thr = _thresholds_for(model, tok, site, 0.4, windows=16)
    sparsify_(model, thr)
    held_out = make_windows(tok, load_text("wikitext2-test"), 256, 32)
    with torch.inference_mode(), measure_sparsity(model, thr.taps) as meter:
        model(held_out.ids)
    unsparsify_(model)
    frac = meter.fraction()
    for j, tap in enumerate(meter.taps):
        if tap in thr.taps:
            bound = 0.03 if tap is Tap.FFN_IN else 0.02
            assert (frac[:, j] - 0.4).abs().max().item() <= bound, (tap, frac[:, j])


def test_per_layer_targets():
    model = tiny_model("llama")
    stats = collect_stats(model, IDS, (Tap.MID,), StatsConfig(progress=False))
    thr = stats.thresholds({1: 0.6}, "intermediate")
    assert thr.targets.tolist() == [0.0, 0.6] and thr.values[0, 0] == 0
    thr = stats.thresholds([0.2, 0.7], "intermediate")
    assert thr.values[0, 0] == stats.thresholds(0.2, "intermediate").values[0, 0]
    assert thr.values[1, 0] == stats.thresholds(0.7, "intermediate").values[1, 0]
    assert thr.values[1, 0] > stats.thresholds(0.2, "intermediate").values[1, 0] > 0
    with pytest.raises(ValueError, match="3 per-layer targets"):
        stats.thresholds([0.1, 0.2, 0.3], "intermediate")
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        stats.thresholds(1.0, "intermediate")


def test_thresholds_round_trip_and_mismatch_errors(tmp_path):
    model = tiny_model("llama")
    thr = _thresholds(model, "paper")
    p = thr.save(tmp_path / "t.safetensors")
    back = Thresholds.load(p)
    assert torch.equal(back.values, thr.values) and back.taps == thr.taps and back.site == "paper"
    sparsify_(model, back)  # validates
    unsparsify_(model)
    with pytest.raises(ArtifactError, match="n_layers"):
        sparsify_(tiny_model("llama", num_hidden_layers=3), back)
    with pytest.raises(ArtifactError, match="model_type"):
        sparsify_(tiny_model("gpt2"), back)
    with pytest.raises(ArtifactError, match="intermediate_size"):
        sparsify_(tiny_model("llama", intermediate_size=64), back)
    blob = p.read_bytes()
    p.write_bytes(blob[:-7])
    with pytest.raises(ArtifactError):
        Thresholds.load(p)
    with pytest.raises(ArtifactError, match="expected 'dormant.Thresholds'"):
        from dormant.llm.stats import ActivationStats

        stats = collect_stats(model, IDS, (Tap.MID,), StatsConfig(progress=False))
        Thresholds.load(stats.save(tmp_path / "s.safetensors"))
    assert isinstance(ActivationStats.load(tmp_path / "s.safetensors"), ActivationStats)


def test_refined_calibration_puts_downstream_taps_on_target():
    """Dense calibration misses the ``paper`` site's down_proj-output target once gate/up are sparse
    (about 3 points here at 50%); passes under the current thresholds fix it on the calibration text."""
    from dormant.llm.calibration import refine
    from dormant.llm.models import load_model
    from dormant.llm.text import load_text, make_windows

    model, tok, _ = load_model("stories260k")
    cal = make_windows(tok, load_text("wikitext2-valid"), 256, 16).ids

    def worst(thr):
        sparsify_(model, thr)
        with torch.inference_mode(), measure_sparsity(model, thr.taps) as meter:
            model(cal)
        unsparsify_(model)
        frac = meter.fraction()
        return {t: (frac[:, j] - 0.5).abs().max().item() for j, t in enumerate(meter.taps) if t in thr.taps}

    dense = _thresholds_for(model, tok, "paper", 0.5, windows=16)
    refined = refine(model, cal, dense, 0.5, passes=2, config=StatsConfig(progress=False))
    before, after = worst(dense), worst(refined)
    assert before[Tap.OUT] > 0.02 and after[Tap.OUT] < 0.005
    assert max(after.values()) < 0.005 and not is_sparsified(model)
    assert refined.calibration["under_thresholds"]["site"] == "paper"
    with pytest.raises(ValueError, match="dense model"):
        sparsify_(model, dense)
        try:
            refine(model, cal, dense, 0.5)
        finally:
            unsparsify_(model)
