"""Hugging Face causal LMs -> the engine's :class:`~dormant.kernels.decode_step.DecoderWeights`.

Three sources, one result (:class:`EngineWeights`):

* :func:`pack_model` -- a loaded HF model, each projection quantised to a chosen format;
* :func:`pack_gguf` -- a ``.gguf`` file, keeping the file's own blocks where the kernels read the type;
* :func:`random_weights` -- random weights of the right shapes built straight from a transformers
  config (no float model in memory), for speed measurements at shapes too big to load here.

:data:`FAMILIES` is the dispatch table from ``model_type`` to what differs between the supported
pre-norm decoders (qkv bias, q/k norms, Gemma's ``1 + w`` norms, ``sqrt(d)`` embedding scale and GeGLU).
Each projection is stored in the ``rows`` layout, or in ``cols`` when the plan thresholds its input
(``down`` also for ``mid`` / ``act``); the LM head likewise (a cols copy beside the rows embedding when
tied). Rotary tables come from the model's own transformers rotary class (so ``llama3`` and other static scalings are exactly HF's).

GGUF types read natively (``rows`` layout, byte for byte): F32, BF16, Q8_0, Q4_0, Q4_1. Any other
type, and any projection the plan needs in ``cols``, is dequantised (``gguf.quants``) and re-packed in
``convert_to`` (an error when it is not given) -- a cols copy of a Q4 tensor is therefore a second
quantisation of the dequantised values, not the file's blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dormant.kernels.blocks import FORMATS, QK, PackedWeight, block_format, from_gguf_rows, pack
from dormant.kernels.decode_step import PROJECTIONS, DecoderWeights, LayerWeights
from dormant.llm.decode.plan import SparsityPlan

__all__ = [
    "Family",
    "FAMILIES",
    "WEIGHT_FORMATS",
    "GGUF_NATIVE",
    "EngineWeights",
    "UnsupportedDecodeError",
    "family_of",
    "pack_model",
    "pack_gguf",
    "random_weights",
    "rope_tables",
]


class UnsupportedDecodeError(ValueError):
    """A model, format or option the lean decode engine does not support (the message lists what is)."""


@dataclass(frozen=True)
class Family:
    """What one ``model_type`` needs beyond the Llama block.

    Attributes:
        rotary: ``module:Class`` of the model's rotary embedding in transformers.
        qkv_bias: q/k/v always have a bias (Qwen2); else ``config.attention_bias`` decides (q/k/v/o).
        qk_norm: per-head RMSNorm on q and k before RoPE (Qwen3).
        norm_offset: added to every RMSNorm weight (Gemma stores ``w`` and multiplies by ``1 + w``).
        scale_embedding: multiply the embedding by ``sqrt(hidden_size)`` (Gemma).
    """

    rotary: str
    qkv_bias: bool = False
    qk_norm: bool = False
    norm_offset: float = 0.0
    scale_embedding: bool = False


FAMILIES: dict[str, Family] = {
    "llama": Family("transformers.models.llama.modeling_llama:LlamaRotaryEmbedding"),
    "mistral": Family("transformers.models.mistral.modeling_mistral:MistralRotaryEmbedding"),
    "qwen2": Family("transformers.models.qwen2.modeling_qwen2:Qwen2RotaryEmbedding", qkv_bias=True),
    "qwen3": Family("transformers.models.qwen3.modeling_qwen3:Qwen3RotaryEmbedding", qk_norm=True),
    "gemma": Family(
        "transformers.models.gemma.modeling_gemma:GemmaRotaryEmbedding", norm_offset=1.0, scale_embedding=True
    ),
}
_ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
_STATIC_ROPE = ("default", "linear", "llama3", "yarn")  # position-independent inv_freq: one table is exact
# Engine weight formats -> kernel format ("gguf": keep each GGUF tensor's own type).
WEIGHT_FORMATS = {"fp32": "f32", "bf16": "bf16", "q8_0": "q8_0", "q4_0": "q4_0", "q4_1": "q4_1", "gguf": None}
GGUF_NATIVE = {"F32": "f32", "BF16": "bf16", "Q8_0": "q8_0", "Q4_0": "q4_0", "Q4_1": "q4_1"}


@dataclass
class EngineWeights:
    """Engine-ready weights plus what the engine checks against.

    Attributes:
        decoder: the kernel-level description.
        model_type: the HF ``model_type``.
        fmt: the weight format asked for (a key of :data:`WEIGHT_FORMATS`).
        max_context: the longest KV cache that is exact (a sliding window) or None.
        plan: the sparsity plan the layouts were chosen for.
        info: provenance (source, formats of each tensor kind, conversions made).
    """

    decoder: DecoderWeights
    model_type: str
    fmt: str
    max_context: int | None
    plan: SparsityPlan
    info: dict[str, Any] = field(default_factory=dict)


def family_of(config) -> Family:
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedDecodeError(
            f"model_type {model_type!r} is not supported by the lean decode engine; supported: {', '.join(FAMILIES)}"
        )
    return FAMILIES[model_type]


def _kernel_format(fmt: str) -> str:
    if fmt not in WEIGHT_FORMATS or WEIGHT_FORMATS[fmt] is None:
        choices = [k for k, v in WEIGHT_FORMATS.items() if v is not None]
        raise UnsupportedDecodeError(f"weight format {fmt!r} not supported here; supported: {', '.join(choices)}")
    return WEIGHT_FORMATS[fmt]


def _shape(config) -> dict[str, int]:
    hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return {
        "dim": config.hidden_size,
        "n_heads": config.num_attention_heads,
        "n_kv_heads": getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        "head_dim": hd,
        "inter": config.intermediate_size,
        "vocab": config.vocab_size,
        "n_layers": config.num_hidden_layers,
    }


def _check_config(config) -> tuple[Family, str, int | None]:
    """The family, activation and exact context length, or an error naming what is unsupported."""
    fam = family_of(config)
    act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
    if config.model_type == "gemma" and act == "gelu":
        act = "gelu_pytorch_tanh"  # transformers maps Gemma's legacy "gelu" to the tanh approximation too
    if act not in _ACTIVATIONS:
        raise UnsupportedDecodeError(f"activation {act!r} not supported; supported: {', '.join(_ACTIVATIONS)}")
    if getattr(config, "mlp_bias", False):
        raise UnsupportedDecodeError("FFN biases (mlp_bias=True) are not supported")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") not in _STATIC_ROPE:
        raise UnsupportedDecodeError(
            f"rope_type {rope.get('rope_type')!r} is not supported (its frequencies depend on the sequence length); "
            f"supported: {', '.join(_STATIC_ROPE)}"
        )
    if getattr(config, "partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedDecodeError("partial rotary embeddings are not supported")
    window = getattr(config, "sliding_window", None)
    if config.model_type == "qwen2" and not getattr(config, "use_sliding_window", False):
        window = None
    return fam, _ACTIVATIONS[act], window


def rope_tables(config, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin`` ``[positions, head_dim]`` float32 from the model's own transformers rotary class."""
    import importlib

    module, cls = family_of(config).rotary.split(":")
    rotary = getattr(importlib.import_module(module), cls)(config)
    pos = torch.arange(positions)[None]
    with torch.no_grad():
        cos, sin = rotary(torch.zeros(1, dtype=torch.float32), pos)
    return cos[0].float().contiguous(), sin[0].float().contiguous()


def _plan_for(plan: SparsityPlan | None, n_layers: int, in_features: dict[str, int]) -> SparsityPlan:
    plan = SparsityPlan.dense(n_layers) if plan is None else plan
    plan.check(n_layers, in_features)
    return plan


def _out_features(s: dict[str, int]) -> dict[str, int]:
    a, kv = s["n_heads"] * s["head_dim"], s["n_kv_heads"] * s["head_dim"]
    return {"q": a, "k": kv, "v": kv, "o": s["dim"], "gate": s["inter"], "up": s["inter"], "down": s["dim"]}


def _in_features(s: dict[str, int]) -> dict[str, int]:
    a = s["n_heads"] * s["head_dim"]
    return {"q": s["dim"], "k": s["dim"], "v": s["dim"], "o": a, "gate": s["dim"], "up": s["dim"], "down": s["inter"],
            "head": s["dim"]}


def _decoder(config, s, fam, act, embedding, head, final_norm, layers, positions, plan) -> DecoderWeights:
    cos, sin = rope_tables(config, positions)
    return DecoderWeights(
        dim=s["dim"], n_heads=s["n_heads"], n_kv_heads=s["n_kv_heads"], head_dim=s["head_dim"], inter=s["inter"],
        vocab=s["vocab"], eps=float(getattr(config, "rms_norm_eps", 1e-6)), attn_scale=s["head_dim"] ** -0.5,
        activation=act, embedding=embedding, head=head, final_norm=final_norm, rope_cos=cos, rope_sin=sin,
        layers=layers, emb_scale=math.sqrt(s["dim"]) if fam.scale_embedding else 1.0, head_thresholds=plan.head,
    )  # fmt: skip


def _norm(w: torch.Tensor, fam: Family) -> torch.Tensor:
    return (w.detach().float() + fam.norm_offset).contiguous()


FUSIONS = {"qkv": ("q", "k", "v"), "gate_up": ("gate", "up")}


def _fusions(lp, out_features: dict[str, int], fuse: bool) -> dict[str, tuple[str, ...]]:
    """The projection groups of one layer stored as one cols weight: those sharing an input whose plan gives
    every part the same threshold vector (TEAL calibrates them on the same tensor), with whole-block parts."""
    if not fuse:
        return {}
    out = {}
    for name, parts in FUSIONS.items():
        t = [lp.inputs.get(p) for p in parts]
        if t[0] is None or any(x is None or not torch.equal(x, t[0]) for x in t):
            continue
        if any(out_features[p] % QK for p in parts) or (name == "gate_up" and lp.act is not None):
            continue
        out[name] = parts
    return out


def _layer(tensors: dict[str, Any], lp, fam: Family) -> LayerWeights:
    """A LayerWeights from packed projections (None: part of a fused weight) and float extras, with the plan's
    thresholds."""
    return LayerWeights(
        attn_norm=tensors["attn_norm"], ffn_norm=tensors["ffn_norm"],
        **{p: tensors.get(p) for p in PROJECTIONS},
        q_bias=tensors.get("q_bias"), k_bias=tensors.get("k_bias"), v_bias=tensors.get("v_bias"),
        o_bias=tensors.get("o_bias"), q_norm=tensors.get("q_norm"), k_norm=tensors.get("k_norm"),
        thresholds=dict(lp.inputs), mid=lp.mid, act=lp.act, qkv=tensors.get("qkv"),
        gate_up=tensors.get("gate_up"), qkv_bias=tensors.get("qkv_bias"),
    )  # fmt: skip


def _fuse_biases(t: dict[str, Any], groups: dict) -> None:
    """Move q/k/v biases of a fused qkv into ``qkv_bias`` (zeros for parts without one)."""
    if "qkv" in groups and any(f"{p}_bias" in t for p in "qkv"):
        parts = [t.pop(f"{p}_bias", None) for p in "qkv"]
        sizes = {p: t["_out"][p] for p in "qkv"}
        t["qkv_bias"] = torch.cat([b if b is not None else torch.zeros(sizes[p]) for p, b in zip("qkv", parts)])


def pack_model(
    model, fmt: str = "fp32", plan: SparsityPlan | None = None, head_fmt: str | None = None, positions: int = 4096,
    fuse: bool = True,
) -> EngineWeights:
    """Pack a loaded HF causal LM for the engine.

    Args:
        model: a ``*ForCausalLM`` of a :data:`FAMILIES` type (any dtype; weights are read as float).
        fmt: the projections' format (``fp32``, ``bf16``, ``q8_0``, ``q4_0``, ``q4_1``).
        plan: the sparsity plan (None: dense); it decides each projection's layout.
        head_fmt: format of the embedding and LM head (default ``fmt``).
        positions: rows of the rotary tables (the longest KV cache an engine can use).
        fuse: store q/k/v (gate/up) as one cols weight where the plan gives them one threshold vector.

    Returns:
        The :class:`EngineWeights`.
    """
    config = model.config
    fam, act, window = _check_config(config)
    kf = _kernel_format(fmt)
    hf = _kernel_format(head_fmt or fmt)
    s = _shape(config)
    plan = _plan_for(plan, s["n_layers"], _in_features(s))
    bias = fam.qkv_bias or bool(getattr(config, "attention_bias", False))
    layers = []
    with torch.no_grad():
        for n, layer in enumerate(model.model.layers):
            att, mlp = layer.self_attn, layer.mlp
            mods = {"q": att.q_proj, "k": att.k_proj, "v": att.v_proj, "o": att.o_proj,
                    "gate": mlp.gate_proj, "up": mlp.up_proj, "down": mlp.down_proj}  # fmt: skip
            cols = plan.sparse_projections(n)
            groups = _fusions(plan.layers[n], _out_features(s), fuse)
            fused = {p for parts in groups.values() for p in parts}
            t: dict[str, Any] = {p: pack(m.weight, kf, "cols" if p in cols else "rows") for p, m in mods.items()
                                 if p not in fused}  # fmt: skip
            for name, parts in groups.items():
                t[name] = pack(torch.cat([mods[p].weight for p in parts]), kf, "cols")
            t["_out"] = _out_features(s)
            t["attn_norm"] = _norm(layer.input_layernorm.weight, fam)
            t["ffn_norm"] = _norm(layer.post_attention_layernorm.weight, fam)
            if bias:
                for p in ("q", "k", "v", "o"):
                    if mods[p].bias is not None:
                        t[f"{p}_bias"] = mods[p].bias.detach().float()
            if fam.qk_norm:
                t["q_norm"], t["k_norm"] = _norm(att.q_norm.weight, fam), _norm(att.k_norm.weight, fam)
            _fuse_biases(t, groups)
            layers.append(_layer(t, plan.layers[n], fam))
        emb_w = model.get_input_embeddings().weight
        head_w = model.get_output_embeddings().weight
        embedding = pack(emb_w, hf, "rows")
        tied = head_w.data_ptr() == emb_w.data_ptr()
        head_layout = "rows" if plan.head is None else "cols"  # a sparse head: a cols copy, even when tied
        head = embedding if tied and head_layout == "rows" else pack(head_w, hf, head_layout)
        final_norm = _norm(model.model.norm.weight, fam)
    dec = _decoder(config, s, fam, act, embedding, head, final_norm, layers, positions, plan)
    info = {"source": "hf", "projections": kf, "head": hf, "tied_head": tied}
    return EngineWeights(dec, config.model_type, fmt, window, plan, info)


# GGUF -----------------------------------------------------------------------------------------

_GGUF_NAMES = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output", "gate": "ffn_gate",
               "up": "ffn_up", "down": "ffn_down"}  # fmt: skip


def _unpermute(n_heads: int, rows: int) -> torch.Tensor:
    """Row order that undoes llama.cpp's q/k permutation (GGUF ``llama`` arch interleaves rotary pairs).

    HF row ``(h, half, i)`` (``i < head_dim / 2``) is GGUF row ``(h, i, half)``.
    """
    hd = rows // n_heads
    h, half, i = torch.meshgrid(torch.arange(n_heads), torch.arange(2), torch.arange(hd // 2), indexing="ij")
    return (h * hd + i * 2 + half).reshape(-1)


def pack_gguf(
    path: str | Path,
    fmt: str = "gguf",
    plan: SparsityPlan | None = None,
    convert_to: str | None = None,
    head_fmt: str | None = None,
    positions: int = 4096,
    fuse: bool = True,
) -> EngineWeights:
    """Engine weights straight from a ``.gguf`` file (the HF config is read from the file by transformers).

    Args:
        path: the file.
        fmt: ``"gguf"`` keeps each tensor's own blocks when its type is in :data:`GGUF_NATIVE` (rows layout);
            another :data:`WEIGHT_FORMATS` key re-packs every projection in that format.
        plan: the sparsity plan; projections it sparsifies are re-packed in the cols layout.
        convert_to: format for tensors that cannot stay native (other GGUF types, cols layouts) under
            ``fmt="gguf"``; default: the tensor's own type if the kernels support it, else an error.
        head_fmt: the embedding / LM head format under a non-gguf ``fmt`` (default ``fmt``).
        positions: rows of the rotary tables.
        fuse: as :func:`pack_model` (a fused weight is re-packed in cols, in the parts' common format).
    """
    import gguf
    from gguf.quants import dequantize
    from transformers import AutoConfig

    path = Path(path)
    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    fam, act, window = _check_config(config)
    s = _shape(config)
    plan = _plan_for(plan, s["n_layers"], _in_features(s))
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    conversions: list[str] = []

    def floats(t) -> torch.Tensor:
        out_f, in_f = (int(t.shape[1]), int(t.shape[0])) if len(t.shape) == 2 else (int(t.shape[0]), 1)
        return torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).float().reshape(out_f, in_f)

    def weight(name: str, layout: str, rows: torch.Tensor | None, want: str | None) -> PackedWeight:
        t = tensors[name]
        out_f, in_f = int(t.shape[1]), int(t.shape[0])
        native = GGUF_NATIVE.get(t.tensor_type.name)
        target = want or convert_to or native
        if target is None:
            raise UnsupportedDecodeError(
                f"{name} is {t.tensor_type.name}; natively read GGUF types: {', '.join(GGUF_NATIVE)}. "
                f"Pass convert_to= one of {', '.join(FORMATS)} to re-pack it"
            )
        block_format(target)
        if want is None and layout == "rows" and native is not None and (convert_to is None or target == native):
            p = from_gguf_rows(t.data, native, out_f, in_f)
            if rows is not None:
                p = PackedWeight(p.data[rows].contiguous(), p.fmt, p.layout, out_f, in_f)
            return p
        w = floats(t)
        if rows is not None:
            w = w[rows]
        conversions.append(f"{name}: {t.tensor_type.name} -> {target} {layout}")
        return pack(w, target, layout)

    want = None if fmt == "gguf" else _kernel_format(fmt)
    want_head = None if fmt == "gguf" else _kernel_format(head_fmt or fmt)
    perm_q = _unpermute(s["n_heads"], s["n_heads"] * s["head_dim"]) if arch == "llama" else None
    perm_k = _unpermute(s["n_kv_heads"], s["n_kv_heads"] * s["head_dim"]) if arch == "llama" else None
    bias = fam.qkv_bias or bool(getattr(config, "attention_bias", False))
    layers = []
    for n in range(s["n_layers"]):
        cols = plan.sparse_projections(n)
        groups = _fusions(plan.layers[n], _out_features(s), fuse)
        fused = {p for parts in groups.values() for p in parts}
        t: dict[str, Any] = {"_out": _out_features(s)}
        for p, g in _GGUF_NAMES.items():
            rows = perm_q if p == "q" else perm_k if p == "k" else None
            if p not in fused:
                t[p] = weight(f"blk.{n}.{g}.weight", "cols" if p in cols else "rows", rows, want)
        for name, parts in groups.items():
            names = [f"blk.{n}.{_GGUF_NAMES[p]}.weight" for p in parts]
            types = {GGUF_NATIVE.get(tensors[k].tensor_type.name) for k in names}
            target = want or convert_to or (types.pop() if len(types) == 1 else None)
            if target is None:
                raise UnsupportedDecodeError(
                    f"layer {n}: fusing {'/'.join(parts)} needs one target format (types {sorted(map(str, types))}); "
                    "pass convert_to= or fuse=False"
                )
            ws = []
            for p, key in zip(parts, names):
                w = floats(tensors[key])
                ws.append(w[perm_q] if p == "q" and perm_q is not None else w[perm_k] if p == "k" and perm_k is not None else w)
            conversions.append(f"blk.{n}.{name}: {'+'.join(parts)} -> {target} cols (fused)")
            t[name] = pack(torch.cat(ws), target, "cols")
        t["attn_norm"] = _norm(floats(tensors[f"blk.{n}.attn_norm.weight"]).reshape(-1), fam)
        t["ffn_norm"] = _norm(floats(tensors[f"blk.{n}.ffn_norm.weight"]).reshape(-1), fam)
        if bias:
            for p in ("q", "k", "v", "o"):
                key = f"blk.{n}.{_GGUF_NAMES[p]}.bias"
                if key in tensors:
                    b = floats(tensors[key]).reshape(-1)
                    rows = perm_q if p == "q" else perm_k if p == "k" else None
                    t[f"{p}_bias"] = b[rows] if rows is not None else b
        if fam.qk_norm:
            t["q_norm"] = _norm(floats(tensors[f"blk.{n}.attn_q_norm.weight"]).reshape(-1), fam)
            t["k_norm"] = _norm(floats(tensors[f"blk.{n}.attn_k_norm.weight"]).reshape(-1), fam)
        _fuse_biases(t, groups)
        layers.append(_layer(t, plan.layers[n], fam))
    embedding = weight("token_embd.weight", "rows", None, want_head)
    head_name = "output.weight" if "output.weight" in tensors else "token_embd.weight"
    if plan.head is not None:  # a sparse head: a cols copy (re-packed), even when tied
        head = weight(head_name, "cols", None, want_head)
    else:
        head = weight(head_name, "rows", None, want_head) if head_name == "output.weight" else embedding
    final_norm = _norm(floats(tensors["output_norm.weight"]).reshape(-1), fam)
    dec = _decoder(config, s, fam, act, embedding, head, final_norm, layers, positions, plan)
    info = {
        "source": str(path), "gguf_types": sorted({t.tensor_type.name for t in reader.tensors}),
        "conversions": conversions, "tied_head": "output.weight" not in tensors, "arch": arch,
    }  # fmt: skip
    return EngineWeights(dec, config.model_type, fmt, window, plan, info)


# Random weights -------------------------------------------------------------------------------

def _random_packed(out_f: int, in_f: int, fmt: str, layout: str, gen: torch.Generator, pool: torch.Tensor) -> PackedWeight:
    """Random weights ~ unit-variance outputs for unit-variance inputs. Quantised: random quant bytes (tiled from
    ``pool``) and one scale magnitude with a random sign per block, so weights have mean 0 (uniform nibbles alone
    have mean -0.5 after q4_0's offset, which compounds over layers)."""
    f = block_format(fmt)
    n_vec, n_len = (out_f, in_f) if layout == "rows" else (in_f, out_f)
    if not f.quantized:
        data = (torch.randn(n_vec, n_len, generator=gen) * n_len**-0.5).to(f.dtype)
        return PackedWeight(data.contiguous(), fmt, layout, out_f, in_f)
    nb = -(-n_len // QK)
    total = n_vec * nb * f.block_bytes
    start = int(torch.randint(0, pool.numel() - 1, (1,), generator=gen))
    reps = -(-(start + total) // pool.numel())
    data = pool.repeat(reps)[start : start + total].reshape(n_vec, nb, f.block_bytes).clone()
    # |q| ~ 74 (q8_0, uniform int8) or |q - 8| ~ 4.6 (4-bit): d = 1 / (that * sqrt(fan-in of a row))
    d = (74.0 if fmt == "q8_0" else 4.6) ** -1 * in_f**-0.5
    sign = torch.randint(0, 2, (n_vec, nb), generator=gen, dtype=torch.uint8)
    scales = [torch.tensor([d], dtype=torch.float16).view(torch.uint8).repeat(n_vec, nb, 1)]
    if fmt == "q4_1":  # m = -8 d: the same centred values as q4_0
        scales.append(torch.tensor([-8 * d], dtype=torch.float16).view(torch.uint8).repeat(n_vec, nb, 1))
    for sc in scales:
        sc[..., 1] ^= sign << 7  # the fp16 sign bit
    header = torch.cat(scales, -1)  # [n_vec, nb, 2 or 4]
    if layout == "rows":
        data[..., : header.shape[-1]] = header
        return PackedWeight(data.reshape(n_vec, -1).contiguous(), fmt, layout, out_f, in_f)
    flat = data.reshape(n_vec, -1)  # cols: every block's d, then (q4_1) every m, then the quants
    for k, sc in enumerate(scales):
        flat[:, 2 * nb * k : 2 * nb * (k + 1)] = sc.reshape(n_vec, -1)
    return PackedWeight(flat.contiguous(), fmt, layout, out_f, in_f)


def random_weights(
    config,
    fmt: str = "q4_0",
    plan: SparsityPlan | None = None,
    head_fmt: str | None = None,
    n_layers: int | None = None,
    positions: int = 4096,
    seed: int = 0,
    fuse: bool = True,
) -> EngineWeights:
    """Random engine weights with the shapes of ``config`` (e.g. ``LlamaConfig`` of Llama-3-8B), built directly.

    Quantised formats get random quant bytes and scales that keep activations O(1); float formats
    ``N(0, 1/in)``. Speed does not depend on the values; sparsity is set by the plan's thresholds.

    Args:
        config: a transformers config of a :data:`FAMILIES` type.
        fmt, plan, head_fmt, positions, fuse: as :func:`pack_model`.
        n_layers: build only this many decoder layers (the plan must match); default all.
        seed: generator seed.
    """
    fam, act, window = _check_config(config)
    kf = _kernel_format(fmt)
    hf = _kernel_format(head_fmt or fmt)
    s = _shape(config)
    if n_layers is not None:
        s["n_layers"] = int(n_layers)
    plan = _plan_for(plan, s["n_layers"], _in_features(s))
    gen = torch.Generator().manual_seed(seed)
    pool = torch.randint(0, 256, (1 << 24,), dtype=torch.uint8, generator=gen)
    a, kv = s["n_heads"] * s["head_dim"], s["n_kv_heads"] * s["head_dim"]
    shapes = {"q": (a, s["dim"]), "k": (kv, s["dim"]), "v": (kv, s["dim"]), "o": (s["dim"], a),
              "gate": (s["inter"], s["dim"]), "up": (s["inter"], s["dim"]), "down": (s["dim"], s["inter"])}  # fmt: skip
    bias = fam.qkv_bias or bool(getattr(config, "attention_bias", False))
    layers = []
    for n in range(s["n_layers"]):
        cols = plan.sparse_projections(n)
        groups = _fusions(plan.layers[n], _out_features(s), fuse)
        fused = {p for parts in groups.values() for p in parts}
        t: dict[str, Any] = {p: _random_packed(*shapes[p], kf, "cols" if p in cols else "rows", gen, pool)
                             for p in PROJECTIONS if p not in fused}  # fmt: skip
        for name, parts in groups.items():
            t[name] = _random_packed(sum(shapes[p][0] for p in parts), s["dim"], kf, "cols", gen, pool)
        t["_out"] = _out_features(s)
        t["attn_norm"] = torch.ones(s["dim"])
        t["ffn_norm"] = torch.ones(s["dim"])
        if bias:
            for p in ("q", "k", "v"):
                t[f"{p}_bias"] = torch.zeros(shapes[p][0])
        if fam.qk_norm:
            t["q_norm"], t["k_norm"] = torch.ones(s["head_dim"]), torch.ones(s["head_dim"])
        _fuse_biases(t, groups)
        layers.append(_layer(t, plan.layers[n], fam))
    embedding = _random_packed(s["vocab"], s["dim"], hf, "rows", gen, pool)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if plan.head is not None:
        head = _random_packed(s["vocab"], s["dim"], hf, "cols", gen, pool)
    else:
        head = embedding if tied else _random_packed(s["vocab"], s["dim"], hf, "rows", gen, pool)
    dec = _decoder(config, s, fam, act, embedding, head, torch.ones(s["dim"]), layers, positions, plan)
    info = {"source": "random", "projections": kf, "head": hf, "tied_head": tied, "n_layers": s["n_layers"],
            "config_layers": config.num_hidden_layers}  # fmt: skip
    return EngineWeights(dec, config.model_type, fmt, window, plan, info)
