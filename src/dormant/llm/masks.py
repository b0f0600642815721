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
    non-zero, what a gate-first executor knows before touching ``up``. Only intermediate-sized taps
    (``GATE``, ``UP``, ``ACT``, ``MID``) make sense here.
    """
    from tqdm.auto import tqdm

    from dormant.llm.sparsify import active_thresholds

    layout = ffn_layout(model)
    if tap not in (Tap.GATE, Tap.UP, Tap.ACT, Tap.MID) or tap not in layout.taps():
        raise ValueError(f"tap {tap.value!r} is not an intermediate-sized tap of this FFN")
    chunks: list[list[torch.Tensor]] = [[] for _ in range(layout.n_layers)]

    def record(layer: int, tap: Tap, x: torch.Tensor) -> None:
        chunks[layer].append(pack_masks(x.reshape(-1, x.shape[-1]) != 0))

    device = next(model.parameters()).device
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
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    meta = {"id": model_id or getattr(model.config, "_name_or_path", None), "dtype": dtype, **layout.describe()}
    return ActivationTrace(packed, layout.intermediate_size, meta, src)


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
