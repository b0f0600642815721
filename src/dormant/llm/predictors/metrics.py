"""Scores of predicted active-neuron masks against the true ones, per layer and overall.

For one layer, with ``P`` the predicted and ``A`` the true active set of each token, counts are pooled
over tokens (micro-averages) -- ``TP = sum_t |P_t & A_t|``, ``FP = sum_t |P_t - A_t|``,
``FN = sum_t |A_t - P_t|`` -- and::

    recall    = TP / (TP + FN)          fraction of truly active neurons that were predicted (fetched)
    precision = TP / (TP + FP)          fraction of predicted neurons that were really active
    F1        = 2 TP / (2 TP + FP + FN)
    Jaccard   = TP / (TP + FP + FN)     pooled intersection over union
    predicted density = (TP + FP) / (N I),   true density = (TP + FN) / (N I)

``density_ratio`` = predicted / true density (the issue's target is recall >= 0.99 at ratio <= 1.3).
"Overall" pools the counts of all layers. Recall is the metric Deja Vu stops training on
(Liu et al., ICML 2023); a miss costs a fetch (or, when skipped, accuracy), a false positive costs
bandwidth only (Dhar et al., arXiv 2412.12178, Sec. V).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["MaskConfusion", "scores_from_counts", "mask_metrics"]

_FIELDS = ("tp", "fp", "fn", "tn")


def scores_from_counts(tp: float, fp: float, fn: float, tn: float) -> dict[str, float]:
    """Recall, precision, F1, Jaccard and densities from pooled confusion counts (0/0 -> 1.0 or 0.0)."""
    n = tp + fp + fn + tn
    pos, pred = tp + fn, tp + fp
    return {
        "recall": tp / pos if pos else 1.0,
        "precision": tp / pred if pred else 1.0,
        "f1": 2 * tp / (2 * tp + fp + fn) if (tp + fp + fn) else 1.0,
        "jaccard": tp / (tp + fp + fn) if (tp + fp + fn) else 1.0,
        "pred_density": pred / n if n else 0.0,
        "true_density": pos / n if n else 0.0,
        "density_ratio": (pred / pos) if pos else float("inf") if pred else 1.0,
        "tokens_x_neurons": n,
    }


class MaskConfusion:
    """Accumulates pooled confusion counts per layer.

    Args:
        n_layers: number of layers.
    """

    def __init__(self, n_layers: int):
        self.counts = torch.zeros(n_layers, 4, dtype=torch.float64)  # tp, fp, fn, tn
        self.tokens = torch.zeros(n_layers, dtype=torch.int64)

    @property
    def n_layers(self) -> int:
        return self.counts.shape[0]

    def update(self, layer: int, pred: torch.Tensor, true: torch.Tensor) -> None:
        """Add masks of one layer: ``pred``, ``true`` bool ``[..., I]`` (same shape)."""
        if pred.shape != true.shape:
            raise ValueError(f"predicted {tuple(pred.shape)} and true {tuple(true.shape)} masks differ in shape")
        pred, true = pred.bool(), true.bool()
        tp = (pred & true).sum()
        npred, ntrue = pred.sum(), true.sum()
        n = pred.numel()
        self.counts[layer] += torch.stack([tp, npred - tp, ntrue - tp, n - npred - ntrue + tp]).double().cpu()
        self.tokens[layer] += n // max(pred.shape[-1], 1)

    def merge(self, other: MaskConfusion) -> MaskConfusion:
        self.counts += other.counts
        self.tokens += other.tokens
        return self

    def layer(self, layer: int) -> dict[str, float]:
        return scores_from_counts(*self.counts[layer].tolist())

    def overall(self, layers: list[int] | None = None) -> dict[str, float]:
        """Scores of the counts pooled over ``layers`` (default: all layers that saw data)."""
        idx = [i for i in range(self.n_layers) if self.tokens[i] > 0] if layers is None else layers
        return scores_from_counts(*self.counts[idx].sum(0).tolist())

    def summary(self) -> dict[str, Any]:
        """``{"overall": {...}, "per_layer": {metric: [n_layers values]}}``."""
        per = [self.layer(i) for i in range(self.n_layers)]
        return {"overall": self.overall(), "per_layer": {k: [p[k] for p in per] for k in per[0]} if per else {}}


def mask_metrics(pred: torch.Tensor, true: torch.Tensor) -> dict[str, float]:
    """Scores of one set of masks, bool ``[..., I]``, pooled over all leading dimensions."""
    c = MaskConfusion(1)
    c.update(0, pred, true)
    return c.layer(0)
