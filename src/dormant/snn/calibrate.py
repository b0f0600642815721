"""Registry of post-conversion calibrations: every method is a configuration of the same network and neuron.

A method takes a converted :class:`~dormant.snn.network.SpikingNetwork`, calibration data (training images) and a
horizon T, and returns an outcome that can install its neuron state for any number of steps. ``causal`` methods
(their state for step t depends only on steps <= t) are calibrated once at the largest T of a sweep; the others
are calibrated per T.

Methods here: ``none`` (plain threshold-balanced conversion) and ``ftbc`` (Wu et al., ECCV 2024, arXiv
2403.18388). Further methods (bias/potential correction of Li et al. 2021, RTS shifts, ...) register the same way:
they set ``IFNeuron.bias``, ``IFNeuron.v_init`` or the conversion's ``shift``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from dormant.artifacts import load_artifact, save_artifact
from dormant.snn.ftbc import FTBCConfig, FTBCResult, calibrate_ftbc
from dormant.snn.network import SpikingNetwork

__all__ = ["CalibrationData", "CalibrationOutcome", "CalibrationMethod", "CALIBRATIONS", "get_calibration",
           "NoCalibration"]


@dataclass
class CalibrationData:
    """Training data for calibration.

    Attributes:
        x: ``[N, ...]`` normalised calibration inputs.
        holdout: held-out training inputs and labels for selection, or ``None``.
        chunk: steps per stateless call (memory bound).
        batch_size: images per held-out evaluation batch.
        progress: show progress bars.
    """

    x: torch.Tensor
    holdout: tuple[torch.Tensor, torch.Tensor] | None = None
    chunk: int | None = None
    batch_size: int = 100
    progress: bool = False


class CalibrationOutcome(Protocol):
    seconds: float

    def select(self, T: int) -> int: ...  # which variant (e.g. FTBC snapshot) serves T steps

    def apply_(self, snn: SpikingNetwork, T: int, snapshot: int | None = None) -> int: ...

    def save(self, path: str | Path) -> Path: ...


@dataclass
class NoCalibration:
    """Plain conversion: no per-step bias."""

    seconds: float = 0.0
    KIND = "dormant.NoCalibration"

    def select(self, T: int) -> int:
        return 0

    def apply_(self, snn: SpikingNetwork, T: int, snapshot: int | None = None) -> int:
        for nrn in snn.neurons.values():
            nrn.step_bias = torch.zeros(0, nrn.channels, device=nrn.theta.device)
        return 0

    def save(self, path: str | Path) -> Path:
        return save_artifact(path, self.KIND, 1, {}, {"seconds": self.seconds})

    @classmethod
    def load(cls, path: str | Path) -> NoCalibration:
        _, meta, _ = load_artifact(path, cls.KIND, (1,))
        return cls(meta["seconds"])


@dataclass(frozen=True)
class CalibrationMethod:
    """A registered calibration.

    Attributes:
        run: ``run(snn, data, T, cfg) -> outcome``.
        load: read an outcome saved by ``outcome.save``.
        causal: one calibration at the largest T serves every smaller T.
        config: the method's config dataclass (``None`` if it has none).
        help: one line for ``--help``.
    """

    run: Callable[[SpikingNetwork, CalibrationData, int, Any], CalibrationOutcome]
    load: Callable[[Path], CalibrationOutcome]
    causal: bool
    config: type | None
    help: str


def _run_none(snn: SpikingNetwork, data: CalibrationData, T: int, cfg: Any) -> NoCalibration:
    out = NoCalibration()
    out.apply_(snn, T)
    return out


def _run_ftbc(snn: SpikingNetwork, data: CalibrationData, T: int, cfg: FTBCConfig | None) -> FTBCResult:
    cfg = cfg or FTBCConfig()
    holdout = data.holdout if cfg.select == "holdout" else None
    return calibrate_ftbc(snn, data.x, T, cfg, holdout=holdout, chunk=data.chunk, eval_batch_size=data.batch_size,
                          progress=data.progress)


CALIBRATIONS: dict[str, CalibrationMethod] = {
    "none": CalibrationMethod(_run_none, NoCalibration.load, True, None, "plain conversion (no calibration)"),
    "ftbc": CalibrationMethod(_run_ftbc, FTBCResult.load, True, FTBCConfig,
                              "forward temporal bias correction (per layer, step and channel)"),
}


def get_calibration(name: str) -> CalibrationMethod:
    if name not in CALIBRATIONS:
        raise KeyError(f"unknown calibration {name!r}; registered: {', '.join(CALIBRATIONS)}")
    return CALIBRATIONS[name]
