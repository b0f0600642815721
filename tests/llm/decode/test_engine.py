"""The engine in fp32 is the Hugging Face model: dense, and with a plan equal to hooks zeroing the same tensors."""

import pytest
import torch

from dormant.llm.decode import Engine, LayerPlan, SparsityPlan, UnsupportedDecodeError, pack_model
from tests.llm.decode.helpers import (
    FAMILY_CONFIGS,
    quantile_plan,
    shared_input_plan,
    tiny_model,
    widths_of,
    zeroing_hooks,
)

# fp32 engine vs HF fp32: the same operations, different summation order and exp/rsqrt implementations.
ATOL_SCALE = 1e-5


def engine_logits(engine, ids):
    return torch.stack([engine.step(int(t), i) for i, t in enumerate(ids)])


def hf_logits(model, ids):
    with torch.no_grad():
        return model(ids[None]).logits[0]


def assert_logits_close(got, want):
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL_SCALE * float(want.abs().max()))


@pytest.mark.parametrize("model_type", list(FAMILY_CONFIGS))
def test_fp32_engine_is_the_hf_model(model_type):
    model = tiny_model(model_type)
    ids = torch.randint(0, 128, (12,), generator=torch.Generator().manual_seed(2))
    assert_logits_close(engine_logits(Engine(pack_model(model, "fp32", positions=64), 64), ids), hf_logits(model, ids))


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gemma"])
@pytest.mark.parametrize("kind", ["inputs+mid", "cats", "fused"])
def test_plan_equals_hf_with_zeroing_hooks(model_type, kind):
    model = tiny_model(model_type)
    w = widths_of(model.config)
    if kind == "inputs+mid":
        plan = quantile_plan(2, w, 0.4, mid=0.02)
    elif kind == "fused":  # q/k/v and gate/up share thresholds: one cols weight each (qwen2: with the qkv bias)
        plan = shared_input_plan(2, w, 0.4, mid=0.02)
    else:
        plan = quantile_plan(2, w, 0.4, act=0.05, mid=0.005, projections=["q", "k", "v", "o", "gate", "down"])
    ids = torch.randint(0, 128, (12,), generator=torch.Generator().manual_seed(3))
    engine = Engine(pack_model(model, "fp32", plan=plan, positions=64), 64)
    got = engine_logits(engine, ids)
    with zeroing_hooks(model, plan):
        want = hf_logits(model, ids)
    assert_logits_close(got, want)
    assert (got - hf_logits(model, ids)).abs().max() > 10 * ATOL_SCALE * float(want.abs().max())  # the plan bites
    density = engine.density()
    assert set(density) >= set(plan.layers[0].inputs) and all(0 < d < 1 for d in density.values())


def test_threshold_zero_plan_is_dense_exactly():
    model = tiny_model("llama")
    ids = torch.arange(10)
    zero = SparsityPlan([LayerPlan({p: torch.zeros(n) for p, n in widths_of(model.config).items()}) for _ in range(2)])
    dense = engine_logits(Engine(pack_model(model, "fp32", positions=32), 32), ids)
    sparse_engine = Engine(pack_model(model, "fp32", plan=zero, positions=32), 32)
    assert_logits_close(engine_logits(sparse_engine, ids), dense)  # cols vs rows: another summation order
    assert all(d > 0.99 for d in sparse_engine.density().values())  # only exact zeros are skipped


@pytest.fixture(scope="module")
def stories():
    from dormant.llm.models import load_model

    model, tok, _ = load_model("stories260k")
    return model, tok


def test_stories260k_greedy_tokens_equal_hf_generate(stories):
    model, tok = stories
    ids = tok("Once upon a time, there was a little", return_tensors="pt").input_ids
    with torch.no_grad():
        hf = model.generate(ids, max_new_tokens=40, do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
    engine = Engine(pack_model(model, "fp32", positions=128), 128)
    assert engine.generate(ids[0], 40) == hf
    full = torch.tensor(ids[0].tolist() + hf[:-1])
    assert_logits_close(engine_logits(engine, full), hf_logits(model, full))


def test_prefill_then_steps_equals_stepping_from_scratch(stories):
    model, _ = stories
    engine = Engine(pack_model(model, "q8_0", positions=64), 64)
    ids = list(range(3, 23))
    scratch = engine_logits(engine, torch.tensor(ids))
    engine.reset()
    last = engine.prefill(ids[:12])
    assert torch.equal(last, scratch[11])
    steps = torch.stack([engine.step(t, 12 + i) for i, t in enumerate(ids[12:])])
    assert torch.equal(steps, scratch[12:])


def test_batch_rows_are_independent_sequences(stories):
    model, _ = stories
    plan = quantile_plan(5, widths_of(model.config), 0.3, mid=0.01)
    weights = pack_model(model, "q4_0", plan=plan, positions=64)
    prompts = [[1, 5, 9, 13], [1, 40], [1, 7, 7, 7, 7, 7, 2]]
    single = Engine(weights, 64)
    want = []
    for p in prompts:
        single.reset()
        want.append(single.generate(p, 8))
    batched = Engine(weights, 64, batch=3)
    assert batched.generate_batch(prompts, 8) == want
    with pytest.raises(ValueError, match="batch=3"):
        batched.generate_batch(prompts * 2, 2)


def test_trace_quantile_thresholds_hit_the_target_density(stories):
    """TEAL-style calibration from the engine's own trace: per projection, the 50% quantile of |x|."""
    model, _ = stories
    dense = Engine(pack_model(model, "fp32", positions=128), 128)
    calib = list(range(1, 65))
    tr = dense.trace(calib)
    assert tr["attn_in"].shape == (64, 5, 64) and tr["mid"].shape == (64, 5, 172)
    site = {"q": "attn_in", "k": "attn_in", "v": "attn_in", "o": "o_in", "gate": "ffn_in", "up": "ffn_in", "down": "mid"}
    layers = [LayerPlan({p: torch.full((tr[s].shape[-1],), float(tr[s][:, n].abs().quantile(0.5))) for p, s in site.items()})
              for n in range(5)]  # fmt: skip
    sparse = Engine(pack_model(model, "fp32", plan=SparsityPlan(layers), positions=128), 128)
    for i, t in enumerate(calib):
        sparse.step(t, i)
    density = sparse.density()
    assert set(density) == set(site)
    for p in ("q", "gate"):  # the first projection of each block sees exactly the calibration inputs' distribution
        assert abs(density[p] - 0.5) < 0.1, density
    assert all(0.3 < d < 0.7 for d in density.values()), density


def test_unsupported_inputs_raise_errors_that_list_options():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50)).eval()
    with pytest.raises(UnsupportedDecodeError, match="supported: llama, mistral, qwen2, qwen3, gemma"):
        pack_model(gpt2)
    model = tiny_model("llama")
    with pytest.raises(UnsupportedDecodeError, match="supported: fp32, bf16, q8_0, q4_0, q4_1"):
        pack_model(model, "q5_k")
    with pytest.raises(ValueError, match="act .* up input threshold"):
        LayerPlan({"up": torch.zeros(64)}, act=0.1)
    with pytest.raises(ValueError, match="unknown projection 'w1'"):
        LayerPlan({"w1": torch.zeros(64)})
    with pytest.raises(ValueError, match="3 layers, the model 2"):
        pack_model(model, plan=SparsityPlan.dense(3))
    with pytest.raises(ValueError, match="63 thresholds for 64"):
        pack_model(model, plan=SparsityPlan([LayerPlan({"q": torch.zeros(63)}), LayerPlan()]))
    mistral = tiny_model("mistral", sliding_window=16)
    with pytest.raises(UnsupportedDecodeError, match="sliding window of 16"):
        Engine(pack_model(mistral, positions=64), max_seq=32)
    engine = Engine(pack_model(model, positions=16), 16)
    with pytest.raises(IndexError, match=r"position 16 outside the KV cache \[0, 16\)"):
        engine.step(1, 16)
    with pytest.raises(IndexError, match="vocabulary"):
        engine.step(128, 0)


def test_weights_whose_layout_disagrees_with_the_plan_are_rejected():
    model = tiny_model("llama")
    weights = pack_model(model, "q8_0", positions=16)
    weights.decoder.layers[1].thresholds = {"gate": torch.zeros(64)}  # plan changed, weights not re-packed
    with pytest.raises(ValueError, match="layer 1 gate: the plan needs the 'cols' layout, the weight is 'rows'"):
        Engine(weights, 16)
