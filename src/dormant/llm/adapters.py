"""Where the FFN and the attention projections live in each Hugging Face architecture, and the named tensors
("taps") inside them.

One table, :data:`FFN_SPECS`, maps a config ``model_type`` to the module names of the FFN parts and of the
attention projections. Gated (SwiGLU/GeGLU) FFNs compute ``down(act(gate(x)) * up(x))``; non-gated ones
``down(act(up(x)))`` (``up`` is ``fc1`` / ``c_fc`` / ``dense_h_to_4h``). Every FFN exposes the same taps::

    FFN_IN  x, the input of gate/up            GATE  gate(x), pre-activation (gated only)
    UP      up(x) (non-gated: fc1(x))          ACT   act(gate(x)) (non-gated: act(fc1(x)))
    MID     the intermediate, input of down    OUT   down(MID), what is added to the residual

and every linear layer of a block has an *input* tap, so that input sparsity (TEAL, WINA, CHESS) reaches all of
them: ``Q_IN``/``K_IN``/``V_IN`` (the normed hidden state each of q/k/v reads; ``QKV_IN`` when q, k and v are one
fused projection), ``O_IN`` (the attention output, input of o), ``GATE_IN``/``UP_IN`` (the FFN input as gate and up
read it; for a fused gate_up or a non-gated FFN only ``UP_IN``), ``MID`` (the input of down) and ``HEAD_IN`` (the
final hidden state the LM head reads). :meth:`FFNLayout.linears` lists each linear with its input tap and weight.

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

__all__ = ["Tap", "INPUT_TAPS", "AttnSpec", "FFNSpec", "FFN_SPECS", "FFNLayout", "FFNWeights", "Linear",
           "UnsupportedModelError", "ffn_layout"]


class Tap(str, Enum):
    FFN_IN = "ffn_in"
    GATE = "gate"
    UP = "up"
    ACT = "act"
    MID = "mid"
    OUT = "out"
    Q_IN = "q_in"
    K_IN = "k_in"
    V_IN = "v_in"
    QKV_IN = "qkv_in"
    O_IN = "o_in"
    GATE_IN = "gate_in"
    UP_IN = "up_in"
    HEAD_IN = "head_in"


# The input taps of linear layers (MID is the input of down), in block order.
INPUT_TAPS = (Tap.Q_IN, Tap.K_IN, Tap.V_IN, Tap.QKV_IN, Tap.O_IN, Tap.GATE_IN, Tap.UP_IN, Tap.MID, Tap.HEAD_IN)
_FFN_TAPS = (Tap.FFN_IN, Tap.GATE, Tap.UP, Tap.ACT, Tap.MID, Tap.OUT)


class UnsupportedModelError(UserError, ValueError):
    pass


@dataclass(frozen=True)
class AttnSpec:
    """Module names of one architecture's attention projections, relative to a decoder layer.

    Attributes:
        attn: dotted path from a decoder layer to the attention module.
        q, k, v: the query/key/value projections; with ``qkv`` set (one fused projection) they are ``None``.
        o: the output projection.
        qkv: the fused q/k/v projection (Phi-3 ``qkv_proj``, GPT-2 ``c_attn``, GPT-NeoX ``query_key_value``).
        conv1d: weights are GPT-2 ``Conv1D`` (stored ``[in, out]``).
        norm: the norm before attention, relative to the decoder layer: it maps the residual stream to the
            q/k/v input (:mod:`dormant.llm.input_prediction` applies it to an earlier layer's residual).
    """

    attn: str
    o: str
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None
    conv1d: bool = False
    norm: str = "input_layernorm"


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
        attention: where the attention projections live (:class:`AttnSpec`).
    """

    layers: str
    mlp: str
    up: str
    down: str
    act: str
    gate: str | None = None
    fused_gate_up: bool = False
    conv1d: bool = False
    attention: AttnSpec | None = None

    @property
    def gated(self) -> bool:
        return self.gate is not None


_LLAMA_ATTN = AttnSpec("self_attn", o="o_proj", q="q_proj", k="k_proj", v="v_proj")
_LLAMA_LIKE = FFNSpec("model.layers", "mlp", up="up_proj", down="down_proj", act="act_fn", gate="gate_proj",
                      attention=_LLAMA_ATTN)
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
        fused_gate_up=True, attention=AttnSpec("self_attn", o="o_proj", qkv="qkv_proj"),
    ),
    "opt": FFNSpec("model.decoder.layers", "", up="fc1", down="fc2", act="activation_fn",
                   attention=AttnSpec("self_attn", o="out_proj", q="q_proj", k="k_proj", v="v_proj",
                                      norm="self_attn_layer_norm")),
    "gpt2": FFNSpec("transformer.h", "mlp", up="c_fc", down="c_proj", act="act", conv1d=True,
                    attention=AttnSpec("attn", o="c_proj", qkv="c_attn", conv1d=True, norm="ln_1")),
    "gpt_neox": FFNSpec("gpt_neox.layers", "mlp", up="dense_h_to_4h", down="dense_4h_to_h", act="act",
                        attention=AttnSpec("attention", o="dense", qkv="query_key_value")),
}


@dataclass(frozen=True)
class TapPoint:
    """Where a tap is read: ``module`` name within its ``scope``, ``"in"``/``"out"``, optional half.

    ``scope`` is ``"ffn"`` (names relative to the FFN container; ``""`` = the container itself), ``"layer"``
    (relative to the decoder layer) or ``"model"`` (relative to the causal LM; the LM head, read once per token,
    carries layer index 0).
    """

    module: str
    direction: str
    half: int | None = None  # 0 = first half of the last dim (gate), 1 = second half (up)
    scope: str = "ffn"


@dataclass(frozen=True)
class Linear:
    """One linear layer of a block (or the LM head) and the tap on its input.

    Attributes:
        name: ``q``, ``k``, ``v``, ``qkv``, ``o``, ``gate``, ``up``, ``gate_up``, ``down`` or ``head``.
        tap: its input tap.
        in_features, out_features: the matrix shape ``[out, in]``.
    """

    name: str
    tap: Tap
    in_features: int
    out_features: int


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
        self.model = model
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
        """The taps this model has: the FFN's (no ``GATE`` for non-gated FFNs) and one per linear input."""
        ffn = tuple(t for t in _FFN_TAPS if self.gated or t is not Tap.GATE)
        inputs = tuple(lin.tap for lin in self.linears() if lin.tap not in ffn)
        return ffn + inputs

    def linears(self) -> tuple[Linear, ...]:
        """Every linear layer of a block, then the LM head, each with its input tap (in block order)."""
        a, s = self.spec.attention, self.spec
        d, i = int(self.hidden_size), int(self.intermediate_size)
        out: list[Linear] = []
        if a is not None:
            if a.qkv is not None:
                out.append(Linear("qkv", Tap.QKV_IN, *self._shape(self.attn_module(0, a.qkv), a.conv1d)))
            else:
                for name, tap in (("q", Tap.Q_IN), ("k", Tap.K_IN), ("v", Tap.V_IN)):
                    out.append(Linear(name, tap, *self._shape(self.attn_module(0, getattr(a, name)), a.conv1d)))
            out.append(Linear("o", Tap.O_IN, *self._shape(self.attn_module(0, a.o), a.conv1d)))
        if s.fused_gate_up:
            out.append(Linear("gate_up", Tap.UP_IN, d, 2 * i))
        elif s.gated:
            out += [Linear("gate", Tap.GATE_IN, d, i), Linear("up", Tap.UP_IN, d, i)]
        else:
            out.append(Linear("up", Tap.UP_IN, d, i))
        out.append(Linear("down", Tap.MID, i, d))
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        if head is not None:
            out.append(Linear("head", Tap.HEAD_IN, *self._shape(head, False)))
        return tuple(out)

    @staticmethod
    def _shape(module: nn.Module, conv1d: bool) -> tuple[int, int]:
        w = module.weight
        out_f, in_f = (w.shape[1], w.shape[0]) if conv1d else (w.shape[0], w.shape[1])
        return int(in_f), int(out_f)

    def attn_module(self, layer: int, name: str) -> nn.Module:
        a = self.spec.attention
        if a is None:
            raise ValueError(f"{self.model_type}: the adapter table has no attention projections")
        return _get(_get(self.layers[layer], a.attn), name)

    def attn_norm(self, layer: int) -> nn.Module:
        """The norm whose output is ``layer``'s q/k/v input."""
        a = self.spec.attention
        if a is None:
            raise ValueError(f"{self.model_type}: the adapter table has no attention projections")
        return _get(self.layers[layer], a.norm)

    def linear_weight(self, layer: int, name: str) -> torch.Tensor:
        """Weight ``[out, in]`` of linear ``name`` of ``layer`` (see :meth:`linears`); a view when possible."""
        a = self.spec.attention
        if name == "head":
            return self.model.get_output_embeddings().weight
        if name in ("q", "k", "v", "qkv", "o"):
            w = self.attn_module(layer, getattr(a, name)).weight
            return w.t() if a.conv1d else w
        ffn = self.weights(layer)
        if name == "gate_up":
            return torch.cat([ffn.gate, ffn.up])
        return {"gate": ffn.gate, "up": ffn.up, "down": ffn.down}[name]

    def tap_point(self, tap: Tap) -> TapPoint:
        s = self.spec
        if tap not in self.taps():
            raise ValueError(f"{self.model_type} has no {tap.value!r} tap; it has: "
                             f"{', '.join(t.value for t in self.taps())}")
        a = s.attention
        if tap in (Tap.Q_IN, Tap.K_IN, Tap.V_IN, Tap.QKV_IN, Tap.O_IN):
            name = {Tap.Q_IN: a.q, Tap.K_IN: a.k, Tap.V_IN: a.v, Tap.QKV_IN: a.qkv, Tap.O_IN: a.o}[tap]
            return TapPoint(f"{a.attn}.{name}", "in", scope="layer")
        if tap is Tap.GATE_IN:
            return TapPoint(s.gate, "in")
        if tap is Tap.UP_IN:
            return TapPoint(s.up, "in")
        if tap is Tap.HEAD_IN:
            return TapPoint("", "in", scope="head")
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

    def point_module(self, layer: int, point: TapPoint) -> nn.Module:
        """The module a tap point hooks, for ``layer`` (the LM head for scope ``"head"``)."""
        if point.scope == "head":
            return self.model.get_output_embeddings()
        if point.scope == "layer":
            return _get(self.layers[layer], point.module)
        return self.module(layer, point.module) if point.module else self.ffns[layer]

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
