"""Synaptic operations and energy estimates of a converted network, against the ANN it came from.

Conventions (as in SpikingJelly issue #258, Spikformer, and the FTBC peers; see ``notes-ftbc.md`` Sec. 4):

* ``MACs_l``: multiply-accumulates of synaptic layer l (conv or linear) for one sample in the ANN::

      conv:   MACs = C_out * H_out * W_out * (C_in / groups) * k_h * k_w        linear: MACs = in * out

  (the FLOPs of the SNN literature, which counts one MAC as one FLOP).
* ``r_l[t]``: input spike rate of layer l at step t = fraction of its input elements that are non-zero (a spike
  of amplitude theta, or a sum of spikes after average pooling / residual addition).
* Synaptic operations of a spiking-input layer up to step T (one accumulate per non-zero input and fan-out)::

      SOP_l(T) = sum_{t<=T} r_l[t] * MACs_l  =  T * rbar_l * MACs_l       (rbar_l: mean rate over steps 1..T)

* Layers whose input is the analog image (no neuron in between; the first conv) multiply: they cost ``MACs_l``
  multiply-accumulates once (``analog_input="once"``: the input current is the same at every step, so it is
  computed once and injected every step) or ``T * MACs_l`` (``"every_step"``, what a naive simulation does).
* Energy per sample, with ``E_AC = 0.9 pJ`` and ``E_MAC = 4.6 pJ`` (Horowitz, "Computing's energy problem (and what
  we can do about it)", ISSCC 2014: 32-bit float add 0.9 pJ, multiply 3.7 pJ, in 45 nm)::

      E_SNN(T) = E_MAC * sum_{analog l} MACs_l * (1 or T) + E_AC * sum_{spiking l} SOP_l(T)
      E_ANN    = E_MAC * sum_l MACs_l

Not counted (as in the convention): membrane updates, threshold comparisons, biases, pooling, memory traffic.
The ``r * MACs`` form assumes every input element has the same fan-out, which is exact for linear layers and for
convolutions up to the border positions of padded convolutions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import fx, nn

from dormant.snn.configs import EnergyConfig
from dormant.snn.neurons import IFNeuron, SpikeMaxPool2d

__all__ = ["E_AC_PJ", "E_MAC_PJ", "EnergyConfig", "SynapticLayer", "synaptic_layers", "layer_macs", "synaptic_ops",
           "energy_estimate", "EnergyEstimate"]

E_AC_PJ = 0.9  # Horowitz 2014, 45 nm, 32-bit float add
E_MAC_PJ = 4.6  # Horowitz 2014, 45 nm, 32-bit float multiply (3.7) + add (0.9)

_SYNAPTIC = (nn.Conv1d, nn.Conv2d, nn.Linear)


@dataclass(frozen=True)
class SynapticLayer:
    """A conv/linear layer of a converted network.

    Attributes:
        macs: multiply-accumulates for one sample (ANN).
        analog: its input comes from the analog input without a neuron in between (it multiplies).
        in_elements: input elements per sample (the denominator of its rate).
    """

    macs: int
    analog: bool
    in_elements: int


def layer_macs(module: nn.Module, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> int:
    """MACs of ``module`` for one sample, from its input and output shapes without the batch dimension.

    Args:
        module: ``nn.Conv1d``, ``nn.Conv2d`` or ``nn.Linear``.
        in_shape: e.g. ``(C_in, H, W)``; out_shape: e.g. ``(C_out, H_out, W_out)``.
    """
    if isinstance(module, nn.Linear):
        rows = 1
        for d in out_shape[:-1]:
            rows *= d
        return rows * module.in_features * module.out_features
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        k = 1
        for d in module.kernel_size:
            k *= d
        n_out = 1
        for d in out_shape:
            n_out *= d
        return n_out * (module.in_channels // module.groups) * k
    raise TypeError(f"no MAC count for {type(module).__name__}; synaptic layers are {[c.__name__ for c in _SYNAPTIC]}")


def _analog_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes whose value depends on the input through a path without a spiking layer."""
    mods = dict(gm.named_modules())
    analog: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            analog.add(node)
            continue
        if node.op == "call_module" and isinstance(mods[node.target], (IFNeuron, SpikeMaxPool2d)):
            continue
        if any(a in analog for a in node.all_input_nodes):
            analog.add(node)
    return analog


@torch.no_grad()
def synaptic_layers(snn) -> dict[str, SynapticLayer]:
    """``{module name: SynapticLayer}`` for every conv/linear call of a :class:`SpikingNetwork`, in graph order.

    Shapes come from one ANN-mode forward of a zero input of the network's input shape.
    """
    gm = snn.net
    mods = dict(gm.named_modules())
    analog = _analog_nodes(gm)
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    handles = []
    for name, m in mods.items():
        if isinstance(m, _SYNAPTIC):
            def hook(mod, inp, out, name=name):
                shapes[name] = (tuple(inp[0].shape[1:]), tuple(out.shape[1:]))
            handles.append(m.register_forward_hook(hook))
    try:
        x = torch.zeros(1, *snn.meta["input_shape"], device=snn.device)
        snn.ann_forward(x)
    finally:
        for h in handles:
            h.remove()
    out: dict[str, SynapticLayer] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(mods[node.target], _SYNAPTIC) and node.target not in out:
            i, o = shapes[node.target]
            n_in = 1
            for d in i:
                n_in *= d
            is_analog = any(a in analog for a in node.all_input_nodes)
            out[node.target] = SynapticLayer(layer_macs(mods[node.target], i, o), is_analog, n_in)
    return out


def synaptic_ops(rates: torch.Tensor, macs: int) -> torch.Tensor:
    """``SOP(T) = sum_{t<=T} r[t] * MACs`` for every T: ``rates`` ``[T]`` -> ``[T]`` cumulative SOPs per sample."""
    return torch.as_tensor(rates, dtype=torch.float64).cumsum(0) * float(macs)


@dataclass
class EnergyEstimate:
    """Operation counts and energy per sample after T steps (module docstring for the formulas).

    Attributes:
        T: steps.
        sops: synaptic accumulates of spiking-input layers.
        macs: multiply-accumulates of analog-input layers.
        energy_pj: ``E_MAC * macs + E_AC * sops``.
        ann_macs, ann_energy_pj: the ANN's MACs and ``E_MAC * ann_macs``.
        per_layer_sops: ``{layer: SOP}`` (analog layers: their MACs).
    """

    T: int
    sops: float
    macs: float
    energy_pj: float
    ann_macs: float
    ann_energy_pj: float
    per_layer_sops: dict[str, float]

    @property
    def ratio(self) -> float:
        """SNN energy / ANN energy."""
        return self.energy_pj / self.ann_energy_pj

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio}


def energy_estimate(layers: dict[str, SynapticLayer], rates: dict[str, Any], T: int,
                    cfg: EnergyConfig | None = None) -> EnergyEstimate:
    """Energy per sample after ``T`` steps.

    Args:
        layers: from :func:`synaptic_layers` (or hand-made).
        rates: ``{layer: [>= T]}`` input rates per step (analog layers may be missing: they are not used).
        T: steps (1-based; rates of steps 1..T are used).
        cfg: energy constants and the analog-input rule.
    """
    cfg = cfg or EnergyConfig()
    sops = macs = 0.0
    per_layer: dict[str, float] = {}
    for name, layer in layers.items():
        if layer.analog:
            ops = layer.macs * (T if cfg.analog_input == "every_step" else 1)
            macs += ops
        else:
            r = torch.as_tensor(rates[name], dtype=torch.float64)
            if len(r) < T:
                raise ValueError(f"layer {name}: rates for {len(r)} steps, asked for T={T}")
            ops = float(synaptic_ops(r[:T], layer.macs)[-1])
            sops += ops
        per_layer[name] = float(ops)
    ann_macs = float(sum(layer.macs for layer in layers.values()))
    return EnergyEstimate(T, sops, macs, cfg.e_mac_pj * macs + cfg.e_ac_pj * sops, ann_macs,
                          cfg.e_mac_pj * ann_macs, per_layer)
