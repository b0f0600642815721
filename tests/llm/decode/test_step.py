"""The C decode step equals its torch specification (ReferenceStep) for every family, format and plan kind."""

import pytest
import torch

from dormant.llm.decode import Engine, ReferenceStep, SparsityPlan, pack_model, random_weights
from tests.llm.decode.helpers import FAMILY_CONFIGS, quantile_plan, shared_input_plan, tiny_model, widths_of

FORMATS = ["fp32", "bf16", "q8_0", "q4_0", "q4_1"]
# Float formats: the same fp32 products summed in another order (a few ulps of the logit scale).
# Quantised formats: the integer block dots are exact, but C and torch compute the norms in a different
# order, so an input can round to the neighbouring 8-bit level, moving a logit by about one step
# (~1e-3 of its scale); observed differences are ~1e-7.
TOL = {"fp32": 2e-5, "bf16": 2e-5, "q8_0": 2e-3, "q4_0": 2e-3, "q4_1": 2e-3}


def plans(config):
    w = widths_of(config)
    return {
        "dense": None,
        "inputs+mid": quantile_plan(config.num_hidden_layers, w, 0.4, mid=0.02),  # all 7 projections
        "cats": quantile_plan(config.num_hidden_layers, w, 0.4, act=0.05, mid=0.005, projections=["q", "o", "gate", "down"]),
        "fused": shared_input_plan(config.num_hidden_layers, w, 0.4, mid=0.02),
        "inputs+head": with_head(quantile_plan(config.num_hidden_layers, w, 0.4, mid=0.02), config.hidden_size),
    }


def with_head(plan: SparsityPlan, dim: int) -> SparsityPlan:
    """``plan`` with random thresholds on the LM head's input too (a cols head)."""
    return SparsityPlan(plan.layers, plan.meta, head=torch.rand(dim, generator=torch.Generator().manual_seed(3)) * 0.8)


def run_both(weights, ids, **engine_kw):
    engine, ref = Engine(weights, max_seq=32, **engine_kw), ReferenceStep(weights.decoder, 32)
    got = torch.stack([engine.step(int(t), i) for i, t in enumerate(ids)])
    want = torch.stack([ref.step(int(t), i) for i, t in enumerate(ids)])
    return got, want


@pytest.mark.parametrize("model_type", list(FAMILY_CONFIGS))
@pytest.mark.parametrize("fmt", FORMATS)
def test_c_step_matches_reference(model_type, fmt):
    model = tiny_model(model_type)
    ids = torch.randint(0, model.config.vocab_size, (8,), generator=torch.Generator().manual_seed(1))
    for name, plan in plans(model.config).items():
        weights = pack_model(model, fmt, plan=plan, positions=32)
        fused = [lw.qkv is not None and lw.gate_up is not None for lw in weights.decoder.layers]
        assert all(fused) == (name == "fused") and any(fused) == (name == "fused")
        # 2 threads with every cols projection split by columns: partial sums and the pending residual
        for kw in ({}, {"threads": 2, "column_split": "columns"}):
            got, want = run_both(weights, ids, **kw)
            scale = float(want.abs().max())
            torch.testing.assert_close(got, want, rtol=0, atol=TOL[fmt] * scale, msg=f"{model_type} {fmt} {name} {kw}")


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_1"])
def test_odd_intermediate_size_pads_blocks(fmt):
    """stories260K-like shapes: intermediate 172 is not a multiple of 32 (blocks are zero-padded)."""
    model = tiny_model("llama", intermediate_size=172, head_dim=8, num_attention_heads=8, num_key_value_heads=4)
    ids = torch.arange(6)
    for plan in plans(model.config).values():
        got, want = run_both(pack_model(model, fmt, plan=plan, positions=32), ids)
        torch.testing.assert_close(got, want, rtol=0, atol=TOL[fmt] * float(want.abs().max()))


@pytest.mark.parametrize("fmt", ["q4_0", "q8_0"])
def test_random_weights_run_and_match_reference(fmt):
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, tie_word_embeddings=False)  # fmt: skip
    plan = quantile_plan(2, widths_of(config), 0.4, mid=0.02)
    weights = random_weights(config, fmt, plan=plan, n_layers=2, positions=32)
    assert weights.decoder.n_layers == 2 and weights.decoder.head is not weights.decoder.embedding
    got, want = run_both(weights, torch.arange(5))
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=0, atol=TOL[fmt] * float(want.abs().max()))


@pytest.mark.parametrize("kind", ["cats", "fused", "inputs+mid"])
def test_thread_count_does_not_change_the_result(kind):
    """Split by outputs, every output is summed by one thread in a fixed order: any thread count gives the same
    bits. Split by columns (partials summed in thread order), the sums are reordered: equal within tolerance."""
    model = tiny_model("qwen2", intermediate_size=224)
    weights = pack_model(model, "q4_0", plan=plans(model.config)[kind], positions=32)
    ids = torch.arange(7)

    def run(n, split):
        engine = Engine(weights, 32, threads=n, column_split=split)
        return torch.stack([engine.step(int(t), i) for i, t in enumerate(ids)])

    one = run(1, "outputs")
    assert torch.equal(one, run(2, "outputs")) and torch.equal(one, run(3, "outputs"))
    for n in (2, 3):
        torch.testing.assert_close(run(n, "columns"), one, rtol=0, atol=TOL["q4_0"] * float(one.abs().max()))
        torch.testing.assert_close(run(n, "auto"), one, rtol=0, atol=TOL["q4_0"] * float(one.abs().max()))


@pytest.mark.parametrize("flags", [("-mno-avx512f",), ("-mno-avx2", "-mno-fma", "-mno-f16c", "-mno-avx512f")],
                         ids=["avx2", "scalar"])  # fmt: skip
def test_compiled_fallbacks_match_reference(flags):
    from dormant.kernels.decode_step import DecodeStep

    model = tiny_model("gemma")  # GeGLU: the vector tanh path; fused and CATS plans cover every FFN branch
    ids = torch.arange(6)
    for name in ("fused", "cats"):
        weights = pack_model(model, "q4_1", plan=plans(model.config)[name], positions=16)
        step, ref = DecodeStep(weights.decoder, 16, extra_flags=flags), ReferenceStep(weights.decoder, 16)
        got = torch.stack([step.step(int(t), i) for i, t in enumerate(ids)])
        want = torch.stack([ref.step(int(t), i) for i, t in enumerate(ids)])
        torch.testing.assert_close(got, want, rtol=0, atol=TOL["q4_1"] * float(want.abs().max()))
