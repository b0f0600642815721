"""Integrate-and-fire recursion in plain torch, step by step: the specification of ``csrc/spiking.cpp``.

This is the loop :class:`dormant.snn.neurons.IFNeuron` ran before the fused kernel existed, kept op for op so
the kernel can be tested equal to it bit for bit. Per element and step (reset by subtraction, ``H(0) = 1``)::

    v = v + (x[t] + beta[t, c])        (x[t] alone when there is no beta)
    o[t] = theta[c] if v >= theta[c] else 0
    v = v - o[t]

Runs on any device (it is what CUDA uses).
"""

from __future__ import annotations

import torch

__all__ = ["count_nonzero", "if_forward", "if_probe"]


def _channel_shape(x: torch.Tensor) -> tuple[int, ...]:
    # [C] -> [C, 1, ...] broadcasting over one sample [C, *S] of x [N, C, *S]
    return (x.shape[1],) + (1,) * (x.dim() - 2)


def if_forward(x: torch.Tensor, beta: torch.Tensor | None, theta: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Simulate ``x`` ``[T, N, C, *S]`` from membranes ``v`` ``[N, C, *S]`` (updated in place).

    Args:
        beta: ``[T, C]`` per-step membrane terms added to the input, or ``None`` (none).
        theta: ``[C]`` thresholds.

    Returns:
        ``[T, N, C, *S]`` outputs ``theta * s[t]``.
    """
    shape = _channel_shape(v)
    th = theta.view(shape).to(x.dtype)
    drive = x + beta.to(x.dtype).view(len(x), 1, *shape) if beta is not None else x
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    spike = torch.empty(x.shape[1:], dtype=torch.bool, device=x.device)
    zero = th.new_zeros(())
    for i in range(len(x)):
        v.add_(drive[i])
        torch.ge(v, th, out=spike)
        torch.where(spike, th, zero, out=out[i])
        v.sub_(out[i])
    return out


def if_probe(x: torch.Tensor, beta: torch.Tensor, theta: torch.Tensor, v: torch.Tensor,
             target: torch.Tensor) -> torch.Tensor:
    """One step looked at, not taken: ``H(v + (x + beta) - theta) * theta - target``, all ``[N, C, *S]``
    (``beta`` ``[C]``); ``v`` is not changed. FTBC's error before its update (:mod:`dormant.snn.ftbc`)."""
    shape = _channel_shape(v)
    th = theta.view(shape).to(x.dtype)
    m = v + (x + beta.to(x.dtype).view(shape))
    return torch.where(m >= th, th, th.new_zeros(())) - target


def count_nonzero(rows: torch.Tensor) -> torch.Tensor:
    """Non-zero elements per row of ``rows`` ``[T, K]``: ``[T]`` int64."""
    return (rows != 0).sum(1)
