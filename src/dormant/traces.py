"""Active-neuron traces: which neurons are non-zero, per token and layer, stored bit-packed.

A neuron ``i`` of layer ``l`` is *active* at token ``t`` when its FFN intermediate (the input of ``down``) is
non-zero after thresholds -- exactly the neurons whose gate row, up row and down column a sparse executor must
touch. :class:`ActivationTrace` is the shared currency of the predictors, the memory/compute accounting and the
prefetch simulator; it knows nothing of models, so :mod:`dormant.offload` reads traces without importing
:mod:`dormant.llm` (which records them: :func:`dormant.llm.masks.collect_trace`). Masks are packed 8 neurons per
byte (``numpy.packbits``, little bit order: bit ``j`` of byte ``k`` is neuron ``8k + j``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dormant.artifacts import ArtifactError, load_artifact, save_artifact

__all__ = ["pack_masks", "unpack_masks", "ActivationTrace"]


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
