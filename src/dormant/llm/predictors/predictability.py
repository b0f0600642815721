"""The predictability study: do similar inputs activate the same FFN neurons? (paper Table II, made precise): the verbs.

Dhar et al. (arXiv 2412.12178, Sec. V, Table II, Figs. 9-12) perturb 12 texts to 95...70% similarity
and report a layer-1 "pattern match rate" between original and perturbed input, but define neither
the edit nor the metric (notes 1.8, 1.9 item 7). Here both are explicit.

**Texts.** ``samples`` consecutive non-overlapping windows of ``seqlen`` tokens of the evaluation text
(:func:`dormant.llm.text.make_windows`).

**Perturbation** (token level, nested, seeded). For sample ``j`` a generator
``numpy.random.default_rng([seed, j])`` draws (a) a random order of the editable positions (every
position except an added BOS at position 0) and (b) for each position one replacement token, drawn
uniformly from the token stream of the whole evaluation text (i.e. from its unigram distribution),
redrawn until it differs from the original token. The variant at similarity ``s`` replaces the first
``round((1 - s) * n_editable)`` positions of that order by their replacement tokens; so exactly that
fraction of tokens differs, and the variant at 70% contains every edit of the variant at 75%.

**Metrics** (per layer, per token ``t``, with ``A_t``/``B_t`` the active sets ``MID != 0`` of original
and variant at the same position, then averaged over all positions)::

    Jaccard            |A & B| / |A | B|                (1 if both empty)
    recall of original |A & B| / |A|                    (1 if A empty) -- what a predictor replaying
                                                                          B would fetch of A
    Hamming agreement  1 - |A xor B| / I
    Jaccard (unchanged) Jaccard over positions whose token was not replaced
    exact match        fraction of positions where A == B (the strictest reading of "match rate")

**Baselines.** *Unrelated text*: original of sample ``j`` vs original of sample ``j + 1``, position by
position. *Independent masks*: the expectation of each metric for independent random sets with the
layer's measured densities ``p``, ``q``: Jaccard ``pq / (p + q - pq)``, recall ``q``, Hamming ``pq + (1-p)(1-q)``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from dormant.llm.adapters import Tap, ffn_layout
from dormant.llm.hooks import tap_hooks

__all__ = ["perturbation_plan", "perturb", "pattern_metrics", "independent_baseline", "active_masks",
           "layer_metrics", "METRICS"]

METRICS = ("jaccard", "recall", "hamming", "jaccard_unchanged", "exact")


def perturbation_plan(ids: torch.Tensor, pool: np.ndarray, seed: int, sample: int, bos: bool) -> tuple[np.ndarray, np.ndarray]:
    """Edit order and replacement tokens of one text (see the module docstring).

    Args:
        ids: ``[T]`` token ids of the original text.
        pool: token stream whose unigram distribution replacement tokens are drawn from.
        seed, sample: generator seed ``default_rng([seed, sample])``.
        bos: position 0 is an added BOS and is never edited.

    Returns:
        ``(order [E], replacement [E])``: editable positions in edit order, and each one's replacement.
    """
    rng = np.random.default_rng([seed, sample])
    orig = ids.numpy()
    order = rng.permutation(np.arange(1 if bos else 0, len(orig)))
    repl = pool[rng.integers(0, len(pool), size=len(order))]
    clash = repl == orig[order]
    while clash.any():  # redraw replacements equal to the original token
        repl[clash] = pool[rng.integers(0, len(pool), size=int(clash.sum()))]
        clash = repl == orig[order]
    return order, repl


def perturb(ids: torch.Tensor, order: np.ndarray, repl: np.ndarray, similarity: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The variant of ``ids`` at ``similarity``: ``(ids' [T], changed bool [T])``."""
    n = int(round((1.0 - similarity) * len(order)))
    out = ids.clone()
    out[torch.from_numpy(order[:n])] = torch.from_numpy(repl[:n]).to(ids.dtype)
    changed = torch.zeros(len(ids), dtype=torch.bool)
    changed[torch.from_numpy(order[:n])] = True
    return out, changed


def pattern_metrics(a: torch.Tensor, b: torch.Tensor, unchanged: torch.Tensor | None = None) -> dict[str, float]:
    """Metrics of the module docstring between active masks ``a`` (original) and ``b``, bool ``[T, I]``.

    Args:
        unchanged: bool ``[T]`` positions whose token is the same in both (for ``jaccard_unchanged``).
    """
    inter = (a & b).sum(-1).double()
    union = (a | b).sum(-1).double()
    na = a.sum(-1).double()
    jac = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))
    out = {
        "jaccard": float(jac.mean()),
        "recall": float(torch.where(na > 0, inter / na.clamp(min=1), torch.ones_like(inter)).mean()),
        "hamming": float(1 - (a ^ b).sum(-1).double().mean() / a.shape[-1]),
        "exact": float((a == b).all(-1).double().mean()),
        "density_a": float(a.double().mean()),
        "density_b": float(b.double().mean()),
    }
    out["jaccard_unchanged"] = float(jac[unchanged].mean()) if unchanged is not None and unchanged.any() else float("nan")
    return out


def independent_baseline(p: float, q: float) -> dict[str, float]:
    """Expected metrics of independent random active sets with densities ``p`` and ``q``."""
    return {"jaccard": p * q / (p + q - p * q) if p + q > 0 else 1.0, "recall": q,
            "hamming": p * q + (1 - p) * (1 - q)}


@torch.inference_mode()
def active_masks(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Bool ``[L, T, I]`` active masks (``MID != 0``) of one text ``ids`` ``[T]``."""
    layout = ffn_layout(model)
    out: list[torch.Tensor | None] = [None] * layout.n_layers

    def record(layer: int, tap: Tap, x: torch.Tensor) -> None:
        out[layer] = (x.reshape(-1, x.shape[-1]) != 0).cpu()

    with tap_hooks(layout, [Tap.MID], record):
        model(ids[None].to(next(model.parameters()).device), use_cache=False)
    return torch.stack(out)  # type: ignore[arg-type]


def layer_metrics(a: torch.Tensor, b: torch.Tensor, unchanged: torch.Tensor | None) -> dict[str, list[float]]:
    """:func:`pattern_metrics` of every layer of ``[L, T, I]`` masks: ``{metric: [L values]}``."""
    rows = [pattern_metrics(a[layer], b[layer], unchanged) for layer in range(len(a))]
    return {k: [r[k] for r in rows] for k in rows[0]}
