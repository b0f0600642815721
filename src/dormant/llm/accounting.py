"""What sparsity buys: FFN weight bytes and FLOPs per generated token under sparse execution policies.

Dhar et al. (IPCCC 2024, arXiv 2412.12178, Insight 3) claim "around 50% of main memory and computing
reductions for critical FFN components" from 50% activation sparsity, reasoning that the FFN holds ~2/3
of the parameters; they never count bytes or FLOPs. This module counts them, exactly, from
:class:`~dormant.llm.masks.ActivationTrace` masks of real tokens.

**Storage model.** Batch-1 decoding reads every weight it uses once per token. The FFN of layer ``l`` is
stored *neuron-major*: neuron ``i``'s bundle is gate row ``i``, up row ``i`` and down column ``i`` (down
stored transposed), each a ``D``-vector, as in LLM-in-a-flash's row-column bundling and PowerInfer. A
``D``-vector costs ``vec_bits(D) = D * b + ceil(D / g) * s`` bits in a format with ``b`` bits per
weight and, for integer formats, one ``s``-bit group header (scale, zero point) per ``g`` weights along
``D`` (:data:`dormant.formats.FORMATS`: fp32, fp16, bf16; int8 = GGUF Q8_0, one fp16 scale per 32 weights,
8.5 bits/weight; int4 = GGUF Q4_0, one fp16 scale per 32 weights, 4.5 bits/weight). Biases are vectors kept at
``vector_bits`` (the float width; 16 for integer formats). Per-neuron biases (gate, up / fc1) travel
with their neuron; the down bias (``D`` values) is always read.

**Policies.** Per token and layer, with ``A`` the active neurons (``MID != 0``), ``G`` the neurons with
``act(gate) != 0`` (``A`` is a subset of ``G``) and ``P`` a predicted set, the executor touches:

=============  =========  =========  ================  ==================  ==================================
policy         gate rows  up rows    down cols read    down cols computed  meaning
=============  =========  =========  ================  ==================  ==================================
dense          I          I          I                 I                   everything
down_skip      I          I          abs(A)            abs(A)              thresholding without a predictor
gate_first     I          abs(G)     abs(A)            abs(A)              gate first; up/down where act != 0
oracle         abs(A)     abs(A)     abs(A)            abs(A)              a perfect predictor's bound
predicted      abs(P|A)   abs(P|A)   abs(P|A)          abs(A)              + the predictor's own cost
=============  =========  =========  ================  ==================  ==================================

Non-gated FFNs (OPT, GPT-2) have no gate rows and no ``gate_first`` policy. Under ``predicted`` the
bundles of all predicted neurons are fetched; a false positive (``P - A``) costs its bundle and its gate
and up products (its down product is skipped once ``h = 0`` is known); a false negative (``A - P``) is
counted as a demand load of its bundle plus its full compute, which keeps the output exact. Skipping
false negatives instead changes the output; their number is reported (``false_negatives``) together with
the bytes that variant would read (``bytes_if_misses_skipped``).

With ``n_g, n_u, n_dr, n_dc`` the four counts above, per layer and token::

    bytes = [(n_g + n_u + n_dr) * vec_bits(D) + (n_g*[gate bias] + n_u*[up bias] + D*[down bias]) * vb] / 8
    FLOPs = 2*D*(n_g + n_u + n_dc)                       # multiply-adds of the three projections
          + n_act + n_prod                               # act(.) on computed gate (non-gated: up) entries,
                                                         #   gating product on computed up entries
          + n_g*[gate bias] + n_u*[up bias] + D*[down bias]   # bias adds

where ``[.]`` is 1 when the bias exists. Per-token figures are sums over layers averaged over the
traced tokens (teacher-forced text, each token counted as one decode step). All counts are integers and
every total is computed in integer bits before the final division, so the arithmetic is exact.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from dormant.formats import FORMATS, WeightFormat, weight_format
from dormant.llm.adapters import FFNLayout, Tap, ffn_layout
from dormant.traces import ActivationTrace

__all__ = [
    "WeightFormat",
    "FORMATS",
    "POLICIES",
    "FFNDims",
    "PredictorCost",
    "NeuronCounts",
    "PolicyCost",
    "neuron_counts",
    "policy_costs",
    "ParamGroup",
    "ParamBreakdown",
    "ArchSpec",
    "ARCHS",
    "model_breakdown",
    "collect_policy_traces",
    "previous_token_prediction",
    "linear_bytes",
    "skipped_linear_bytes",
]


# ----------------------------------------------------------------------------------------------------
# Weight formats


POLICIES = ("dense", "down_skip", "gate_first", "oracle", "predicted")


def _formats(formats: Sequence[str | WeightFormat]) -> list[WeightFormat]:
    return [weight_format(f) for f in formats]


# ----------------------------------------------------------------------------------------------------
# FFN dimensions, predictor cost, neuron counts


@dataclass(frozen=True)
class FFNDims:
    """The FFN facts the accounting needs: ``D`` (hidden), ``I`` (intermediate), layers, gating, biases."""

    hidden_size: int
    intermediate_size: int
    n_layers: int
    gated: bool
    gate_bias: bool = False
    up_bias: bool = False
    down_bias: bool = False

    @classmethod
    def from_layout(cls, layout: FFNLayout) -> FFNDims:
        w = layout.weights(0)
        return cls(int(layout.hidden_size), int(layout.intermediate_size), layout.n_layers, layout.gated,
                   w.gate_bias is not None, w.up_bias is not None, w.down_bias is not None)

    def bundle_bits(self, fmt: WeightFormat) -> int:
        """Bits of one neuron's bundle (gate row, up row, down column, per-neuron biases)."""
        vec = fmt.vec_bits(self.hidden_size)
        return (3 if self.gated else 2) * vec + (self.gate_bias + self.up_bias) * fmt.vector_bits

    def params(self) -> int:
        """FFN parameters of the whole model."""
        d, n = self.hidden_size, self.intermediate_size
        per = (3 if self.gated else 2) * d * n + (self.gate_bias + self.up_bias) * n + self.down_bias * d
        return self.n_layers * per


@dataclass(frozen=True)
class PredictorCost:
    """Per-token cost of a neuron predictor, added to the ``predicted`` policy.

    Attributes:
        bytes_per_token: bytes the predictor reads per token (all layers): one number used for every
            weight format, or ``{format name: bytes}``.
        flops_per_token: FLOPs the predictor does per token (all layers).
        name: what the predictor is.
    """

    bytes_per_token: float | Mapping[str, float]
    flops_per_token: float
    name: str = ""

    def bytes_for(self, fmt: str) -> float:
        if isinstance(self.bytes_per_token, Mapping):
            if fmt not in self.bytes_per_token:
                raise ValueError(f"predictor cost has no bytes for format {fmt!r}")
            return float(self.bytes_per_token[fmt])
        return float(self.bytes_per_token)

    @classmethod
    def from_params(cls, params_per_token: int, flops_per_token: float, name: str = "",
                    formats: Sequence[str] = tuple(FORMATS)) -> PredictorCost:
        """Cost of a predictor that reads ``params_per_token`` weights per token, stored like the FFN."""
        return cls({f: params_per_token * FORMATS[f].bits_per_weight / 8 for f in formats}, flops_per_token, name)


@dataclass
class NeuronCounts:
    """Per-layer neuron counts summed over the traced tokens (int64 ``[n_layers]`` each).

    Attributes:
        n_tokens: traced tokens ``T``.
        n_neurons: ``I``.
        active: sum over tokens of ``|A|`` (``MID != 0``).
        gate_active: sum of ``|G|`` (``act(gate) != 0``), or ``None`` without an ``ACT`` trace.
        predicted: sum of ``|P|``, or ``None`` without predictions.
        union: sum of ``|P | A|``; ``hits``: sum of ``|P & A|``.
    """

    n_tokens: int
    n_neurons: int
    active: torch.Tensor
    gate_active: torch.Tensor | None = None
    predicted: torch.Tensor | None = None
    union: torch.Tensor | None = None
    hits: torch.Tensor | None = None

    @property
    def n_layers(self) -> int:
        return len(self.active)

    def sparsity(self) -> torch.Tensor:
        """``[n_layers]`` fraction of inactive neurons per token."""
        return 1 - self.active.double() / (self.n_tokens * self.n_neurons)

    def gate_sparsity(self) -> torch.Tensor | None:
        return None if self.gate_active is None else 1 - self.gate_active.double() / (self.n_tokens * self.n_neurons)


_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


def _popcount(packed: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """uint8 ``[T, L, B]`` -> int64 ``[L]``: set bits summed over tokens and bytes."""
    total = torch.zeros(packed.shape[1], dtype=torch.int64)
    for i in range(0, packed.shape[0], chunk):
        total += _POPCOUNT[packed[i : i + chunk].long()].sum(dim=(0, 2))
    return total


def _check_aligned(ref: ActivationTrace, other: ActivationTrace, what: str) -> None:
    if other.packed.shape != ref.packed.shape or other.n_neurons != ref.n_neurons:
        raise ValueError(f"{what} trace {tuple(other.packed.shape)} is not aligned with the MID trace "
                         f"{tuple(ref.packed.shape)} (tokens, layers, bytes)")
    fa, fb = ref.model.get("fingerprint"), other.model.get("fingerprint")
    if fa and fb and fa != fb:
        raise ValueError(f"{what} trace is of another model (fingerprint {fb} != {fa})")


def neuron_counts(
    mid: ActivationTrace, act: ActivationTrace | None = None, predicted: ActivationTrace | None = None
) -> NeuronCounts:
    """Count active, gate-active and predicted neurons from token-aligned traces.

    Args:
        mid: oracle trace of ``MID`` (active neurons), ``packed`` ``[T, L, ceil(I/8)]``.
        act: trace of ``ACT`` (``act(gate) != 0``) over the same tokens; must contain ``mid``'s masks.
        predicted: predicted masks (``source["kind"] == "predicted"``) for the same tokens.
    """
    if mid.source.get("kind", "oracle") != "oracle" or mid.source.get("tap", Tap.MID.value) != Tap.MID.value:
        raise ValueError(f"the reference trace must be an oracle MID trace, got source {mid.source}")
    c = NeuronCounts(mid.n_tokens, mid.n_neurons, _popcount(mid.packed))
    if act is not None:
        _check_aligned(mid, act, "ACT")
        if act.source.get("tap") not in (None, Tap.ACT.value):
            raise ValueError(f"expected an ACT trace, got tap {act.source.get('tap')!r}")
        outside = _popcount(mid.packed & ~act.packed)
        if outside.any():
            raise ValueError(f"{int(outside.sum())} active neurons have act(gate) == 0: the ACT and MID traces "
                             "were not recorded on the same text and thresholds")
        c.gate_active = _popcount(act.packed)
    if predicted is not None:
        _check_aligned(mid, predicted, "predicted")
        if predicted.source.get("kind") != "predicted":
            raise ValueError(f"predicted trace has source kind {predicted.source.get('kind')!r}, expected 'predicted'")
        c.predicted = _popcount(predicted.packed)
        c.union = _popcount(predicted.packed | mid.packed)
        c.hits = _popcount(predicted.packed & mid.packed)
    return c


# ----------------------------------------------------------------------------------------------------
# Policy costs


@dataclass
class PolicyCost:
    """FFN cost of one policy in one weight format, per token (all layers) and per layer.

    ``rel_bytes`` / ``rel_flops`` are relative to ``dense`` in the same format. ``extra`` holds the
    misprediction figures of ``predicted`` (per token: ``false_positives``, ``false_negatives``,
    ``fp_bytes``, ``fn_bytes``, ``bytes_if_misses_skipped``, ``predictor_bytes``, ``predictor_flops``,
    ``recall``, ``precision``).
    """

    policy: str
    format: str
    bytes_per_token: float
    flops_per_token: float
    rel_bytes: float
    rel_flops: float
    bytes_per_layer: list[float]
    flops_per_layer: list[float]
    extra: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _layer_totals(dims: FFNDims, fmt: WeightFormat, T: int, n_g, n_u, n_dr, n_dc) -> tuple[list[int], list[int]]:
    """Integer bits and FLOPs per layer, summed over ``T`` tokens, from summed row/column counts."""
    D = dims.hidden_size
    vec, vb = fmt.vec_bits(D), fmt.vector_bits
    gb, ub, db = int(dims.gate_bias), int(dims.up_bias), int(dims.down_bias)
    bits, flops = [], []
    for g, u, dr, dc in zip(*(x.tolist() for x in (n_g, n_u, n_dr, n_dc))):
        bits.append((g + u + dr) * vec + (g * gb + u * ub + T * D * db) * vb)
        n_act = g if dims.gated else u
        n_prod = u if dims.gated else 0
        flops.append(2 * D * (g + u + dc) + n_act + n_prod + g * gb + u * ub + T * D * db)
    return bits, flops


def _policy_counts(dims: FFNDims, c: NeuronCounts, policy: str):
    full = torch.full((c.n_layers,), c.n_tokens * dims.intermediate_size, dtype=torch.int64)
    zero = torch.zeros_like(full)
    gate = (lambda n: n) if dims.gated else (lambda n: zero)
    A = c.active
    if policy == "dense":
        return gate(full), full, full, full
    if policy == "down_skip":
        return gate(full), full, A, A
    if policy == "gate_first":
        return full, c.gate_active, A, A
    if policy == "oracle":
        return gate(A), A, A, A
    if policy == "predicted":
        return gate(c.union), c.union, c.union, A
    raise ValueError(f"unknown policy {policy!r}; choose from: {', '.join(POLICIES)}")


def policy_costs(
    dims: FFNDims,
    counts: NeuronCounts,
    formats: Sequence[str | WeightFormat] = tuple(FORMATS),
    predictor: PredictorCost | None = None,
    policies: Sequence[str] | None = None,
) -> list[PolicyCost]:
    """FFN bytes and FLOPs per token of every applicable policy in every format.

    ``gate_first`` needs ``counts.gate_active`` (an ``ACT`` trace) and a gated FFN; ``predicted`` needs
    predicted counts. Policies whose inputs are missing are left out unless named in ``policies``
    (then a ``ValueError`` says what is missing). A ``predicted`` policy without ``predictor`` costs
    the predictor nothing.
    """
    if counts.n_layers != dims.n_layers or counts.n_neurons != dims.intermediate_size:
        raise ValueError(f"counts ({counts.n_layers} layers x {counts.n_neurons} neurons) do not match the FFN "
                         f"({dims.n_layers} x {dims.intermediate_size})")
    if counts.n_tokens == 0:
        raise ValueError("no traced tokens")
    available = ["dense", "down_skip"]
    if dims.gated and counts.gate_active is not None:
        available.append("gate_first")
    available.append("oracle")
    if counts.union is not None:
        available.append("predicted")
    if policies is None:
        policies = available
    for p in policies:
        if p not in POLICIES:
            raise ValueError(f"unknown policy {p!r}; choose from: {', '.join(POLICIES)}")
        if p not in available:
            why = {"gate_first": "a gated FFN and an ACT trace", "predicted": "a predicted trace"}.get(p, "")
            raise ValueError(f"policy {p!r} needs {why}")
    T = counts.n_tokens
    out = []
    for fmt in _formats(formats):
        dense_bits, dense_flops = _layer_totals(dims, fmt, T, *_policy_counts(dims, counts, "dense"))
        for p in policies:
            bits, flops = _layer_totals(dims, fmt, T, *_policy_counts(dims, counts, p))
            extra: dict[str, float] = {}
            b_tok, f_tok = sum(bits) / (8 * T), sum(flops) / T
            if p == "predicted":
                pb = predictor.bytes_for(fmt.name) if predictor else 0.0
                pf = float(predictor.flops_per_token) if predictor else 0.0
                bundle = dims.bundle_bits(fmt)
                fp = int((counts.predicted - counts.hits).sum())
                fn = int((counts.active - counts.hits).sum())
                pred = int(counts.predicted.sum())
                act = int(counts.active.sum())
                extra = {
                    "false_positives": fp / T,
                    "false_negatives": fn / T,
                    "fp_bytes": fp * bundle / (8 * T),
                    "fn_bytes": fn * bundle / (8 * T),
                    "bytes_if_misses_skipped": b_tok - fn * bundle / (8 * T) + pb,
                    "predictor_bytes": pb,
                    "predictor_flops": pf,
                    "recall": int(counts.hits.sum()) / act if act else 1.0,
                    "precision": int(counts.hits.sum()) / pred if pred else 1.0,
                }
                b_tok, f_tok = b_tok + pb, f_tok + pf
            out.append(PolicyCost(
                policy=p, format=fmt.name, bytes_per_token=b_tok, flops_per_token=f_tok,
                rel_bytes=b_tok / (sum(dense_bits) / (8 * T)), rel_flops=f_tok / (sum(dense_flops) / T),
                bytes_per_layer=[b / (8 * T) for b in bits], flops_per_layer=[f / T for f in flops], extra=extra,
            ))
    return out


# ----------------------------------------------------------------------------------------------------
# Parameter breakdowns: FFN share of parameters and of per-token weight bytes


@dataclass(frozen=True)
class ParamGroup:
    """``count`` parameters of one shape and category.

    ``shape`` is ``(rows, row_len)`` for matrices (groups run along ``row_len``, the input dimension;
    FFN matrices are neuron-major: ``(I, D)``) or ``(n,)`` for vectors. ``rows_read`` is how many rows one
    token reads (``None``: all; an input embedding: 1).
    """

    category: str  # embedding | lm_head | attention | ffn | norm | other
    shape: tuple[int, ...]
    count: int = 1
    rows_read: int | None = None

    @property
    def params(self) -> int:
        return self.count * math.prod(self.shape)

    def bits_per_token(self, fmt: WeightFormat) -> int:
        if len(self.shape) == 1:
            return self.count * self.shape[0] * fmt.vector_bits
        rows, n = self.shape
        return self.count * (rows if self.rows_read is None else self.rows_read) * fmt.vec_bits(n)


BLOCK_CATEGORIES = ("attention", "ffn", "norm")


@dataclass
class ParamBreakdown:
    """Where a model's parameters are, and what one decoded token reads of them."""

    name: str
    groups: list[ParamGroup]
    source: str = ""

    def params(self, categories: Sequence[str] | None = None) -> int:
        return sum(g.params for g in self.groups if categories is None or g.category in categories)

    def bytes_per_token(self, fmt: str | WeightFormat, categories: Sequence[str] | None = None) -> float:
        (f,) = _formats([fmt])
        return sum(g.bits_per_token(f) for g in self.groups if categories is None or g.category in categories) / 8

    def summary(self, formats: Sequence[str] = ("fp16", "int4")) -> dict[str, Any]:
        """Totals and FFN shares (of parameters, of block parameters, of per-token bytes per format)."""
        total, ffn = self.params(), self.params(["ffn"])
        d: dict[str, Any] = {
            "model": self.name,
            "params": total,
            "ffn_params": ffn,
            "ffn_share_params": ffn / total,
            "ffn_share_block_params": ffn / self.params(BLOCK_CATEGORIES),
        }
        for f in formats:
            tok = self.bytes_per_token(f)
            d[f"bytes_per_token_{f}"] = tok
            d[f"ffn_share_bytes_{f}"] = self.bytes_per_token(f, ["ffn"]) / tok
        d["source"] = self.source
        return d


@dataclass(frozen=True)
class ArchSpec:
    """The few configuration numbers that fix a decoder-only transformer's parameter layout.

    ``reference_params`` is the parameter count published for the checkpoint (a check on the formula).
    """

    name: str
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    tied_embeddings: bool
    qkv_bias: bool = False
    gated: bool = True
    source: str = ""
    reference_params: int | None = None

    def ffn_dims(self) -> FFNDims:
        return FFNDims(self.hidden_size, self.intermediate_size, self.n_layers, self.gated)

    def breakdown(self) -> ParamBreakdown:
        """Llama-style blocks: q/k/v/o projections (GQA), gated FFN, two RMSNorms per layer, final norm."""
        d, n, layers, v = self.hidden_size, self.intermediate_size, self.n_layers, self.vocab_size
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        g = [
            ParamGroup("attention", (q, d), layers),
            ParamGroup("attention", (kv, d), 2 * layers),
            ParamGroup("attention", (d, q), layers),
            ParamGroup("ffn", (n, d), (3 if self.gated else 2) * layers),
            ParamGroup("norm", (d,), 2 * layers + 1),
        ]
        if self.qkv_bias:
            g += [ParamGroup("attention", (q,), layers), ParamGroup("attention", (kv,), 2 * layers)]
        if self.tied_embeddings:
            g.append(ParamGroup("lm_head", (v, d)))  # the embedding matrix, read whole by the output layer
        else:
            g += [ParamGroup("embedding", (v, d), rows_read=1), ParamGroup("lm_head", (v, d))]
        return ParamBreakdown(self.name, g, self.source)


_HF = "https://huggingface.co/{}/blob/main/config.json"
ARCHS: dict[str, ArchSpec] = {
    a.name: a
    for a in (
        ArchSpec("Llama-2-7B", 4096, 11008, 32, 32, 32, 128, 32000, False,
                 source=_HF.format("meta-llama/Llama-2-7b-hf"), reference_params=6_738_415_616),
        ArchSpec("Llama-3-8B", 4096, 14336, 32, 32, 8, 128, 128256, False,
                 source=_HF.format("meta-llama/Meta-Llama-3-8B"), reference_params=8_030_261_248),
        ArchSpec("Mistral-7B", 4096, 14336, 32, 32, 8, 128, 32000, False,
                 source=_HF.format("mistralai/Mistral-7B-v0.1"), reference_params=7_241_732_096),
        ArchSpec("Phi-3-mini", 3072, 8192, 32, 32, 32, 96, 32064, False,
                 source=_HF.format("microsoft/Phi-3-mini-4k-instruct") + " (128k: same shapes)",
                 reference_params=3_821_079_552),
        ArchSpec("Qwen2.5-7B", 3584, 18944, 28, 28, 4, 128, 152064, False, qkv_bias=True,
                 source=_HF.format("Qwen/Qwen2.5-7B"), reference_params=7_615_616_512),
        ArchSpec("SmolLM2-135M", 576, 1536, 30, 9, 3, 64, 49152, True,
                 source=_HF.format("HuggingFaceTB/SmolLM2-135M"), reference_params=134_515_008),
    )
}


def _row_len(module: nn.Module, p: torch.Tensor) -> tuple[int, int]:
    """``(rows, row_len)`` of a weight matrix, ``row_len`` being its input dimension."""
    if type(module).__name__ == "Conv1D":  # GPT-2 stores [in, out]
        return p.shape[1], p.shape[0]
    return p.shape[0], math.prod(p.shape[1:])


def model_breakdown(model: nn.Module, name: str | None = None) -> ParamBreakdown:
    """The :class:`ParamBreakdown` of a loaded model, from its parameters.

    FFN parameters are those of the FFN projections found by :func:`ffn_layout`, counted neuron-major
    (``(I, D)`` per projection). ``nn.Embedding`` weights read one row per token unless tied to the
    output layer, which reads its matrix whole. Other matrices are ``attention`` when their name
    contains ``attn``/``attention`` and ``other`` otherwise; 1-D parameters are ``norm``.
    """
    layout = ffn_layout(model)
    dims = FFNDims.from_layout(layout)
    ffn_ids = set()
    for layer in range(layout.n_layers):
        for part in {layout.spec.up, layout.spec.down, layout.spec.gate} - {None}:
            ffn_ids.update(id(p) for p in layout.module(layer, part).parameters())
    out_emb = model.get_output_embeddings()
    out_w = None if out_emb is None else out_emb.weight
    d, n_i, n_l = dims.hidden_size, dims.intermediate_size, dims.n_layers
    groups = [ParamGroup("ffn", (n_i, d), (3 if dims.gated else 2) * n_l)]
    for flag, n in ((dims.gate_bias, n_i), (dims.up_bias, n_i), (dims.down_bias, d)):
        if flag:
            groups.append(ParamGroup("ffn", (n,), n_l))
    seen = set()
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            if id(p) in seen or id(p) in ffn_ids:
                continue
            seen.add(id(p))
            full = f"{mod_name}.{p_name}"
            if p is out_w:
                groups.append(ParamGroup("lm_head", tuple(p.shape)))
            elif isinstance(module, nn.Embedding):
                groups.append(ParamGroup("embedding", tuple(p.shape), rows_read=1))
            elif p.ndim == 1:
                groups.append(ParamGroup("norm", tuple(p.shape)))
            else:
                cat = "attention" if ("attn" in full or "attention" in full) else "other"
                groups.append(ParamGroup(cat, _row_len(module, p)))
    merged: dict[tuple, int] = {}
    for g in groups:
        key = (g.category, g.shape, g.rows_read)
        merged[key] = merged.get(key, 0) + g.count
    name = name or getattr(model.config, "_name_or_path", None) or layout.model_type
    return ParamBreakdown(name, [ParamGroup(c, s, n, r) for (c, s, r), n in merged.items()], "loaded weights")


# ----------------------------------------------------------------------------------------------------
# Traces from a model


def collect_policy_traces(
    model: nn.Module,
    windows: torch.Tensor,
    thresholds=None,
    max_tokens: int | None = None,
    model_id: str | None = None,
    progress: bool = True,
) -> tuple[ActivationTrace, ActivationTrace | None]:
    """The ``MID`` and (gated FFNs) ``ACT`` oracle traces the policies are counted from.

    Args:
        windows: token ids ``[n, seqlen]``.
        thresholds: a :class:`~dormant.llm.thresholds.Thresholds` applied while tracing (the model's
            previous sparsification state is restored afterwards); ``None`` traces the model as it is.
    Returns:
        ``(mid, act)``; ``act`` is ``None`` for non-gated FFNs (where ``act(fc1)`` *is* ``MID``).
    """
    from dormant.llm.masks import collect_trace
    from dormant.llm.sparsify import sparsified

    with sparsified(model, thresholds, model_id):
        mid = collect_trace(model, windows, model_id, max_tokens=max_tokens, progress=progress, tap=Tap.MID)
        act = None
        if ffn_layout(model).gated:
            act = collect_trace(model, windows, model_id, max_tokens=max_tokens, progress=progress, tap=Tap.ACT)
    return mid, act


def previous_token_prediction(trace: ActivationTrace, seqlen: int | None = None) -> ActivationTrace:
    """A zero-cost strawman predictor: token ``t`` is predicted to use token ``t-1``'s active set.

    The first token of every ``seqlen``-window (of the trace, default ``trace.source["seqlen"]``) is
    predicted all-active. Returns a ``kind="predicted"`` trace aligned with ``trace``.
    """
    seqlen = seqlen or int(trace.source.get("seqlen", trace.n_tokens))
    packed = torch.empty_like(trace.packed)
    packed[1:] = trace.packed[:-1]
    all_on = torch.full_like(trace.packed[0], 255)
    pad = 8 * all_on.shape[-1] - trace.n_neurons
    if pad:
        all_on[:, -1] = 255 >> pad
    packed[::seqlen] = all_on
    src = {"kind": "predicted", "predictor": "previous-token", "seqlen": seqlen, "oracle": dict(trace.source)}
    return ActivationTrace(packed, trace.n_neurons, dict(trace.model), src)


# ----------------------------------------------------------------------------------------------------
# Every linear layer: weight bytes read per token, and what zero activations let an executor skip


def linear_bytes(layout: FFNLayout, fmt: str | WeightFormat = "fp16") -> dict[str, int]:
    """Weight bits/8 each linear reads per token when dense (row-major, groups along the input), per layer;
    ``head`` once per token. Keys are :meth:`FFNLayout.linears` names."""
    (f,) = _formats([fmt])
    return {lin.name: lin.out_features * f.vec_bits(lin.in_features) // 8 for lin in layout.linears()}


def skipped_linear_bytes(layout: FFNLayout, zero: dict[tuple[int, Tap], float],
                         formats: Sequence[str] = tuple(FORMATS)) -> dict[str, dict[str, Any]]:
    """Weight bytes per token that zero activations let a sparse executor skip, per format.

    Args:
        zero: measured zero fraction of ``(layer, tap)``: every input tap that was thresholded, ``MID`` and (gated
            FFNs) ``ACT``.

    A zero input of a linear skips its weight column (stored column-major, ``in x vec_bits(out)``): that is input
    sparsity (TEAL, WINA, CHESS's q/o) and, through ``MID``, the down columns of silent neurons. A zero ``act(gate)``
    (CATS, CHESS, the paper's thresholded gate) also skips the neuron's up row (gate computed first). Returns
    ``{format: {"skipped": bytes, "total": bytes, "fraction": ..., "fraction_no_head": ..., "per_linear": {name:
    fraction of that linear's bytes}}}``; ``total`` is all block linears plus the LM head, read densely.
    """
    out = {}
    lins = {lin.name: lin for lin in layout.linears()}
    last = layout.n_layers - 1
    for fname in formats:
        (f,) = _formats([fname])
        dense = linear_bytes(layout, f)
        per_linear_skipped = {name: 0.0 for name in lins}
        for name, lin in lins.items():
            col = lin.in_features * f.vec_bits(lin.out_features) / 8  # all columns of one layer, column-major
            layers = [last] if name == "head" else range(layout.n_layers)
            for layer in layers:
                z = zero.get((layer, lin.tap), 0.0)
                skipped = z * col
                if name in ("up", "gate_up") and layout.gated:  # rows of neurons whose act(gate) is zero
                    rows = zero.get((layer, Tap.ACT), 0.0) * lin.out_features * f.vec_bits(lin.in_features) / 8
                    if name == "gate_up":
                        rows /= 2  # only the up half; the gate half is read to know act(gate)
                    skipped = max(skipped, rows)
                per_linear_skipped[name] += skipped
        total_block = sum(dense[n] * layout.n_layers for n in lins if n != "head")
        total = total_block + dense.get("head", 0)
        skipped_block = sum(v for n, v in per_linear_skipped.items() if n != "head")
        out[f.name] = {
            "skipped": skipped_block + per_linear_skipped.get("head", 0.0),
            "total": total,
            "fraction": (skipped_block + per_linear_skipped.get("head", 0.0)) / total,
            "fraction_no_head": skipped_block / total_block,
            "per_linear": {n: v / (dense[n] * (1 if n == "head" else layout.n_layers))
                           for n, v in per_linear_skipped.items()},
        }
    return out
