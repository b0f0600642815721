"""The predictability study: do similar inputs activate the same FFN neurons? (paper Table II, made precise)

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

import csv
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dormant.artifacts import ArtifactError, append_jsonl, atomic_path, read_jsonl
from dormant.config import field
from dormant.llm.adapters import Tap, ffn_layout
from dormant.llm.hooks import tap_hooks

log = logging.getLogger(__name__)

__all__ = ["PredictabilityConfig", "perturbation_plan", "perturb", "pattern_metrics", "active_masks",
           "run_predictability", "write_predictability_report", "METRICS"]

METRICS = ("jaccard", "recall", "hamming", "jaccard_unchanged", "exact")


@dataclass
class PredictabilityConfig:
    samples: int = field(12, help="texts (consecutive evaluation windows) to perturb")
    similarities: list[float] = field(default_factory=lambda: [0.95, 0.9, 0.85, 0.8, 0.75, 0.7],
                                      help="token similarity of the perturbed copies")
    seed: int = field(0, help="perturbation seed")
    out: str = field("runs/predictability", help="output folder (records.jsonl, CSV, report.md, heatmaps)")
    progress: bool = field(True, help="show progress bars")


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


def _layer_metrics(a: torch.Tensor, b: torch.Tensor, unchanged: torch.Tensor | None) -> dict[str, list[float]]:
    rows = [pattern_metrics(a[layer], b[layer], unchanged) for layer in range(len(a))]
    return {k: [r[k] for r in rows] for k in rows[0]}


def run_predictability(
    model: nn.Module, windows, pool: np.ndarray, cfg: PredictabilityConfig, meta: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Run (or resume) the study on the (thresholded) ``model``; returns all records.

    Args:
        windows: :class:`dormant.llm.text.Windows` with at least ``cfg.samples`` windows.
        pool: the token stream replacements are drawn from.
        meta: run description stored in every record (model, thresholds, text).
    """
    from tqdm.auto import tqdm

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "records.jsonl"
    key = json.dumps({"cfg": {k: v for k, v in asdict(cfg).items() if k not in ("out", "progress")},
                      "meta": meta or {}}, sort_keys=True)
    old = read_jsonl(path)
    if any(r.get("key") != key for r in old):
        raise ArtifactError(f"{path} holds records of another configuration; use another --out")
    done = {(r["kind"], r["sample"]) for r in old}
    ids = windows.ids[: cfg.samples]
    if len(ids) < cfg.samples:
        raise ValueError(f"only {len(ids)} windows available for {cfg.samples} samples")
    prev: torch.Tensor | None = None
    for j in tqdm(range(cfg.samples), desc="predictability", unit="text", disable=not cfg.progress):
        need_var = ("variant", j) not in done
        need_unrel = j > 0 and ("unrelated", j - 1) not in done
        if not (need_var or need_unrel):
            prev = None
            continue
        t0 = time.perf_counter()
        a = active_masks(model, ids[j])
        if need_unrel:
            if prev is None:
                prev = active_masks(model, ids[j - 1])
            m = _layer_metrics(prev, a, None)
            indep = [independent_baseline(p, q) for p, q in zip(m["density_a"], m["density_b"])]
            m.update({f"indep_{k}": [d[k] for d in indep] for k in ("jaccard", "recall", "hamming")})
            append_jsonl(path, {"key": key, "kind": "unrelated", "sample": j - 1, "other": j, "metrics": m})
        if need_var:
            order, repl = perturbation_plan(ids[j], pool, cfg.seed, j, windows.bos)
            per_sim = {}
            for s in cfg.similarities:
                v, changed = perturb(ids[j], order, repl, s)
                per_sim[f"{s:g}"] = {"replaced": int(changed.sum()), **_layer_metrics(a, active_masks(model, v), ~changed)}
            append_jsonl(path, {"key": key, "kind": "variant", "sample": j, "metrics": per_sim,
                                "seconds": time.perf_counter() - t0})
        prev = a
    records = read_jsonl(path)
    write_predictability_report(out, records, cfg, meta or {})
    return records


def summarize(records: list[dict[str, Any]], similarities: list[float]) -> dict[str, dict[str, np.ndarray]]:
    """``{row: {metric: [mean over samples per layer], metric+'_std': ...}}``; rows are similarities,
    ``unrelated`` and ``independent``."""
    rows: dict[str, dict[str, np.ndarray]] = {}
    var = [r for r in records if r["kind"] == "variant"]
    for s in similarities:
        k = f"{s:g}"
        vals = [r["metrics"][k] for r in var if k in r["metrics"]]
        if vals:
            rows[k] = {m: np.nanmean([v[m] for v in vals], 0) for m in METRICS}
            rows[k].update({f"{m}_std": np.nanstd([v[m] for v in vals], 0) for m in METRICS})
    un = [r["metrics"] for r in records if r["kind"] == "unrelated"]
    if un:
        rows["unrelated"] = {m: np.mean([v[m] for v in un], 0) for m in ("jaccard", "recall", "hamming", "exact")}
        rows["independent"] = {m: np.mean([v[f"indep_{m}"] for v in un], 0) for m in ("jaccard", "recall", "hamming")}
    return rows


def write_predictability_report(out: Path, records: list[dict[str, Any]], cfg: PredictabilityConfig, meta: dict) -> Path:
    """``predictability.csv``, ``report.md`` and ``heatmap_<metric>.png`` from the records."""
    from dormant.report import markdown_table, new_figure, save_figure, write_markdown

    rows = summarize(records, cfg.similarities)
    if not rows:
        raise ValueError("no predictability records")
    n_layers = len(next(iter(rows.values()))["jaccard"])
    with atomic_path(out / "predictability.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["comparison", "layer", *METRICS])
        for name, r in rows.items():
            for layer in range(n_layers):
                w.writerow([name, layer, *(f"{r[m][layer]:.6f}" if m in r else "" for m in METRICS)])
    shown = sorted({0, 1, min(9, n_layers - 1), min(19, n_layers - 1), n_layers - 1})
    n_var = len({r["sample"] for r in records if r["kind"] == "variant"})
    n_un = len([r for r in records if r["kind"] == "unrelated"])
    text = [
        "# Predictability of active-neuron patterns under input perturbation\n",
        f"- model: {meta.get('model', {}).get('id')}; thresholds: {meta.get('thresholds')}",
        f"- texts: {n_var} windows of {meta.get('text', {}).get('seqlen')} tokens of {meta.get('text', {}).get('source')}; "
        f"perturbation seed {cfg.seed}; unrelated-text pairs: {n_un}",
        "- edit: a seeded random set of exactly round((1-s)*n) token positions (never an added BOS) gets tokens "
        "drawn from the text's unigram distribution (never the original token); lower similarities contain the "
        "edits of higher ones. Metrics are per-token means over all positions (module docstring of "
        "`dormant.llm.predictors.predictability`). Layers are 0-indexed.\n",
    ]
    for m, title in (("jaccard", "Jaccard of active sets"), ("recall", "recall of the original active set"),
                     ("hamming", "Hamming agreement"), ("jaccard_unchanged", "Jaccard on unchanged positions"),
                     ("exact", "exact pattern match (fraction of positions)")):
        hdr = ["comparison", *[f"L{layer}" for layer in shown], "mean over layers"]
        body = []
        for name, r in rows.items():
            if m not in r:
                continue
            label = f"{float(name):.0%} similar" if name not in ("unrelated", "independent") else name
            body.append([label, *[float(r[m][layer]) for layer in shown], float(np.nanmean(r[m]))])
        text += [f"## {title}\n", markdown_table(hdr, body), f"![{m}](heatmap_{m}.png)\n"]
    write_markdown(out / "report.md", "\n".join(text))
    for m in ("jaccard", "recall", "hamming", "jaccard_unchanged", "exact"):
        names = [n for n, r in rows.items() if m in r]
        mat = np.stack([rows[n][m] for n in names])
        fig, ax = new_figure(1, 1, size=(min(14, max(6, 2 + 0.4 * n_layers)), 0.45 * len(names) + 1.5))
        im = ax[0, 0].imshow(mat, aspect="auto", cmap="viridis", vmin=0, vmax=1)
        ax[0, 0].set_yticks(range(len(names)), [f"{float(n):.0%}" if n not in ("unrelated", "independent") else n
                                                for n in names])
        ax[0, 0].set(xlabel="layer", title=f"{m}: original vs perturbed copy, and baselines")
        for i in range(mat.shape[0]):
            for layer in range(mat.shape[1]):
                if n_layers <= 32 and not math.isnan(mat[i, layer]):
                    ax[0, 0].text(layer, i, f"{mat[i, layer]:.2f}"[1:] if mat[i, layer] < 1 else "1",
                                  ha="center", va="center", fontsize=6, color="w" if mat[i, layer] < 0.6 else "k")
        fig.colorbar(im, ax=ax[0, 0])
        save_figure(fig, out / f"heatmap_{m}.png")
    return out / "report.md"
