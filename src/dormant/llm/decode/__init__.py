"""Lean CPU decode for Llama-family Hugging Face models: whole-model batch-1 steps in C++ with sparse weights.

The pieces: :class:`SparsityPlan` (which activations are zeroed: per-projection input thresholds,
the FFN ``mid`` and ``act`` thresholds), :func:`pack_model` / :func:`pack_gguf` / :func:`random_weights`
(weights in ``fp32``, ``bf16``, ``q8_0``, ``q4_0``, ``q4_1`` or a GGUF file's own blocks, each projection
laid out for its plan), :class:`Engine` (step, prefill, greedy generate, batch of independent
sequences) and :class:`ReferenceStep` (the step in torch: the specification). Importing this package
imports neither transformers nor the compiled library.
"""

from dormant.llm.decode.engine import Engine
from dormant.llm.decode.plan import PROJECTIONS, LayerPlan, SparsityPlan
from dormant.llm.decode.reference import ReferenceStep
from dormant.llm.decode.weights import (
    FAMILIES,
    GGUF_NATIVE,
    WEIGHT_FORMATS,
    EngineWeights,
    UnsupportedDecodeError,
    pack_gguf,
    pack_model,
    random_weights,
)

__all__ = [
    "Engine",
    "EngineWeights",
    "FAMILIES",
    "GGUF_NATIVE",
    "LayerPlan",
    "PROJECTIONS",
    "ReferenceStep",
    "SparsityPlan",
    "UnsupportedDecodeError",
    "WEIGHT_FORMATS",
    "pack_gguf",
    "pack_model",
    "random_weights",
]
