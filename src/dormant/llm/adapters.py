"""Where the FFN lives in each Hugging Face architecture, and the named tensors ("taps") inside it.

One table, :data:`FFN_SPECS`, maps a config ``model_type`` to the module names of the FFN parts.
Gated (SwiGLU/GeGLU) FFNs compute ``down(act(gate(x)) * up(x))``; non-gated ones ``down(act(up(x)))``
(``up`` is ``fc1`` / ``c_fc`` / ``dense_h_to_4h``). Every FFN exposes the same taps::

    FFN_IN  x, the input of gate/up            GATE  gate(x), pre-activation (gated only)
    UP      up(x) (non-gated: fc1(x))          ACT   act(gate(x)) (non-gated: act(fc1(x)))
    MID     the intermediate, input of down    OUT   down(MID), what is added to the residual

A tap is observed or rewritten by a forward hook (``*_out``) or forward pre-hook (``*_in``) on one
module; no model code is patched, so parameter names, ``generate()`` and the KV cache are untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch
from torch import nn

from dormant.artifacts import config_key
from dormant.config import UserError

__all__ = ["Tap", "FFNSpec", "FFN_SPECS", "FFNLayout", "FFNWeights", "UnsupportedModelError", "ffn_layout"]


class Tap(str, Enum):
    FFN_IN = "ffn_in"
    GATE = "gate"
    UP = "up"
    ACT = "act"
    MID = "mid"
    OUT = "out"


class UnsupportedModelError(UserError, ValueError):
    pass


@dataclass(frozen=True)
class FFNSpec:
    """Module names of one architecture's FFN.

    Attributes:
        layers: dotted path from the causal-LM module to the list of decoder layers.
        mlp: dotted path from a decoder layer to the module holding the FFN parts ("" = the layer itself).
        up: the projection producing the "up" branch (non-gated: the first FFN linear).
        down: the output projection.
        act: the activation module.
        gate: the gate projection (gated FFNs); equal to ``up`` when gate and up are fused.
        fused_gate_up: ``up`` outputs ``[gate | up]`` concatenated on the last dim (Phi-3).
        conv1d: weights are GPT-2 ``Conv1D`` (stored ``[in, out]``).
    """

    layers: str
    mlp: str
    up: str
    down: str
    act: str
    gate: str | None = None
    fused_gate_up: bool = False
    conv1d: bool = False

    @property
    def gated(self) -> bool:
        return self.gate is not None


_LLAMA_LIKE = FFNSpec("model.layers", "mlp", up="up_proj", down="down_proj", act="act_fn", gate="gate_proj")
FFN_SPECS: dict[str, FFNSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "phi3": FFNSpec(
        "model.layers", "mlp", up="gate_up_proj", down="down_proj", act="activation_fn", gate="gate_up_proj",
        fused_gate_up=True,
    ),
    "opt": FFNSpec("model.decoder.layers", "", up="fc1", down="fc2", act="activation_fn"),
    "gpt2": FFNSpec("transformer.h", "mlp", up="c_fc", down="c_proj", act="act", conv1d=True),
    "gpt_neox": FFNSpec("gpt_neox.layers", "mlp", up="dense_h_to_4h", down="dense_4h_to_h", act="act"),
}


@dataclass(frozen=True)
class TapPoint:
    """Where a tap is read: ``module`` name within the FFN container, ``"in"``/``"out"``, optional half."""

    module: str  # "" = the FFN container itself
    direction: str
    half: int | None = None  # 0 = first half of the last dim (gate), 1 = second half (up)


@dataclass
class FFNWeights:
    """FFN weights of one layer in a canonical layout (views, no copies unless transposed).

    Shapes: ``gate``/``up`` ``[I, D]`` (row i = neuron i's input weights), ``down`` ``[D, I]``.
    ``gate`` is ``None`` for non-gated FFNs; biases are ``None`` when absent.
    """

    up: torch.Tensor
    down: torch.Tensor
    gate: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    gate_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None


def _get(root: nn.Module, path: str) -> nn.Module:
    m = root
    for part in filter(None, path.split(".")):
        m = getattr(m, part)
    return m


class FFNLayout:
    """The FFN of every decoder layer of one model, resolved from :data:`FFN_SPECS`."""

    def __init__(self, model: nn.Module, model_type: str, spec: FFNSpec):
        self.model_type = model_type
        self.spec = spec
        self.layers: list[nn.Module] = list(_get(model, spec.layers))
        self.ffns: list[nn.Module] = [_get(layer, spec.mlp) for layer in self.layers]
        w = self.weights(0)
        self.intermediate_size, self.hidden_size = w.up.shape
        config = getattr(model, "config", None)
        self.vocab_size = getattr(config, "vocab_size", None)
        self.activation = getattr(config, "hidden_act", None) or getattr(config, "activation_function", None)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def gated(self) -> bool:
        return self.spec.gated

    def taps(self) -> tuple[Tap, ...]:
        """The taps this FFN has (no ``GATE`` for non-gated FFNs)."""
        return tuple(t for t in Tap if self.gated or t is not Tap.GATE)

    def tap_point(self, tap: Tap) -> TapPoint:
        s = self.spec
        if tap not in self.taps():
            raise ValueError(f"{self.model_type} FFN has no {tap.value!r} tap (non-gated FFN)")
        if tap is Tap.FFN_IN:
            # Gated non-fused FFNs feed x to two projections: rewrite it once at the container's input.
            return TapPoint("" if s.gated and not s.fused_gate_up else s.up, "in")
        if tap is Tap.GATE:
            return TapPoint(s.gate, "out", 0 if s.fused_gate_up else None)
        if tap is Tap.UP:
            return TapPoint(s.up, "out", 1 if s.fused_gate_up else None)
        if tap is Tap.ACT:
            return TapPoint(s.act, "out")
        if tap is Tap.MID:
            return TapPoint(s.down, "in")
        return TapPoint(s.down, "out")

    def module(self, layer: int, name: str) -> nn.Module:
        return _get(self.ffns[layer], name)

    def weights(self, layer: int) -> FFNWeights:
        s, ffn = self.spec, self.ffns[layer]
        up_m, down_m = _get(ffn, s.up), _get(ffn, s.down)
        up, down = up_m.weight, down_m.weight
        if s.conv1d:
            up, down = up.t(), down.t()
        up_b, down_b = getattr(up_m, "bias", None), getattr(down_m, "bias", None)
        gate = gate_b = None
        if s.fused_gate_up:
            gate, up = up.chunk(2, dim=0)
            if up_b is not None:
                gate_b, up_b = up_b.chunk(2)
        elif s.gated:
            gate_m = _get(ffn, s.gate)
            gate, gate_b = gate_m.weight, getattr(gate_m, "bias", None)
        return FFNWeights(up=up, down=down, gate=gate, up_bias=up_b, gate_bias=gate_b, down_bias=down_b)

    def describe(self) -> dict:
        """Architecture facts that thresholds and other artifacts are validated against."""
        d = {
            "model_type": self.model_type,
            "n_layers": self.n_layers,
            "hidden_size": int(self.hidden_size),
            "intermediate_size": int(self.intermediate_size),
            "gated": self.gated,
            "vocab_size": self.vocab_size,
            "activation": self.activation,
        }
        d["fingerprint"] = config_key(d, digits=16)
        return d


def ffn_layout(model: nn.Module) -> FFNLayout:
    """Resolve the FFN layout of a Hugging Face causal LM; unsupported types get an error listing the options."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FFN_SPECS:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(FFN_SPECS))}. "
            "Add an FFNSpec to dormant.llm.adapters.FFN_SPECS to support it."
        )
    return FFNLayout(model, model_type, FFN_SPECS[model_type])
