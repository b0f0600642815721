"""ANN -> SNN conversion: trace, check, fold batch-norm, set thresholds, swap ReLUs for IF neurons.

The recipe of threshold-balanced rate conversion (Diehl et al. 2015; Rueckauer et al. 2017) as used by FTBC
(Wu et al., ECCV 2024, arXiv 2403.18388, Sec. 3):

1. Trace the ANN with ``torch.fx``; every operation must be one the conversion understands (table below), so
   nothing is converted silently wrong. A functional ``F.relu`` is rejected: it has no module to hold a threshold.
2. Fold each BatchNorm into the preceding conv/linear: ``W' = W * g``, ``b' = (b - mu) * g + beta`` with
   ``g = gamma / sqrt(var + eps)``. A BatchNorm that cannot be folded stays (it is affine, so it acts on spike
   trains per step as on rates).
3. Thresholds from training activations ``a = relu(z)`` of each ReLU: ``theta = scale * Q_q(a)`` per layer or per
   channel, with ``Q_q`` the q-quantile over all values (zeros included; q = 1 is the maximum). Channels that
   never fire in the data get the layer threshold. Or (``threshold="ltb"``) by local threshold balancing
   (:func:`balanced_thresholds`; Bu, Li, Yu, CVPR 2025).
4. Each ReLU becomes an :class:`~dormant.snn.neurons.IFNeuron` (reset by subtraction, ``v[0] = v0*theta``, spike
   amplitude theta, so no weight rescaling is needed). Each max pooling after a ReLU becomes spike-count max
   pooling (``maxpool="spike_count"``, see :mod:`dormant.snn.neurons`) or is moved in front of the neuron,
   ``maxpool(relu(z)) = relu(maxpool(z))`` (``maxpool="pre_neuron"``, max over per-step currents as in Bu et al.
   2024's LTB).
5. A :class:`~dormant.snn.qcfs.QCFS` activation (Bu et al., ICLR 2022) becomes an IF neuron whose threshold is its
   trained clip value theta (no activation statistics) and whose ANN mode is the QCFS activation itself.

Supported operations: modules Conv1d/2d, Linear, BatchNorm1d/2d, ReLU, AvgPool1d/2d, AdaptiveAvgPool1d/2d,
MaxPool2d, Flatten, Identity, Dropout (eval: identity), :class:`~dormant.snn.models.ZeroPadShortcut`; functions
and methods: residual ``+``/``torch.add``, ``torch.flatten``/``.flatten`` (from dim 1), ``.view``/``.reshape``
(keep the batch dimension first), ``.size``, ``.contiguous``, ``torch.cat`` (not on dim 0), slicing that keeps
dim 0, ``F.pad`` with zeros, ``F.avg_pool2d``, ``F.adaptive_avg_pool2d``, ``.mean`` over non-batch dims.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from dormant.snn.configs import ConvertConfig
from dormant.snn.graph import ConversionError, spiking_graph
from dormant.snn.network import SpikingNetwork

__all__ = ["ConvertConfig", "ConversionError", "build_spiking_network", "activation_thresholds", "balanced_thresholds",
           "set_thresholds_", "convert"]

log = logging.getLogger(__name__)


def build_spiking_network(ann: nn.Module, example: torch.Tensor, cfg: ConvertConfig | None = None,
                          meta: dict[str, Any] | None = None) -> SpikingNetwork:
    """The converted structure with unit thresholds (set them with :func:`set_thresholds_`).

    Args:
        ann: the trained ANN (left untouched: a copy is converted).
        example: one input batch ``[N, ...]`` (only its shape matters).
        cfg: conversion options.
        meta: extra description stored with the network (e.g. ``{"model": "resnet20"}``).
    """
    cfg = cfg or ConvertConfig()
    gm = spiking_graph(ann, example, cfg)
    info = dict(meta or {})
    info.update({"convert": asdict(cfg), "input_shape": list(example.shape[1:])})
    return SpikingNetwork(gm, info)


class _TopK:
    """Running top-k of the values of each row of ``[R, M]`` batches (exact order statistics near the top)."""

    def __init__(self, k: int):
        self.k = k
        self.values: torch.Tensor | None = None

    def update(self, rows: torch.Tensor) -> None:
        if self.values is not None:
            rows = torch.cat([self.values, rows], dim=1)
        self.values = rows.topk(min(self.k, rows.shape[1]), dim=1, sorted=False).values


@torch.no_grad()
def activation_thresholds(snn: SpikingNetwork, x: torch.Tensor, cfg: ConvertConfig, batch_size: int = 200,
                          progress: bool = False) -> dict[str, torch.Tensor]:
    """Thresholds ``[C]`` per neuron from the ANN-mode (ReLU) activations on training inputs ``x`` ``[N, ...]``.

    ``theta = scale * Q_q(a)`` with ``Q_q`` the nearest-rank q-quantile of all values of the layer (or of each
    channel): the value at 0-based descending rank ``n - ceil(q n)`` among ``n`` values. Neurons converted from
    QCFS (``levels > 0``) keep their trained threshold and are skipped.
    """
    names = [name for name, nrn in snn.neurons.items() if not int(nrn.levels)]
    if not names:
        return {}
    n_img = len(x)
    q = cfg.quantile
    tops: dict[str, _TopK] = {}
    ranks: dict[str, int] = {}
    dev = snn.device
    for i in tqdm(range(0, n_img, batch_size), desc="threshold stats", disable=not progress, leave=False):
        _, rec = snn.ann_forward(x[i : i + batch_size].to(dev), record=names)
        for name in names:
            a = rec[name]
            rows = a.transpose(0, 1).reshape(a.shape[1], -1) if cfg.granularity == "channel" else a.reshape(1, -1)
            if name not in tops:
                n = rows.shape[1] // len(a) * n_img  # values per row over the whole set
                ranks[name] = n - math.ceil(q * n)
                tops[name] = _TopK(ranks[name] + 1)
            tops[name].update(rows.float())
    out = {}
    for name in names:
        vals = tops[name].values.sort(dim=1, descending=True).values
        theta = vals[:, ranks[name]] * cfg.scale
        channels = snn.neurons[name].channels
        if cfg.granularity == "channel":
            layer = theta.max()
            if layer <= 0:
                raise ConversionError(f"neuron {name!r} never activates on the threshold data")
            # channel quantiles that are 0 (channel silent on the data): use the layer's largest channel threshold
            theta = torch.where(theta > 0, theta, layer)
        else:
            if theta.item() <= 0:
                raise ConversionError(f"neuron {name!r}: the {100 * q:g}th percentile of its activations is 0; "
                                      "use a higher percentile or threshold='max'")
            theta = theta.expand(channels)
        out[name] = theta.clone().cpu()
    return out


@torch.no_grad()
def balanced_thresholds(snn: SpikingNetwork, x: torch.Tensor, cfg: ConvertConfig, progress: bool = False
                        ) -> dict[str, torch.Tensor]:
    """Thresholds ``[C]`` by local threshold balancing (LTB; Bu, Li, Yu, CVPR 2025, arXiv 2409.03368).

    Every neuron layer's threshold starts at 0 and, on ``cfg.ltb_batches`` training batches of
    ``cfg.ltb_batch_size`` images, takes a step against the gradient of its own clipping error
    ``E[(z - theta)^2 ; z > theta]`` at its input currents ``z``, per channel (``channel`` granularity) or
    per layer::

        theta <- theta + c * 2 * mean_{N, S}((z - theta) * [z > theta])

    The forward pass is the ANN with every activation clipped at its current threshold, ``clamp(z, 0, theta)``
    after the update, so each layer balances against the clipped, already balanced layers below it (local: no
    gradient flows between layers, no labels are used). The cost is that of ``ltb_batches`` ANN forwards.
    Neurons converted from QCFS keep their trained thresholds; a channel whose threshold stays 0 (silent on
    the data) takes its layer's largest threshold.
    """
    names = {name for name, nrn in snn.neurons.items() if not int(nrn.levels)}
    theta: dict[str, torch.Tensor] = {}
    step = cfg.ltb_step

    def hook(name, neuron, z):
        if name not in names:
            return neuron.ann(z)
        dims = [0] + list(range(2, z.dim())) if cfg.granularity == "channel" else list(range(z.dim()))
        shape = (1, -1) + (1,) * (z.dim() - 2) if cfg.granularity == "channel" else (1,) * z.dim()
        th = theta.setdefault(name, z.new_zeros(neuron.channels if cfg.granularity == "channel" else 1))
        over = z - th.view(shape)
        th += step * 2 * (over * (over > 0)).mean(dim=dims)
        return torch.minimum(torch.relu(z), th.view(shape))

    bs = cfg.ltb_batch_size
    n_batches = min(cfg.ltb_batches, -(-len(x) // bs))
    if n_batches < cfg.ltb_batches:
        log.warning("threshold balancing: %d images give %d of the %d configured batches of %d", len(x), n_batches,
                    cfg.ltb_batches, bs)
    for i in tqdm(range(n_batches), desc="threshold balancing", disable=not progress, leave=False):
        snn.ann_forward(x[i * bs : (i + 1) * bs].to(snn.device), hook=hook)
    out = {}
    for name in names:
        th = theta[name].expand(snn.neurons[name].channels) if cfg.granularity == "layer" else theta[name]
        layer = th.max()
        if layer <= 0:
            raise ConversionError(f"neuron {name!r} never activates on the threshold data")
        out[name] = (torch.where(th > 0, th, layer) * cfg.scale).cpu().clone()
    return out


def set_thresholds_(snn: SpikingNetwork, thresholds: dict[str, torch.Tensor]) -> None:
    neurons = snn.neurons
    if set(thresholds) != set(neurons):
        raise ValueError(f"thresholds for {sorted(thresholds)} but neurons are {sorted(neurons)}")
    for name, theta in thresholds.items():
        neurons[name].set_theta_(theta)


def convert(ann: nn.Module, x: torch.Tensor, cfg: ConvertConfig | None = None, *, batch_size: int = 200,
            meta: dict[str, Any] | None = None, device: str | torch.device = "cpu", progress: bool = False
            ) -> SpikingNetwork:
    """Convert ``ann`` using training inputs ``x`` ``[N, ...]`` (normalised) for the thresholds.

    The ANN itself is never modified. Returns the :class:`SpikingNetwork` on ``device``.
    """
    cfg = cfg or ConvertConfig()
    snn = build_spiking_network(ann, x[:1], cfg, meta).to(device)
    thresholds = {name: nrn.theta.cpu() for name, nrn in snn.neurons.items()}  # QCFS: trained theta
    if cfg.threshold == "ltb":
        thresholds.update(balanced_thresholds(snn, x, cfg, progress))
    else:
        thresholds.update(activation_thresholds(snn, x, cfg, batch_size, progress))
    set_thresholds_(snn, thresholds)
    snn.meta["threshold_data"] = {"n": len(x)}
    return snn
