"""Observers of a simulation: spikes per neuron layer and step, non-zero inputs per synaptic layer and step.

:class:`SpikeMonitor` is passed as ``observer`` to :meth:`~dormant.snn.network.SpikingNetwork.simulate` (firing
rates); :func:`monitor_synapses` hooks every conv/linear input (input spike rates, the ``r_l[t]`` of
:mod:`dormant.snn.energy`). Both accumulate through one :class:`StepCounts`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from dormant import distributed
from dormant.kernels import spiking
from dormant.snn.energy import SynapticLayer, synaptic_layers

__all__ = ["StepCounts", "SpikeMonitor", "SynapticMonitor", "monitor_synapses"]


class StepCounts:
    """Non-zero elements per step and name, summed over the batches of a simulation run in time chunks.

    Attributes:
        counts: ``{name: [T] float64}`` non-zero elements summed over batch and positions.
        samples: samples seen (per name).
    """

    def __init__(self):
        self.counts: dict[str, torch.Tensor] = {}
        self.samples: dict[str, int] = {}
        self._t: dict[str, int] = {}

    def start_batch(self) -> None:
        self._t = {}

    def add(self, name: str, x: torch.Tensor, n: int) -> None:
        """``x``: ``[tc, ...]`` the next ``tc`` steps of ``name`` for one batch of ``n`` samples."""
        tc = x.shape[0]
        c = spiking.count_nonzero(x).double().cpu()
        t0 = self._t.get(name, 0)
        if t0 == 0:
            self.samples[name] = self.samples.get(name, 0) + n
        cur = self.counts.get(name, torch.zeros(0, dtype=torch.float64))
        if len(cur) < t0 + tc:
            cur = torch.cat([cur, torch.zeros(t0 + tc - len(cur), dtype=torch.float64)])
        cur[t0 : t0 + tc] += c
        self.counts[name] = cur
        self._t[name] = t0 + tc

    def all_reduce_(self) -> None:
        """Sum counts and samples over the ranks of a ``torchrun`` group (each simulated a share of the images);
        nothing in one process. Every rank must have seen the same names and steps."""
        if distributed.world() <= 1:
            return
        for name in sorted(self.counts):
            distributed.all_reduce_sum_(self.counts[name])
            n = torch.tensor([float(self.samples[name])], dtype=torch.float64)
            self.samples[name] = int(distributed.all_reduce_sum_(n).item())


class SpikeMonitor(StepCounts):
    """Observer counting spikes per neuron layer and step (pass it as ``observer`` to ``simulate``).

    Attributes:
        counts: ``{name: [T] float64}`` spikes summed over batch and positions.
        sizes: ``{name: neurons per sample}``.
        samples: samples seen (per name).
    """

    def __init__(self):
        super().__init__()
        self.sizes: dict[str, int] = {}

    def __call__(self, name: str, out: torch.Tensor) -> None:
        self.sizes[name] = out[0, 0].numel()
        self.add(name, out, out.shape[1])

    def rates(self) -> dict[str, torch.Tensor]:
        """``{name: [T]}`` firing rate per step."""
        return {k: v / (self.samples[k] * self.sizes[k]) for k, v in self.counts.items()}

    def mean_rates(self, T: int | None = None) -> dict[str, float]:
        """Firing rate per layer averaged over steps 1..T (all steps by default)."""
        return {k: float(r[:T].mean()) for k, r in self.rates().items()}


class SynapticMonitor(StepCounts):
    """Counts non-zero inputs of every conv/linear layer per step during :meth:`SpikingNetwork.simulate`.

    Use through :func:`monitor_synapses`; call :meth:`start_batch` with the batch size before each simulation.

    Attributes:
        counts: ``{layer: [T] float64}`` non-zero input elements summed over the batch.
        samples: samples seen per layer.
    """

    def __init__(self, layers: dict[str, SynapticLayer]):
        super().__init__()
        self.layers = layers
        self._n = 0

    def start_batch(self, n: int) -> None:
        super().start_batch()
        self._n = n

    def observe(self, name: str, x: torch.Tensor) -> None:
        """``x``: the layer's merged input ``[T_c * n, ...]`` (step-major)."""
        if not self._n or x.shape[0] % self._n:
            return  # not a simulation call (e.g. an ANN-mode forward)
        self.add(name, x.reshape(x.shape[0] // self._n, -1), self._n)

    def rates(self) -> dict[str, torch.Tensor]:
        """``{layer: [T]}`` input rate per step (fraction of non-zero input elements)."""
        return {k: v / (self.samples[k] * self.layers[k].in_elements) for k, v in self.counts.items()}


@contextmanager
def monitor_synapses(snn) -> Iterator[SynapticMonitor]:
    """Context manager: hooks every conv/linear input of ``snn`` and always removes the hooks."""
    layers = synaptic_layers(snn)
    mon = SynapticMonitor(layers)
    mods = dict(snn.net.named_modules())
    handles = [mods[name].register_forward_pre_hook(lambda m, inp, name=name: mon.observe(name, inp[0]))
               for name in layers]
    try:
        yield mon
    finally:
        for h in handles:
            h.remove()
