import pytest
import torch

from dormant.llm.adapters import FFN_SPECS, Tap, UnsupportedModelError, ffn_layout
from dormant.llm.hooks import tap_hooks
from tests.llm.tiny import HIDDEN, INTER, LAYERS, MODEL_TYPES, tiny_model


def test_the_table_covers_the_required_architectures():
    required = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "opt", "gpt2", "gpt_neox"}
    assert required <= set(FFN_SPECS) and set(MODEL_TYPES) == required


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_layout_and_taps_see_the_real_ffn(model_type):
    model = tiny_model(model_type)
    layout = ffn_layout(model)
    assert (layout.n_layers, layout.hidden_size, layout.intermediate_size) == (LAYERS, HIDDEN, INTER)
    assert layout.gated == (model_type not in ("opt", "gpt2", "gpt_neox"))
    seen = {}

    def keep(layer, tap, x):
        seen[(layer, tap)] = x.detach().reshape(-1, x.shape[-1]).clone()

    ids = torch.randint(0, 96, (1, 7))
    with torch.inference_mode(), tap_hooks(layout, layout.taps(), keep):
        model(ids)
    # every tap in every layer; the LM head's input once, under the last layer
    assert set(seen) == {(layer, t) for layer in range(LAYERS) for t in layout.taps()
                         if t is not Tap.HEAD_IN or layer == LAYERS - 1}
    for layer in range(LAYERS):
        w = _detached(layout.weights(layer))
        x = seen[(layer, Tap.FFN_IN)]
        up = x @ w.up.T + (w.up_bias if w.up_bias is not None else 0)
        torch.testing.assert_close(seen[(layer, Tap.UP)], up, rtol=1e-5, atol=1e-5)
        if layout.gated:
            gate = x @ w.gate.T + (w.gate_bias if w.gate_bias is not None else 0)
            torch.testing.assert_close(seen[(layer, Tap.GATE)], gate, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(seen[(layer, Tap.MID)], seen[(layer, Tap.ACT)] * up, rtol=1e-5, atol=1e-5)
        else:
            torch.testing.assert_close(seen[(layer, Tap.MID)], seen[(layer, Tap.ACT)], rtol=1e-5, atol=1e-5)
        out = seen[(layer, Tap.MID)] @ w.down.T + (w.down_bias if w.down_bias is not None else 0)
        torch.testing.assert_close(seen[(layer, Tap.OUT)], out, rtol=1e-4, atol=1e-5)


def _detached(w):
    from dataclasses import fields, replace

    return replace(w, **{f.name: getattr(w, f.name).detach() for f in fields(w) if getattr(w, f.name) is not None})


def test_unsupported_model_lists_supported_types():
    model = torch.nn.Linear(2, 2)
    model.config = type("C", (), {"model_type": "mamba"})()
    with pytest.raises(UnsupportedModelError, match="supported: .*gpt2.*llama"):
        ffn_layout(model)


def test_non_gated_has_no_gate_tap():
    layout = ffn_layout(tiny_model("gpt2"))
    with pytest.raises(ValueError, match="no 'gate' tap"):
        layout.tap_point(Tap.GATE)
