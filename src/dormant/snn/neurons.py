"""Stateful spiking layers: integrate-and-fire neurons and spike-count max pooling.

Integrate-and-fire neuron with reset by subtraction (the neuron of QCFS, Bu et al. ICLR 2022, and of FTBC,
Wu et al. ECCV 2024, arXiv 2403.18388). Per element, for steps ``t = 1..T``::

    m[t] = v[t-1] + x[t] + beta[t]            membrane after integrating input current x[t]
    s[t] = H(m[t] - theta)                    spike (H = Heaviside, H(0) = 1)
    v[t] = m[t] - theta * s[t]                reset by subtraction
    o[t] = theta * s[t]                       output: spike of amplitude theta
    v[0] = v_init                             default v0 * theta, v0 = 1/2

with one additive membrane term per channel ``c`` and step ``t``::

    beta[t, c] = b_ftbc[t, c] + b[c] + shift * theta[c]

* ``b_ftbc`` (``step_bias``, ``[T_b, C]``): FTBC's temporal bias; steps ``t > T_b`` use 0.
* ``b`` (``bias``, ``[C]``): a constant per-channel bias (e.g. Li et al. 2021 bias correction).
* ``shift``: a per-step shift in units of theta (e.g. RTS, Deng & Gu 2021: ``1/(2T)``).
* ``v_init`` (optional, broadcastable to ``[C, ...]``): per-element initial membrane (e.g. potential correction);
  when unset, ``v[0] = v0 * theta``.

Summing the dynamics over t gives the rate identity ``mean_t o[t] = mean_t (x[t] + beta[t]) - (v[T] - v[0]) / T``,
so the output rate tracks the clipped input as T grows.

Spike-count max pooling (this project's max-pool method): a max-pooling window forwards, at step t, the spike of
the unit whose count so far is largest, ties broken towards a unit that spikes at t when its count before t was
maximal. Keyed by ``2 * n_j[t-1] + s_j[t]`` this makes the window's output count equal ``max_j n_j[t]`` at every
step (proof: the count maximum grows by one exactly when a unit that held it spikes), i.e. the output rate is the
maximum of the input rates, which is max-pooling of the ReLU output in the rate limit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dormant import distributed
from dormant.kernels import spiking
from dormant.snn.qcfs import qcfs

__all__ = ["IFNeuron", "SpikeMaxPool2d"]


class IFNeuron(nn.Module):
    """Multi-step IF neuron (see the module docstring for the equations).

    Inputs are chunks of consecutive steps, ``[T_c, N, C, *S]``; the membrane is kept between chunks until
    :meth:`reset`. In ANN mode (:meth:`ann`) the neuron is the ReLU it replaced (or ReLU clipped at theta).

    Args:
        theta: ``[C]`` thresholds (positive).
        v0: initial membrane in units of theta (``v[0] = v0 * theta``).
        shift: per-step membrane shift in units of theta.
        levels: 0 for a neuron converted from a ReLU; ``L`` for one converted from a QCFS activation with ``L``
            levels (its ANN mode is then that activation, :func:`dormant.snn.qcfs.qcfs`).
    """

    def __init__(self, theta: torch.Tensor, v0: float = 0.5, shift: float = 0.0, levels: int = 0):
        super().__init__()
        theta = torch.as_tensor(theta, dtype=torch.float32).reshape(-1)
        self.v0, self.shift = float(v0), float(shift)
        self.register_buffer("theta", theta.clone())
        self.register_buffer("levels", torch.tensor(int(levels)))
        self.register_buffer("bias", torch.zeros_like(theta))
        self.register_buffer("step_bias", torch.zeros(0, len(theta)))
        self.register_buffer("v_init", torch.zeros(0))  # empty: v(0) = v0 * theta
        self._v: torch.Tensor | None = None
        self._t = 0

    @property
    def channels(self) -> int:
        return self.theta.numel()

    def set_theta_(self, theta: torch.Tensor) -> None:
        """Replace the thresholds (resizing ``bias``/``step_bias`` to the new channel count)."""
        theta = torch.as_tensor(theta, dtype=torch.float32, device=self.theta.device).reshape(-1)
        if not (torch.isfinite(theta).all() and (theta > 0).all()):
            raise ValueError("thresholds must be positive and finite")
        if theta.numel() != self.theta.numel():
            self.bias = torch.zeros_like(theta)
            self.step_bias = torch.zeros(0, theta.numel(), device=theta.device)
        self.theta = theta.clone()

    def reset(self) -> None:
        """Forget the membrane: the next chunk starts at step 1."""
        self._v, self._t = None, 0

    @property
    def t(self) -> int:
        """Steps simulated since the last :meth:`reset`."""
        return self._t

    def _bshape(self, x: torch.Tensor) -> tuple[int, ...]:
        # [C] -> [C, 1, ...] broadcasting over one sample [C, *S]
        return (self.channels,) + (1,) * (x.dim() - 3)

    def extra(self) -> torch.Tensor:
        """``b + shift * theta``: the step-independent part of ``beta``, ``[C]``."""
        return self.bias + self.shift * self.theta

    def beta(self, t0: int, n: int) -> torch.Tensor:
        """``beta[t0+1 .. t0+n]`` as ``[n, C]``."""
        sb = torch.zeros(n, self.channels, device=self.theta.device)
        k = max(0, min(n, self.step_bias.shape[0] - t0))
        if k:
            sb[:k] = self.step_bias[t0 : t0 + k]
        return sb + self.extra()

    def _init_membrane(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[1:]
        if self.v_init.numel():
            return (self.v_init * torch.ones(shape, device=x.device)).to(x.dtype).contiguous()
        return (self.v0 * self.theta).view(self._bshape(x)).expand(shape).to(x.dtype).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Simulate ``x``: ``[T_c, N, C, *S]`` input currents -> ``[T_c, N, C, *S]`` outputs ``theta * s``.

        ``x`` may be a step-broadcast view (the same ``[N, C, *S]`` at every step). The recursion runs in
        :func:`dormant.kernels.spiking.if_forward` (fused on the CPU, the step-by-step reference elsewhere or
        inside ``spiking.using("reference")``; identical outputs).
        """
        if x.shape[2] != self.channels:
            raise ValueError(f"neuron has {self.channels} channels, input has {x.shape[2]}")
        if self._v is None:
            self._v = self._init_membrane(x)
        # x[t] + beta[t] is skipped when beta is all zero (plain conversion), which gives the same values
        beta = self.beta(self._t, len(x))
        out = spiking.if_forward(x, beta if bool(beta.any()) else None, self.theta, self._v)
        self._t += len(x)
        return out

    def calibrate_ftbc_(self, x: torch.Tensor, target: torch.Tensor, alpha: float) -> torch.Tensor:
        """Simulate one chunk while updating the FTBC biases of its steps, in place.

        At each step ``t`` (sequentially): ``m = v + x[t] + beta[t]`` with the *current* bias; the channel error
        ``e[c] = mean_{N,S}(theta*s[t] - target)`` (float64 sums; under ``torchrun`` over every rank's share of the
        batch, :mod:`dormant.distributed`); ``b_ftbc[t] -= alpha * e``; then the step is taken again with the
        updated bias, so the returned trajectory is exactly what :meth:`forward` gives with the new biases.

        Args:
            x: ``[T_c, N, C, *S]`` input currents of steps ``t0+1..t0+T_c``.
            target: ``[N, C, *S]`` ANN activation this layer should match at every step.
            alpha: step size.

        Returns:
            ``[T_c, N, C, *S]`` outputs with the updated biases.
        """
        if self._v is None:
            self._v = self._init_membrane(x)
        t0, n = self._t, len(x)
        if self.step_bias.shape[0] < t0 + n:
            grown = torch.zeros(t0 + n, self.channels, device=self.theta.device)
            grown[: self.step_bias.shape[0]] = self.step_bias
            self.step_bias = grown
        extra = self.extra()
        dims = [0] + list(range(2, x.dim() - 1))  # batch and space of one step [N, C, *S]
        v = self._v
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        for i in range(n):
            t = t0 + i
            beta = (self.step_bias[t] + extra).to(x.dtype)  # the current bias (same sum as beta())
            diff = spiking.if_probe(x[i], beta, self.theta, v, target)
            # the channel mean over the batch, as a float64 sum and count summed across torchrun ranks (each holds a
            # share of the batch), so ranks agree with one process over the whole batch
            total = torch.cat([diff.double().sum(dim=dims), diff.new_full((1,), diff[:, 0].numel(), dtype=torch.float64)])
            distributed.all_reduce_sum_(total)
            err = total[:-1] / total[-1]
            self.step_bias[t] -= alpha * err.to(self.step_bias.dtype)
            beta = (self.step_bias[t] + extra).to(x.dtype)
            out[i] = spiking.if_forward(x[i : i + 1], beta.view(1, -1), self.theta, v)[0]  # forward()'s arithmetic
        self._t += n
        return out

    def ann(self, x: torch.Tensor, clip: bool = False) -> torch.Tensor:
        """ANN counterpart of ``x`` ``[N, C, *S]``: ``relu(x)``, or ``clamp(x, 0, theta)`` when ``clip``; for a
        neuron converted from QCFS (``levels > 0``) always the QCFS activation with clip theta (shift 1/2)."""
        L = int(self.levels)
        if not clip and not L:
            return torch.relu(x)
        theta = self.theta.view((self.channels,) + (1,) * (x.dim() - 2)).to(x.dtype)
        if L:
            return qcfs(x, theta, L, 0.5)
        return torch.minimum(torch.relu(x), theta)

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, v0={self.v0}, shift={self.shift}, levels={int(self.levels)}, "
                f"steps_with_bias={self.step_bias.shape[0]}")


class SpikeMaxPool2d(nn.Module):
    """Spike-count max pooling (module docstring); in ANN mode the max pooling it replaced.

    Args:
        pool: the ``nn.MaxPool2d`` being replaced (its geometry is kept).
    """

    def __init__(self, pool: nn.MaxPool2d):
        super().__init__()
        if pool.return_indices:
            raise ValueError("max pooling that returns indices cannot be converted")
        self.kernel_size, self.stride, self.padding = pool.kernel_size, pool.stride, pool.padding
        self.dilation, self.ceil_mode = pool.dilation, pool.ceil_mode
        self._count: torch.Tensor | None = None

    def _pool(self, x: torch.Tensor, indices: bool = False):
        return F.max_pool2d(x, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode,
                            return_indices=indices)

    def reset(self) -> None:
        self._count = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[T_c, N, C, H, W]`` spikes (0 or theta) -> ``[T_c, N, C, H', W']`` spikes."""
        tc, n, c, h, w = x.shape
        s = (x > 0).to(x.dtype)
        count = torch.cumsum(s, dim=0)
        if self._count is not None:
            count = count + self._count
        key = 2 * (count - s) + s  # 2 * n[t-1] + s[t]: integers, exact in float
        _, idx = self._pool(key.reshape(tc * n, c, h, w), indices=True)
        out = x.reshape(tc * n, c, h * w).gather(2, idx.flatten(2)).view(tc, n, *idx.shape[1:])
        self._count = count[-1]
        return out

    def ann(self, x: torch.Tensor, clip: bool = False) -> torch.Tensor:
        return self._pool(x)
