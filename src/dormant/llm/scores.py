"""Per-channel score scales: what a threshold compares, beyond the plain magnitude ``|a|``.

A scored tap zeroes ``a_c`` when ``|a_c| * s_c < T`` (:mod:`dormant.llm.thresholds`). The scores here:

* ``magnitude`` -- no scale: ``|a_c|`` (the paper; TEAL, arXiv 2408.14690).
* ``wina`` -- ``s_c = ||W[:, c]||_2``, the norm of the weight column that ``a_c`` multiplies, for every input tap of
  a linear layer (WINA, arXiv 2505.19427, Eq. 5: the contribution of input ``c`` to the output is at most
  ``|a_c| * ||W[:, c]||``). Taps that are not linear inputs keep the magnitude.
* ``chess`` -- ``s_c = E|up_c|`` on ``act(gate)`` (CHESS, arXiv 2409.01366, Sec. 3: the importance of neuron ``c``
  is ``|act(gate)_c| * E|up_c|``, the mean taken over calibration tokens); other taps keep the magnitude, as CHESS
  thresholds its attention inputs by magnitude.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dormant.llm.adapters import FFNLayout, Tap, ffn_layout
from dormant.llm.hooks import tap_hooks
from dormant.llm.models import input_device, onloaded

__all__ = ["score_scales", "column_norms", "mean_abs"]


def column_norms(layout: FFNLayout, tap: Tap) -> torch.Tensor:
    """``[n_layers, in_features]`` float32 column norms ``||W[:, c]||_2`` of the linear reading ``tap``."""
    lin = next((lin for lin in layout.linears() if lin.tap is tap), None)
    if lin is None:
        raise ValueError(f"{tap.value} is not the input of a linear layer of {layout.model_type}")
    norms = []
    with torch.no_grad():  # onloaded: weights a device map offloaded are read one block at a time
        if lin.name == "head":
            with onloaded(layout.model.get_output_embeddings()):
                norm = layout.linear_weight(0, "head").detach().float().norm(dim=0).cpu()
            return norm.expand(layout.n_layers, -1).clone()
        for layer in range(layout.n_layers):
            with onloaded(layout.layers[layer]):
                norms.append(layout.linear_weight(layer, lin.name).detach().float().norm(dim=0).cpu())
        return torch.stack(norms)


@torch.inference_mode()
def mean_abs(model: nn.Module, windows: torch.Tensor, tap: Tap, batch_size: int = 1) -> torch.Tensor:
    """``[n_layers, width]`` float32 mean of ``|a_c|`` at ``tap`` over every token of ``windows`` ``[n, seqlen]``."""
    layout = ffn_layout(model)
    sums: list[torch.Tensor | None] = [None] * layout.n_layers
    count = [0] * layout.n_layers

    def observe(layer: int, t: Tap, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).float().abs()
        sums[layer] = flat.sum(0) if sums[layer] is None else sums[layer] + flat.sum(0)
        count[layer] += flat.shape[0]

    device = input_device(model)
    with tap_hooks(layout, [tap], observe):
        for i in range(0, len(windows), batch_size):
            model(windows[i : i + batch_size].to(device), use_cache=False)
    return torch.stack([(s / n).cpu() for s, n in zip(sums, count)])


def score_scales(model: nn.Module, windows: torch.Tensor, taps: Sequence[Tap], score: str,
                 batch_size: int = 1) -> dict[Tap, torch.Tensor]:
    """The per-channel scales of ``score`` for ``taps`` (module docstring); ``{}`` for ``magnitude``.

    ``windows`` (``[n, seqlen]`` calibration ids) are read only by ``chess`` (the mean ``|up|``).
    """
    layout = ffn_layout(model)
    if score == "magnitude":
        return {}
    if score == "wina":
        inputs = {lin.tap for lin in layout.linears()}
        return {t: column_norms(layout, t) for t in taps if t in inputs}
    if score == "chess":
        if Tap.ACT not in taps:
            return {}
        if not layout.gated:
            raise ValueError("score 'chess' weighs act(gate) by E|up|: it needs a gated FFN")
        return {Tap.ACT: mean_abs(model, windows, Tap.UP, batch_size)}
    raise ValueError(f"unknown score {score!r}; choose from magnitude, wina, chess")
