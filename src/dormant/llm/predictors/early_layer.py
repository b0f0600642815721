"""``early_layer``: predict the masks of later layers from an early layer, the paper's proposal.

Dhar et al. (arXiv 2412.12178, Sec. V) observe that layer-1 activation patterns of similar inputs
match and suggest to "use the pattern in Layer 1 to predict the patterns of Layer 16-32", so that
the weights of all later layers can be prefetched as soon as layer 1 has run. Two readings of that
idea, with source layer ``s`` (default 1):

``linear``
    For layer ``l > s``, a low-rank network (the trainer of :mod:`~dormant.llm.predictors.lowrank`,
    default without nonlinearity, i.e. a rank-``r`` linear map) from the FFN input of layer ``s``
    to the logits of layer ``l``. Layers ``l <= s`` read their own FFN input (nothing earlier exists).
``nearest``
    A bank of ``B`` training tokens stores, per token, the active pattern of layer ``s`` and those of
    all layers ``l > s``. A new token's layer-``s`` pattern (observed after layer ``s`` ran) selects
    its ``K`` nearest bank tokens by Hamming distance; the score of neuron ``i`` of layer ``l`` is the
    fraction of those neighbours in which it is active, and ``score >= tau`` is predicted (``tau``
    on selection data, the smallest is the union of the ``K`` patterns). Layers ``l <= s`` are not
    predicted (fetched densely).
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch

from dormant.llm.adapters import Tap
from dormant.llm.predictors.base import Predictor, layer_params_from, layer_params_tensors
from dormant.llm.predictors.configs import EarlyLayerConfig
from dormant.llm.predictors.lowrank import (
    lowrank_layer_cost,
    lowrank_logits,
    train_lowrank_layer,
)
from dormant.traces import unpack_masks

__all__ = ["EarlyLayerConfig", "EarlyLayerPredictor"]


class EarlyLayerPredictor(Predictor):
    """Later layers' masks from an early layer's FFN input (``linear``) or pattern (``nearest``)."""

    name = "early_layer"
    Config = EarlyLayerConfig

    def __init__(self, config: EarlyLayerConfig, n_layers: int, hidden_size: int, n_neurons: int, gated: bool = True):
        super().__init__(config, n_layers, hidden_size, n_neurons, gated)
        if config.mode not in ("linear", "nearest"):
            raise ValueError(f"unknown early_layer mode {config.mode!r}; choose linear or nearest")
        if not 0 <= config.source_layer < n_layers:
            raise ValueError(f"source_layer {config.source_layer} out of range for {n_layers} layers")
        self.params: list[dict[str, torch.Tensor] | None] = [None] * n_layers  # linear
        self.bank_source: torch.Tensor | None = None  # nearest: packed [B, ceil(I/8)]
        self.bank: dict[int, torch.Tensor] = {}  # nearest: layer -> packed [B, ceil(I/8)]
        self._bank_float: torch.Tensor | None = None  # unpacked bank_source, built on first use

    @property
    def s(self) -> int:
        return self.config.source_layer

    def source(self, layer: int) -> tuple[int, Tap] | None:
        if self.config.mode == "linear":
            return (min(layer, self.s), Tap.FFN_IN) if self.params[layer] is not None else None
        return (self.s, Tap.MID) if layer in self.bank else None

    # -- nearest ------------------------------------------------------------------------------------
    def features(self, layer: int, tap: Tap, x: torch.Tensor) -> Any:
        if self.config.mode == "linear":
            return x
        return self.neighbours(x)

    def neighbours(self, pattern: torch.Tensor) -> torch.Tensor:
        """Long ``[N, K]`` indices of the bank tokens nearest (Hamming) to bool patterns ``[N, I]``."""
        q = pattern.float()
        if self._bank_float is None:
            self._bank_float = unpack_masks(self.bank_source, self.n_neurons).float()
        b = self._bank_float
        # Hamming = |q| + |b| - 2 q.b ; |q| is constant per row and does not change the ranking.
        d = b.sum(1)[None, :] - 2 * q @ b.T
        k = min(self.config.neighbours, len(b))
        return d.topk(k, dim=1, largest=False).indices

    def scores(self, layer: int, feats: torch.Tensor) -> torch.Tensor:
        if self.config.mode == "linear":
            p = self.params[layer]
            return lowrank_logits(feats.float(), p, self.config.hidden_act)
        out = np.empty((len(feats), self.n_neurons), dtype=np.float32)
        bank = self.bank[layer].numpy()
        idx = feats.numpy()
        for i in range(0, len(idx), 256):  # bound the [n, K, I] unpacked neighbour patterns
            bits = np.unpackbits(bank[idx[i : i + 256]], axis=-1, count=self.n_neurons, bitorder="little")
            out[i : i + 256] = bits.sum(axis=1, dtype=np.uint16)
        return torch.from_numpy(out) / feats.shape[1]

    # -- training -----------------------------------------------------------------------------------
    def fit(self, store, progress: bool = True, layers: list[int] | None = None) -> dict[str, Any]:
        """Train the linear maps of every layer (or only ``layers``), or build the pattern bank (all at once)."""
        from tqdm.auto import tqdm

        cfg = self.config
        records = self.info.setdefault("fit", {}).setdefault("per_layer", {})
        if cfg.mode == "linear":
            srcs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
            todo = list(range(self.n_layers)) if layers is None else layers
            for layer in tqdm(todo, desc=f"fit {self.name}", unit="layer", disable=not progress):
                s = min(layer, self.s)
                if s not in srcs:
                    srcs = {s: (store.inputs(s, "train").float(), store.inputs(s, "select").float())}
                x, xh = srcs[s]
                params, tau, rec = train_lowrank_layer(
                    x, store.masks(layer, "train"), xh, store.masks(layer, "select"), cfg.lowrank())
                self.params[layer], self.tau[layer] = params, tau
                records[str(layer)] = {k: v for k, v in rec.items() if k != "history"}
            return self.info["fit"]
        t0 = time.perf_counter()
        n = store.n_tokens("train")
        g = torch.Generator().manual_seed(cfg.seed)
        idx = torch.randperm(n, generator=g)[: min(cfg.bank_size, n)].sort().values
        self.bank_source, self._bank_float = store.packed_masks(self.s, "train")[idx].contiguous(), None
        for layer in tqdm(range(self.s + 1, self.n_layers), desc="bank", unit="layer", disable=not progress):
            self.bank[layer] = store.packed_masks(layer, "train")[idx].contiguous()
        self.choose_taus(store, cfg.recall, cfg.density_ratio, progress=progress)
        self.info["fit"].update(bank_tokens=len(idx), seconds=time.perf_counter() - t0)
        return self.info["fit"]

    # -- cost -----------------------------------------------------------------------------------
    def layer_cost(self, layer: int, weight_bytes: int = 2) -> tuple[int, int, int]:
        d, i, cfg = self.hidden_size, self.n_neurons, self.config
        if cfg.mode == "linear":
            return lowrank_layer_cost(d, i, cfg.rank, weight_bytes)
        b = len(self.bank_source) if self.bank_source is not None else cfg.bank_size
        k, row = min(cfg.neighbours, b), math.ceil(i / 8)
        # Per predicted layer: its bank column (resident) and K rows read; the shared search over the
        # layer-s bank (B rows, I bit compares each) is charged to the first predicted layer.
        first = layer == self.s + 1
        search_bytes, search_ops = (b * row, b * i) if first else (0, 0)
        return b * row + search_bytes, k * row + search_bytes, search_ops + k * i

    # -- persistence ------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        if self.config.mode == "linear":
            return layer_params_tensors(self.params)
        out = {"bank_source": self.bank_source}
        out.update({f"bank.{layer}": v for layer, v in self.bank.items()})
        return out

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.config.mode == "linear":
            self.params = layer_params_from(tensors, self.n_layers, ("A", "c", "B", "b"))
            return
        self.bank_source, self._bank_float = tensors["bank_source"], None
        self.bank = {int(k.split(".")[1]): v for k, v in tensors.items() if k.startswith("bank.")}
