"""Run a model with predicted active-neuron masks, or watch a predictor alongside the oracle.

Semantics (issue 4): a neuron predicted inactive is **skipped** -- its gate row, up row and down column
are never touched, so its contribution to the FFN output is zero; a neuron predicted active is
computed normally and the zero-enforcing threshold still applies. With ``MID`` the input of ``down``,
that is exactly ``MID <- MID * pred`` after the thresholds (for row ``i``, ``down`` sums
``W_down[:, i] * MID[i]``, so a zero entry and a skipped column are the same thing). Everything goes
through :func:`dormant.llm.hooks.tap_hooks` -- the source tap (``FFN_IN`` of some layer, or ``MID``
of an early layer) is observed to compute features, and ``MID`` of each predicted layer is rewritten.
Hooks registered after :func:`~dormant.llm.sparsify.sparsify_` see the thresholded ``MID``, so the
mask that would have been active (``MID != 0``) is known at the same point and scored against.

* :func:`predicted_masks` applies the predictions (closed loop: later layers see the effect of
  earlier misses) -- used for perplexity.
* :func:`observe_predictions` only watches (open loop: every layer's predictor reads the inputs of
  the oracle-thresholded model) -- used for metrics and for the aligned predicted/oracle
  :class:`~dormant.llm.masks.ActivationTrace` pair of :func:`collect_predicted_trace`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from dormant.llm.adapters import FFNLayout, Tap, ffn_layout
from dormant.llm.hooks import tap_hooks
from dormant.llm.predictors.base import Predictor
from dormant.llm.predictors.metrics import MaskConfusion
from dormant.traces import ActivationTrace, pack_masks

__all__ = ["PredictionRun", "predicted_masks", "observe_predictions", "collect_predicted_trace"]


class PredictionRun:
    """Hook state of one predictor during forward passes: features, confusion counts, recorded masks.

    Attributes:
        confusion: predicted vs thresholded (``MID != 0``) masks, per layer, over all tokens seen.
        mass: float64 ``[L, 2]``: ``sum |MID|`` over truly active entries, and over those also predicted
            (their ratio is the magnitude-weighted recall: how much of the intermediate survives).
    """

    def __init__(self, layout: FFNLayout, predictor: Predictor, apply: bool, record: int = 0,
                 record_true: bool = True):
        predictor.check_model(layout)
        self.layout, self.predictor, self.apply = layout, predictor, apply
        self.sources = predictor.sources()
        self.taps = tuple({Tap.MID, *(t for _, t in self.sources)})
        self.confusion = MaskConfusion(layout.n_layers)
        self.mass = torch.zeros(layout.n_layers, 2, dtype=torch.float64)
        self._feats: dict[tuple[int, Tap], Any] = {}
        # Recorded masks go into buffers allocated once: many small long-lived chunks interleaved with
        # the large per-layer temporaries fragment the C heap badly (GBs over a few 2048-token windows).
        nb = (layout.intermediate_size + 7) // 8
        self._pred = torch.zeros(record, layout.n_layers, nb, dtype=torch.uint8) if record else None
        self._true = torch.zeros(record, layout.n_layers, nb, dtype=torch.uint8) if record and record_true else None
        self._n = [0] * layout.n_layers  # tokens recorded per layer
        self.seconds = 0.0  # time spent inside the predictor

    def __call__(self, layer: int, tap: Tap, x: torch.Tensor) -> torch.Tensor | None:
        t0 = time.perf_counter()
        flat = x.detach().reshape(-1, x.shape[-1]).cpu()
        if (layer, tap) in self.sources:
            src = flat.float() if tap is Tap.FFN_IN else flat != 0
            self._feats[(layer, tap)] = self.predictor.features(layer, tap, src)
        if tap is not Tap.MID:
            self.seconds += time.perf_counter() - t0
            return None
        true = flat != 0
        src = self.predictor.source(layer)
        pred = torch.ones_like(true) if src is None else self.predictor.predict(layer, self._feats[src])
        self.confusion.update(layer, pred, true)
        mag = flat.abs()
        self.mass[layer, 0] += float(mag.sum(dtype=torch.float64))
        self.mass[layer, 1] += float((mag * pred).sum(dtype=torch.float64))
        if self._pred is not None:
            n, t = self._n[layer], len(pred)
            if n + t > len(self._pred):
                raise ValueError(f"recording capacity of {len(self._pred)} tokens exceeded")
            self._pred[n : n + t, layer] = pack_masks(pred)
            if self._true is not None:
                self._true[n : n + t, layer] = pack_masks(true)
            self._n[layer] = n + t
        self.seconds += time.perf_counter() - t0
        if self.apply and src is not None:
            return x.masked_fill(~pred.view(x.shape).to(x.device), 0)
        return None

    def summary(self) -> dict[str, Any]:
        """:meth:`MaskConfusion.summary` plus ``mass_recall`` (per layer and overall)."""
        out = self.confusion.summary()
        m = self.mass
        out["per_layer"]["mass_recall"] = (m[:, 1] / m[:, 0].clamp(min=1e-30)).tolist()
        out["overall"]["mass_recall"] = float(m[:, 1].sum() / m[:, 0].sum().clamp(min=1e-30))
        out["predictor_seconds"] = self.seconds
        return out

    def traces(self, model_meta: dict[str, Any], source: dict[str, Any] | None = None) -> tuple[ActivationTrace, ActivationTrace | None]:
        """The recorded ``(predicted, oracle)`` traces, token-aligned (oracle ``None`` without ``record_true``)."""
        if self._pred is None or not self._n[0]:
            raise ValueError("nothing recorded: run forward passes inside a context with record > 0")
        n, size = self._n[0], self.layout.intermediate_size
        if any(k != n for k in self._n):
            raise ValueError(f"layers recorded different token counts: {self._n}")
        src = dict(source or {})
        p = self.predictor
        pred_src = {**src, "kind": "predicted", "predictor": p.name, "config": p.describe()["config"],
                    "predicted_layers": p.predicted_layers(), "cost": p.cost().summary(),
                    "closed_loop": self.apply}
        true_src = {**src, "kind": "oracle", "tap": Tap.MID.value, "closed_loop": self.apply}
        pred = ActivationTrace(self._pred[:n].clone(), size, model_meta, pred_src)
        true = None if self._true is None else ActivationTrace(self._true[:n].clone(), size, model_meta, true_src)
        return pred, true


def model_meta(model: nn.Module, layout: FFNLayout, model_id: str | None) -> dict[str, Any]:
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return {"id": model_id or getattr(model.config, "_name_or_path", None), "dtype": dtype, **layout.describe()}


@contextmanager
def predicted_masks(model: nn.Module, predictor: Predictor, record: int = 0,
                    record_true: bool = True) -> Iterator[PredictionRun]:
    """Run the enclosed forward passes with ``predictor``'s masks applied (closed loop).

    Apply thresholds (``sparsify_``) before entering, so the threshold still acts on predicted-active
    neurons. The yielded :class:`PredictionRun` scores predictions against ``MID != 0`` as it would
    have been without the predictor at each layer (given the already-masked earlier layers).

    Args:
        record: record the masks of up to this many tokens (0: none) for :meth:`PredictionRun.traces`.
        record_true: also record the thresholded (oracle) masks.
    """
    layout = ffn_layout(model)
    run = PredictionRun(layout, predictor, apply=True, record=record, record_true=record_true)
    with tap_hooks(layout, run.taps, run):
        yield run


@contextmanager
def observe_predictions(model: nn.Module, predictor: Predictor, record: int = 0,
                        record_true: bool = True) -> Iterator[PredictionRun]:
    """Score ``predictor`` during the enclosed forward passes without changing them (open loop).

    Args: as :func:`predicted_masks`.
    """
    layout = ffn_layout(model)
    run = PredictionRun(layout, predictor, apply=False, record=record, record_true=record_true)
    with tap_hooks(layout, run.taps, run):
        yield run


@torch.inference_mode()
def collect_predicted_trace(
    model: nn.Module,
    predictor: Predictor,
    windows: torch.Tensor,
    model_id: str | None = None,
    source: dict[str, Any] | None = None,
    closed_loop: bool = False,
    progress: bool = True,
) -> tuple[ActivationTrace, ActivationTrace, MaskConfusion]:
    """Predicted and oracle traces of the same tokens, from one pass per window.

    Args:
        model: the (thresholded) model.
        windows: ``[n, seqlen]`` token ids.
        closed_loop: apply the predictions while recording (the oracle trace is then the thresholded
            mask each layer would have had given the masked earlier layers).

    Returns:
        ``(predicted, oracle, confusion)``; both traces ``[n * seqlen, L, ceil(I / 8)]``, token-aligned.
    """
    from tqdm.auto import tqdm

    from dormant.llm.sparsify import active_thresholds

    layout = ffn_layout(model)
    device = next(model.parameters()).device
    ctx = predicted_masks if closed_loop else observe_predictions
    with ctx(model, predictor, record=windows.numel()) as run:
        for i in tqdm(range(len(windows)), desc="trace", unit="win", disable=not progress):
            model(windows[i : i + 1].to(device), use_cache=False)
    src = {"windows": len(windows), "seqlen": int(windows.shape[1]), **(source or {})}
    thr = active_thresholds(model)
    if thr is not None:
        src["thresholds"] = {"site": thr.site, "mean_target": float(thr.targets.mean()), "calibration": thr.calibration}
    pred, true = run.traces(model_meta(model, layout, model_id), src)
    return pred, true, run.confusion
