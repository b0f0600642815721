"""Activation traces for the prefetch simulator: recording, geometry, weight formats, synthetic traces.

The simulator consumes :class:`dormant.llm.masks.ActivationTrace` (bit-packed per-token, per-layer
active-neuron masks) unchanged. This module adds what the cost model needs around it:

* :class:`FFNGeometry` -- layer count, widths and the parameters that stay resident (attention per
  layer, the LM head), read from the trace's ``model`` / ``source`` metadata;
* :func:`weight_format` -- a :class:`dormant.formats.WeightFormat` by name (or the trace's dtype): bytes
  of one stored vector of ``D`` weights, including per-group scales. One FFN *neuron* ``i`` of a gated FFN is gate row ``i``, up row ``i`` and down column ``i``
  (LLM in a flash, Alizadeh et al. 2024, §3.2 "row-column bundling")::

      vector_bytes(D) = ceil((D * bits + ceil(D / group) * group_bits) / 8)
      neuron_bytes    = n_mats * vector_bytes(D)        n_mats = 3 (gated) or 2 (non-gated)
      ffn_bytes       = n_layers * I * neuron_bytes

  e.g. SmolLM2-135M (D=576, I=1536, 30 layers) in fp16: 3456 B per neuron, 159 MB of FFN.
* :func:`synthetic_trace` and :func:`perturb_trace` -- traces with a power-law of neuron frequencies and
  temporal persistence, and "predicted" traces made from an oracle by injecting false negatives and
  false positives (for tests, benchmarks, and until real predictor traces exist).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from dormant.formats import WeightFormat
from dormant.formats import weight_format as _lookup
from dormant.traces import ActivationTrace, pack_masks, unpack_masks

__all__ = [
    "WeightFormat",
    "weight_format",
    "FFNGeometry",
    "iter_masks",
    "synthetic_trace",
    "perturb_trace",
    "check_aligned",
]


def weight_format(name: str, trace: ActivationTrace | None = None) -> WeightFormat:
    """Look up a format of :data:`dormant.formats.FORMATS`; ``"trace"`` means the dtype recorded in ``trace``."""
    if name == "trace":
        if trace is None:
            raise ValueError("weight format 'trace' needs a trace")
        name = str(trace.model.get("dtype", "float32"))
    return _lookup(name)


@dataclass(frozen=True)
class FFNGeometry:
    """The shapes the cost model needs.

    Attributes:
        n_layers: decoder layers.
        hidden_size: ``D``.
        intermediate_size: ``I`` (neurons per layer).
        gated: SwiGLU/GeGLU FFN (3 matrices) or not (2).
        attn_params: resident non-FFN parameters read per layer and token (attention projections).
        head_params: parameters read once per token outside the layers (the LM head).
        vectors: weight vectors of ``hidden_size`` per unit when not an FFN neuron's ``3`` / ``2`` (a trace of
            one linear's input columns: 1 vector of that linear's output size; ``source["unit"]``).
    """

    n_layers: int
    hidden_size: int
    intermediate_size: int
    gated: bool = True
    attn_params: int = 0
    head_params: int = 0
    vectors: int | None = None

    @property
    def n_mats(self) -> int:
        if self.vectors is not None:
            return self.vectors
        return 3 if self.gated else 2

    def neuron_bytes(self, fmt: WeightFormat) -> int:
        """Bytes of one neuron: ``n_mats * vector_bytes(D)``."""
        return self.n_mats * fmt.vector_bytes(self.hidden_size)

    def ffn_bytes(self, fmt: WeightFormat) -> int:
        """All FFN weights of the model: ``n_layers * I * neuron_bytes``."""
        return self.n_layers * self.intermediate_size * self.neuron_bytes(fmt)

    @classmethod
    def from_trace(cls, trace: ActivationTrace) -> FFNGeometry:
        """Geometry from a trace's metadata.

        Resident parameter counts come from ``source["params"]`` (written by ``dormant trace``, :func:`dormant.llm.masks.resident_params`). When
        absent they are estimated as ``4 * D**2`` per layer (multi-head attention) and ``vocab * D`` for
        the head (0 if the vocabulary is unknown).
        """
        m = trace.model
        d = int(m.get("hidden_size", 0))
        if d <= 0:
            raise ValueError("the trace's model metadata has no hidden_size")
        params = trace.source.get("params", {})
        attn = int(params.get("attn_per_layer", 4 * d * d))
        head = int(params.get("head", (m.get("vocab_size") or 0) * d))
        unit = trace.source.get("unit")
        if unit is not None:  # one linear's input columns (dormant.llm.masks.collect_trace)
            return cls(int(m.get("n_layers", trace.n_layers)), int(unit["length"]), trace.n_neurons,
                       bool(m.get("gated", True)), attn, head, int(unit["vectors"]))
        return cls(int(m.get("n_layers", trace.n_layers)), d, trace.n_neurons, bool(m.get("gated", True)), attn, head)


def iter_masks(trace: ActivationTrace, start: int = 0, stop: int | None = None,
               block: int = 256) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(t0, masks)`` with bool ``masks [b, n_layers, n_neurons]`` for tokens ``t0 .. t0+b-1``.

    Unpacks ``block`` tokens at a time so a long trace never sits unpacked in memory.
    """
    stop = trace.n_tokens if stop is None else min(stop, trace.n_tokens)
    for t0 in range(start, stop, block):
        yield t0, unpack_masks(trace.packed[t0:min(t0 + block, stop)], trace.n_neurons).numpy()


def check_aligned(oracle: ActivationTrace, predicted: ActivationTrace) -> None:
    """Raise ``ValueError`` unless ``predicted`` covers the same tokens, layers and neurons as ``oracle``."""
    if predicted.packed.shape != oracle.packed.shape or predicted.n_neurons != oracle.n_neurons:
        raise ValueError(
            f"predicted trace {tuple(predicted.packed.shape)} is not aligned with the oracle trace "
            f"{tuple(oracle.packed.shape)} (tokens, layers, bytes); both must cover the same tokens"
        )
    for key in ("n_layers", "hidden_size", "intermediate_size"):
        a, b = oracle.model.get(key), predicted.model.get(key)
        if a is not None and b is not None and a != b:
            raise ValueError(f"predicted trace was made for another model ({key}: {b} != {a})")


def synthetic_trace(
    n_tokens: int,
    n_layers: int,
    n_neurons: int,
    density: float = 0.5,
    skew: float = 1.0,
    persistence: float = 0.5,
    hidden_size: int = 64,
    dtype: str = "float16",
    seed: int = 0,
) -> ActivationTrace:
    """A random trace with hot neurons and temporal correlation.

    Neuron ``(l, i)`` has a base rate ``p_li`` drawn from ``Beta(a, a / skew-ish)`` rescaled to mean
    ``density`` (``skew`` > 1 makes a heavier head of hot neurons, as PowerInfer's power law). Each token
    keeps the previous token's state with probability ``persistence`` and otherwise redraws
    ``Bernoulli(p_li)``, so the stationary density per neuron stays ``p_li``.
    """
    if not 0 < density < 1:
        raise ValueError("density must lie in (0, 1)")
    rng = np.random.default_rng(seed)
    # Beta(alpha, beta) with mean `density`; smaller concentration -> more extreme (hot/cold) neurons.
    conc = 2.0 / max(skew, 1e-3)
    p = rng.beta(density * conc, (1 - density) * conc, size=(n_layers, n_neurons))
    out = np.empty((n_tokens, n_layers, n_neurons), dtype=bool)
    state = rng.random((n_layers, n_neurons)) < p
    for t in range(n_tokens):
        redraw = rng.random((n_layers, n_neurons)) >= persistence
        fresh = rng.random((n_layers, n_neurons)) < p
        state = np.where(redraw, fresh, state)
        out[t] = state
    model = {"id": "synthetic", "dtype": dtype, "n_layers": n_layers, "hidden_size": hidden_size,
             "intermediate_size": n_neurons, "gated": True, "vocab_size": None}
    src = {"kind": "oracle", "synthetic": {"density": density, "skew": skew, "persistence": persistence,
                                            "seed": seed},
           "params": {"attn_per_layer": 4 * hidden_size * hidden_size, "head": 0}}
    return ActivationTrace(pack_masks(out), n_neurons, model, src)


def perturb_trace(oracle: ActivationTrace, fn_rate: float, fp_rate: float, seed: int = 0,
                  block: int = 256) -> ActivationTrace:
    """A synthetic "predicted" trace: the oracle with injected misses and false alarms.

    Each active neuron is dropped with probability ``fn_rate`` (recall = ``1 - fn_rate``). False
    positives are drawn uniformly among inactive neurons, ``fp_rate`` of them per active neuron
    (predicted density = ``(1 - fn_rate + fp_rate) * density``), so ``fp_rate=0.07`` reads as "7% more
    neurons predicted than needed". LLM in a flash reports about 5% FN and 7% FP for its predictor
    (secondary source; see the notes §2.5).
    """
    if not (0 <= fn_rate < 1 and fp_rate >= 0):
        raise ValueError("need 0 <= fn_rate < 1 and fp_rate >= 0")
    rng = np.random.default_rng(seed)
    blocks = []
    for _, m in iter_masks(oracle, block=block):
        keep = m & (rng.random(m.shape) >= fn_rate)
        n_act = m.sum(-1, keepdims=True)
        n_off = m.shape[-1] - n_act
        q = np.where(n_off > 0, np.minimum(fp_rate * n_act / np.maximum(n_off, 1), 1.0), 0.0)
        blocks.append(keep | (~m & (rng.random(m.shape) < q)))
    packed = pack_masks(np.concatenate(blocks))
    src = {"kind": "predicted", "predictor": "synthetic", "fn_rate": fn_rate, "fp_rate": fp_rate, "seed": seed,
           "oracle_source": oracle.source}
    if "params" in oracle.source:
        src["params"] = oracle.source["params"]
    return ActivationTrace(packed, oracle.n_neurons, dict(oracle.model), src)
