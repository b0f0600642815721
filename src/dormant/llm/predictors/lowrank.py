"""``lowrank``: a per-layer low-rank network from the layer's FFN input to neuron logits.

Deja Vu (Liu et al., ICML 2023; ``sparse_predictor/main_mlp.py``) predicts the active ReLU neurons
of each OPT layer from that layer's MLP input with a two-layer low-rank network ``D -> r -> I``,
trained with class-weighted binary cross-entropy and stopped once selection-split recall passes 0.99;
ShadowLLM (Akhauri et al., EMNLP 2024) and LLM-in-a-flash (Alizadeh et al., ACL 2024) use the same
shape. Here, for layer ``l`` with FFN input ``x`` ``[N, D]`` (the tap ``FFN_IN``)::

    z = (x - mu) / sigma                     per-feature standardisation (training statistics)
    h = act(z A + c)                          A: [D, r], c: [r], act = identity or ReLU
    logits = h B + b                          B: [r, I], b: [I]
    loss = BCE(logits, m; pos_weight = w * (1 - p) / p)   p = true density of the layer

``m`` is the active mask ``MID != 0`` under the thresholds the pairs were collected with. Training
(AdamW, minibatches) is scored after every epoch on the selection windows by the **predicted density
at which selection recall reaches the target** (``tau`` from :func:`~dormant.llm.predictors.base.choose_tau`);
the best epoch is kept and training stops after ``patience`` epochs without improvement. The
standardisation is folded into ``A`` and ``c`` after training. The shared trainer
:func:`train_lowrank_layer` also serves the ``linear`` mode of
:mod:`~dormant.llm.predictors.early_layer`.
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
from dormant.llm.predictors.configs import LowRankConfig

__all__ = ["LowRankConfig", "LowRankPredictor", "train_lowrank_layer", "lowrank_logits", "lowrank_layer_cost"]


def lowrank_logits(x: torch.Tensor, p: dict[str, torch.Tensor], act: str) -> torch.Tensor:
    """``[N, I]`` logits of one layer's network ``p`` (keys ``A, c, B, b``) on inputs ``x`` ``[N, D]``."""
    h = x @ p["A"] + p["c"]
    if act == "relu":
        h = F.relu(h)
    return h @ p["B"] + p["b"]


def lowrank_layer_cost(d: int, i: int, r: int, weight_bytes: int) -> tuple[int, int, int]:
    """``(param_bytes, read_bytes, flops)`` per token of a ``D -> r -> I`` network (all of it is read)."""
    params = d * r + r + r * i + i
    return params * weight_bytes, params * weight_bytes, 2 * (d * r + r * i)


def train_lowrank_layer(
    x: torch.Tensor,
    y: torch.Tensor,
    xh: torch.Tensor,
    yh: torch.Tensor,
    cfg: LowRankConfig,
) -> tuple[dict[str, torch.Tensor], float, dict[str, Any]]:
    """Train one layer's network; returns ``(params, tau, record)``.

    Args:
        x, y: training inputs float ``[N, D]`` and active masks bool ``[N, I]``.
        xh, yh: selection-split inputs and masks (early stopping and ``tau``).
        cfg: hyperparameters.
    """
    g = torch.Generator().manual_seed(cfg.seed)
    d, n_out = x.shape[1], y.shape[1]
    mu, sigma = x.mean(0), x.std(0).clamp(min=1e-6)
    z, zh = (x - mu) / sigma, (xh - mu) / sigma
    r = cfg.rank
    p = {
        "A": (torch.randn(d, r, generator=g) / math.sqrt(d)).requires_grad_(),
        "c": torch.zeros(r, requires_grad=True),
        "B": (torch.randn(r, n_out, generator=g) / math.sqrt(r)).requires_grad_(),
        "b": torch.zeros(n_out, requires_grad=True),
    }
    dens = y.float().mean().clamp(1e-4, 1 - 1e-4)
    pos_weight = torch.tensor(cfg.pos_weight * float((1 - dens) / dens))
    opt = torch.optim.AdamW(list(p.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * math.ceil(len(z) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(steps, 1), pct_start=0.1)
    best, best_state, best_epoch, history = float("inf"), None, -1, []
    y = y.to(torch.uint8)  # labels as bytes; cast to float per minibatch
    t0 = time.perf_counter()
    for epoch in range(cfg.epochs):
        perm = torch.randperm(len(z), generator=g)
        total = 0.0
        for k in range(0, len(z), cfg.batch_size):
            idx = perm[k : k + cfg.batch_size]
            logits = lowrank_logits(z[idx], p, cfg.hidden_act)
            loss = F.binary_cross_entropy_with_logits(logits, y[idx].float(), pos_weight=pos_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        with torch.no_grad():
            op = operating_point(lowrank_logits(zh, p, cfg.hidden_act), yh, cfg.recall, cfg.density_ratio)
        history.append({"epoch": epoch, "loss": total / len(z), "select_density": op["density"],
                        "select_recall": op["recall"]})
        if op["loss"] < best - 1e-5:
            best, best_epoch = op["loss"], epoch
            best_state = {k: v.detach().clone() for k, v in p.items()}
        elif epoch - best_epoch >= cfg.patience:
            break
    assert best_state is not None
    # Fold the standardisation into the first factor: z A + c = x (A / sigma) + (c - (mu / sigma) A).
    a = best_state["A"] / sigma[:, None]
    params = {"A": a, "c": best_state["c"] - mu @ a, "B": best_state["B"], "b": best_state["b"]}
    with torch.no_grad():
        op = operating_point(lowrank_logits(xh, params, cfg.hidden_act), yh, cfg.recall, cfg.density_ratio)
    tau = op["tau"]
    record = {"best_epoch": best_epoch, "epochs_run": len(history), "select_density": op["density"],
              "select_recall": op["recall"],
              "select_true_density": float(yh.float().mean()), "seconds": time.perf_counter() - t0,
              "history": history}
    return {k: v.contiguous() for k, v in params.items()}, tau, record


class LowRankPredictor(Predictor):
    """Per-layer ``D -> r -> I`` network on the layer's own FFN input (Deja Vu / ShadowLLM style)."""

    name = "lowrank"
    Config = LowRankConfig

    def __init__(self, config: LowRankConfig, n_layers: int, hidden_size: int, n_neurons: int, gated: bool = True):
        super().__init__(config, n_layers, hidden_size, n_neurons, gated)
        self.params: list[dict[str, torch.Tensor] | None] = [None] * n_layers

    def source(self, layer: int) -> tuple[int, Tap] | None:
        return (layer, Tap.FFN_IN) if self.params[layer] is not None else None

    def scores(self, layer: int, feats: torch.Tensor) -> torch.Tensor:
        p = self.params[layer]
        return lowrank_logits(feats.to(p["A"].dtype), p, self.config.hidden_act)

    def fit(self, store, progress: bool = True, layers: list[int] | None = None) -> dict[str, Any]:
        """Train every layer (or only ``layers``) independently; see the module docstring."""
        from tqdm.auto import tqdm

        records = self.info.setdefault("fit", {}).setdefault("per_layer", {})
        todo = list(range(self.n_layers)) if layers is None else layers
        for layer in tqdm(todo, desc=f"fit {self.name}", unit="layer", disable=not progress):
            params, tau, rec = train_lowrank_layer(
                store.inputs(layer, "train").float(), store.masks(layer, "train"),
                store.inputs(layer, "select").float(), store.masks(layer, "select"), self.config,
            )
            self.params[layer], self.tau[layer] = params, tau
            records[str(layer)] = {k: v for k, v in rec.items() if k != "history"}
        return self.info["fit"]

    def layer_cost(self, layer: int, weight_bytes: int = 2) -> tuple[int, int, int]:
        return lowrank_layer_cost(self.hidden_size, self.n_neurons, self.config.rank, weight_bytes)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return layer_params_tensors(self.params)

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.params = layer_params_from(tensors, self.n_layers, ("A", "c", "B", "b"))
