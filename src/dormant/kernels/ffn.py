"""Sparse gated-FFN decode: one explicit table of implementations, and the call that dispatches through it.

:func:`sparse_ffn_decode` computes :func:`dormant.kernels.reference.sparse_ffn` with the implementation
named by ``impl`` (:class:`~dormant.kernels.base.Impl`); there is no fallback between implementations, and
an unsupported device or dtype raises :class:`~dormant.kernels.base.UnsupportedKernelError` listing what is
supported. The weight layout and thresholds are in :mod:`dormant.kernels.base`.

Modes (``active`` argument): ``None`` -- gate-first: the gate is read in full and only neurons whose
thresholded activation survives have their up and down rows read; a mask or index list -- from a
predictor or an oracle: only those neurons' gate, up and down rows are read.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dormant.kernels import reference
from dormant.kernels.base import FFNThresholds, Impl, PackedFFN, UnsupportedKernelError

__all__ = ["IMPLS", "sparse_ffn_decode", "resolve_impl", "default_impl", "check_impl"]


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
