"""Sparse gated-FFN decode: the weight layout, the thresholds, and one explicit table of implementations.

A decode step multiplies one token by every FFN weight, so it is bound by memory bandwidth: a neuron
whose intermediate ``h_i`` is zero need not have its up row or down column read at all (Deja Vu, TEAL,
CATS; Dhar et al. arXiv 2412.12178 §V). :class:`PackedFFN` stores each neuron's gate row, up row and
down column as contiguous rows (down transposed to neuron-major ``[I, D]``), built once per layer.
:func:`sparse_ffn_decode` computes :func:`dormant.kernels.reference.sparse_ffn` with the
implementation named by ``impl`` (:class:`Impl`); there is no fallback between implementations, and an
unsupported device or dtype raises :class:`UnsupportedKernelError` listing what is supported.

Modes (``active`` argument): ``None`` -- gate-first: the gate is read in full and only neurons whose
thresholded activation survives have their up and down rows read; a mask or index list -- from a
predictor or an oracle: only those neurons' gate, up and down rows are read.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, fields
from enum import Enum

import torch

from dormant.kernels import reference

__all__ = [
    "Impl",
    "IMPLS",
    "FFNThresholds",
    "PackedFFN",
    "pack_ffn",
    "sparse_ffn_decode",
    "resolve_impl",
    "default_impl",
    "check_impl",
    "UnsupportedKernelError",
]


class UnsupportedKernelError(ValueError):
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


def _cpu(packed, x, thresholds, active):
    from dormant.kernels import cpu

    return cpu.sparse_ffn(packed, x, thresholds, active)


def _triton(packed, x, thresholds, active):
    from dormant.kernels import triton_gpu

    return triton_gpu.sparse_ffn(packed, x, thresholds, active)


def _check_reference(device: torch.device, dtype: torch.dtype) -> None:
    return None


def _check_cpu(device: torch.device, dtype: torch.dtype) -> None:
    from dormant.kernels import cpu

    cpu.check(device, dtype)


def _check_triton(device: torch.device, dtype: torch.dtype) -> None:
    from dormant.kernels import triton_gpu

    triton_gpu.check(device, dtype)


# The one dispatch table: implementation -> (kernel, support check).
IMPLS: dict[Impl, tuple[Callable, Callable[[torch.device, torch.dtype], None]]] = {
    Impl.REFERENCE: (reference.sparse_ffn, _check_reference),
    Impl.CPU: (_cpu, _check_cpu),
    Impl.TRITON: (_triton, _check_triton),
}


def resolve_impl(impl: Impl | str) -> Impl:
    """``impl`` as an :class:`Impl`; an unknown name raises listing the implementations."""
    try:
        return Impl(impl)
    except ValueError:
        raise UnsupportedKernelError(
            f"unknown sparse FFN implementation {impl!r}; choose from: {', '.join(i.value for i in Impl)}"
        ) from None


def default_impl(device: torch.device | str) -> Impl:
    """The fast implementation for ``device``: ``cpu`` on CPUs, ``triton`` on CUDA (never ``reference``)."""
    kind = torch.device(device).type
    if kind == "cpu":
        return Impl.CPU
    if kind == "cuda":
        return Impl.TRITON
    raise UnsupportedKernelError(
        f"no sparse FFN kernel for device type {kind!r}; kernels exist for cpu (cpu) and cuda (triton)"
    )


def check_impl(impl: Impl | str, device: torch.device | str, dtype: torch.dtype) -> Impl:
    """Raise :class:`UnsupportedKernelError` unless ``impl`` runs on ``device`` in ``dtype``; returns the :class:`Impl`."""
    impl = resolve_impl(impl)
    IMPLS[impl][1](torch.device(device), dtype)
    return impl


def sparse_ffn_decode(
    packed: PackedFFN,
    x: torch.Tensor,
    thresholds: FFNThresholds | None = None,
    active: torch.Tensor | None = None,
    impl: Impl | str = Impl.REFERENCE,
) -> torch.Tensor:
    """One token through one sparse FFN layer.

    Args:
        packed: the layer's weights (:func:`pack_ffn`).
        x: ``[D]`` FFN input (cast to the weight dtype).
        thresholds: per-tap thresholds; ``None`` = none (with ``active=None`` that is the dense FFN).
        active: ``None`` (gate-first), a bool mask ``[I]``, or strictly increasing neuron indices ``[k]``.
        impl: which implementation runs it (:class:`Impl`); no fallback.

    Returns:
        ``y`` ``[D]`` in the weight dtype, equal to :func:`dormant.kernels.reference.sparse_ffn` within the
        implementation's tolerance.
    """
    impl = resolve_impl(impl)
    if x.shape != (packed.D,):
        raise ValueError(f"x must be one token [D] = [{packed.D}], got {tuple(x.shape)}")
    kernel, check = IMPLS[impl]
    check(packed.device, packed.dtype)
    return kernel(packed, x, thresholds or FFNThresholds(), active)
