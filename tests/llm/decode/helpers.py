"""Tiny random models of each supported family, random sparsity plans, and the HF hooks a plan stands for."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from dormant.llm.decode import PROJECTIONS, LayerPlan, SparsityPlan

BASE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=128, max_position_embeddings=256)  # fmt: skip
FAMILY_CONFIGS = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "gemma": {"head_dim": 16, "hidden_act": "gelu_pytorch_tanh"},
}


def tiny_model(model_type: str, seed: int = 0, **overrides):
    """A 2-layer random ``model_type`` causal LM (float32, eval). Norm weights are randomised too, so Gemma's
    ``1 + w`` and Qwen3's q/k norms are exercised, and biases are non-zero where the family has them."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = {**BASE, **FAMILY_CONFIGS[model_type], **overrides}
    config = AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.2 + (0.0 if model_type == "gemma" or name.endswith("bias") else 1.0))
    return model


def quantile_plan(n_layers: int, widths: dict[str, int], target: float, mid: float | None = None,
                  act: float | None = None, projections=PROJECTIONS, seed: int = 0) -> SparsityPlan:  # fmt: skip
    """Random per-channel input thresholds of roughly ``target`` density on unit-scale activations."""
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for _ in range(n_layers):
        inputs = {p: torch.rand(widths[p], generator=gen) * 2 * target for p in projections}
        layers.append(LayerPlan(inputs, mid=mid, act=act))
    return SparsityPlan(layers, {"kind": "test"})


def shared_input_plan(n_layers: int, widths: dict[str, int], target: float, mid: float | None = None,
                      seed: int = 0) -> SparsityPlan:  # fmt: skip
    """Like :func:`quantile_plan`, but projections reading one tensor share one vector (as TEAL calibrates
    them): q/k/v and gate/up, which the packers then fuse into one cols weight each."""
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for _ in range(n_layers):
        attn = torch.rand(widths["q"], generator=gen) * 2 * target
        ffn = torch.rand(widths["gate"], generator=gen) * 2 * target
        inputs = {"q": attn, "k": attn, "v": attn, "gate": ffn, "up": ffn,
                  "o": torch.rand(widths["o"], generator=gen) * 2 * target}  # fmt: skip
        layers.append(LayerPlan(inputs, mid=mid))
    return SparsityPlan(layers, {"kind": "test-shared"})


def widths_of(config) -> dict[str, int]:
    hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    d, a = config.hidden_size, config.num_attention_heads * hd
    return {"q": d, "k": d, "v": d, "o": a, "gate": d, "up": d, "down": config.intermediate_size}


@contextmanager
def zeroing_hooks(model, plan: SparsityPlan):
    """Forward hooks on a Llama-family HF model that zero exactly the tensors ``plan`` thresholds
    (``masked_fill(|v| < t, 0)``): projection inputs, ``act_fn``'s output (act) and down's input (mid)."""
    handles = []

    def pre(t):
        def hook(module, args):
            return (args[0].masked_fill(args[0].abs() < t, 0),) + tuple(args[1:])

        return hook

    def post(t):
        def hook(module, args, out):
            return out.masked_fill(out.abs() < t, 0)

        return hook

    try:
        for n, layer in enumerate(model.model.layers):
            lp = plan.layers[n]
            att, mlp = layer.self_attn, layer.mlp
            mods = {"q": att.q_proj, "k": att.k_proj, "v": att.v_proj, "o": att.o_proj,
                    "gate": mlp.gate_proj, "up": mlp.up_proj, "down": mlp.down_proj}  # fmt: skip
            for p, t in lp.inputs.items():
                handles.append(mods[p].register_forward_pre_hook(pre(t)))
            if lp.act is not None:
                handles.append(mlp.act_fn.register_forward_hook(post(lp.act)))
            if lp.mid is not None:
                handles.append(mlp.down_proj.register_forward_pre_hook(pre(lp.mid)))
        yield model
    finally:
        for h in handles:
            h.remove()


def write_tiny_gguf(path: Path, model, types: dict[str, str]) -> Path:
    """Write a llama-arch GGUF of a tiny HF Llama, q/k permuted as llama.cpp's converter does.

    ``types``: projection (or ``"embedding"``) -> GGUF type name (F32, F16, Q8_0, Q4_0, Q4_1).
    """
    import gguf
    from gguf import GGMLQuantizationType as T
    from gguf.quants import quantize

    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"t{i}".encode() for i in range(c.vocab_size)])
    w.add_token_scores([0.0] * c.vocab_size)
    w.add_token_types([1] * c.vocab_size)

    def perm(x, n_heads):
        return x.reshape(n_heads, 2, x.shape[0] // n_heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    def add(name, t, type_name):
        a = t.detach().numpy().astype(np.float32)
        qt = getattr(T, type_name)
        if qt == T.F32:
            w.add_tensor(name, a)
        else:
            w.add_tensor(name, quantize(a, qt), raw_dtype=qt)

    sd = model.state_dict()
    add("token_embd.weight", sd["model.embed_tokens.weight"], types.get("embedding", "F32"))
    add("output_norm.weight", sd["model.norm.weight"], "F32")
    names = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output", "gate": "ffn_gate", "up": "ffn_up",
             "down": "ffn_down"}  # fmt: skip
    hf = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
          "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}  # fmt: skip
    for n in range(c.num_hidden_layers):
        pre = f"model.layers.{n}."
        for p in PROJECTIONS:
            t = sd[pre + hf[p] + ".weight"]
            if p == "q":
                t = perm(t, c.num_attention_heads)
            if p == "k":
                t = perm(t, c.num_key_value_heads)
            add(f"blk.{n}.{names[p]}.weight", t, types.get(p, "F32"))
        add(f"blk.{n}.attn_norm.weight", sd[pre + "input_layernorm.weight"], "F32")
        add(f"blk.{n}.ffn_norm.weight", sd[pre + "post_attention_layernorm.weight"], "F32")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
