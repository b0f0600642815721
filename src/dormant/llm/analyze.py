"""Natural sparsity, activation and weight distributions: the measurements behind ``dormant analyze``.

The measurements of Dhar et al. (IPCCC 2024, arXiv 2412.12178) §III on any supported model: natural FFN
activation sparsity per layer (Figs 3-4: ReLU OPT is >90% sparse, GELU/SiLU models almost not at all),
per-layer CDFs of ``|activation|`` per site (Figs 5-7) and weight magnitudes (Fig 2). The run that also reads
thresholds vs depth and accounts bytes/FLOPs per policy, and writes the report, is
:mod:`dormant.experiments.analysis`.

Natural sparsity at a tap is the fraction of entries with ``|a| <= eps`` (``eps = 0``: exact zeros), over
all tokens and neurons of a layer, counted exactly during the same forward pass that fills the
:class:`~dormant.llm.stats.ActivationStats` histograms the CDFs are read from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dormant.llm.adapters import FFNLayout, Tap, ffn_layout
from dormant.llm.configs import DEFAULT_EPS
from dormant.llm.hooks import tap_hooks
from dormant.llm.models import input_device
from dormant.llm.stats import ActivationStats, MagnitudeHistogram, StatsConfig, collect_stats

__all__ = ["DEFAULT_EPS", "NaturalSparsity", "analyze_activations", "WeightStats", "weight_stats"]



# ----------------------------------------------------------------------------------------------------
# Natural sparsity and activation distributions


@dataclass
class NaturalSparsity:
    """Fraction of ``|a| <= eps`` per layer and tap.

    Attributes:
        taps: the measured taps.
        eps: the thresholds; ``eps[0] == 0.0`` (exact zeros).
        fraction: float64 ``[n_layers, n_taps, n_eps]``.
        tokens: tokens the fractions were measured on.
    """

    taps: tuple[Tap, ...]
    eps: tuple[float, ...]
    fraction: torch.Tensor
    tokens: int

    def at(self, tap: Tap, eps: float = 0.0) -> torch.Tensor:
        """``[n_layers]`` fraction at one tap and ``eps``."""
        return self.fraction[:, self.taps.index(tap), self.eps.index(eps)]

    def rows(self) -> list[dict[str, Any]]:
        return [{"layer": layer, "tap": tap.value, "eps": e, "fraction": float(self.fraction[layer, j, k])}
                for layer in range(self.fraction.shape[0]) for j, tap in enumerate(self.taps)
                for k, e in enumerate(self.eps)]

    def to_dict(self) -> dict[str, Any]:
        return {"taps": [t.value for t in self.taps], "eps": list(self.eps), "tokens": self.tokens,
                "fraction": self.fraction.tolist()}


@torch.inference_mode()
def analyze_activations(
    model: nn.Module,
    windows: torch.Tensor,
    eps: Sequence[float] = DEFAULT_EPS,
    taps: Sequence[Tap] | None = None,
    model_id: str | None = None,
    data: dict[str, Any] | None = None,
    progress: bool = True,
) -> tuple[ActivationStats, NaturalSparsity]:
    """One forward pass over ``windows`` (``[n, seqlen]``): |a| histograms and exact ``|a| <= eps`` counts.

    Args:
        eps: positive thresholds; exact zeros (``eps = 0``) are always counted.
        taps: default all taps of the FFN (``FFN_IN, GATE, UP, ACT, MID, OUT``; no ``GATE`` if non-gated).
    Returns:
        ``(stats, natural)``: the :class:`ActivationStats` (CDFs, quantiles) and :class:`NaturalSparsity`.
    """
    layout = ffn_layout(model)
    taps = tuple(taps or layout.taps())
    eps_t = (0.0, *sorted(float(e) for e in eps if e > 0))
    device = input_device(model)
    hits = torch.zeros(layout.n_layers, len(taps), len(eps_t), dtype=torch.int64, device=device)
    totals = torch.zeros(layout.n_layers, len(taps), dtype=torch.int64)
    index = {t: j for j, t in enumerate(taps)}

    def count(layer: int, tap: Tap, x: torch.Tensor) -> None:
        a = x.detach().abs()
        j = index[tap]
        for k, e in enumerate(eps_t):
            hits[layer, j, k] += torch.count_nonzero(a <= e)
        totals[layer, j] += a.numel()

    # Our hooks observe the same forward passes collect_stats runs; both only read the taps.
    with tap_hooks(layout, taps, count):
        stats = collect_stats(model, windows, taps, StatsConfig(progress=progress), model_id=model_id, data=data)
    frac = hits.cpu().double() / totals.clamp(min=1).unsqueeze(-1).double()
    return stats, NaturalSparsity(taps, eps_t, frac, int(windows.numel()))


# ----------------------------------------------------------------------------------------------------
# Weights


@dataclass
class WeightStats:
    """|w| histograms of the FFN projections per (layer, projection), and exact-zero counts.

    Stream of layer ``l`` and projection ``projections[j]`` is ``l * len(projections) + j``.
    ``zeros`` / ``total``: int64 ``[n_layers, n_projections]``.
    """

    hist: MagnitudeHistogram
    projections: tuple[str, ...]
    zeros: torch.Tensor
    total: torch.Tensor

    @property
    def n_layers(self) -> int:
        return self.zeros.shape[0]

    def quantiles(self, q: float) -> torch.Tensor:
        """``[n_layers, n_projections]`` |w| quantile."""
        return self.hist.quantile(q).view(self.n_layers, len(self.projections))

    def zero_fraction(self) -> torch.Tensor:
        return self.zeros.double() / self.total.double()


@torch.no_grad()
def weight_stats(model: nn.Module, layout: FFNLayout | None = None) -> WeightStats:
    """Histogram ``|w|`` of every FFN projection (gate, up, down; non-gated: up, down) of every layer."""
    layout = layout or ffn_layout(model)
    names = ("gate", "up", "down") if layout.gated else ("up", "down")
    hist = MagnitudeHistogram(layout.n_layers * len(names))
    zeros = torch.zeros(layout.n_layers, len(names), dtype=torch.int64)
    total = torch.zeros_like(zeros)
    for layer in range(layout.n_layers):
        w = layout.weights(layer)
        for j, n in enumerate(names):
            t = getattr(w, n)
            hist.update(layer * len(names) + j, t)
            zeros[layer, j] = int((t == 0).sum())
            total[layer, j] = t.numel()
    return WeightStats(hist.sync(), names, zeros, total)
