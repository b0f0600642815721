"""Configuration dataclasses of :mod:`dormant.snn` (no torch import, so the CLI stays light).

Each maps 1:1 onto command-line flags (:mod:`dormant.config`); library functions take them, never argparse.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dormant.config import field

__all__ = ["ConvertConfig", "FTBCConfig", "CorrectionConfig", "EnergyConfig", "RunConfig", "QCFSTrainConfig"]


@dataclass
class ConvertConfig:
    threshold: Literal["percentile", "max"] = field("percentile", help="threshold statistic of ReLU activations")
    percentile: float = field(99.99, help="percentile for threshold=percentile (over all activation values)")
    granularity: Literal["layer", "channel"] = field("layer", help="one threshold per layer or per channel")
    scale: float = field(1.0, help="multiply every threshold by this factor")
    v0: float = field(0.5, help="initial membrane potential in units of theta")
    shift: float = field(0.0, help="per-step membrane shift in units of theta (RTS uses 1/(2T))")
    maxpool: Literal["spike_count", "pre_neuron"] = field("spike_count", help="how max pooling is converted")

    def __post_init__(self):
        for name, value, options in (("threshold", self.threshold, ("percentile", "max")),
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
class FTBCConfig:
    alpha: float = field(0.5, help="step size of the bias update")
    passes: int = field(4, help="passes over the calibration batches")
    batches: int | None = field(None, help="calibration batches per pass (all calibration images if unset)")
    batch_size: int = field(100, help="images per calibration batch")
    target: Literal["relu", "clip"] = field("relu", help="ANN activation to match: the ANN's own (ReLU, or QCFS for "
                                            "QCFS nets), or ReLU clipped at theta")
    select: Literal["holdout", "last"] = field("holdout", help="snapshot per T: best on held-out training data, or last")
    patience: int | None = field(None, help="stop after this many passes without held-out improvement at any step")
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
class CorrectionConfig:
    """Bias / potential correction of Li et al. 2021 (:mod:`dormant.snn.corrections`)."""

    alpha: float = field(1.0, help="step size of the correction (1 = Li et al.'s one-shot correction)")
    batches: int | None = field(2, help="calibration batches (all calibration images if unset)")
    batch_size: int = field(100, help="images per calibration batch (memory grows with T x batch size)")
    passes: int = field(1, help="passes over the calibration batches")
    target: Literal["relu", "clip"] = field("relu", help="ANN activation to match: the ANN's own, or clipped at theta")

    def __post_init__(self):
        if self.target not in ("relu", "clip"):
            raise ValueError(f"target must be one of ('relu', 'clip'), got {self.target!r}")
        if self.passes < 1 or self.batch_size < 1 or self.alpha <= 0:
            raise ValueError("passes and batch_size must be >= 1 and alpha > 0")


@dataclass
class EnergyConfig:
    """Energy estimate (:mod:`dormant.snn.energy`); defaults: Horowitz, ISSCC 2014, 45 nm, 32-bit float."""

    e_ac_pj: float = field(0.9, help="energy of one accumulate (pJ)")
    e_mac_pj: float = field(4.6, help="energy of one multiply-accumulate (pJ)")
    analog_input: Literal["once", "every_step"] = field(
        "once", help="MACs of layers fed by the analog input: once (constant current) or at every step")

    def __post_init__(self):
        if self.analog_input not in ("once", "every_step"):
            raise ValueError(f"analog_input must be one of ('once', 'every_step'), got {self.analog_input!r}")


@dataclass
class RunConfig:
    model: str = field("resnet20", help="zoo model: resnet20/32/44/56, vgg16, lenet")
    weights: str | None = field(None, help="checkpoint path (default: the zoo's pretrained weights)")
    qcfs: str | None = field(None, help="QCFS checkpoint (from `dormant snn train-qcfs`) to convert instead of the ReLU net")
    data: str | None = field(None, help="dataset (default: the model's): cifar10-lossless, cifar10-jpeg, cifar10, mnist")
    data_path: str | None = field(None, help="explicit dataset file/folder")
    holdout: int = field(1000, help="training images held out for selection (never test images)")
    calib_images: int | None = field(None, help="calibration images (thresholds and FTBC) from the rest; all if unset")
    split_seed: int = field(0, help="seed of the calibration/held-out split")
    test_images: int | None = field(None, help="evaluate on the first N test images (all if unset)")
    evaluate: Literal["test", "none"] = field("test", help="test: evaluate on the test split; none: held-out only")
    batch_size: int = field(100, help="images per simulation batch")
    chunk: int | None = field(None, help="time steps per stateless call (memory bound only)")
    device: str = field("auto", help="auto | cpu | cuda | cuda:N")
    threads: int | None = field(None, help="torch CPU threads (default: torch's choice)")
    out: str = field("runs/snn", help="output folder")
    progress: bool = field(True, help="show progress bars")


@dataclass
class QCFSTrainConfig:
    model: str = field("resnet20", help="zoo model whose ReLU weights are fine-tuned")
    weights: str | None = field(None, help="ReLU checkpoint (default: the zoo's pretrained weights)")
    levels: int = field(4, help="QCFS quantization levels L")
    init_percentile: float = field(99.5, help="initial theta per layer: this percentile of the ReLU activations")
    init_images: int = field(500, help="training images used for the initial theta")
    data: str = field("cifar10-jpeg", help="training data: cifar10-jpeg (lossy, 50k), cifar10-lossless (4k), cifar10")
    data_path: str | None = field(None, help="explicit dataset file/folder")
    train_images: int | None = field(None, help="random subset of the training images (all if unset)")
    val_images: int = field(1000, help="training images held out and scored after each epoch (monitoring only)")
    epochs: int = field(4, help="epochs (cosine learning rate over all of them)")
    batch_size: int = field(128, help="images per optimizer step")
    lr: float = field(0.02, help="initial learning rate (SGD)")
    momentum: float = field(0.9, help="SGD momentum")
    weight_decay: float = field(5e-4, help="weight decay (weights and theta)")
    augment: bool = field(True, help="random crop (pad 4) and horizontal flip")
    seed: int = field(0, help="seed of the split, the shuffling and the augmentation")
    device: str = field("auto", help="auto | cpu | cuda | cuda:N")
    threads: int | None = field(None, help="torch CPU threads (default: torch's choice)")
    out: str = field("runs/qcfs/resnet20_L4", help="output folder (checkpoints, history, final model)")
    progress: bool = field(True, help="show progress bars")

    def __post_init__(self):
        if self.levels < 1 or self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("levels, epochs and batch_size must be >= 1 and lr > 0")
