"""The specification of sparse gated-FFN decode, in plain torch: what every fast kernel must compute.

For one token ``x`` ``[D]`` and one gated FFN layer (gate/up ``[I, D]``, down ``[D, I]``)::

    g = Z(gate x, T_gate)          a = Z(act(g), T_act)          u = Z(up x, T_up)
    h = Z(a * u, T_mid) * m        y = Z(down h, T_out)

with ``Z(v, T) = 0 where |v| < T else v`` -- the rule :func:`dormant.llm.sparsify.sparsify_` enforces
with hooks (paper Eq. 7, Dhar et al. arXiv 2412.12178; ``T = 0`` leaves values untouched) -- and
``m`` the optional neuron mask of a predictor or an oracle (all ones when absent). The taps are those
of :mod:`dormant.llm.adapters`: ``GATE``, ``ACT``, ``UP``, ``MID``, ``OUT``. Every product is computed in
the weight dtype exactly as the dense Hugging Face module does (so bf16 intermediates are rounded to
bf16 and a threshold is compared in that dtype); this is the dense, hook-thresholded computation
restricted to the active neurons, and it reads every weight. Fast kernels skip the rows of neurons
with ``h_i = 0`` and must match it within the tolerances stated in ``tests/kernels``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["ACTIVATIONS", "zero_below", "as_mask", "sparse_ffn"]


def _gelu_tanh(g: torch.Tensor) -> torch.Tensor:
    return F.gelu(g, approximate="tanh")


# Activations the kernels implement, by name (SwiGLU: Llama, Mistral, Qwen; GeGLU-tanh: Gemma).
ACTIVATIONS = {"silu": F.silu, "gelu_tanh": _gelu_tanh}


def zero_below(v: torch.Tensor, t: float) -> torch.Tensor:
    """``Z(v, t)``: zero the entries with ``|v| < t`` (the comparison runs in ``v``'s dtype); ``t = 0`` is a no-op."""
    return v.masked_fill(v.abs() < t, 0) if t > 0 else v


def as_mask(active: torch.Tensor, n: int) -> torch.Tensor:
    """A bool mask ``[n]`` from a bool mask ``[n]`` or a tensor of neuron indices ``[k]``."""
    if active.dtype == torch.bool:
        if active.shape != (n,):
            raise ValueError(f"a neuron mask must have shape ({n},), got {tuple(active.shape)}")
        return active
    mask = torch.zeros(n, dtype=torch.bool, device=active.device)
    return mask.index_fill_(0, active.long(), True)


def sparse_ffn(packed, x: torch.Tensor, thresholds, active: torch.Tensor | None = None) -> torch.Tensor:
    """Reference sparse FFN decode.

    Args:
        packed: a :class:`dormant.kernels.PackedFFN` (gate/up/down_t ``[I, D]``).
        x: the token's FFN input ``[D]``.
        thresholds: a :class:`dormant.kernels.FFNThresholds`.
        active: optional neuron mask ``[I]`` (bool) or neuron indices ``[k]``.

    Returns:
        ``y`` ``[D]`` in the weight dtype.
    """
    t = thresholds
    xs = x.to(packed.dtype)
    g = zero_below(F.linear(xs, packed.gate), t.gate)
    a = zero_below(ACTIVATIONS[packed.activation](g), t.act)
    u = zero_below(F.linear(xs, packed.up), t.up)
    h = zero_below(a * u, t.mid)
    if active is not None:
        h = h.masked_fill(~as_mask(active, packed.I), 0)
    return zero_below(F.linear(h, packed.down_t.T), t.out)
