"""Sparsification sites: which FFN taps get zero-enforcing thresholds.

=============  ==========================  =====================================================
site           taps                        origin
=============  ==========================  =====================================================
paper          GATE, UP, OUT               Dhar et al.'s released code: gate_proj, up_proj and
                                           down_proj outputs (non-gated: fc1 and fc2 outputs)
intermediate   MID                         act(gate)*up, the input of down_proj
gate_act       ACT                         act(gate) as in CATS (non-gated: act(fc1))
inputs         FFN_IN, MID                 inputs of gate/up and of down, as in TEAL / NNCF
=============  ==========================  =====================================================

For Phi-3's fused ``gate_up_proj`` the gate and up halves are thresholded separately, each with its
own calibrated threshold (the authors' code used one threshold, calibrated on the whole fused output).
"""

from __future__ import annotations

from dormant.llm.adapters import FFNLayout, Tap

__all__ = ["SITES", "site_taps"]

SITES: dict[str, tuple[Tap, ...]] = {
    "paper": (Tap.GATE, Tap.UP, Tap.OUT),
    "intermediate": (Tap.MID,),
    "gate_act": (Tap.ACT,),
    "inputs": (Tap.FFN_IN, Tap.MID),
}


def site_taps(site: str, layout: FFNLayout | None = None) -> tuple[Tap, ...]:
    """Taps of ``site``, restricted to those ``layout``'s FFN has (``GATE`` only exists in gated FFNs)."""
    if site not in SITES:
        raise ValueError(f"unknown site {site!r}; choose from: {', '.join(SITES)}")
    taps = SITES[site]
    if layout is not None:
        taps = tuple(t for t in taps if t in layout.taps())
    return taps
