"""The one calibration verb: activation statistics -> per-layer targets -> thresholds (-> refinement passes).

``calibrate(model, windows, CalibrationConfig(site, sparsity, score, allocation, refine))`` is what the CLI, the
sweep and every runner call:

1. one streaming pass over calibration ``windows`` summarises the score of every entry at the site's taps
   (:func:`~dormant.llm.stats.collect_stats`; a runner may pass statistics it has already collected): ``|a|``
   (``magnitude``: the paper, TEAL), ``|a_c| * ||W[:, c]||`` (``wina``) or ``|act(gate)_c| * E|up_c|``
   (``chess``; :mod:`dormant.llm.scores`);
2. targets per layer (and per tap): the same target everywhere (``uniform``: the paper, TEAL, CHESS); a budget
   with that mean spent where calibration loss rises least (``sensitivity``, :mod:`dormant.llm.allocate`);
   TEAL's per-layer greedy search on block-output error (``greedy``); or dormant's predicted-output-error
   allocation by measured marginal loss per byte (``loss``; both :mod:`dormant.llm.tap_allocation`);
3. thresholds = the target quantiles of the scores (paper Eqs. 1-7);
4. ``refine`` extra passes, each observing every tap under the thresholds so far (after its upstream taps,
   before its own) and re-reading them, so that each layer's measured sparsity meets its target once upstream
   taps are sparse (beyond the paper, which reads every tap from the dense model).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dormant.artifacts import ArtifactError
from dormant.llm.adapters import ffn_layout
from dormant.llm.allocate import Sensitivity, allocate, measure_sensitivity
from dormant.llm.configs import ALLOCATIONS, SCORES, CalibrationConfig
from dormant.llm.scores import score_scales
from dormant.llm.sites import site_taps
from dormant.llm.stats import ActivationStats, StatsConfig, collect_stats
from dormant.llm.tap_allocation import greedy_block_targets, loss_targets, site_byte_fraction
from dormant.llm.thresholds import Thresholds

__all__ = ["ALLOCATIONS", "SCORES", "CalibrationConfig", "TapTargets", "calibrate", "calibration_stats", "refine",
           "search_tap_targets"]

SCALE_WINDOWS = 2  # calibration windows of CHESS's E|up|

def calibrate(
    model: nn.Module,
    windows: torch.Tensor,
    config: CalibrationConfig,
    *,
    stats: ActivationStats | None = None,
    sensitivity: Sensitivity | None = None,
    sensitivity_windows: torch.Tensor | None = None,
    tap_targets: TapTargets | None = None,
    model_id: str | None = None,
    data: dict[str, Any] | None = None,
) -> Thresholds:
    """Thresholds of ``config.site`` for ``config.sparsity`` from calibration ``windows`` (``[n, seqlen]`` ids).

    Args:
        stats: statistics of these windows already collected (at least the site's taps); skips step 1.
        sensitivity: a per-layer sensitivity profile already measured (``allocation="sensitivity"``).
        sensitivity_windows: calibration windows to measure it on when it is not given.
        tap_targets: per-tap targets already searched (``allocation`` greedy or error) for this target among others
            (:func:`search_tap_targets`; one search serves every target of a sweep).
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
        stats = calibration_stats(model, windows, taps, config.score, stats_cfg, model_id=model_id, data=data)
    else:
        _check_stats(stats, taps, layout, config.score)
        if stats.taps != taps:
            stats = stats.subset(taps)
    target: Any = config.target()
    extra: dict[str, Any] = {"allocation": config.allocation, "score": config.score, "refine": config.refine}
    if config.allocation != "uniform" and not isinstance(target, float):
        raise ValueError(f"allocation {config.allocation!r} takes one mean target, not per-layer targets")
    if config.allocation == "sensitivity":
        if sensitivity is None:
            if sensitivity_windows is None:
                raise ValueError("allocation 'sensitivity' needs a sensitivity profile or calibration windows for it")
            sensitivity = measure_sensitivity(model, stats, sensitivity_windows, config.site, progress=config.progress)
        target = allocate(sensitivity, target)
        extra["layer_targets"] = target
    elif config.allocation in TAP_ALLOCATIONS:
        if tap_targets is None:
            tap_targets = search_tap_targets(model, stats, windows, config, [target])
        extra.update({k: v for k, v in tap_targets.meta.items()})
        target = tap_targets.targets[target]
        extra["tap_targets"] = target.tolist()
    if isinstance(target, torch.Tensor):
        extra["byte_fraction"] = site_byte_fraction(layout, taps, target)
    thr = stats.thresholds(target, config.site)
    thr = refine(model, windows, thr, target, config.refine, stats_cfg, model_id=model_id, data=data)
    extra["seconds"] = round(time.perf_counter() - t0, 3)
    thr.calibration.update(extra)
    return thr


TAP_ALLOCATIONS = ("greedy", "loss")


@dataclass
class TapTargets:
    """``[n_layers, n_taps]`` per-tap targets of one site for each model-wide target, and how they were found."""

    targets: dict[float, torch.Tensor]
    meta: dict[str, Any]


def search_tap_targets(model: nn.Module, stats: ActivationStats, windows: torch.Tensor, config: CalibrationConfig,
                       targets: Sequence[float]) -> TapTargets:
    """Per-tap targets of ``config.allocation`` (greedy: TEAL's; loss: dormant's) for every one of ``targets``
    from one search over the first calibration tokens of ``windows``."""
    t0 = time.perf_counter()
    taps = site_taps(config.site, ffn_layout(model))
    if stats.taps != taps:
        stats = stats.subset(taps)
    if config.allocation == "greedy":
        tokens = _first_tokens(windows, config.greedy_tokens)
        found = greedy_block_targets(model, stats, tokens, taps, targets, progress=config.progress)
        meta: dict[str, Any] = {"greedy_tokens": int(tokens.numel())}
    elif config.allocation == "loss":
        tokens = _first_tokens(windows, config.probe_tokens)
        found, rounds = loss_targets(model, stats, tokens, taps, targets, progress=config.progress)
        meta = {"probe_tokens": int(tokens.numel()), "loss_rounds": rounds}
    else:
        raise ValueError(f"allocation {config.allocation!r} has no per-tap search; those that do: "
                         f"{', '.join(TAP_ALLOCATIONS)}")
    meta["search_seconds"] = round(time.perf_counter() - t0, 3)
    return TapTargets(found, meta)


def calibration_stats(model: nn.Module, windows: torch.Tensor, taps, score: str = "magnitude",
                      config: StatsConfig | None = None, *, model_id: str | None = None,
                      data: dict[str, Any] | None = None) -> ActivationStats:
    """Step 1 alone: the statistics of ``score`` at ``taps`` over calibration ``windows`` (a runner may cache
    them and pass them to :func:`calibrate` for every target)."""
    if score not in SCORES:
        raise ValueError(f"unknown score {score!r}; choose from {', '.join(SCORES)}")
    batch = config.batch_size if config else 1
    scales = score_scales(model, windows[:SCALE_WINDOWS], taps, score, batch)
    return collect_stats(model, windows, taps, config, model_id=model_id, data=data, scales=scales, score=score)


def _first_tokens(windows: torch.Tensor, tokens: int) -> torch.Tensor:
    """The first ``tokens`` calibration tokens as whole windows (the first window cut when it alone has more)."""
    seqlen = windows.shape[1]
    if tokens <= seqlen:
        return windows[:1, :tokens]
    return windows[: -(-tokens // seqlen)]


def refine(
    model: nn.Module,
    windows: torch.Tensor,
    thresholds: Thresholds,
    sparsity: float | Sequence[float] | dict[int, float] | torch.Tensor,
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
        stats = collect_stats(model, windows, thresholds.taps, config, model_id=model_id, data=data, under=thresholds,
                              scales=thresholds.scales, score=thresholds.score)
        thresholds = stats.thresholds(sparsity, site)
    return thresholds


def _check_stats(stats: ActivationStats, taps, layout, score: str) -> None:
    if stats.score != score:
        raise ArtifactError(f"statistics summarise the {stats.score!r} score, the calibration asks for {score!r}")
    missing = [t.value for t in taps if t not in stats.taps]
    if missing:
        raise ArtifactError(f"statistics hold no tap(s) {missing}; they hold {[t.value for t in stats.taps]}")
    if stats.model.get("fingerprint") != layout.describe()["fingerprint"]:
        raise ArtifactError(f"statistics were collected on another model ({stats.model.get('id')})")
