"""The sparse decode path: a module swap whose single-token steps equal the hook-thresholded model."""

import pytest
import torch

from dormant.llm.adapters import UnsupportedModelError, ffn_layout
from dormant.llm.calibration import calibrate
from dormant.llm.configs import CalibrationConfig
from dormant.llm.sparse_decode import (
    SparseDecodeError,
    SparseDecodeMLP,
    SparseDecodeWarning,
    disable_sparse_decode_,
    enable_sparse_decode_,
    is_sparse_decode,
    kernel_sites,
    sparse_decode_stats,
)
from dormant.llm.sparsify import measure_sparsity, sparsify_, unsparsify_
from tests.llm.tiny import LAYERS, tiny_model

# past_key_values= works on every supported transformers version (5.x also takes cache=).
pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")

IDS = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(1))
CALIB = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(2))
PREFIX = 4
# fp32: kernel and hooks differ only in summation order (~1e-6 relative per layer).
FP32 = {"rtol": 1e-4, "atol": 1e-5}


def _stepwise_logits(model, ids=IDS, prefix=PREFIX):
    """Logits of a prefill of ``prefix`` tokens, then of each later token fed alone with the KV cache."""
    with torch.inference_mode():
        out = model(ids[:, :prefix], use_cache=True)
        logits = [out.logits[0, -1]]
        for t in range(prefix, ids.shape[1]):
            out = model(ids[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
            logits.append(out.logits[0, -1])
    return torch.stack(logits)


def _sparsified(model_type="llama", site="gate_act", **kw):
    model = tiny_model(model_type, **kw)
    thr = calibrate(model, CALIB, CalibrationConfig(site, [0.5], progress=False), model_id="tiny")
    sparsify_(model, thr)
    return model, thr


def test_swap_keeps_names_children_and_restores():
    model = tiny_model("llama")
    keys = list(model.state_dict())
    before = [layer.mlp for layer in model.model.layers]
    enable_sparse_decode_(model, impl="cpu")
    assert is_sparse_decode(model) and list(model.state_dict()) == keys
    for layer, old in zip(model.model.layers, before):
        assert isinstance(layer.mlp, SparseDecodeMLP) and layer.mlp.dense is old
        assert dict(layer.mlp.named_children()) == dict(old.named_children())  # the same module objects
    disable_sparse_decode_(model)
    assert not is_sparse_decode(model) and [layer.mlp for layer in model.model.layers] == before


@pytest.mark.parametrize("site", kernel_sites())
@pytest.mark.parametrize("model_type", ["llama", "gemma", "phi3"])  # SwiGLU, GeGLU-tanh, fused gate_up
def test_decode_steps_match_hook_path(model_type, site):
    model, _ = _sparsified(model_type, site)
    expected = _stepwise_logits(model)
    enable_sparse_decode_(model, impl="cpu")
    got = _stepwise_logits(model)
    torch.testing.assert_close(got, expected, **FP32)
    steps = IDS.shape[1] - PREFIX
    assert sparse_decode_stats(model) == {"kernel": LAYERS * steps, "dense:multi_token": LAYERS}


def test_reference_impl_through_the_module_matches_too():
    model, _ = _sparsified("llama", "paper")
    expected = _stepwise_logits(model)
    enable_sparse_decode_(model, impl="reference")
    torch.testing.assert_close(_stepwise_logits(model), expected, **FP32)


def test_enable_before_or_after_sparsify_is_the_same():
    model, thr = _sparsified("llama", "intermediate")
    expected = _stepwise_logits(model)
    unsparsify_(model)
    enable_sparse_decode_(model, impl="cpu")
    assert _stepwise_logits(model).ne(expected).any()  # dense now: no thresholds
    assert sparse_decode_stats(model)["dense:no_thresholds"] > 0
    sparsify_(model, thr)
    torch.testing.assert_close(_stepwise_logits(model), expected, **FP32)
    unsparsify_(model)
    disable_sparse_decode_(model)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_threshold_zero_is_the_dense_model():
    model, thr = _sparsified("llama", "gate_act")
    unsparsify_(model)
    dense = _stepwise_logits(model)
    sparsify_(model, thr.scaled(0.0))
    enable_sparse_decode_(model, impl="cpu")
    torch.testing.assert_close(_stepwise_logits(model), dense, **FP32)
    assert sparse_decode_stats(model)["kernel"] > 0


def test_inputs_site_has_no_kernel():
    model, thr = _sparsified("llama", "inputs")
    with pytest.raises(SparseDecodeError, match="gate_act, intermediate, paper"):
        enable_sparse_decode_(model, impl="cpu")
    unsparsify_(model)
    enable_sparse_decode_(model, impl="cpu")
    sparsify_(model, thr)  # after the swap: the FFN_IN hook lands on the new container
    with pytest.raises(SparseDecodeError, match="ffn_in"):
        _stepwise_logits(model)
    with pytest.raises(SparseDecodeError, match="hooks are registered"):
        disable_sparse_decode_(model)
    unsparsify_(model)
    disable_sparse_decode_(model)


def test_observers_see_every_step_through_the_dense_path():
    model, _ = _sparsified("llama", "gate_act")
    with measure_sparsity(model) as meter:
        expected = _stepwise_logits(model)
    enable_sparse_decode_(model, impl="cpu")
    with measure_sparsity(model) as meter2, pytest.warns(SparseDecodeWarning, match="hook other than sparsify_") as w:
        got = _stepwise_logits(model)
    assert sum(issubclass(x.category, SparseDecodeWarning) for x in w) == LAYERS  # once per layer, not per step
    torch.testing.assert_close(got, expected, **FP32)
    assert meter2.summary()["neuron"] == pytest.approx(meter.summary()["neuron"])
    stats = sparse_decode_stats(model)
    assert stats.get("kernel", 0) == 0 and stats["dense:hooks"] == LAYERS * (IDS.shape[1] - PREFIX)


def test_autograd_steps_stay_dense():
    model, _ = _sparsified("llama", "gate_act")
    enable_sparse_decode_(model, impl="cpu")
    with pytest.warns(SparseDecodeWarning, match="gradients are enabled"):
        model(IDS[:, :1]).logits.sum().backward()
    assert sparse_decode_stats(model) == {"dense:autograd": LAYERS}


def test_predictor_sets_the_active_neurons():
    model, _ = _sparsified("llama", "gate_act")
    expected = _stepwise_logits(model)
    n = ffn_layout(model).intermediate_size
    enable_sparse_decode_(
        model, impl="cpu", predictor=lambda layer, x: torch.arange(n)
    )  # all: thresholds decide
    torch.testing.assert_close(_stepwise_logits(model), expected, **FP32)
    # An empty prediction silences every FFN in decode steps (hooks on the container itself do not block the kernel).
    enable_sparse_decode_(model, impl="cpu", predictor=lambda layer, x: torch.zeros(n, dtype=torch.bool))
    outputs = []
    handle = model.model.layers[0].mlp.register_forward_hook(lambda m, args, out: outputs.append(out.clone()))
    _stepwise_logits(model)
    handle.remove()
    assert outputs[0].abs().sum() > 0  # prefill: dense
    assert (
        all(torch.equal(o, torch.zeros_like(o)) for o in outputs[1:])
        and len(outputs) == IDS.shape[1] - PREFIX + 1
    )
    assert sparse_decode_stats(model)["kernel"] == LAYERS * (IDS.shape[1] - PREFIX)


def test_weights_changed_after_enable_are_repacked():
    model, _ = _sparsified("llama", "paper")
    enable_sparse_decode_(model, impl="cpu")
    _stepwise_logits(model)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.mul_(-2.0)
            layer.mlp.gate_proj.weight.add_(0.01)
    got = _stepwise_logits(model)
    disable_sparse_decode_(model)
    torch.testing.assert_close(got, _stepwise_logits(model), **FP32)


def test_bfloat16_decode_is_close_to_hook_path():
    model, _ = _sparsified("llama", "gate_act")
    model.to(torch.bfloat16)
    expected = _stepwise_logits(model)
    enable_sparse_decode_(model, impl="cpu")
    got = _stepwise_logits(model)
    # bf16 logits of a random model: the FFN outputs may round one ulp apart (2^-8), then propagate.
    torch.testing.assert_close(got.float(), expected.float(), rtol=3e-2, atol=3e-2)
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.75


def test_unsupported_models_and_impls_raise():
    with pytest.raises(UnsupportedModelError, match="gated"):
        enable_sparse_decode_(tiny_model("opt"), impl="cpu")
    with pytest.raises(ValueError, match="float32, bfloat16"):
        enable_sparse_decode_(tiny_model("llama").half(), impl="cpu")
    with pytest.raises(ValueError, match="choose from"):
        enable_sparse_decode_(tiny_model("llama"), impl="numba")


@pytest.mark.slow
def test_generate_tokens_equal_hook_path_on_stories260k():
    from dormant.llm.models import load_model

    model, tok, _ = load_model("stories260k")
    prompt = tok("Once upon a time", return_tensors="pt").input_ids
    windows = torch.randint(3, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    for site in kernel_sites():
        sparsify_(model, calibrate(model, windows, CalibrationConfig(site, [0.5], progress=False), model_id="stories260k"))
        expected = model.generate(prompt, max_new_tokens=24, do_sample=False)
        enable_sparse_decode_(model, impl="cpu")
        got = model.generate(prompt, max_new_tokens=24, do_sample=False)
        stats = sparse_decode_stats(model)
        disable_sparse_decode_(model)
        unsparsify_(model)
        assert torch.equal(got, expected), site
        assert stats["kernel"] == 23 * model.config.num_hidden_layers, site
