"""Per-layer, per-tap zero-enforcing thresholds: the versioned artifact (calibrated by :mod:`dormant.llm.calibration`).

Rule (paper Eq. 7): an activation ``a`` at a thresholded tap becomes 0 when ``|a| < T[l, tap]`` and is
kept otherwise. ``T`` is the ``target``-quantile of ``|a|`` on calibration text, so a fraction
``target`` of the entries of every thresholded tensor becomes zero (paper Eqs. 1-6: the
``100*alpha``-th percentile over all tokens and neurons of the layer, computed per tap).

With a per-channel **score scale** ``s[l, tap, c]`` the rule reads the score ``|a_c| * s_c`` instead:
``a_c -> 0`` when ``|a_c| * s_c < T``, i.e. a per-channel threshold ``T / s_c`` on ``|a_c|``. WINA (arXiv
2505.19427) takes ``s_c = ||W[:, c]||_2``, the norm of the weight column ``a_c`` multiplies; CHESS (arXiv
2409.01366) takes ``s_c = E|up_c|`` on ``act(gate)``. One mechanism, several scores.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dormant.artifacts import ArtifactError, load_artifact, save_artifact
from dormant.config import UsageError
from dormant.llm.adapters import FFNLayout, Tap

__all__ = ["Thresholds", "normalize_targets"]


def normalize_targets(sparsity: float | Sequence[float] | dict[int, float] | torch.Tensor, n_layers: int
                      ) -> torch.Tensor:
    """One target for all layers, a per-layer list, ``{layer: target}`` (others 0) -> ``[n_layers]``; or a
    ``[n_layers, n_taps]`` tensor of per-tap targets, returned as it is (checked)."""
    if isinstance(sparsity, torch.Tensor) and sparsity.ndim == 2:
        t = sparsity.to(torch.float64)
        if t.shape[0] != n_layers:
            raise UsageError(f"got per-tap targets for {t.shape[0]} layers, the model has {n_layers}")
    elif isinstance(sparsity, dict):
        t = torch.zeros(n_layers, dtype=torch.float64)
        for layer, v in sparsity.items():
            if not 0 <= int(layer) < n_layers:
                raise UsageError(f"layer {layer} out of range for a {n_layers}-layer model")
            t[int(layer)] = float(v)
    elif isinstance(sparsity, (int, float)):
        t = torch.full((n_layers,), float(sparsity), dtype=torch.float64)
    else:
        t = torch.tensor([float(v) for v in sparsity], dtype=torch.float64)
        if len(t) != n_layers:
            raise UsageError(f"got {len(t)} per-layer targets for a {n_layers}-layer model")
    if not ((t >= 0) & (t < 1)).all():  # also refuses nan
        raise UsageError("target sparsities must lie in [0, 1)")
    return t


@dataclass
class Thresholds:
    """Zero-enforcing thresholds of one model and site. Version 1.

    Attributes:
        values: ``[n_layers, n_taps]`` float32 thresholds ``T`` (on the score, where a tap has a scale).
        targets: ``[n_layers]`` target sparsity each layer was calibrated for, or ``[n_layers, n_taps]`` one per tap.
        taps: the thresholded taps (the columns of ``values``).
        site: the site name (see :mod:`dormant.llm.sites`).
        model: what the thresholds were calibrated on (:meth:`FFNLayout.describe` plus ``id``).
        calibration: description of the calibration text (source, windows, seqlen, tokens, calib_on_eval).
        nonfinite: ``[n_layers, n_taps]`` int64 NaN/Inf activations seen (and dropped) during calibration.
        scales: ``{tap: [n_layers, channels]}`` float32 score scales (module docstring); taps without one use
            ``|a|`` itself.
        score: how the scores were made: ``magnitude``, ``wina`` or ``chess``.
    """

    values: torch.Tensor
    targets: torch.Tensor
    taps: tuple[Tap, ...]
    site: str
    model: dict[str, Any]
    calibration: dict[str, Any] = field(default_factory=dict)
    nonfinite: torch.Tensor | None = None
    scales: dict[Tap, torch.Tensor] = field(default_factory=dict)
    score: str = "magnitude"

    KIND = "dormant.Thresholds"
    VERSION = 1

    def __post_init__(self):
        self.values = torch.as_tensor(self.values, dtype=torch.float32)
        self.targets = torch.as_tensor(self.targets, dtype=torch.float64)
        if self.values.shape != (len(self.targets), len(self.taps)):
            raise ValueError(f"values {tuple(self.values.shape)} do not match {len(self.targets)} layers x {len(self.taps)} taps")
        if self.targets.ndim == 2 and self.targets.shape != self.values.shape:
            raise ValueError(f"per-tap targets {tuple(self.targets.shape)} do not match values {tuple(self.values.shape)}")
        self.scales = {Tap(t): torch.as_tensor(v, dtype=torch.float32) for t, v in self.scales.items()}
        for t, v in self.scales.items():
            if t not in self.taps or v.ndim != 2 or v.shape[0] != len(self.targets):
                raise ValueError(f"scale of {t.value} {tuple(v.shape)} does not fit {len(self.targets)} layers of "
                                 f"taps {[x.value for x in self.taps]}")
        if self.nonfinite is None:
            self.nonfinite = torch.zeros(self.values.shape, dtype=torch.int64)
        self.nonfinite = torch.as_tensor(self.nonfinite, dtype=torch.int64)
        if self.nonfinite.shape != self.values.shape:
            raise ValueError(f"nonfinite counts {tuple(self.nonfinite.shape)} do not match values {tuple(self.values.shape)}")

    @property
    def n_layers(self) -> int:
        return len(self.targets)

    def value(self, layer: int, tap: Tap) -> float:
        """The threshold ``T`` of ``(layer, tap)`` (on the score when the tap has a scale)."""
        return float(self.values[layer, self.taps.index(tap)])

    def channel_thresholds(self, layer: int, tap: Tap) -> float | torch.Tensor:
        """What ``|a|`` is compared with at ``(layer, tap)``: the scalar ``T``, or ``T / s`` per channel ``[C]``
        (``inf`` where ``s = 0``: a channel whose weight column is zero never matters)."""
        t = self.value(layer, tap)
        if tap not in self.scales:
            return t
        s = self.scales[tap][layer]
        return torch.where(s > 0, t / s.clamp(min=1e-30), torch.full_like(s, float("inf")))

    def layer_target(self, layer: int, tap: Tap) -> float:
        """The sparsity ``(layer, tap)`` was calibrated for."""
        t = self.targets[layer]
        return float(t[self.taps.index(tap)] if self.targets.ndim == 2 else t)

    def scaled(self, factor: float) -> Thresholds:
        """The same thresholds multiplied by ``factor`` (``0`` gives the dense model exactly)."""
        return Thresholds(self.values * factor, self.targets, self.taps, self.site, self.model, self.calibration,
                          self.nonfinite, self.scales, self.score)

    def validate(self, layout: FFNLayout, model_id: str | None = None) -> None:
        """Raise :class:`ArtifactError` if these thresholds were calibrated on another architecture."""
        theirs = self.model
        ours = layout.describe()
        for key in ("model_type", "n_layers", "hidden_size", "intermediate_size"):
            if theirs.get(key) != ours[key]:
                raise ArtifactError(
                    f"thresholds were calibrated for {theirs.get('id')!r} ({key}={theirs.get(key)}), "
                    f"but this model has {key}={ours[key]}"
                )
        if theirs.get("fingerprint") != ours["fingerprint"]:
            raise ArtifactError(f"thresholds fingerprint {theirs.get('fingerprint')} != model {ours['fingerprint']}")
        missing = [t.value for t in self.taps if t not in layout.taps()]
        if missing:
            raise ArtifactError(f"this model has no tap(s) {missing}")
        if model_id and theirs.get("id") and theirs["id"] != model_id:
            warnings.warn(f"thresholds were calibrated on {theirs['id']!r}, applying them to {model_id!r}", stacklevel=2)
        if not torch.isfinite(self.values).all() or (self.values < 0).any():
            raise ArtifactError("thresholds contain negative or non-finite values")
        widths = {lin.tap: lin.in_features for lin in layout.linears()}
        for t, v in self.scales.items():
            if not torch.isfinite(v).all() or (v < 0).any():
                raise ArtifactError(f"the score scale of {t.value} has negative or non-finite values")
            if t in widths and v.shape[1] != widths[t]:
                raise ArtifactError(f"the score scale of {t.value} has {v.shape[1]} channels, the model {widths[t]}")

    def save(self, path: str | Path) -> Path:
        meta = {
            "taps": [t.value for t in self.taps],
            "site": self.site,
            "model": self.model,
            "calibration": self.calibration,
        }
        tensors = {"values": self.values, "targets": self.targets, "nonfinite": self.nonfinite,
                   **{f"scale.{t.value}": v for t, v in self.scales.items()}}
        return save_artifact(path, self.KIND, self.VERSION, tensors, {**meta, "score": self.score})

    @classmethod
    def load(cls, path: str | Path) -> Thresholds:
        tensors, meta, _ = load_artifact(path, cls.KIND, (cls.VERSION,))
        try:
            return cls(
                values=tensors["values"],
                targets=tensors["targets"],
                taps=tuple(Tap(t) for t in meta["taps"]),
                site=meta["site"],
                model=meta["model"],
                calibration=meta.get("calibration", {}),
                nonfinite=tensors.get("nonfinite"),
                scales={Tap(k.removeprefix("scale.")): v for k, v in tensors.items() if k.startswith("scale.")},
                score=meta.get("score", "magnitude"),
            )
        except (KeyError, ValueError) as e:
            raise ArtifactError(f"{path}: inconsistent Thresholds artifact ({e})") from e

    def summary(self) -> dict[str, Any]:
        return {
            "site": self.site,
            "score": self.score,
            "taps": [t.value for t in self.taps],
            "mean_target": float(self.targets.mean()),
            "threshold_first_layer": self.values[0].tolist(),
            "threshold_last_layer": self.values[-1].tolist(),
            "nonfinite_values": {t.value: int(self.nonfinite[:, j].sum()) for j, t in enumerate(self.taps)},
            "calibration": self.calibration,
        }
