"""Which of layer ``l+1``'s q/k/v input channels will be non-zero, known while layer ``l`` runs.

Input sparsity needs no predictor to *compute* sparsely (the input is known before its matmul), but an executor
that streams weights from slow memory must know the active columns a layer ahead to prefetch them. The residual
stream changes slowly from layer to layer (each block adds a small update), so layer ``l+1``'s q/k/v input
``x_(l+1) = norm_(l+1)(h_(l+1))`` is close to ``norm_(l+1)(h_l)``, computable from layer ``l``'s *input* ``h_l``
with weights already resident (one norm vector). The predictor scores channel ``c`` as

    r_c = |norm_(l+1)(h_l)_c| * s_c / T_c

(``s_c`` the tap's score scale -- 1 for magnitudes, ``||W[:, c]||`` for WINA -- and ``T_c`` layer ``l+1``'s
threshold), and predicts ``c`` active when ``r_c >= tau_(l+1)``. One ``tau`` per layer is the only fitted
parameter: the largest that keeps ``recall`` of the truly active channels on selection text
(:func:`~dormant.llm.predictors.base.choose_tau`). Layer 0 has no earlier layer and is predicted all active.
Scores on held-out text are pooled confusion counts (:mod:`dormant.llm.predictors.metrics`).

Beyond the papers: TEAL, WINA and CHESS compute on the known input and never predict it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dormant.artifacts import ArtifactError, load_artifact, save_artifact
from dormant.llm.adapters import FFNLayout, Tap, ffn_layout
from dormant.llm.hooks import tap_hooks
from dormant.llm.predictors.base import choose_tau
from dormant.llm.predictors.metrics import MaskConfusion
from dormant.llm.sparsify import active_thresholds
from dormant.llm.thresholds import Thresholds
from dormant.traces import ActivationTrace, pack_masks

__all__ = ["ATTN_INPUT_TAPS", "ResidualInputPredictor", "fit_residual_predictor", "score_residual_predictor",
           "residual_predicted_trace"]

ATTN_INPUT_TAPS = (Tap.Q_IN, Tap.K_IN, Tap.V_IN, Tap.QKV_IN)


@dataclass
class ResidualInputPredictor:
    """Per-layer decision thresholds ``tau`` of the residual-stream predictor of one q/k/v input tap. Version 1.

    Attributes:
        tap: the predicted tap (one of :data:`ATTN_INPUT_TAPS`).
        tau: float64 ``[n_layers]``; layer 0 is ``-inf`` (predicted all active).
        recall: the recall ``tau`` was chosen for on selection text.
        model: :meth:`FFNLayout.describe` of the model.
        fit: how it was fitted (tokens, thresholds' site and target).
    """

    tap: Tap
    tau: torch.Tensor
    recall: float
    model: dict[str, Any]
    fit: dict[str, Any] = field(default_factory=dict)

    KIND = "dormant.ResidualInputPredictor"
    VERSION = 1

    def save(self, path: str | Path) -> Path:
        meta = {"tap": self.tap.value, "recall": self.recall, "model": self.model, "fit": self.fit}
        return save_artifact(path, self.KIND, self.VERSION, {"tau": self.tau}, meta)

    @classmethod
    def load(cls, path: str | Path) -> ResidualInputPredictor:
        tensors, meta, _ = load_artifact(path, cls.KIND, (cls.VERSION,))
        return cls(Tap(meta["tap"]), tensors["tau"], meta["recall"], meta["model"], meta["fit"])

    def bytes_per_token(self, layout: FFNLayout, bits: int = 16) -> int:
        """Weights the prediction reads per token beyond the model's own: none -- the norm vectors and score
        scales are resident for the forward pass anyway -- and ``tau``, one value per layer."""
        return layout.n_layers * bits // 8


def _check(layout: FFNLayout, tap: Tap, thresholds: Thresholds) -> None:
    if tap not in ATTN_INPUT_TAPS or tap not in layout.taps():
        options = [t.value for t in ATTN_INPUT_TAPS if t in layout.taps()]
        raise ValueError(f"the residual predictor predicts a q/k/v input; this model's: {', '.join(options)}")
    if tap not in thresholds.taps:
        raise ValueError(f"the thresholds hold no {tap.value} tap (site {thresholds.site}): nothing to predict")


def _capture(model: nn.Module, layout: FFNLayout, window: torch.Tensor, tap: Tap
             ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """One forward over ``window`` ``[1, seqlen]``: each layer's input residual and ``tap``'s non-zero mask."""
    residual: dict[int, torch.Tensor] = {}
    active: dict[int, torch.Tensor] = {}

    def grab(layer: int, args, kwargs) -> None:
        h = args[0] if args else kwargs["hidden_states"]
        residual[layer] = h.detach().reshape(-1, h.shape[-1])

    def observe(layer: int, _tap: Tap, x: torch.Tensor) -> None:
        active[layer] = x.detach().reshape(-1, x.shape[-1]) != 0

    handles = [block.register_forward_pre_hook(lambda m, a, k, layer=layer: grab(layer, a, k), with_kwargs=True)
               for layer, block in enumerate(layout.layers)]
    try:
        with tap_hooks(layout, [tap], observe):
            model(window.to(next(model.parameters()).device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return residual, active


def _layer_pairs(model: nn.Module, windows: torch.Tensor, tap: Tap, thresholds: Thresholds
                 ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Per window and layer ``l+1 >= 1``: ``(l+1, r [tokens, C], active [tokens, C])`` with the model sparsified."""
    layout = ffn_layout(model)
    # per-channel T_c / s_c: r_c >= 1 is exactly the rule the thresholds enforce on the true input
    thr = {layer: thresholds.channel_thresholds(layer, tap) for layer in range(layout.n_layers)}
    for i in range(len(windows)):
        residual, active = _capture(model, layout, windows[i : i + 1], tap)
        for layer in range(1, layout.n_layers):
            x_hat = layout.attn_norm(layer)(residual[layer - 1]).float().abs()
            t = torch.as_tensor(thr[layer], dtype=torch.float32).to(x_hat.device)
            yield layer, (x_hat / t.clamp(min=1e-30)).cpu(), active[layer].cpu()


def _sparsified_by(model: nn.Module, thresholds: Thresholds) -> None:
    current = active_thresholds(model)
    if current is not thresholds:
        raise ValueError("apply the thresholds first (dormant.llm.sparsify.sparsified(model, thresholds)): the "
                         "predictor learns the sparsified model's active channels")


@torch.inference_mode()
def fit_residual_predictor(model: nn.Module, windows: torch.Tensor, thresholds: Thresholds, tap: Tap,
                           recall: float = 0.99) -> ResidualInputPredictor:
    """Fit ``tau`` per layer on selection ``windows`` ``[n, seqlen]`` (calibration text) of the sparsified
    ``model`` for ``recall`` of the truly active channels of ``tap``."""
    layout = ffn_layout(model)
    _check(layout, tap, thresholds)
    _sparsified_by(model, thresholds)
    positives: dict[int, list[torch.Tensor]] = {layer: [] for layer in range(1, layout.n_layers)}
    for layer, r, act in _layer_pairs(model, windows, tap, thresholds):
        positives[layer].append(r[act])
    tau = torch.full((layout.n_layers,), float("-inf"), dtype=torch.float64)
    for layer, pos in positives.items():
        tau[layer] = choose_tau(torch.cat(pos), recall)
    fit = {"tokens": int(windows.numel()), "site": thresholds.site, "score": thresholds.score,
           "mean_target": float(thresholds.targets.mean())}
    return ResidualInputPredictor(tap, tau, recall, layout.describe(), fit)


@torch.inference_mode()
def score_residual_predictor(model: nn.Module, windows: torch.Tensor, thresholds: Thresholds,
                             predictor: ResidualInputPredictor) -> MaskConfusion:
    """Pooled confusion counts per layer on held-out ``windows`` (layer 0 counted all-active)."""
    layout = ffn_layout(model)
    _check(layout, predictor.tap, thresholds)
    _sparsified_by(model, thresholds)
    if predictor.model.get("fingerprint") != layout.describe()["fingerprint"]:
        raise ArtifactError("the predictor was fitted on another model")
    conf = MaskConfusion(layout.n_layers)
    for layer, r, act in _layer_pairs(model, windows, predictor.tap, thresholds):
        conf.update(layer, r >= predictor.tau[layer], act)
    return conf


@torch.inference_mode()
def residual_predicted_trace(model: nn.Module, windows: torch.Tensor, thresholds: Thresholds,
                             predictor: ResidualInputPredictor, oracle: ActivationTrace) -> ActivationTrace:
    """The predicted masks of ``oracle``'s tokens (a :func:`~dormant.llm.masks.collect_trace` of the same tap over
    the same ``windows``), aligned with it for ``dormant simulate --predicted``."""
    layout = ffn_layout(model)
    _sparsified_by(model, thresholds)
    if oracle.source.get("tap") != predictor.tap.value:
        raise ValueError(f"the oracle trace records tap {oracle.source.get('tap')}, the predictor "
                         f"{predictor.tap.value}")
    per_layer: dict[int, list[torch.Tensor]] = {layer: [] for layer in range(layout.n_layers)}
    for layer, r, _ in _layer_pairs(model, windows, predictor.tap, thresholds):
        per_layer[layer].append(pack_masks(r >= predictor.tau[layer]))
        if layer == 1:
            per_layer[0].append(pack_masks(torch.ones_like(r, dtype=torch.bool)))
    n = oracle.n_tokens
    packed = torch.stack([torch.cat(per_layer[layer])[:n] for layer in range(layout.n_layers)], dim=1)
    source = {"kind": "predicted", "predictor": "residual", "tap": predictor.tap.value, "recall": predictor.recall,
              "fit": predictor.fit, "oracle": dict(oracle.source)}
    return ActivationTrace(packed, oracle.n_neurons, dict(oracle.model), source)
