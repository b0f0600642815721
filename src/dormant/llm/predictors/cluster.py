"""``cluster``: cluster the binary activation patterns of a layer and predict a centroid.

The authors' follow-up (Dhar et al., Euro-Par 2025, arXiv 2507.14179; ``Activation-Aware-Clustering``)
clusters binary FFN activation patterns into ``k`` centroids and predicts a cluster rather than
individual neurons. Here, per layer ``l``:

1. **Cluster** the training masks ``m`` ``{0,1}^[N, I]`` with Lloyd's k-means under squared
   Euclidean distance, which on binary vectors is the Hamming distance to a frequency centroid:
   ``C[j, i]`` = fraction of the members of cluster ``j`` with neuron ``i`` active. Initialisation:
   ``k`` distinct random training tokens (seeded); an emptied cluster is re-seeded with the token
   farthest from its centroid.
2. **Assign** at inference time with a linear classifier on the FFN input,
   ``j*(x) = argmax_j (x W + w0)_j`` (``W`` ``[D, k]``), trained with cross-entropy on the k-means
   labels (AdamW, standardised inputs folded into ``W`` afterwards).
3. **Predict** the centroid: score ``s_i = C[j*, i]`` and mask ``s >= tau``, with ``tau`` chosen on
   selection data for the recall target. Deployed, the centroids are ``k`` bit masks (``C >= tau``).

The fit record also reports the selection-split scores under *oracle* assignment (nearest centroid to the
true mask), the quantity the follow-up calls clustering precision.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F

from dormant.llm.adapters import Tap
from dormant.llm.predictors.base import (
    Predictor,
    layer_params_from,
    layer_params_tensors,
    operating_point,
)
from dormant.llm.predictors.configs import ClusterConfig
from dormant.llm.predictors.metrics import mask_metrics

__all__ = ["ClusterConfig", "ClusterPredictor", "kmeans_binary"]


def kmeans_binary(m: torch.Tensor, k: int, iters: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means of binary rows.

    Args:
        m: bool ``[N, I]`` patterns.
        k: clusters (``<= N``).
        iters: iterations.

    Returns:
        ``(centroids float [k, I] in [0, 1], labels long [N])``.
    """
    x = m.float()
    n = len(x)
    k = min(k, n)
    g = torch.Generator().manual_seed(seed)
    c = x[torch.randperm(n, generator=g)[:k]].clone()
    xx = x.sum(1)
    labels = torch.zeros(n, dtype=torch.long)
    for _ in range(iters):
        d = xx[:, None] - 2 * x @ c.T + (c * c).sum(1)[None, :]  # ||x - c||^2
        dist, new = d.min(1)
        counts = torch.bincount(new, minlength=k)
        c = torch.zeros_like(c).index_add_(0, new, x) / counts.clamp(min=1)[:, None]
        empty = (counts == 0).nonzero().flatten()
        if len(empty):
            far = dist.topk(len(empty)).indices
            c[empty] = x[far]
        if torch.equal(new, labels):
            break
        labels = new
    d = xx[:, None] - 2 * x @ c.T + (c * c).sum(1)[None, :]
    return c, d.argmin(1)


def _nearest(m: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    x = m.float()
    return (-2 * x @ c.T + (c * c).sum(1)[None, :]).argmin(1)


class ClusterPredictor(Predictor):
    """Per-layer k-means centroids of activation patterns, chosen by a linear classifier on the FFN input."""

    name = "cluster"
    Config = ClusterConfig

    def __init__(self, config: ClusterConfig, n_layers: int, hidden_size: int, n_neurons: int, gated: bool = True):
        super().__init__(config, n_layers, hidden_size, n_neurons, gated)
        self.params: list[dict[str, torch.Tensor] | None] = [None] * n_layers

    def source(self, layer: int) -> tuple[int, Tap] | None:
        return (layer, Tap.FFN_IN) if self.params[layer] is not None else None

    def assign(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Long ``[N]`` predicted cluster of each token from FFN inputs ``x`` ``[N, D]``."""
        p = self.params[layer]
        return (x.float() @ p["W"] + p["w0"]).argmax(1)

    def scores(self, layer: int, feats: torch.Tensor) -> torch.Tensor:
        return self.params[layer]["C"].float()[self.assign(layer, feats)]

    def _fit_layer(self, store, layer: int) -> tuple[dict[str, torch.Tensor], float, dict[str, Any]]:
        cfg = self.config
        t0 = time.perf_counter()
        y = store.masks(layer, "train")
        g = torch.Generator().manual_seed(cfg.seed)
        sub = torch.randperm(len(y), generator=g)[: cfg.kmeans_tokens] if 0 < cfg.kmeans_tokens < len(y) else None
        c, _ = kmeans_binary(y if sub is None else y[sub], cfg.k, cfg.kmeans_iters, cfg.seed)
        labels = _nearest(y, c)
        k = len(c)
        x = store.inputs(layer, "train").float()
        mu, sigma = x.mean(0), x.std(0).clamp(min=1e-6)
        z = (x - mu) / sigma
        w = (torch.randn(x.shape[1], k, generator=g) / math.sqrt(x.shape[1])).requires_grad_()
        w0 = torch.zeros(k, requires_grad=True)
        opt = torch.optim.AdamW([w, w0], lr=cfg.lr, weight_decay=cfg.weight_decay)
        for _ in range(cfg.epochs):
            perm = torch.randperm(len(z), generator=g)
            for s in range(0, len(z), cfg.batch_size):
                idx = perm[s : s + cfg.batch_size]
                loss = F.cross_entropy(z[idx] @ w + w0, labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        w_fold = (w.detach() / sigma[:, None]).contiguous()
        params = {"W": w_fold, "w0": w0.detach() - mu @ w_fold, "C": c}
        self.params[layer] = params
        xh, yh = store.inputs(layer, "select").float(), store.masks(layer, "select")
        with torch.no_grad():
            s = self.scores(layer, xh)
            tau = operating_point(s, yh, cfg.recall, cfg.density_ratio)["tau"]
            oracle = mask_metrics(c[_nearest(yh, c)] >= tau, yh)
            train_acc = float(((x @ params["W"] + params["w0"]).argmax(1) == labels).float().mean())
            select_acc = float((self.assign(layer, xh) == _nearest(yh, c)).float().mean())
        rec = {"k": k, "train_assign_acc": train_acc, "select_assign_acc": select_acc,
               "select_density": float((s >= tau).float().mean()), "select_true_density": float(yh.float().mean()),
               "oracle_assignment": {m: oracle[m] for m in ("recall", "precision", "pred_density")},
               "seconds": time.perf_counter() - t0}
        return params, tau, rec

    def fit(self, store, progress: bool = True, layers: list[int] | None = None) -> dict[str, Any]:
        """Cluster and train every layer (or only ``layers``); see the module docstring."""
        from tqdm.auto import tqdm

        records = self.info.setdefault("fit", {}).setdefault("per_layer", {})
        todo = list(range(self.n_layers)) if layers is None else layers
        for layer in tqdm(todo, desc=f"fit {self.name}", unit="layer", disable=not progress):
            params, tau, rec = self._fit_layer(store, layer)
            self.params[layer], self.tau[layer] = params, tau
            records[str(layer)] = rec
        return self.info["fit"]

    def layer_cost(self, layer: int, weight_bytes: int = 2) -> tuple[int, int, int]:
        k = self.params[layer]["C"].shape[0] if self.params[layer] is not None else self.config.k
        d, i = self.hidden_size, self.n_neurons
        classifier = (d * k + k) * weight_bytes
        centroid_bits = k * math.ceil(i / 8)  # deployed: one bit mask per centroid
        return classifier + centroid_bits, classifier + math.ceil(i / 8), 2 * d * k

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return layer_params_tensors(self.params)

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.params = layer_params_from(tensors, self.n_layers, ("W", "w0", "C"))
