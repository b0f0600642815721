"""Tiny random Hugging Face causal LMs built from configs (no weights, no downloads)."""

from __future__ import annotations

import torch

HIDDEN, INTER, LAYERS, VOCAB = 32, 48, 2, 96

_CONFIGS = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": {"head_dim": 8},
    "gemma": {"head_dim": 8},
    "gemma2": {"head_dim": 8},
    "gemma3_text": {"head_dim": 8},
    "phi3": {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    "opt": {"ffn_dim": INTER, "word_embed_proj_dim": HIDDEN, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    "gpt2": {"n_embd": HIDDEN, "n_inner": INTER, "n_layer": LAYERS, "n_head": 4, "bos_token_id": 1, "eos_token_id": 2},
    "gpt_neox": {},
}
MODEL_TYPES = tuple(_CONFIGS)


def tiny_model(model_type: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A 2-layer random model of ``model_type`` in eval mode, float32, CPU."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256)
    kw.update(_CONFIGS[model_type])
    kw.update(overrides)
    if model_type in ("opt", "gpt2"):
        for k in ("intermediate_size", "num_key_value_heads"):
            kw.pop(k)
    config = AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    return model.float().eval()
