"""Active-neuron masks: which FFN neurons are non-zero, per token and layer, stored bit-packed.

A neuron ``i`` of layer ``l`` is *active* at token ``t`` when its intermediate ``MID[t, i]`` (the input
of ``down``) is non-zero after thresholds -- exactly the neurons whose gate row, up row and down
column a sparse executor must touch. :class:`ActivationTrace` is the shared currency of the
predictors, the memory/compute accounting and the prefetch simulator. Masks are packed 8 neurons per
byte (``numpy.packbits``, little bit order: bit ``j`` of byte ``k`` is neuron ``8k + j``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dormant.artifacts import ArtifactError, load_artifact, save_artifact
from dormant.llm.adapters import Tap, ffn_layout
from dormant.llm.hooks import tap_hooks

__all__ = ["pack_masks", "unpack_masks", "ActivationTrace", "collect_trace"]


def pack_masks(mask: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Bool ``[..., n]`` -> uint8 ``[..., ceil(n / 8)]``."""
    m = mask.cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    return torch.from_numpy(np.packbits(m.astype(bool), axis=-1, bitorder="little"))


def unpack_masks(packed: torch.Tensor | np.ndarray, n: int) -> torch.Tensor:
    """uint8 ``[..., ceil(n / 8)]`` -> bool ``[..., n]``."""
    p = packed.cpu().numpy() if isinstance(packed, torch.Tensor) else np.asarray(packed)
    return torch.from_numpy(np.unpackbits(p, axis=-1, count=n, bitorder="little").astype(bool))


@dataclass
class ActivationTrace:
    """Active-neuron sets of consecutive tokens. Version 1.

    Attributes:
        packed: uint8 ``[n_tokens, n_layers, ceil(n_neurons / 8)]``, tokens in text order.
        n_neurons: FFN intermediate size.
        model: :meth:`FFNLayout.describe` plus ``id`` and the weight ``dtype``.
        source: how the masks were made: ``kind`` (``"oracle"`` or ``"predicted"``), text, thresholds, ...
    """

    packed: torch.Tensor
    n_neurons: int
    model: dict[str, Any]
    source: dict[str, Any] = field(default_factory=dict)

    KIND = "dormant.ActivationTrace"
    VERSION = 1

    def __post_init__(self):
        if self.packed.dtype != torch.uint8 or self.packed.ndim != 3:
            raise ValueError("packed masks must be uint8 [n_tokens, n_layers, n_bytes]")
        if self.packed.shape[2] != (self.n_neurons + 7) // 8:
            raise ValueError(f"{self.packed.shape[2]} bytes per mask do not hold {self.n_neurons} neurons")

    @property
    def n_tokens(self) -> int:
        return self.packed.shape[0]

    @property
    def n_layers(self) -> int:
        return self.packed.shape[1]

    def masks(self, layer: int | None = None, tokens: slice | None = None) -> torch.Tensor:
        """Bool masks ``[n_tokens, n_layers, n_neurons]`` (or ``[n_tokens, n_neurons]`` for one layer)."""
        p = self.packed[tokens or slice(None)]
        if layer is not None:
            p = p[:, layer]
        return unpack_masks(p, self.n_neurons)

    def density(self) -> torch.Tensor:
        """``[n_layers]`` mean fraction of active neurons per token."""
        return torch.stack([self.masks(layer).float().mean() for layer in range(self.n_layers)])

    def save(self, path: str | Path) -> Path:
        meta = {"n_neurons": self.n_neurons, "model": self.model, "source": self.source}
        return save_artifact(path, self.KIND, self.VERSION, {"packed": self.packed}, meta)

    @classmethod
    def load(cls, path: str | Path) -> ActivationTrace:
        tensors, meta, _ = load_artifact(path, cls.KIND, (cls.VERSION,))
        try:
            return cls(tensors["packed"], int(meta["n_neurons"]), meta["model"], meta.get("source", {}))
        except (KeyError, ValueError) as e:
            raise ArtifactError(f"{path}: inconsistent ActivationTrace ({e})") from e


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
