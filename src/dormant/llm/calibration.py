"""The one calibration verb: activation statistics -> per-layer targets -> thresholds (-> refinement passes).

``calibrate(model, windows, CalibrationConfig(site, sparsity, allocation, refine))`` is what the CLI, the sweep and
every runner call:

1. one streaming pass over calibration ``windows`` summarises ``|a|`` at the site's taps
   (:func:`~dormant.llm.stats.collect_stats`; a runner may pass statistics it has already collected);
2. per-layer targets: the same target for every layer (``uniform``, the paper), or a budget with that mean spent
   where calibration loss rises least (``sensitivity``, :mod:`dormant.llm.allocate`; beyond the paper);
3. thresholds = the per-layer target quantiles of ``|a|`` (paper Eqs. 1-7);
4. ``refine`` extra passes, each observing every tap under the thresholds so far (after its upstream taps,
   before its own) and re-reading them, so that each layer's measured sparsity meets its target once upstream
   taps are sparse (beyond the paper, which reads every tap from the dense model).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from dormant.artifacts import ArtifactError
from dormant.llm.adapters import ffn_layout
from dormant.llm.allocate import Sensitivity, allocate, measure_sensitivity
from dormant.llm.configs import ALLOCATIONS, CalibrationConfig
from dormant.llm.sites import site_taps
from dormant.llm.stats import ActivationStats, StatsConfig, collect_stats
from dormant.llm.thresholds import Thresholds

__all__ = ["ALLOCATIONS", "CalibrationConfig", "calibrate", "refine"]

def calibrate(
    model: nn.Module,
    windows: torch.Tensor,
    config: CalibrationConfig,
    *,
    stats: ActivationStats | None = None,
    sensitivity: Sensitivity | None = None,
    sensitivity_windows: torch.Tensor | None = None,
    model_id: str | None = None,
    data: dict[str, Any] | None = None,
) -> Thresholds:
    """Thresholds of ``config.site`` for ``config.sparsity`` from calibration ``windows`` (``[n, seqlen]`` ids).

    Args:
        stats: statistics of these windows already collected (at least the site's taps); skips step 1.
        sensitivity: a per-layer sensitivity profile already measured (``allocation="sensitivity"``).
        sensitivity_windows: calibration windows to measure it on when it is not given.
        model_id, data: recorded in the artifact (``data`` describes the calibration text).

    Returns:
        The :class:`Thresholds`; its ``calibration`` record names the allocation, refinement passes and targets.
    """
    t0 = time.perf_counter()
    layout = ffn_layout(model)
    taps = site_taps(config.site, layout)
    if config.allocation not in ALLOCATIONS:
        raise ValueError(f"unknown allocation {config.allocation!r}; choose from {', '.join(ALLOCATIONS)}")
    stats_cfg = StatsConfig(batch_size=config.batch_size, progress=config.progress)
    if stats is None:
        stats = collect_stats(model, windows, taps, stats_cfg, model_id=model_id, data=data)
    else:
        _check_stats(stats, taps, layout)
        if stats.taps != taps:
            stats = stats.subset(taps)
    target: float | list[float] = config.target()
    extra: dict[str, Any] = {"allocation": config.allocation, "refine": config.refine}
    if config.allocation == "sensitivity":
        if not isinstance(target, float):
            raise ValueError("allocation 'sensitivity' takes one mean target, not per-layer targets")
        if sensitivity is None:
            if sensitivity_windows is None:
                raise ValueError("allocation 'sensitivity' needs a sensitivity profile or calibration windows for it")
            sensitivity = measure_sensitivity(model, stats, sensitivity_windows, config.site, progress=config.progress)
        target = allocate(sensitivity, target)
        extra["layer_targets"] = target
    thr = stats.thresholds(target, config.site)
    thr = refine(model, windows, thr, target, config.refine, stats_cfg, model_id=model_id, data=data)
    extra["seconds"] = round(time.perf_counter() - t0, 3)
    thr.calibration.update(extra)
    return thr


def refine(
    model: nn.Module,
    windows: torch.Tensor,
    thresholds: Thresholds,
    sparsity: float | Sequence[float] | dict[int, float],
    passes: int = 1,
    config: StatsConfig | None = None,
    model_id: str | None = None,
    data: dict[str, Any] | None = None,
) -> Thresholds:
    """Re-read ``thresholds`` for ``sparsity`` from ``passes`` calibration passes run *under* the current ones.

    Dense calibration (the paper's) reads every tap's threshold from dense activations, but once upstream taps are
    thresholded the downstream distributions shift (e.g. the ``paper`` site's down_proj output overshoots its
    target). Each pass collects |a| with the current thresholds enforced (``collect_stats(..., under=...)``) and
    reads new ones, a fixed-point iteration towards per-layer sparsity on target; 1 or 2 passes are usually enough.
    """
    site = thresholds.site
    for _ in range(passes):
        stats = collect_stats(model, windows, thresholds.taps, config, model_id=model_id, data=data, under=thresholds)
        thresholds = stats.thresholds(sparsity, site)
    return thresholds


def _check_stats(stats: ActivationStats, taps, layout) -> None:
    missing = [t.value for t in taps if t not in stats.taps]
    if missing:
        raise ArtifactError(f"statistics hold no tap(s) {missing}; they hold {[t.value for t in stats.taps]}")
    if stats.model.get("fingerprint") != layout.describe()["fingerprint"]:
        raise ArtifactError(f"statistics were collected on another model ({stats.model.get('id')})")
