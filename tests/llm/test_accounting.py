"""Golden per-token bytes/FLOPs of every policy on hand-built masks, and parameter breakdowns.

Expected numbers are worked out by hand in the comments (see the formulas in dormant.llm.accounting).
"""

import pytest
import torch

from dormant.llm.accounting import (
    ARCHS,
    FORMATS,
    ArchSpec,
    FFNDims,
    PredictorCost,
    WeightFormat,
    collect_policy_traces,
    model_breakdown,
    neuron_counts,
    policy_costs,
    previous_token_prediction,
)
from dormant.llm.adapters import Tap, ffn_layout
from dormant.llm.sparsify import is_sparsified
from dormant.llm.stats import StatsConfig, collect_stats
from dormant.traces import ActivationTrace, pack_masks
from tests.llm.tiny import HIDDEN, INTER, LAYERS, VOCAB, tiny_model

META = {"fingerprint": "hand", "id": "hand-built"}


def _trace(sets, n_neurons, kind="oracle", tap="mid", seqlen=None):
    """``sets[t][l]`` = active neuron indices of token t, layer l -> ActivationTrace."""
    m = torch.zeros(len(sets), len(sets[0]), n_neurons, dtype=torch.bool)
    for t, per_layer in enumerate(sets):
        for layer, idx in enumerate(per_layer):
            m[t, layer, list(idx)] = True
    src = {"kind": kind, "tap": tap, "seqlen": seqlen or len(sets)}
    return ActivationTrace(pack_masks(m), n_neurons, dict(META), src)


# Gated FFN, D = 4, I = 8, two layers, two tokens. Sets are [layer 0, layer 1] per token.
A = [[{0, 1}, set()], [{0, 1, 2, 3}, {7}]]  # active (MID != 0): |A| summed = 2 + 0 + 4 + 1 = 7
G = [[{0, 1, 2}, {5}], [{0, 1, 2, 3, 4, 5}, {6, 7}]]  # act(gate) != 0, contains A: 3 + 1 + 6 + 2 = 12
P = [[{0, 4}, set()], [{0, 1, 2, 3}, {6}]]  # predicted: 7 neurons, 5 hits, 2 FP (4, 6), 2 FN (1, 7)
GATED = FFNDims(hidden_size=4, intermediate_size=8, n_layers=2, gated=True)


def _by_policy(costs, fmt="fp16"):
    return {c.policy: c for c in costs if c.format == fmt}


def test_vector_bits_and_formats():
    assert FORMATS["fp32"].vec_bits(576) == 576 * 32
    assert FORMATS["fp16"].vec_bits(576) == 9216
    assert FORMATS["int8"].vec_bits(576) == 576 * 8 + 18 * 16  # GGUF Q8_0: 576 / 32 = 18 fp16 scales
    assert FORMATS["int4"].vec_bits(576) == 576 * 4 + 18 * 16  # GGUF Q4_0: 18 fp16 scales
    assert FORMATS["int8"].bits_per_weight == 8.5 and FORMATS["int4"].bits_per_weight == 4.5
    assert WeightFormat("q", 4, group_size=2, group_bits=16).vec_bits(5) == 20 + 3 * 16


def test_gated_policies_golden_fp16():
    counts = neuron_counts(_trace(A, 8), _trace(G, 8, tap="act"), _trace(P, 8, kind="predicted"))
    assert counts.active.tolist() == [6, 1] and counts.gate_active.tolist() == [9, 3]
    assert counts.union.tolist() == [7, 2] and counts.hits.tolist() == [5, 0]
    c = _by_policy(policy_costs(GATED, counts, ["fp16"], PredictorCost(10.0, 20.0, "test")))
    # fp16 D-vector = 4 * 16 bits = 8 bytes; 2D = 8 FLOPs per row/column.
    # dense: 24 vectors x 8 B x 2 layers = 384 B; FLOPs 2 x (8 x 24 + 8 act + 8 product) = 416.
    assert c["dense"].bytes_per_token == 384 and c["dense"].flops_per_token == 416
    assert c["dense"].bytes_per_layer == [192, 192]
    # down_skip: gate+up 4 token-layers x 16 x 8 B = 512, down 7 x 8 = 56 -> 568 / 2 tokens.
    # FLOPs: 4 x 16 x 8 = 512 + 7 x 8 = 56 + act 32 + product 32 = 632 / 2.
    assert c["down_skip"].bytes_per_token == 284 and c["down_skip"].flops_per_token == 316
    assert c["down_skip"].bytes_per_layer == [(256 + 48) / 2, (256 + 8) / 2]
    assert c["down_skip"].rel_bytes == 284 / 384
    # gate_first: gate 32 rows x 8 B = 256, up |G| = 12 -> 96, down |A| = 7 -> 56 -> 408 / 2.
    # FLOPs: 8 x (32 + 12 + 7) = 408 + act 32 + product 12 = 452 / 2.
    assert c["gate_first"].bytes_per_token == 204 and c["gate_first"].flops_per_token == 226
    # oracle: 3 x 7 vectors x 8 B = 168 / 2; FLOPs 8 x 21 + 7 + 7 = 182 / 2.
    assert c["oracle"].bytes_per_token == 84 and c["oracle"].flops_per_token == 91
    # predicted: |P u A| = 9 bundles x 24 B = 216 / 2 = 108 (+10 predictor);
    # FLOPs: gate+up 8 x 18 = 144, down only where active 8 x 7 = 56, act 9, product 9 -> 218 / 2 = 109 (+20).
    p = c["predicted"]
    assert p.bytes_per_token == 118 and p.flops_per_token == 129
    x = p.extra
    assert x["false_positives"] == 1 and x["false_negatives"] == 1  # 2 each over 2 tokens
    assert x["fp_bytes"] == 24 and x["fn_bytes"] == 24  # one 24-byte bundle per token
    assert x["bytes_if_misses_skipped"] == 7 * 24 / 2 + 10  # only the 7 predicted bundles
    assert x["recall"] == 5 / 7 and x["precision"] == 5 / 7
    assert x["predictor_bytes"] == 10 and x["predictor_flops"] == 20


def test_int4_golden_and_relative_bytes_are_format_independent_without_biases():
    counts = neuron_counts(_trace(A, 8), _trace(G, 8, tap="act"))
    c = _by_policy(policy_costs(GATED, counts, ["int4", "fp16"]), "int4")
    # int4 D-vector: 4 x 4 bits + one 16-bit scale (group of 32 > D) = 32 bits = 4 bytes.
    assert c["dense"].bytes_per_token == 2 * 24 * 4
    assert c["oracle"].bytes_per_token == 21 * 4 / 2
    assert c["oracle"].flops_per_token == 91  # FLOPs do not depend on the format
    f = _by_policy(policy_costs(GATED, counts, ["fp16"]))
    for p in ("down_skip", "gate_first", "oracle"):
        assert c[p].rel_bytes == f[p].rel_bytes
    assert "predicted" not in c  # no predicted trace, no predicted policy


def test_non_gated_with_biases_golden_fp32():
    # OPT-like: fc1 [I, D] with bias, fc2 with bias; D = 4, I = 8, one layer, two tokens.
    dims = FFNDims(hidden_size=4, intermediate_size=8, n_layers=1, gated=False, up_bias=True, down_bias=True)
    counts = neuron_counts(_trace([[{0, 1, 2}], [{5}]], 8))  # |A| = 3 + 1 = 4
    c = _by_policy(policy_costs(dims, counts, ["fp32"]), "fp32")
    assert set(c) == {"dense", "down_skip", "oracle"}  # no gate, no gate_first
    # fp32 D-vector 16 B, bias values 4 B.
    # dense: fc1 8 x 16 + bias 8 x 4 + fc2 8 x 16 + bias 4 x 4 = 304 B; FLOPs 8 x 16 + act 8 + biases 8 + 4 = 148.
    assert c["dense"].bytes_per_token == 304 and c["dense"].flops_per_token == 148
    # down_skip: fc1 160 + fc2 4 x 16 / 2 = 32 + bias 16 = 208; FLOPs 64 + 8 x 2 + 8 + 12 = 100.
    assert c["down_skip"].bytes_per_token == 208 and c["down_skip"].flops_per_token == 100
    # oracle: fc1 2 rows x (16 + 4) = 40 + fc2 2 x 16 = 32 + bias 16 = 88; FLOPs 16 + 16 + act 2 + bias 2 + 4 = 40.
    assert c["oracle"].bytes_per_token == 88 and c["oracle"].flops_per_token == 40
    assert dims.bundle_bits(FORMATS["fp32"]) == (16 + 16 + 4) * 8
    with pytest.raises(ValueError, match="gate_first"):
        policy_costs(dims, counts, ["fp32"], policies=["gate_first"])


def test_all_active_and_all_silent_extremes():
    dims = FFNDims(4, 8, 1, True)
    full = neuron_counts(_trace([[set(range(8))]], 8), _trace([[set(range(8))]], 8, tap="act"))
    for c in policy_costs(dims, full, ["fp16"]):
        assert c.rel_bytes == 1 and c.rel_flops == 1
    empty = _by_policy(policy_costs(dims, neuron_counts(_trace([[set()]], 8), _trace([[set()]], 8, tap="act")),
                                    ["fp16"]))
    assert empty["oracle"].bytes_per_token == 0 and empty["oracle"].flops_per_token == 0
    assert empty["down_skip"].rel_bytes == 2 / 3  # gate and up are still read in full
    assert empty["gate_first"].rel_bytes == 1 / 3  # only gate


def test_trace_checks():
    mid, act = _trace(A, 8), _trace(G, 8, tap="act")
    with pytest.raises(ValueError, match="act\\(gate\\) == 0"):
        neuron_counts(mid, _trace(P, 8, tap="act"))  # P does not contain A
    with pytest.raises(ValueError, match="expected 'predicted'"):
        neuron_counts(mid, act, _trace(P, 8))
    with pytest.raises(ValueError, match="not aligned"):
        neuron_counts(mid, act, _trace(P[:1], 8, kind="predicted"))
    with pytest.raises(ValueError, match="do not match"):
        policy_costs(FFNDims(4, 16, 2, True), neuron_counts(mid, act))


def test_previous_token_prediction():
    sets = [[{0}], [{1, 11}], [{2}], [set()]]
    pred = previous_token_prediction(_trace(sets, 12), seqlen=2)
    assert pred.source["kind"] == "predicted"
    m = pred.masks(0)
    assert m[0].all() and m[2].all()  # window starts: all neurons (12 of 16 bits; padding stays clear)
    assert m[1].nonzero().flatten().tolist() == [0] and m[3].nonzero().flatten().tolist() == [2]
    assert int(pred.packed[0, 0, 1]) == 0x0F
    counts = neuron_counts(_trace(sets, 12), predicted=pred)
    assert counts.hits.tolist() == [1 + 0 + 1 + 0]  # token 0 (all), token 2 (all) hit; 1 and 3 miss


def test_predictor_cost_from_params():
    c = PredictorCost.from_params(1000, 2000.0, "lowrank")
    assert c.bytes_for("fp16") == 2000 and c.bytes_for("int4") == 1000 * 4.5 / 8
    with pytest.raises(ValueError):
        PredictorCost({"fp16": 1.0}, 0.0).bytes_for("int8")


@pytest.mark.parametrize("name", list(ARCHS))
def test_arch_params_match_published_counts(name):
    a = ARCHS[name]
    b = a.breakdown()
    assert b.params() == a.reference_params
    assert b.params(["ffn"]) == a.ffn_dims().params()
    assert b.source.startswith("https://huggingface.co/")


def test_arch_ffn_shares():
    s = ARCHS["Llama-3-8B"].breakdown().summary(["fp16"])
    assert s["ffn_share_params"] == pytest.approx(0.70199, abs=1e-5)
    assert s["ffn_share_block_params"] == pytest.approx(0.8077, abs=1e-4)
    # One embedding row instead of the whole table: FFN share of per-token bytes is higher.
    assert s["ffn_share_bytes_fp16"] == pytest.approx(5_637_144_576 / (8_030_261_248 - 128256 * 4096 + 4096), rel=1e-9)


@pytest.mark.parametrize("model_type", ["llama", "opt", "gpt2"])
def test_model_breakdown_counts_every_parameter_and_matches_dense(model_type):
    model = tiny_model(model_type)
    b = model_breakdown(model)
    assert b.params() == sum(p.numel() for p in model.parameters())
    dims = FFNDims.from_layout(ffn_layout(model))
    assert b.params(["ffn"]) == dims.params()
    counts = neuron_counts(_trace([[set()] * dims.n_layers], dims.intermediate_size))
    for fmt in ("fp16", "int4"):
        dense = _by_policy(policy_costs(dims, counts, [fmt]), fmt)["dense"]
        assert dense.bytes_per_token == b.bytes_per_token(fmt, ["ffn"])


def test_model_breakdown_equals_config_formula_on_tiny_llama():
    model = tiny_model("llama")
    spec = ArchSpec("tiny", HIDDEN, INTER, LAYERS, 4, 2, HIDDEN // 4, VOCAB, model.config.tie_word_embeddings)
    a, b = spec.breakdown(), model_breakdown(model)
    assert a.params() == b.params()
    for fmt in FORMATS:
        assert a.bytes_per_token(fmt) == b.bytes_per_token(fmt)


def test_collect_policy_traces_on_thresholded_model():
    model = tiny_model("llama")
    ids = torch.randint(0, 96, (2, 16))
    layout = ffn_layout(model)
    stats = collect_stats(model, ids, (Tap.GATE, Tap.UP, Tap.OUT), StatsConfig(progress=False))
    thr = stats.thresholds(0.5, "paper")
    mid, act = collect_policy_traces(model, ids, thr, max_tokens=24, progress=False)
    assert not is_sparsified(model)  # previous (dense) state restored
    assert mid.n_tokens == 24 and act.source["tap"] == "act"
    counts = neuron_counts(mid, act)  # checks A within G
    # Gate and up both ~50% zero -> neurons ~75% silent; act(gate) ~50%.
    assert 0.6 < float(counts.sparsity().mean()) < 0.9
    assert 0.35 < float(counts.gate_sparsity().mean()) < 0.65
    c = _by_policy(policy_costs(FFNDims.from_layout(layout), counts, ["fp16"]))
    assert c["oracle"].rel_bytes < c["gate_first"].rel_bytes < c["down_skip"].rel_bytes < 1
