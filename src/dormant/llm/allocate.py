"""Per-layer sparsity allocation: spend a mean sparsity budget where it hurts least.

The paper uses one target for every layer. Layers are not equally sensitive, so this module measures,
on calibration text only, the loss increase of each layer made sparse *alone*::

    delta[l, s] = NLL(model with only layer l at sparsity s) - NLL(dense model)

for ``s`` on a grid, and then, assuming the increases add up across layers, chooses per-layer targets
``s_l`` with ``mean_l s_l = S`` minimising ``sum_l delta[l, s_l]`` by greedy marginal allocation: start
every layer at 0 and repeatedly move the layer whose next grid step costs the least extra loss per
unit of sparsity. The cost is ``n_layers * len(grid)`` forward passes over a small calibration set.
The evaluation text is never touched. Under ``torchrun`` every perplexity is summed across ranks
(:func:`~dormant.llm.evaluate.perplexity`), so every rank measures the same profile.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from dormant import distributed
from dormant.llm.evaluate import perplexity
from dormant.llm.sparsify import sparsified
from dormant.llm.stats import ActivationStats

log = logging.getLogger(__name__)

__all__ = ["Sensitivity", "measure_sensitivity", "allocate"]


@dataclass
class Sensitivity:
    """``delta[l, g]``: calibration NLL increase with only layer ``l`` at sparsity ``grid[g]``."""

    grid: list[float]
    delta: torch.Tensor  # [n_layers, len(grid)], delta[:, 0] = 0 for grid[0] = 0
    base_nll: float
    seconds: float = 0.0
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"grid": self.grid, "delta": self.delta.tolist(), "base_nll": self.base_nll, "seconds": self.seconds,
                "meta": self.meta}

    @classmethod
    def from_dict(cls, d: dict) -> Sensitivity:
        return cls(d["grid"], torch.tensor(d["delta"], dtype=torch.float64), d["base_nll"], d["seconds"], d["meta"])


def measure_sensitivity(
    model: nn.Module,
    stats: ActivationStats,
    windows: torch.Tensor,
    site: str,
    grid: tuple[float, ...] = (0.0, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    progress: bool = True,
) -> Sensitivity:
    """Measure per-layer sensitivity on calibration ``windows`` (``[n, seqlen]``) for ``site``."""
    from tqdm.auto import tqdm

    if grid[0] != 0.0 or sorted(grid) != list(grid):
        raise ValueError("grid must be increasing and start at 0")
    t0 = time.perf_counter()
    base = perplexity(model, windows, progress=False).nll
    n = stats.n_layers
    delta = torch.zeros(n, len(grid), dtype=torch.float64)
    bar = tqdm(total=n * (len(grid) - 1), desc=f"sensitivity {site}",
               disable=not progress or not distributed.is_main())
    for layer in range(n):
        for g, s in enumerate(grid[1:], start=1):
            with sparsified(model, stats.thresholds({layer: s}, site)):
                delta[layer, g] = perplexity(model, windows, progress=False).nll - base
            bar.update()
    bar.close()
    return Sensitivity(list(grid), delta, base, time.perf_counter() - t0,
                       {"site": site, "windows": int(windows.shape[0]), "seqlen": int(windows.shape[1])})


def allocate(sens: Sensitivity, mean_target: float) -> list[float]:
    """Per-layer targets on ``sens.grid`` with mean ``mean_target`` (interpolated on the last step).

    Greedy marginal allocation on the convexified per-layer cost curves.
    """
    grid = torch.tensor(sens.grid, dtype=torch.float64)
    if not 0 <= mean_target <= grid[-1]:
        raise ValueError(f"mean target must lie in [0, {grid[-1].item()}]")
    n = sens.delta.shape[0]
    # Monotone envelope: more sparsity never costs less than less sparsity (removes measurement noise dips).
    cost = torch.cummax(sens.delta, dim=1).values
    level = [0] * n
    budget = mean_target * n
    spent = 0.0
    while spent < budget - 1e-12:
        best, best_rate = None, None
        for layer in range(n):
            g = level[layer]
            if g + 1 >= len(grid):
                continue
            step = (grid[g + 1] - grid[g]).item()
            rate = (cost[layer, g + 1] - cost[layer, g]).item() / step
            if best_rate is None or rate < best_rate:
                best, best_rate = layer, rate
        if best is None:
            break
        g = level[best]
        step = (grid[g + 1] - grid[g]).item()
        if spent + step > budget:  # partial last step: interpolate this layer's target
            return _targets(grid, level, best, (budget - spent) / step)
        level[best] += 1
        spent += step
    return _targets(grid, level)


def _targets(grid: torch.Tensor, level: list[int], partial: int | None = None, frac: float = 0.0) -> list[float]:
    out = [grid[g].item() for g in level]
    if partial is not None:
        g = level[partial]
        out[partial] = (grid[g] + frac * (grid[g + 1] - grid[g])).item()
    return out
