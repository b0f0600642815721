"""The types every sparse FFN implementation shares: the weight layout, the thresholds, the implementations.

A decode step multiplies one token by every FFN weight, so it is bound by memory bandwidth: a neuron
whose intermediate ``h_i`` is zero need not have its up row or down column read at all (Deja Vu, TEAL,
CATS; Dhar et al. arXiv 2412.12178 §V). :class:`PackedFFN` stores each neuron's gate row, up row and
down column as contiguous rows (down transposed to neuron-major ``[I, D]``), built once per layer.
This module imports no implementation; :mod:`dormant.kernels.ffn` dispatches to them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields
from enum import Enum

import torch

from dormant.config import UserError
from dormant.kernels import reference

__all__ = ["Impl", "FFNThresholds", "PackedFFN", "pack_ffn", "UnsupportedKernelError"]


class UnsupportedKernelError(UserError, ValueError):
    """An implementation was asked for a device, dtype or mode it does not support (or is unavailable)."""


class Impl(str, Enum):
    REFERENCE = "reference"  # plain torch, any device and dtype; reads every weight (the specification)
    CPU = "cpu"  # C++ / OpenMP / AVX2-FMA, built on first use (dormant.kernels.cpu); float32, bfloat16
    TRITON = "triton"  # Triton GPU kernels (dormant.kernels.triton_gpu); float16, bfloat16, float32


@dataclass(frozen=True)
class FFNThresholds:
    """Zero-enforcing thresholds of one FFN layer at the taps a kernel can apply (``0`` = not thresholded).

    Attributes:
        gate: ``GATE`` -- the gate projection's output, before the activation.
        up: ``UP`` -- the up projection's output.
        act: ``ACT`` -- ``act(gate x)`` (CATS).
        mid: ``MID`` -- ``act(g) * u``, the input of down.
        out: ``OUT`` -- the FFN output (down's output).
    """

    gate: float = 0.0
    up: float = 0.0
    act: float = 0.0
    mid: float = 0.0
    out: float = 0.0

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if not v >= 0 or v == float("inf"):
                raise ValueError(f"threshold {f.name}={v} must be finite and >= 0")

    def rounded(self, dtype: torch.dtype) -> FFNThresholds:
        """The thresholds as a ``dtype`` tensor compares them (torch casts a Python scalar to the tensor's dtype)."""
        return _rounded(self, dtype)


@functools.lru_cache(maxsize=4096)
def _rounded(t: FFNThresholds, dtype: torch.dtype) -> FFNThresholds:
    vals = torch.tensor([getattr(t, f.name) for f in fields(t)], dtype=torch.float64).to(dtype).double()
    return FFNThresholds(*vals.tolist())


@dataclass
class PackedFFN:
    """One gated FFN layer in the sparse-decode layout.

    Neuron ``i`` owns three contiguous rows of ``D`` elements: ``gate[i]``, ``up[i]`` and ``down_t[i]``
    (column ``i`` of down). The three tensors are ``[I, D]`` with unit stride along ``D``; their row
    stride is ``D`` (separate buffers) or ``3 D`` (one interleaved buffer ``[I, 3, D]``).

    Attributes:
        gate: ``[I, D]`` gate projection weight.
        up: ``[I, D]`` up projection weight.
        down_t: ``[I, D]`` down projection weight, transposed.
        activation: a key of :data:`dormant.kernels.reference.ACTIVATIONS`.
    """

    gate: torch.Tensor
    up: torch.Tensor
    down_t: torch.Tensor
    activation: str = "silu"

    def __post_init__(self):
        if self.activation not in reference.ACTIVATIONS:
            raise ValueError(
                f"activation {self.activation!r} not supported; choose from: {', '.join(reference.ACTIVATIONS)}"
            )
        shapes = {tuple(t.shape) for t in (self.gate, self.up, self.down_t)}
        if len(shapes) != 1 or self.gate.ndim != 2:
            raise ValueError(
                f"gate, up and down_t must all be [I, D]; got {[tuple(t.shape) for t in (self.gate, self.up, self.down_t)]}"
            )
        if len({t.dtype for t in (self.gate, self.up, self.down_t)}) != 1:
            raise ValueError("gate, up and down_t must share one dtype")
        if len({t.device for t in (self.gate, self.up, self.down_t)}) != 1:
            raise ValueError("gate, up and down_t must live on one device")
        if any(t.stride(1) != 1 and t.shape[1] > 1 for t in (self.gate, self.up, self.down_t)):
            raise ValueError("each neuron's rows must be contiguous (unit stride along D)")

    @property
    def I(self) -> int:  # noqa: E743 -- the paper's name for the intermediate size
        return self.gate.shape[0]

    @property
    def D(self) -> int:
        return self.gate.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.gate.dtype

    @property
    def device(self) -> torch.device:
        return self.gate.device

    def nbytes(self) -> int:
        """Bytes of weights a dense decode step reads."""
        return 3 * self.I * self.D * self.gate.element_size()


def pack_ffn(
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    activation: str = "silu",
    interleave: bool = False,
) -> PackedFFN:
    """Lay out one gated FFN layer for sparse decode (done once per model, not per token).

    Args:
        gate: ``[I, D]`` (``nn.Linear`` weight of gate_proj).
        up: ``[I, D]``.
        down: ``[D, I]`` (``nn.Linear`` weight of down_proj).
        activation: ``"silu"`` or ``"gelu_tanh"``.
        interleave: one buffer ``[I, 3, D]`` (each neuron's 3 rows adjacent; copies all weights) instead of
            reusing contiguous gate/up tensors and copying only ``down`` transposed.

    Returns:
        The :class:`PackedFFN`. Without ``interleave``, ``gate``/``up`` are shared with the inputs when they
        are contiguous, so the extra memory is one copy of ``down``.
    """
    if gate.shape != up.shape or down.shape != gate.shape[::-1]:
        raise ValueError(
            f"expected gate/up [I, D] and down [D, I], got {tuple(gate.shape)}, {tuple(up.shape)}, {tuple(down.shape)}"
        )
    with torch.no_grad():
        if interleave:
            buf = torch.empty(gate.shape[0], 3, gate.shape[1], dtype=gate.dtype, device=gate.device)
            buf[:, 0].copy_(gate)
            buf[:, 1].copy_(up)
            buf[:, 2].copy_(down.T)
            return PackedFFN(buf[:, 0], buf[:, 1], buf[:, 2], activation)
        return PackedFFN(
            gate.detach().contiguous(), up.detach().contiguous(), down.detach().T.contiguous(), activation
        )
