"""Evaluation: ANN accuracy, and SNN accuracy after every step t = 1..T from one run, with spike counts.

The SNN prediction after step t is ``argmax_k (1/t) sum_{tau<=t} logits[tau, k]`` (logits averaged over steps, as
in QCFS and FTBC, Wu et al. ECCV 2024, arXiv 2403.18388). Firing rate of a layer at step t = fraction of its
neurons (over batch and all positions) that spike at t.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from dormant import distributed
from dormant.snn.monitors import SpikeMonitor, monitor_synapses
from dormant.snn.network import SpikingNetwork

__all__ = ["SNNEvaluation", "evaluate_ann", "evaluate_snn", "resolve_device", "per_step_correct"]


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` (or ``None``) is CUDA when available, else CPU; anything else is taken as given."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def per_step_correct(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``logits`` ``[T, N, K]``, labels ``[N]`` -> ``[T]`` number correct after each step (running mean readout)."""
    cum = logits.double().cumsum(0)
    return (cum.argmax(-1) == y.to(logits.device).unsqueeze(0)).sum(1).cpu()


@dataclass
class SNNEvaluation:
    """Per-step accuracy of one run.

    Attributes:
        T: steps simulated.
        n: images.
        correct: ``[T]`` images classified correctly after steps 1..T.
        rates: ``{neuron: [T]}`` firing rates per step.
        seconds: wall time.
        synaptic_rates: ``{conv/linear layer: [T]}`` input spike rates per step (:mod:`dormant.snn.energy`).
    """

    T: int
    n: int
    correct: torch.Tensor
    rates: dict[str, torch.Tensor] = field(default_factory=dict)
    seconds: float = 0.0
    synaptic_rates: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def accuracy(self) -> torch.Tensor:
        """``[T]`` accuracy (fraction) after each step."""
        return self.correct.double() / self.n

    def at(self, t: int) -> float:
        """Accuracy after step ``t`` (1-based)."""
        return float(self.accuracy[t - 1])

    def to_dict(self) -> dict:
        return {"T": self.T, "n": self.n, "accuracy": self.accuracy.tolist(), "seconds": self.seconds,
                "firing_rate": {k: float(v.mean()) for k, v in self.rates.items()},
                "firing_rate_per_step": {k: [round(float(r), 7) for r in v] for k, v in self.rates.items()},
                "synaptic_rate_per_step": {k: [round(float(r), 7) for r in v]
                                           for k, v in self.synaptic_rates.items()}}


@torch.no_grad()
def evaluate_ann(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500,
                 device: str | torch.device = "cpu") -> float:
    """Top-1 accuracy of ``model`` on normalised inputs ``x`` ``[N, ...]``."""
    model = model.eval().to(device)
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += int((model(x[i : i + batch_size].to(device)).argmax(-1).cpu() == y[i : i + batch_size]).sum())
    return correct / len(x)


@torch.no_grad()
def evaluate_snn(snn: SpikingNetwork, x: torch.Tensor, y: torch.Tensor, T: int, *, batch_size: int = 100,
                 chunk: int | None = None, monitor: bool = True, progress: bool = False, desc: str = "simulate"
                 ) -> SNNEvaluation:
    """Simulate ``T`` steps on every image of ``x`` and count correct predictions after every step.

    Args:
        snn: the network (its device is used).
        x, y: normalised inputs ``[N, ...]`` and labels ``[N]``.
        T: steps.
        batch_size: images per simulation batch.
        chunk: steps per stateless call (memory bound; results do not depend on it).
        monitor: record firing rates and the input spike rates of conv/linear layers.

    Under ``torchrun`` (:mod:`dormant.distributed`) each rank simulates its contiguous share of the images and the
    correct counts and monitor counts are summed across ranks (integers: the same result as one process).
    """
    from contextlib import nullcontext

    start = time.perf_counter()
    n_all = len(x)
    x, y = distributed.shard(x), distributed.shard(y)  # under torchrun: this rank's share of the images
    dev = snn.device
    mon = SpikeMonitor() if monitor else None
    correct = torch.zeros(T, dtype=torch.long)
    with monitor_synapses(snn) if monitor else nullcontext() as syn:
        for i in tqdm(range(0, len(x), batch_size), desc=desc, disable=not progress, leave=False):
            xb = x[i : i + batch_size].to(dev)
            if mon is not None:
                mon.start_batch()
                syn.start_batch(len(xb))
            logits = snn.simulate(xb, T, chunk=chunk, observer=mon)
            correct += per_step_correct(logits, y[i : i + batch_size])
        if monitor:
            syn.all_reduce_()
    if mon is not None:
        mon.all_reduce_()
    distributed.all_reduce_sum_(correct)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return SNNEvaluation(T, n_all, correct, mon.rates() if mon else {}, time.perf_counter() - start,
                         syn.rates() if monitor else {})
