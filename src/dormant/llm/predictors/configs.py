"""The hyperparameters of the active-neuron predictors (torch-free, so the CLI checks flags without importing torch).

One ``Config`` per predictor of :data:`dormant.llm.predictors.base.PREDICTORS`: :class:`LowRankConfig`
(:mod:`~dormant.llm.predictors.lowrank`), :class:`EarlyLayerConfig` (:mod:`~dormant.llm.predictors.early_layer`),
:class:`ClusterConfig` (:mod:`~dormant.llm.predictors.cluster`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dormant.config import checked, field

__all__ = ["PREDICTOR_NAMES", "LowRankConfig", "EarlyLayerConfig", "ClusterConfig"]

PREDICTOR_NAMES = ("lowrank", "early_layer", "cluster")  # = dormant.llm.predictors.base.PREDICTORS


@dataclass
@checked
class LowRankConfig:
    rank: int = field(64, help="hidden width r of the D -> r -> I predictor network", ge=1)
    hidden_act: Literal["none", "relu"] = field("none", help="nonlinearity between the two low-rank factors")
    recall: float = field(0.99, help="recall target on the selection split: sets tau and the early-stopping score",
                         gt=0.0, le=1.0)
    density_ratio: float | None = field(None, help="instead of a recall target: predicted density budget as a "
                                        "multiple of the true density (tau and early stopping then maximise recall)", gt=0.0)
    epochs: int = field(4, help="maximum training epochs per layer (one-cycle learning-rate schedule)", ge=1)
    patience: int = field(2, help="stop after this many epochs without improvement on the selection split", ge=1)
    batch_size: int = field(1024, help="training tokens per step", ge=1)
    lr: float = field(3e-3, help="AdamW peak learning rate", gt=0.0)
    weight_decay: float = field(0.01, help="AdamW weight decay", ge=0.0)
    pos_weight: float = field(1.0, help="extra weight of active neurons on top of class balancing (1-p)/p",
                             gt=0.0)
    seed: int = field(0, help="initialisation and shuffling seed")


@dataclass
@checked
class EarlyLayerConfig:
    mode: Literal["linear", "nearest"] = field("linear", help="linear map from the source FFN input, or nearest stored pattern")
    source_layer: int = field(1, help="the early layer whose input (linear) or pattern (nearest) is read", ge=0)
    recall: float = field(0.99, help="recall target on the selection split that sets tau", gt=0.0, le=1.0)
    density_ratio: float | None = field(None, help="instead of a recall target: predicted density budget as a "
                                        "multiple of the true density", gt=0.0)
    # linear mode (same meaning as in LowRankConfig)
    rank: int = field(64, help="linear: rank r of the map", ge=1)
    hidden_act: Literal["none", "relu"] = field("none", help="linear: nonlinearity between the factors")
    epochs: int = field(4, help="linear: maximum epochs per layer", ge=1)
    patience: int = field(2, help="linear: early-stopping patience", ge=1)
    batch_size: int = field(1024, help="linear: tokens per step", ge=1)
    lr: float = field(3e-3, help="linear: AdamW peak learning rate", gt=0.0)
    weight_decay: float = field(0.01, help="linear: AdamW weight decay", ge=0.0)
    pos_weight: float = field(1.0, help="linear: extra weight of active neurons", gt=0.0)
    # nearest mode
    bank_size: int = field(8192, help="nearest: stored training tokens", ge=1)
    neighbours: int = field(64, help="nearest: K nearest stored patterns per token", ge=1)
    seed: int = field(0, help="seed (initialisation, shuffling, bank sampling)")

    def lowrank(self) -> LowRankConfig:
        return LowRankConfig(rank=self.rank, hidden_act=self.hidden_act, recall=self.recall,
                             density_ratio=self.density_ratio, epochs=self.epochs,
                             patience=self.patience, batch_size=self.batch_size, lr=self.lr,
                             weight_decay=self.weight_decay, pos_weight=self.pos_weight, seed=self.seed)


@dataclass
@checked
class ClusterConfig:
    k: int = field(64, help="number of centroids per layer (k = 1: a static hot-neuron mask)", ge=1)
    kmeans_iters: int = field(15, help="Lloyd iterations", ge=1)
    kmeans_tokens: int = field(8192, help="training tokens clustered (all training tokens are then labelled)",
                               ge=1)
    recall: float = field(0.99, help="recall target on the selection split that sets tau", gt=0.0, le=1.0)
    density_ratio: float | None = field(None, help="instead of a recall target: predicted density budget as a "
                                        "multiple of the true density", gt=0.0)
    epochs: int = field(6, help="classifier training epochs", ge=1)
    batch_size: int = field(512, help="classifier training tokens per step", ge=1)
    lr: float = field(3e-3, help="classifier AdamW learning rate", gt=0.0)
    weight_decay: float = field(0.01, help="classifier AdamW weight decay", ge=0.0)
    seed: int = field(0, help="initialisation and shuffling seed")
