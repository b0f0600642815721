"""Recording active-neuron traces from a model: :func:`collect_trace`.

The trace artifact itself (:class:`~dormant.traces.ActivationTrace`, bit-packed masks) lives in
:mod:`dormant.traces`, below every domain package, so that consumers such as the prefetch simulator read traces
without importing the model side.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from dormant.llm.adapters import FFNLayout, Tap, ffn_layout
from dormant.llm.hooks import tap_hooks
from dormant.llm.models import input_device
from dormant.traces import ActivationTrace, pack_masks

__all__ = ["collect_trace", "resident_params"]


@torch.inference_mode()
def collect_trace(
    model: nn.Module,
    windows: torch.Tensor,
    model_id: str | None = None,
    source: dict[str, Any] | None = None,
    max_tokens: int | None = None,
    progress: bool = True,
    tap: Tap = Tap.MID,
) -> ActivationTrace:
    """Record the non-zero masks of ``model`` (dense or sparsified) over ``windows`` ``[n, seqlen]``.

    By default the tap is ``MID`` (active neurons); ``tap=Tap.ACT`` records where ``act(gate)`` is
    non-zero, what a gate-first executor knows before touching ``up``. An input tap of a block linear
    (``Q_IN`` ... ``UP_IN``, input sparsity) records its active *columns*: each "neuron" of the trace is then one
    weight column of that linear (``source["unit"]``: one vector of ``out_features``), and the rest of the model
    counts as resident (``source["params"]``), so ``dormant simulate`` replays input sparsity too.
    """
    from tqdm.auto import tqdm

    from dormant.llm.sparsify import active_thresholds

    layout = ffn_layout(model)
    column = next((lin for lin in layout.linears() if lin.tap is tap and tap not in (Tap.MID, Tap.HEAD_IN)), None)
    if column is None and (tap not in (Tap.GATE, Tap.UP, Tap.ACT, Tap.MID) or tap not in layout.taps()):
        options = [t.value for t in layout.taps() if t not in (Tap.FFN_IN, Tap.OUT, Tap.HEAD_IN)]
        raise ValueError(f"tap {tap.value!r} cannot be traced; choose from {', '.join(options)}")
    chunks: list[list[torch.Tensor]] = [[] for _ in range(layout.n_layers)]

    def record(layer: int, tap: Tap, x: torch.Tensor) -> None:
        chunks[layer].append(pack_masks(x.reshape(-1, x.shape[-1]) != 0))

    device = input_device(model)
    limit = max_tokens or windows.numel()
    n_windows = min(len(windows), -(-limit // windows.shape[1]))
    t0 = time.perf_counter()
    with tap_hooks(layout, [tap], record):
        for i in tqdm(range(n_windows), desc="trace", unit="win", disable=not progress):
            model(windows[i : i + 1].to(device), use_cache=False)
    packed = torch.stack([torch.cat(c)[:limit] for c in chunks], dim=1)
    thr = active_thresholds(model)
    src = {"kind": "oracle", "tap": tap.value, "windows": n_windows, "seqlen": int(windows.shape[1]), "seconds": time.perf_counter() - t0}
    if thr is not None:
        src["thresholds"] = {"site": thr.site, "mean_target": float(thr.targets.mean()), "calibration": thr.calibration}
    src.update(source or {})
    n_units = layout.intermediate_size
    if column is not None:  # the unit is one column of this linear; everything else of a layer stays resident
        n_units = column.in_features
        src["unit"] = {"linear": column.name, "vectors": 1, "length": column.out_features}
        per_layer = sum(p.numel() for p in layout.layers[0].parameters()) - column.in_features * column.out_features
        src["params"] = {"attn_per_layer": int(per_layer), "head": resident_params(model, layout)["head"]}
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    meta = {"id": model_id or getattr(model.config, "_name_or_path", None), "dtype": dtype, **layout.describe()}
    return ActivationTrace(packed, n_units, meta, src)


def resident_params(model: nn.Module, layout: FFNLayout | None = None) -> dict[str, int]:
    """Non-FFN parameters read per layer (attention, norms) and the LM head read per token.

    The prefetch simulator reads them from a trace's ``source["params"]`` to cost what stays resident.
    """
    layout = layout or ffn_layout(model)
    ffn = {id(p) for f in layout.ffns for p in f.parameters()}
    per_layer = [sum(p.numel() for p in layer.parameters() if id(p) not in ffn) for layer in layout.layers]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {"attn_per_layer": int(sum(per_layer) / max(len(per_layer), 1)),
            "head": int(head.weight.numel()) if head is not None else 0}
