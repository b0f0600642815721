"""Sparsification sites: which taps get zero-enforcing thresholds.

=============  ===============================  =================================================
site           taps                             origin
=============  ===============================  =================================================
paper          GATE, UP, OUT                    Dhar et al.'s released code: gate_proj, up_proj and
                                                down_proj outputs (non-gated: fc1 and fc2 outputs)
intermediate   MID                              act(gate)*up, the input of down_proj
gate_act       ACT                              act(gate) as in CATS (non-gated: act(fc1))
inputs         FFN_IN, MID                      inputs of gate/up and of down, as in NNCF
linear         Q/K/V(or QKV)_IN, O_IN,          the input of every linear layer of a block, each its
               GATE_IN, UP_IN, MID              own threshold: TEAL (arXiv 2408.14690), WINA
linear_head    linear + HEAD_IN                 ... and the LM head's input (beyond TEAL)
chess          ACT, Q_IN, O_IN                  CHESS+ (arXiv 2409.01366): act(gate), and the inputs
                                                of q and o only ("selective" attention sparsity)
=============  ===============================  =================================================

How a tap's threshold is read (plain magnitude, WINA's column-norm-weighted score, CHESS's channel-wise score)
and how targets are spread over layers and taps (uniform, TEAL's greedy, dormant's loss allocation) are
configurations of :func:`dormant.llm.calibration.calibrate`, not sites.

For Phi-3's fused ``gate_up_proj`` the gate and up halves are thresholded separately, each with its
own calibrated threshold (the authors' code used one threshold, calibrated on the whole fused output).
"""

from __future__ import annotations

from dormant.llm.adapters import INPUT_TAPS, FFNLayout, Tap
from dormant.llm.configs import SITE_NAMES

__all__ = ["SITES", "site_taps"]

_BLOCK_INPUTS = tuple(t for t in INPUT_TAPS if t is not Tap.HEAD_IN)
SITES: dict[str, tuple[Tap, ...]] = {
    "paper": (Tap.GATE, Tap.UP, Tap.OUT),
    "intermediate": (Tap.MID,),
    "gate_act": (Tap.ACT,),
    "inputs": (Tap.FFN_IN, Tap.MID),
    "linear": _BLOCK_INPUTS,
    "linear_head": INPUT_TAPS,
    "chess": (Tap.ACT, Tap.Q_IN, Tap.O_IN),
}
assert tuple(SITES) == SITE_NAMES


def site_taps(site: str, layout: FFNLayout | None = None) -> tuple[Tap, ...]:
    """Taps of ``site``, restricted to those ``layout``'s FFN has (``GATE`` only exists in gated FFNs)."""
    if site not in SITES:
        raise ValueError(f"unknown site {site!r}; choose from: {', '.join(SITES)}")
    taps = SITES[site]
    if layout is not None:
        taps = tuple(t for t in taps if t in layout.taps())
    return taps
