"""Configuration dataclasses of :mod:`dormant.snn` (no torch import, so the CLI stays light).

Each maps 1:1 onto command-line flags (:mod:`dormant.config`); library functions take them, never argparse. The
configs of runs (output folders, data splits, threads) live with the runs in :mod:`dormant.experiments`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from dormant.config import checked, field

__all__ = ["ZOO_MODELS", "DATASET_NAMES", "CALIBRATION_NAMES", "device_problem", "ConvertConfig", "FTBCConfig",
           "CorrectionConfig", "EnergyConfig"]

# The names of the tables they list (tests check they are equal): dormant.snn.models.MODELS,
# dormant.snn.datasets.DATASETS, dormant.snn.calibrate.CALIBRATIONS.
ZOO_MODELS = ("resnet20", "resnet32", "resnet44", "resnet56", "vgg16", "lenet")
DATASET_NAMES = ("cifar10-lossless", "cifar10-jpeg", "cifar10", "mnist")
CALIBRATION_NAMES = ("none", "bc", "pc", "rts", "ftbc")


def device_problem(value: str) -> str | None:
    """``check`` of a device name: auto, cpu, cuda or cuda:N."""
    if value in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", value):
        return None
    return "choose auto, cpu, cuda or cuda:N"


@dataclass
@checked
class ConvertConfig:
    # Defaults: the best plain-conversion setting on held-out *training* images (benchmarks/bench_snn_tuning.py,
    # README "Spiking networks"): 99th percentile per channel is first on ResNet-20 at every T <= 8 and within a
    # point of the best on the MNIST LeNet; the former default (99.99th per layer) gave 8% / 55% at T = 1.
    threshold: Literal["percentile", "max", "ltb"] = field(
        "percentile", help="threshold statistic of ReLU activations, or ltb: local threshold balancing (Bu et al. 2025)")
    percentile: float = field(99.0, help="percentile for threshold=percentile (over all activation values)",
                              gt=0.0, le=100.0)
    granularity: Literal["layer", "channel"] = field("channel", help="one threshold per layer or per channel")
    scale: float = field(1.0, help="multiply every threshold by this factor", gt=0.0)
    v0: float = field(0.5, help="initial membrane potential in units of theta", ge=0.0, le=1.0)
    shift: float = field(0.0, help="per-step membrane shift in units of theta (RTS uses 1/(2T))", ge=-1.0, le=1.0)
    maxpool: Literal["spike_count", "pre_neuron"] = field("spike_count", help="how max pooling is converted")
    ltb_batches: int = field(12, help="threshold=ltb: balancing updates (training batches)", ge=1)
    ltb_batch_size: int = field(100, help="threshold=ltb: images per balancing update", ge=1)
    ltb_step: float = field(1.0, help="threshold=ltb: step size c of the balancing update", gt=0.0)

    def __post_init__(self):
        for name, value, options in (("threshold", self.threshold, ("percentile", "max", "ltb")),
                                     ("granularity", self.granularity, ("layer", "channel")),
                                     ("maxpool", self.maxpool, ("spike_count", "pre_neuron"))):
            if value not in options:
                raise ValueError(f"{name} must be one of {options}, got {value!r}")
        if not 0 < self.percentile <= 100:
            raise ValueError("percentile must be in (0, 100]")

    @property
    def quantile(self) -> float:
        return 1.0 if self.threshold == "max" else self.percentile / 100


@dataclass
@checked
class FTBCConfig:
    alpha: float = field(0.5, help="step size of the bias update", gt=0.0)
    passes: int = field(4, help="passes over the calibration batches", ge=1)
    batches: int | None = field(None, help="calibration batches per pass (all calibration images if unset)", ge=1)
    batch_size: int = field(100, help="images per calibration batch", ge=1)
    target: Literal["relu", "clip"] = field("relu", help="ANN activation to match: the ANN's own (ReLU, or QCFS for "
                                            "QCFS nets), or ReLU clipped at theta")
    select: Literal["holdout", "last"] = field("holdout", help="snapshot per T: best on held-out training data, or last")
    patience: int | None = field(None, help="stop after this many passes without held-out improvement at any step",
                                 ge=1)
    implementation: Literal["cached", "reforward"] = field("cached", help="cached (O(L)) or straightforward (O(L^2))")

    def __post_init__(self):
        for name, value, options in (("target", self.target, ("relu", "clip")),
                                     ("select", self.select, ("holdout", "last")),
                                     ("implementation", self.implementation, ("cached", "reforward"))):
            if value not in options:
                raise ValueError(f"{name} must be one of {options}, got {value!r}")
        if self.passes < 1 or self.batch_size < 1 or self.alpha <= 0:
            raise ValueError("passes and batch_size must be >= 1 and alpha > 0")


@dataclass
@checked
class CorrectionConfig:
    """Bias / potential correction of Li et al. 2021 (:mod:`dormant.snn.corrections`)."""

    alpha: float = field(1.0, help="step size of the correction (1 = Li et al.'s one-shot correction)", gt=0.0)
    batches: int | None = field(2, help="calibration batches (all calibration images if unset)", ge=1)
    batch_size: int = field(100, help="images per calibration batch (memory grows with T x batch size)", ge=1)
    passes: int = field(1, help="passes over the calibration batches", ge=1)
    target: Literal["relu", "clip"] = field("relu", help="ANN activation to match: the ANN's own, or clipped at theta")

    def __post_init__(self):
        if self.target not in ("relu", "clip"):
            raise ValueError(f"target must be one of ('relu', 'clip'), got {self.target!r}")
        if self.passes < 1 or self.batch_size < 1 or self.alpha <= 0:
            raise ValueError("passes and batch_size must be >= 1 and alpha > 0")


@dataclass
@checked
class EnergyConfig:
    """Energy estimate (:mod:`dormant.snn.energy`); defaults: Horowitz, ISSCC 2014, 45 nm, 32-bit float."""

    e_ac_pj: float = field(0.9, help="energy of one accumulate (pJ)", gt=0.0)
    e_mac_pj: float = field(4.6, help="energy of one multiply-accumulate (pJ)", gt=0.0)
    analog_input: Literal["once", "every_step"] = field(
        "once", help="MACs of layers fed by the analog input: once (constant current) or at every step")

    def __post_init__(self):
        if self.analog_input not in ("once", "every_step"):
            raise ValueError(f"analog_input must be one of ('once', 'every_step'), got {self.analog_input!r}")
