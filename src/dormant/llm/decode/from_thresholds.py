"""Calibrated :class:`~dormant.llm.thresholds.Thresholds` -> the decode engine's :class:`SparsityPlan`.

The two describe the same rule (``|v| < t`` zeroed on the same tensors), so the mapping is exact:

=================  ==========================================================
Thresholds tap     SparsityPlan
=================  ==========================================================
Q_IN, K_IN, V_IN   ``inputs["q" | "k" | "v"]`` (per channel: ``T / s_c`` when scored, e.g. WINA)
O_IN               ``inputs["o"]``
GATE_IN, UP_IN     ``inputs["gate" | "up"]``
MID                ``mid`` (a scalar), or ``inputs["down"]`` when scored per channel
ACT                ``act`` (a scalar; per-channel CHESS scores have no engine path)
HEAD_IN            ``head`` (the LM head's input; its thresholds sit under the last layer)
=================  ==========================================================

Other taps (the ``paper`` site's gate/up/down outputs, the FFN input of the ``inputs`` site)
have no engine path and are refused with the list of those that do.
"""

from __future__ import annotations

import torch

from dormant.llm.adapters import FFNLayout, Tap
from dormant.llm.decode.plan import LayerPlan, SparsityPlan
from dormant.llm.thresholds import Thresholds

__all__ = ["ENGINE_TAPS", "plan_from_thresholds"]

_INPUTS = {Tap.Q_IN: "q", Tap.K_IN: "k", Tap.V_IN: "v", Tap.O_IN: "o", Tap.GATE_IN: "gate", Tap.UP_IN: "up"}
ENGINE_TAPS = (*_INPUTS, Tap.MID, Tap.ACT, Tap.HEAD_IN)


def plan_from_thresholds(thresholds: Thresholds, layout: FFNLayout) -> SparsityPlan:
    """The plan enforcing exactly ``thresholds`` (validated against ``layout``'s model)."""
    thresholds.validate(layout)
    bad = [t.value for t in thresholds.taps if t not in ENGINE_TAPS]
    if bad:
        raise ValueError(f"site {thresholds.site!r}: the decode engine has no path for tap(s) {', '.join(bad)}; "
                         f"it thresholds {', '.join(t.value for t in ENGINE_TAPS)}")
    if Tap.ACT in thresholds.taps and Tap.ACT in thresholds.scales:
        raise ValueError("per-channel act(gate) thresholds (CHESS scores) have no engine path; the engine's act "
                         "threshold is one scalar per layer")
    widths = {lin.tap: lin.in_features for lin in layout.linears()}
    layers = []
    for layer in range(layout.n_layers):
        inputs, mid, act = {}, None, None
        for tap in thresholds.taps:
            if tap is Tap.HEAD_IN:
                continue
            t = thresholds.channel_thresholds(layer, tap)
            if tap in _INPUTS:
                if bool((torch.as_tensor(t) > 0).any()):  # all zero: dense, kept in the faster rows layout
                    inputs[_INPUTS[tap]] = _vector(t, widths[tap])
            elif tap is Tap.MID:
                if isinstance(t, torch.Tensor):
                    inputs["down"] = _vector(t, widths[Tap.MID])
                else:
                    mid = float(t) if t > 0 else None
            else:
                act = float(t) if t > 0 else None
        layers.append(LayerPlan(inputs=inputs, mid=mid, act=act))
    meta = {"from": "dormant.Thresholds", "site": thresholds.site, "score": thresholds.score,
            "mean_target": float(thresholds.targets.mean()), "model": thresholds.model.get("id"),
            "calibration": {k: thresholds.calibration.get(k) for k in ("source", "windows", "seqlen", "allocation")}}
    head = None
    if Tap.HEAD_IN in thresholds.taps:
        head = _vector(thresholds.channel_thresholds(layout.n_layers - 1, Tap.HEAD_IN), widths[Tap.HEAD_IN])
    return SparsityPlan(layers=layers, meta=meta, head=head)


def _vector(t: float | torch.Tensor, width: int) -> torch.Tensor:
    if isinstance(t, torch.Tensor):
        # a zero score scale makes T / s infinite: that channel is always zero; the plan takes finite values
        v = t.float().cpu()
        return torch.where(torch.isfinite(v), v, torch.full_like(v, torch.finfo(torch.float32).max))
    return torch.full((width,), float(t), dtype=torch.float32)
